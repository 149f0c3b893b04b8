"""Data kinds: each module here turns a `data` config into a `dlrun.family.Data` (the
contract is in `dlrun/family.py`). A data config names its module with `data.kind`
(`configs/data/digits.yaml` has `kind: digits`). Batches come out already on the
training device. This package's own code: the on-device batcher every small data set uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dlrun.distributed import share
from dlrun.errors import DlrunError

if TYPE_CHECKING:
    import torch


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
        self.rank, self.world = 0, 1  # `shard`: this process's part of every batch
        if self.n == 0:
            raise DlrunError(f"the {split} split is empty: use more data or a different split")
        if drop_last and bs > self.n:
            raise DlrunError(
                f"data.bs={bs} is larger than the {split} split ({self.n} items): "
                f"set data.bs to at most {self.n}"
            )

    def __len__(self) -> int:
        return self.n // self.bs if self.drop_last else math.ceil(self.n / self.bs)

    def shard(self, rank: int, world: int) -> None:
        """From now on yield rank `rank`'s part of each batch (of `world` equal parts; a last,
        smaller batch is split as evenly as it goes and an empty part is skipped)."""
        self.rank, self.world = rank, world

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, Any]]:
        import torch

        x, y = self.x, self.y
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).to(y.device)
            x, y = take(x, perm), y[perm]
        for i in range(start, len(self)):
            sl = slice(i * self.bs, (i + 1) * self.bs)
            if self.world > 1:
                part = share(min(self.bs, self.n - sl.start), self.rank, self.world)
                if part.start == part.stop:
                    continue
                sl = slice(sl.start + part.start, sl.start + part.stop)
            yield take(x, sl), y[sl]
