"""`dlrun runs --plot`: one metric's per-epoch curve of every run in a sweep or folder, on one
figure, read from each run's metrics.csv (TensorBoard and MLflow show the same across runs;
this needs neither)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlrun import report, rundir
from dlrun.errors import DlrunError


def label(record: dict[str, Any], swept: list[str]) -> str:
    """A run in the legend: its swept values (what tells the runs apart), else its directory."""
    values = " ".join(f"{k}={record['overrides'][k]}" for k in swept if k in record["overrides"])
    return values or record["run"]


def plot_curves(
    root: Path, records: list[dict[str, Any]], swept: list[str], metric: str | None, path: Path
) -> None:
    """`metric` (default: the runs' monitored metric) against the epoch, one line per run of
    `records` (as `runs.collect(root)` returns them, best first), labelled by the `swept` keys."""
    if metric is None:
        monitored = [r["monitor"] for r in records if r["value"] == r["value"]]
        metric = monitored[0] if monitored else "valid_loss"
    curves, seen = [], set()
    for record in records:
        rows = rundir.read_metrics(root / record["run"])
        seen.update(k for row in rows for k in row if k != "epoch")
        points = [(row["epoch"], row[metric]) for row in rows if metric in row]
        if points:
            curves.append((label(record, swept), points))
    if not curves:
        raise DlrunError(
            f"no run under {root} has a {metric!r} column in its {rundir.METRICS}: use --metric with one of "
            + (", ".join(sorted(seen)) or "the columns of a metrics.csv (no run has one yet)")
        )
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:  # a legend of more runs would hide the curves
        ax.legend(fontsize=8)
    ax.set_title(f"{metric}: {len(curves)} runs in {root}", fontsize=9)
    report.save_figure(fig, path)
