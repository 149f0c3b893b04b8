"""Mixup (Zhang et al. 2018, as fastai's `MixUp`): train on a blend of each batch with a
shuffled copy of itself, lam * x + (1 - lam) * x[perm] with lam ~ Beta(alpha, alpha) once per
batch, against the same blend of the two targets' losses. Training only: validation sees the
real items.

Where the blend happens is the data's say (`Data.mixup`): "inputs" blends the input tensors
(images); "embeddings" hands `(perm, lam)` to the model, `model(x, mix=(perm, lam))`, which
blends what it makes of inputs that cannot be blended as they are (a table's category codes:
their embeddings, and its numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def blend(x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lam * x + (1 - lam) * x[perm], in one kernel."""
    return x.lerp(x[perm], 1 - lam)


class Mixup:
    """Draws lam and the pairing for each batch on the training device (no host sync) and
    returns the blended loss."""

    def __init__(self, alpha: float, where: str, device: torch.device):
        a = torch.tensor(float(alpha), device=device)
        self.beta = torch.distributions.Beta(a, a)
        self.where = where

    def loss(
        self, forward: Callable[..., Any], loss: Callable[[Any, Any], torch.Tensor], x: Any, y: torch.Tensor
    ) -> torch.Tensor:
        lam = self.beta.sample()
        perm = torch.randperm(y.shape[0], device=y.device)
        out = forward(blend(x, perm, lam)) if self.where == "inputs" else forward(x, mix=(perm, lam))
        # lam * loss(out, y) + (1 - lam) * loss(out, y[perm])
        return torch.lerp(loss(out, y[perm]), loss(out, y), lam)
