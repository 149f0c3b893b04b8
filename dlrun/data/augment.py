"""Batch-wise image augmentation on the device, for data sets held as whole tensors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Pad each image by `pad` pixels, take a random crop of the original size, and
    mirror half of them when `flip`: one gather for the whole batch, no Python loop."""
    if pad > 0:
        b, c, h, w = x.shape
        # Shift so the background is zero, pad with zeros, shift back: the border
        # takes the background value of normalised inputs.
        fill_t = torch.as_tensor(fill, device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
        padded = F.pad(x - fill_t, (pad, pad, pad, pad)) + fill_t
        oy = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        mirror = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
        x = torch.where(mirror, x.flip(-1), x)
    return x


class Augmented:
    """Wraps training `Batches` so that every batch's images are augmented on the fly."""

    def __init__(self, batches: Any, pad: int, flip: bool, fill: float | torch.Tensor = 0.0):
        self.batches, self.pad, self.flip, self.fill = batches, pad, flip, fill

    def __len__(self) -> int:
        return len(self.batches)

    def shard(self, rank: int, world: int) -> None:
        """Augment only this rank's part of each batch."""
        self.batches.shard(rank, world)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, Any]]:
        for x, y in self.batches.epoch(epoch, start):
            yield random_crop_flip(x, self.pad, self.flip, self.fill), y
