"""Where a run stands (`RunState`) and the checkpoint that lets it continue exactly."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dlrun import rundir
from dlrun.errors import DlrunError, first_line
from dlrun.learner import Learner


@dataclass
class RunState:
    """Where a run stands; saved in checkpoint.pt so that a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch already done
    step: int = 0  # optimizer steps so far
    lr: float = 0.0  # the peak learning rate (the finder's suggestion with lr=find)
    lr_unfrozen: float = 0.0  # finetune: the unfrozen phase's peak rate, once that phase began
    last_lr: float = 0.0  # the rate of the last step taken (metrics.csv's lr column)
    loss_sum: Any = 0.0  # training loss of the current epoch so far, summed over items
    items: int = 0  # items of the current epoch so far
    epoch_seconds: float = 0.0  # training time of the current epoch so far
    train_items: int = 0  # items and seconds of all training, for items/s
    train_seconds: float = 0.0
    wall_before: float = 0.0  # wall time of the run up to this checkpoint (earlier sessions included)
    best: dict[str, float] | None = None
    best_epoch: int = 0

    def count_time(self, seconds: float, items: int) -> None:
        """Add a stretch of training time and the items trained in it."""
        self.epoch_seconds += seconds
        self.train_seconds += seconds
        self.train_items += items


def save_torch(path: Path, obj: Any) -> None:
    """torch.save through a temporary file and a rename."""
    rundir.write_atomic(path, lambda f: torch.save(obj, f), mode="wb")


def save_checkpoint(path: Path, learner: Learner, state: RunState) -> None:
    """Model (with the state it carries between batches), optimizer, run state and RNG state,
    written atomically."""
    ckpt = {
        "model": learner.model.state_dict(),
        "optimizer": learner.optimizer.state_dict(),
        "scaler": learner.scaler.state_dict() if learner.scaler is not None else None,
        "state": asdict(state),
        # A hidden state carried between batches: mid-epoch, the next batch continues it.
        "carried": learner.carried_state(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if learner.device.type == "cuda" else [],
    }
    save_torch(path, ckpt)


def save_best(path: Path, learner: Learner, epoch: int, metrics: dict[str, float]) -> None:
    """The weights of the best epoch so far, with its metrics."""
    save_torch(path, {"model": learner.model.state_dict(), "epoch": epoch, "metrics": metrics})


def load_checkpoint(path: Path, learner: Learner) -> RunState:
    """Restore what `save_checkpoint` saved; only tensors and plain data are unpickled."""
    if not path.is_file():
        raise DlrunError(
            f"cannot resume: {path} does not exist (the run never finished an epoch "
            "or was started with trainer.checkpoint=false)"
        )
    ckpt = rundir.load_torch(path, learner.device)  # a damaged or foreign file: one user error
    rundir.load_state_dict(learner.model, ckpt["model"], path)
    try:
        rundir.load_state_dict(learner.optimizer, ckpt["optimizer"], path, "the run's optimizer")
        if learner.scaler is not None and ckpt["scaler"]:
            learner.scaler.load_state_dict(ckpt["scaler"])
        learner.load_carried_state(ckpt.get("carried"))
        torch.set_rng_state(ckpt["rng_cpu"].cpu())
        if ckpt["rng_cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng_cuda"]])
        return RunState(**ckpt["state"])
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise DlrunError(
            f"{path} is not a complete dlrun checkpoint ({type(e).__name__}: {first_line(e)}): "
            "it was damaged or changed; train the run again"
        ) from None
