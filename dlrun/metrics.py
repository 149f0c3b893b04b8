"""Metric names, which direction is better, and the validation accumulators.

Accumulators add up on the device and are read back once per validation pass.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

# Every metric dlrun reports, and whether lower or higher is better.
MODES: dict[str, str] = {
    "train_loss": "min",
    "valid_loss": "min",
    "accuracy": "max",
    "rmse": "min",
    "mae": "min",
    "rmspe": "min",
    "perplexity": "min",
    "bpc": "min",
}


def better(name: str, new: float, old: float | None) -> bool:
    """Whether `new` beats `old` for metric `name` (NaN never wins)."""
    if new != new:
        return False
    if old is None or old != old:
        return True
    return new < old if MODES[name] == "min" else new > old


class Metrics(Protocol):
    """A validation pass's metrics: `update` per batch (no host sync), `compute` once."""

    monitor: str  # the metric that picks the best epoch and ranks runs

    def update(self, out: Any, y: Any) -> None: ...

    def compute(self, valid_loss: float) -> dict[str, float]: ...


class Accuracy:
    """Top-1 accuracy of class scores (last dimension) against integer labels."""

    monitor = "accuracy"

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

    monitor = "valid_loss"

    def update(self, out: Any, y: Any) -> None:
        pass

    def compute(self, valid_loss: float) -> dict[str, float]:
        return {}


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged model prints inf rather than raising."""
    return math.exp(loss) if loss < 700 else math.inf
