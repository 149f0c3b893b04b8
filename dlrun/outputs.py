"""What `dlrun predict` and `dlrun interpret` share: a saved model run over batches (with a
progress bar, and the loss and metrics training uses when there are targets), the CSV files
they write, and what a prediction reports."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlrun import report, rundir

BAR_AFTER = 20  # batches: fewer finish before a progress bar would be worth drawing


@dataclass
class Result:
    """What a prediction wrote and measured."""

    output: Path | None
    rows: int  # predictions written
    what: str  # rows | images | tokens
    metrics: dict[str, float] = field(default_factory=dict)  # when the input has targets
    skipped: list[str] = field(default_factory=list)  # inputs left out, each with the reason
    notes: list[str] = field(default_factory=list)  # lines for the user


def run(
    model: Any,
    batches: Iterable[tuple[Any, Any]],
    total: int,
    what: str,
    loss: Callable[[Any, Any], Any] | None = None,
    metrics: Any = None,
    count: Callable[[Any], int] | None = None,
    keep: bool = True,
) -> tuple[list[Any], dict[str, float]]:
    """The model's outputs for `batches` of (x, y) (y None when there is no target), moved to the
    CPU as float32 when `keep`; with `loss` and `metrics` also the validation loss and metrics
    over the batches with a target, accumulated as `dlrun eval` does. A progress bar on the
    terminal for `total` batches when there are many."""
    import torch

    outs: list[Any] = []
    loss_sum, n = None, 0
    with report.bar(total if total >= BAR_AFTER else 0, what) as advance, torch.no_grad():
        for x, y in batches:
            out = model(x)
            if keep:
                outs.append(out.float().cpu())
            if y is not None and loss is not None:
                k = count(y) if count else y.shape[0]
                part = loss(out, y).float() * k
                loss_sum = part if loss_sum is None else loss_sum + part
                n += k
                metrics.update(out, y)
            advance()
    scores: dict[str, float] = {}
    if loss_sum is not None and n:
        valid_loss = (loss_sum / n).item()
        scores = {"valid_loss": valid_loss, **metrics.compute(valid_loss)}
    return outs, scores


def write_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> None:
    """A CSV file, written atomically (a crash never leaves half a submission)."""

    def write(f: Any) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)

    path.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(path, write)
