"""Losses shared by more than one data kind."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Softmax cross-entropy, computed in fp32 even under autocast. `label_smoothing` eps
    (training only, `regularization.label_smoothing`): the target is 1 - eps on the true class
    plus eps spread evenly over all classes."""
    return F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
