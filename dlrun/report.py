"""What a person sees: the progress bar, the per-epoch table, plots and run tables."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def fmt(value: Any) -> str:
    """A metric value in a table cell: 4 significant digits, integers as they are."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


class EpochDisplay:
    """A progress bar per epoch (loss, items/s, ETA) and one table row per finished epoch."""

    def __init__(self, enabled: bool, columns: Sequence[str] | None = None):
        self.enabled = enabled
        self.columns: list[str] | None = list(columns) if columns else None
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not enabled,
        )
        self.task = None

    def __enter__(self) -> EpochDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, total: int, done: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task("", total=total, completed=done, epoch=epoch, loss="-", speed="")

    def update(self, completed: int, loss: float, items_per_s: float) -> None:
        self.progress.update(
            self.task, completed=completed, loss=f"{loss:.4f}", speed=f"{items_per_s:,.0f} items/s"
        )

    def row(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.columns is None:
            self.columns = list(row)
            self.progress.console.print("  ".join(f"{c:>11}" for c in self.columns), style="bold")
        self.progress.console.print("  ".join(f"{fmt(row.get(c, '')):>11}" for c in self.columns))


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A rich table of formatted values."""
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right", overflow="fold")
    for r in rows:
        t.add_row(*(fmt(v) for v in r))
    return t


def plot_losses(rows: list[dict[str, float]], path: Path) -> None:
    """loss.png: train and valid loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in rows]
    for key in ("train_loss", "valid_loss"):
        ax.plot(epochs, [r[key] for r in rows], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def text_curve(
    xs: Sequence[float], ys: Sequence[float], marks: dict[str, float], width: int = 60, height: int = 12
) -> str:
    """A loss-vs-lr curve drawn with characters (log-x), suggestions marked below it."""
    points = [(math.log10(x), y) for x, y in zip(xs, ys) if x > 0 and math.isfinite(y)]
    if len(points) < 2:
        return "(too few points to draw)"
    lx = [p[0] for p in points]
    lo_x, hi_x = min(lx), max(lx)
    lo_y = min(p[1] for p in points)
    hi_y = min(max(p[1] for p in points), points[0][1] * 1.5 if points[0][1] > lo_y else math.inf)
    hi_y = hi_y if hi_y > lo_y else lo_y + 1e-9
    grid = [[" "] * width for _ in range(height)]
    for x, y in points:
        col = round((x - lo_x) / (hi_x - lo_x or 1) * (width - 1))
        row = height - 1 - round((min(y, hi_y) - lo_y) / (hi_y - lo_y) * (height - 1))
        grid[row][col] = "•" if y <= hi_y else "^"
    lines = [" " * 9 + " |" + "".join(row) for row in grid]
    lines[0] = f"{hi_y:9.3g} |" + "".join(grid[0])
    lines[-1] = f"{lo_y:9.3g} |" + "".join(grid[-1])
    letters: dict[str, str] = {}  # each mark's first letter not taken yet: steep s, slide l
    for name in marks:
        letters[name] = next((c for c in name if c.isalpha() and c not in letters.values()), "?")
    axis = [" "] * width
    for name, lr in marks.items():
        col = round((math.log10(lr) - lo_x) / (hi_x - lo_x or 1) * (width - 1))
        axis[min(max(col, 0), width - 1)] = letters[name]
    lines.append(" " * 10 + "+" + "-" * width)
    lines.append(" " * 11 + "".join(axis))
    lines.append(f"{'':11}{10**lo_x:<.0e}{'learning rate (log)':^{width - 10}}{10**hi_x:>.0e}")
    lines.append(f"{'':11}marks: " + ", ".join(f"{c} = {name}" for name, c in letters.items()))
    return "\n".join(lines)
