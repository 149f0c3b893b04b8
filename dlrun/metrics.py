"""Validation accumulators shared by more than one data kind. Each declares the metric that
picks the best epoch (`monitor`) and which way it is better (`mode`); they add up on the
device and are read back once per validation pass (the protocol: `dlrun.family.Metrics`).
"""

from __future__ import annotations

import math
from typing import Any


class Accuracy:
    """Top-1 accuracy of class scores (last dimension) against integer labels."""

    monitor, mode = "accuracy", "max"

    def __init__(self) -> None:
        self.correct: Any = 0
        self.n = 0

    def update(self, out: Any, y: Any) -> None:
        self.correct = self.correct + (out.argmax(-1) == y).sum()
        self.n += y.numel()

    def compute(self, valid_loss: float) -> dict[str, float]:
        return {"accuracy": float(self.correct) / max(self.n, 1)}


class LossOnly:
    """No metric beyond the validation loss."""

    monitor, mode = "valid_loss", "min"

    def update(self, out: Any, y: Any) -> None:
        pass

    def compute(self, valid_loss: float) -> dict[str, float]:
        return {}


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged model prints inf rather than raising."""
    return math.exp(loss) if loss < 700 else math.inf
