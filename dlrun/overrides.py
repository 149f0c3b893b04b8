"""Override values as Hydra reads and writes them: no torch, no dlrun imports but errors, so the
CLI and the sweepers share them without importing each other."""

from __future__ import annotations

import re
from typing import Any

from dlrun.errors import DlrunError, first_line

PLAIN = re.compile(r"[A-Za-z0-9_/.+@%:-]+")


def override_value(line: str) -> Any:
    """The value of one override as Hydra reads it (a quoted path comes back unquoted)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides([line])[0].value()
    except Exception as e:  # noqa: BLE001
        raise DlrunError(f"cannot read the override {line}: {first_line(e)}") from None


def hydra_quote(value: str) -> str:
    """A string as a Hydra override value that reads back as exactly that string. Inside
    single quotes only a quote, and backslashes before a quote or at the end, are escaped;
    `${...}` still interpolates, as Hydra's own `hydra.run.dir` default does."""
    if PLAIN.fullmatch(value) and isinstance(override_value(f"k={value}"), str):
        return value
    escaped = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m[1] * 2, escaped)
    return f"'{escaped}'"
