"""Losses shared by more than one data kind."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy, computed in fp32 even under autocast."""
    return F.cross_entropy(out.float(), y)
