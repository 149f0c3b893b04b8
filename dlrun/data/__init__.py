"""Data kinds. Each module here turns a `data` config into a `Data` bundle.

A data config names its module with `data.kind` (`configs/data/digits.yaml` has
`kind: images`), and the module's `build(cfg, device) -> Data` does the rest.
Batches come out already on the training device.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dlrun.errors import DlrunError

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from dlrun.metrics import Metrics


class Batches(Protocol):
    """One pass over a split, resumable at any batch."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, Any]]:
        """Yield (x, y) for `epoch`, skipping the first `start` batches; the same
        epoch number gives the same batches, so a resumed run sees what an
        uninterrupted one would have."""
        ...


@dataclass
class Data:
    """What a data kind hands the loop: the two splits, the loss and metrics that
    fit the target, and the facts the model builder needs (`info`)."""

    train: Batches
    valid: Batches
    loss: Callable[[Any, Any], "torch.Tensor"]
    metrics: Callable[[], "Metrics"]
    info: dict[str, Any] = field(default_factory=dict)
    # Per-batch learning-rate factor (variable-length BPTT windows); None means 1.
    lr_scale: Callable[[Any], float] | None = None
    # Writes what a later `dlrun eval`/`generate` needs (a vocabulary...) to the run dir.
    save: Callable[[Path], None] | None = None


def build_data(cfg: "DictConfig", device: "torch.device") -> Data:
    """Build the data named by `cfg.data.kind` on `device`."""
    module = importlib.import_module(f"dlrun.data.{cfg.data.kind}")
    return module.build(cfg, device)


def take(x: Any, index: Any) -> Any:
    """Index a tensor or a tuple of tensors (tabular data is (categorical, continuous))."""
    if isinstance(x, (tuple, list)):
        return type(x)(take(t, index) for t in x)
    return x[index]


def to_device(x: Any, device: "torch.device", non_blocking: bool = False) -> Any:
    """Move a tensor or a nested tuple of tensors to `device`."""
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t, device, non_blocking) for t in x)
    return x.to(device, non_blocking=non_blocking)


class TensorBatches:
    """Mini-batches of tensors that already live on the training device.

    Each epoch permutes the whole split once (one gather) and hands out
    contiguous slices of it: no per-item `__getitem__`, no collate, no workers.
    The permutation depends only on (seed, epoch), so any epoch can be replayed.
    """

    def __init__(
        self,
        x: Any,
        y: "torch.Tensor",
        bs: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        split: str = "train",
    ):
        self.x, self.y, self.bs = x, y, bs
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.n = len(y)
        if self.n == 0:
            raise DlrunError(f"the {split} split is empty: use more data or a different split")
        if drop_last and bs > self.n:
            raise DlrunError(
                f"data.bs={bs} is larger than the {split} split ({self.n} items): "
                f"set data.bs to at most {self.n}"
            )

    def __len__(self) -> int:
        return self.n // self.bs if self.drop_last else math.ceil(self.n / self.bs)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, Any]]:
        import torch

        x, y = self.x, self.y
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).to(y.device)
            x, y = take(x, perm), y[perm]
        for i in range(start, len(self)):
            sl = slice(i * self.bs, (i + 1) * self.bs)
            yield take(x, sl), y[sl]
