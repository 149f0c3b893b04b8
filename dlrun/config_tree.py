"""Where the `configs/` tree is and what its groups offer. No dlrun imports but errors, and no
torch: the CLI, the registries and the checks all read it."""

from __future__ import annotations

import functools
from pathlib import Path

from dlrun.errors import DlrunError


def configs_dir() -> Path:
    """The `configs/` tree: inside the package when installed from a wheel, beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise DlrunError(f"cannot find dlrun's configs/ beside {here}: reinstall dlrun")


@functools.cache
def group_options(group: str) -> list[str]:
    """The option names of a config group (`data` -> ['cifar10', 'csv', 'digits', ...])."""
    folder = configs_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _load(group: str, name: str) -> dict:
    """A group option's own keys merged over the configs its defaults list pulls in from the
    same group (`- csv`, `- base/torchvision@_here_`), as Hydra composes them."""
    import yaml

    path = configs_dir() / group / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text()) or {}
    merged: dict = {}
    for entry in doc.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_" and not entry.startswith("/"):
            merged.update(_load(group, entry.split("@")[0]))
    return {**merged, **doc}


@functools.cache
def option_values(group: str, key: str) -> dict[str, str]:
    """option -> its value of the top-level `key` (`data`, `family` -> {'digits': 'image', ...}),
    for the options that set it."""
    values = {}
    for option in group_options(group):
        doc = _load(group, option)
        if key in doc:
            values[option] = str(doc[key])
    return values
