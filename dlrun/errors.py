"""The one exception type for mistakes a user can make and fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class DlrunError(Exception):
    """A user-fixable problem; the CLI prints its message and exits with code 2."""


def closest(word: str, options: Iterable[str]) -> str | None:
    """The option most like a misspelt `word`, if any is close (for "did you mean" hints)."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return match[0] if match else None


def first_line(error: BaseException) -> str:
    """An exception's message without the context lines Hydra, OmegaConf and torch add below it
    (its type name when it has no message)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def parse_args(parser: Any, argv: Any, usage: str) -> Any:
    """`argv` parsed by the argparse `parser`. A bad argument (argparse has printed what was
    wrong) is a DlrunError showing `usage`; --help exits 0 as argparse does."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        if e.code:
            raise DlrunError(f"usage: {usage}") from None
        raise
