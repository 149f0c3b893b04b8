"""The vocabulary of config checks: what a key accepts (`Rule`) and which names exist
(`Registry`). A leaf module (no torch, no other dlrun module but errors), so that every
optimizer, schedule, data kind and model can declare the rules of its own keys."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dlrun.errors import DlrunError, closest


@dataclass(frozen=True)
class Rule:
    """What a key accepts. `kind`: int, float, bool, str, choice; `words`: strings also accepted."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself not allowed
    hi_open: bool = False  # hi itself not allowed
    choices: tuple[str, ...] = ()
    words: tuple[str, ...] = ()
    nullable: bool = False
    each: bool = False  # a list of such values is accepted too
    length: int | None = None  # only a list of exactly this many such values (Adam's betas: 2)
    keyed: bool = False  # a mapping of names to such values (per-column sizes); checked per entry

    def describe(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(self.choices)
        elif self.kind in ("bool", "str"):
            text = {"bool": "true or false", "str": "a string"}[self.kind]
        else:
            noun = "an integer" if self.kind == "int" else "a number"
            lo = f"{'>' if self.lo_open else '>='} {_num(self.lo)}" if self.lo is not None else ""
            hi = f"{'<' if self.hi_open else '<='} {_num(self.hi)}" if self.hi is not None else ""
            if self.lo is not None and self.hi is not None:
                text = f"{noun} {lo} and {hi}"
            elif self.lo is not None:
                text = f"{noun} {lo}"
            elif self.hi is not None:
                text = f"{noun} {hi}"
            else:
                text = noun
        if self.words:
            text += " or " + " or ".join(repr(w) for w in self.words)
        if self.keyed:
            text = f"a mapping of names to values, each {text}"
        elif self.length is not None:
            text = f"a list of exactly {self.length} values, each {text}"
        elif self.each:
            text += " (or a list of them)"
        if self.nullable:
            text += " or null"
        return text

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.keyed:
            one = replace(self, keyed=False, nullable=False)
            return isinstance(value, dict) and all(one.accepts(v) for v in value.values())
        if self.length is not None:
            one = replace(self, length=None, each=False, nullable=False)
            return (
                isinstance(value, (list, tuple))
                and len(value) == self.length
                and all(map(one.accepts, value))
            )
        if self.each and isinstance(value, (list, tuple)):
            return len(value) > 0 and all(self.accepts(v) for v in value)
        if isinstance(value, str) and value in self.words:
            return True
        if self.kind == "choice":  # `trainer.precision=16` arrives as the int 16
            return not isinstance(value, bool) and str(value) in self.choices
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return self.hi is None or value < self.hi or (value == self.hi and not self.hi_open)


def _num(x: float) -> str:
    """A bound as a reader writes it: 4294967295, not 4.29497e+09; 1e-07 stays short."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def Int(lo: float | None = None, hi: float | None = None, **kw: Any) -> Rule:
    return Rule("int", lo, hi, **kw)


def Float(lo: float | None = None, hi: float | None = None, **kw: Any) -> Rule:
    return Rule("float", lo, hi, **kw)


def Choice(*choices: str, **kw: Any) -> Rule:
    return Rule("choice", choices=choices, **kw)


PROB = Float(0, 1)
POSITIVE = Float(0, lo_open=True)
BOOL = Rule("bool")
STR = Rule("str")


@functools.cache
def modules_with_build(package: str) -> list[str]:
    """The modules of `package` that define a top-level `build` function, found by reading
    their source rather than importing them (which would import torch)."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    return sorted(
        path.stem
        for folder in folders
        for path in Path(folder).glob("*.py")
        if re.search(r"^def build\(", path.read_text(encoding="utf-8"), re.M)
    )


class Registry:
    """Names -> implementations: registered ones, or by convention the module `<package>.<name>`
    for each module of `package` that defines `build`. An unknown name is a user error that
    lists the known ones, never a fallback."""

    def __init__(self, what: str, key: str, package: str | None = None):
        self.what, self.key, self.package = what, key, package
        self._added: dict[str, Any] = {}
        self._rules: dict[str, dict[str, Rule]] = {}

    def register(self, name: str, impl: Any, rules: dict[str, Rule] | None = None) -> None:
        """Make `name` resolve to `impl` (a module, or any object with the module's attributes);
        `rules` checks its keys (else `impl.RULES`, if it has them)."""
        self._added[name] = impl
        if rules is not None:
            self._rules[name] = rules

    def names(self) -> list[str]:
        found = modules_with_build(self.package) if self.package else []
        return sorted(set(found) | set(self._added))

    def check(self, name: str) -> None:
        """A user error unless `name` is known (cheap: no module is imported)."""
        if name not in self.names():
            hint = closest(str(name), self.names())
            raise DlrunError(
                f"{self.key}={name} is not a known {self.what}"
                + (f" (did you mean {hint}?)" if hint else "")
                + f": use one of {', '.join(self.names())}"
            )

    def get(self, name: str) -> Any:
        """The module behind `name`."""
        self.check(name)
        if name in self._added or self.package is None:
            return self._added[name]
        return importlib.import_module(f"{self.package}.{name}")

    def rules(self, name: str) -> dict[str, Rule]:
        """The value rules the implementation declares for its config keys (`RULES`)."""
        if name in self._rules:
            return self._rules[name]
        return dict(getattr(self.get(name), "RULES", {}))
