"""The run directory: what each file is called, atomic writes, and reading a past run.

Light on purpose (no torch at import): `dlrun runs` and the CLI use it too.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlrun.errors import DlrunError, first_line

METRICS = "metrics.csv"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
LOSS_PLOT = "loss.png"
CONFIG = Path(".hydra") / "config.yaml"
# `--weights` of the commands that read a run (eval, predict, export, interpret): which file.
WEIGHTS = {"best": BEST, "last": CHECKPOINT}
OVERRIDES = Path(".hydra") / "overrides.yaml"
# logger=mlflow with a SQLite store: the runs' artifacts (copies of their files, summary.json too)
# go into this folder beside the database, under outputs/; `dlrun runs` does not list them as runs.
MLFLOW_ARTIFACTS = "mlartifacts"


def add_weights_option(parser: Any) -> None:
    """The `--weights best|last` option of an argparse `parser`; `WEIGHTS[args.weights]` is the file."""
    parser.add_argument(
        "--weights", choices=list(WEIGHTS), default="best",
        help=f"best: {BEST}, the best epoch's weights (default); last: {CHECKPOINT}",
    )  # fmt: skip


def write_atomic(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through `write(file)` into a temporary file beside `path`, then rename it
    over `path`: a crash or Ctrl-C mid-write never leaves a half-written file. A full disk
    or a read-only folder is a user error that names the file and the last good checkpoint
    (the file that was there before is untouched)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; runs are not
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        problem = storage_problem(e)
        if problem:
            full = problem in (NO_SPACE, NO_QUOTA)
            fix = (
                "free some space, then resume the run"
                if full
                else "write runs to a writable folder (hydra.run.dir=DIR)"
            )
            raise DlrunError(f"{problem} while writing {path}; {last_checkpoint(path.parent)}: {fix}") from e
        raise


# errno -> what the user is told; each means the disk, not dlrun, refused the write.
NO_SPACE, NO_QUOTA = "no space left on device", "disk quota exceeded"
STORAGE_ERRORS = {
    errno.ENOSPC: NO_SPACE,
    errno.EDQUOT: NO_QUOTA,
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied (the output folder is not writable)",
    errno.EPERM: "permission denied (the output folder is not writable)",
}


def storage_problem(error: BaseException) -> str | None:
    """What a full or read-only disk looks like to the user, if that is what `error` is.
    torch.save wraps the OSError of a failed write in a RuntimeError, so the chain is searched."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRORS:
            return STORAGE_ERRORS[error.errno]
        error = error.__cause__ or error.__context__
    return None


def last_checkpoint(run_dir: Path) -> str:
    """The end of a write error: where the run can continue from."""
    ckpt = Path(run_dir) / CHECKPOINT
    return f"the last good checkpoint is {ckpt}" if ckpt.is_file() else "no checkpoint was saved yet"


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

    def __init__(self, path: Path, keep_epochs: int, write: bool = True):
        self.path, self.write = Path(path), write  # write=False: rows kept, no file (ranks but 0)
        self.rows = [r for r in read_metrics(self.path.parent) if r["epoch"] <= keep_epochs]
        self._write_all()

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        self._write_all()

    def _write_all(self) -> None:
        if not self.write:
            return

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


def load_torch(path: Path, device: Any = "cpu") -> dict:
    """A checkpoint dlrun wrote (a dict holding "model"), read with weights_only=True so that
    only tensors and plain data are unpickled. Anything else (an empty, truncated or foreign
    file, or a pickle that would run code) is one user error, never advice to unpickle it."""
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle before refusing it
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle, EOF and tensor errors mean the same here
        if problem := storage_problem(e):
            raise DlrunError(f"cannot read {path}: {problem}") from None
        raise DlrunError(
            f"{path} is not a dlrun checkpoint, or it is damaged or was tampered with "
            f"({type(e).__name__}); it was not loaded: train the run again"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise DlrunError(f"{path} is not a dlrun checkpoint (no model weights in it): train the run again")
    return obj


def load_state_dict(module: Any, state: Any, path: Path, what: str = "the run's model") -> None:
    """`module.load_state_dict(state)`, with a mismatch as a user error naming the file."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        detail = first_line(e).removeprefix("Error(s) in loading state_dict for ")
        raise DlrunError(
            f"{path} does not fit {what} ({detail[:160]}): the file belongs to another run or was changed"
        ) from None


def load_weights(model: Any, run_dir: Path, name: str = BEST, device: Any = "cpu") -> None:
    """Load a run's saved weights (best.pt or checkpoint.pt) into `model`; only tensors and
    plain data are unpickled (weights_only=True)."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise missing(run_dir, name)
    load_state_dict(model, load_torch(path, device)["model"], path)


def init_from(model: Any, run_dir: str | Path) -> tuple[list[str], list[str]]:
    """Copy into `model` the best weights of another run wherever a tensor of the same name and
    shape exists (a language model's encoder into a classifier, a pretrained body under a new
    head); returns (loaded names, names of `model` left as initialised)."""
    import torch

    path = existing_run(run_dir, need=BEST)
    theirs = load_torch(path / BEST)["model"]
    theirs = {k.removeprefix("_orig_mod."): v for k, v in theirs.items()}
    upgrade = getattr(model, "upgrade_state_dict", None)  # a family whose layout changed
    if upgrade is not None:
        theirs = upgrade(theirs)
    ours = model.state_dict()
    loaded = [k for k, v in ours.items() if k in theirs and theirs[k].shape == v.shape]
    if not loaded:
        raise DlrunError(
            f"model.init_from={run_dir}: none of its weights fit this model (no tensor with the same "
            f"name and shape): start from a run of the same model family, or drop model.init_from"
        )
    with torch.no_grad():
        for k in loaded:
            ours[k].copy_(theirs[k])
    return loaded, [k for k in ours if k not in set(loaded)]


def load_config(run_dir: Path) -> Any:
    """The composed config a run was started with, as saved (`config.load_saved` also checks it)."""
    from omegaconf import DictConfig, OmegaConf

    path = Path(run_dir) / CONFIG
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - YAML and OmegaConf errors alike
        raise DlrunError(f"{path} cannot be read ({first_line(e)}): the run directory is damaged") from None
    if not isinstance(cfg, DictConfig):
        raise DlrunError(f"{path} is not a dlrun config: the run directory is damaged")
    return cfg
