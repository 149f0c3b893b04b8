"""The run directory: what each file is called, atomic writes, and reading a past run.

Light on purpose (no torch at import): `dlrun runs` and the CLI use it too.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlrun.errors import DlrunError

METRICS = "metrics.csv"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
LOSS_PLOT = "loss.png"
CONFIG = Path(".hydra") / "config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"


def write_atomic(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through `write(file)` into a temporary file beside `path`, then rename it
    over `path`: a crash or Ctrl-C mid-write never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; runs are not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete the temporary files of `write_atomic` that a killed process left in `run_dir`
    (the files they were meant to replace are intact); returns what was removed."""
    stale = sorted(Path(run_dir).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=2, allow_nan=True))


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The rows of a run's metrics.csv as numbers (an empty list if there is none)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


class MetricsLog:
    """metrics.csv, one row per epoch, rewritten atomically as each epoch ends; a resumed run
    keeps the rows of the epochs its checkpoint holds."""

    def __init__(self, path: Path, keep_epochs: int):
        self.path = Path(path)
        self.rows = [r for r in read_metrics(self.path.parent) if r["epoch"] <= keep_epochs]
        self._write_all()

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        self._write_all()

    def _write_all(self) -> None:
        def write(f: Any) -> None:
            if self.rows:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(self.rows[0])
                w.writerows([int(v) if k == "epoch" else float(v) for k, v in r.items()] for r in self.rows)

        write_atomic(self.path, write)


def claim(path: str | Path) -> Path:
    """Create the directory `path` for this process alone and return it. When it exists
    already (another run that started in the same second, in this process or another),
    take `path_1`, `path_2`, ... instead: `os.mkdir` fails for all but one claimant."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        candidate = path.with_name(f"{path.name}_{n}") if n else path
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


def existing_run(run_dir: str | Path, need: str = SUMMARY) -> Path:
    """`run_dir` as a Path, or a user error saying why it is not a dlrun run directory."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise DlrunError(f"run directory {run_dir} does not exist: give a directory under outputs/")
    if not (path / CONFIG).is_file():
        raise DlrunError(
            f"{run_dir} is not a dlrun run directory (no {CONFIG}): give a directory that `dlrun train` wrote"
        )
    if need and not (path / need).is_file():
        raise missing(run_dir, need)
    return path


def missing(run_dir: str | Path, name: str) -> DlrunError:
    """The error for a run directory without `name` (best.pt, checkpoint.pt...)."""
    return DlrunError(f"{run_dir} has no {name}: the run did not get far enough to write it")


def load_weights(model: Any, run_dir: Path, name: str = BEST, device: Any = "cpu") -> None:
    """Load a run's saved weights (best.pt or checkpoint.pt) into `model`; only tensors and
    plain data are unpickled (weights_only=True)."""
    import torch

    path = Path(run_dir) / name
    if not path.is_file():
        raise missing(run_dir, name)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])


def load_config(run_dir: Path) -> Any:
    """The composed config a run was started with."""
    from omegaconf import OmegaConf

    return OmegaConf.load(Path(run_dir) / CONFIG)
