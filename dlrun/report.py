"""What a person sees: the progress bar, the per-epoch table, plots and run tables."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dlrun import rundir

console = Console()
err_console = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("dlrun")


def fmt(value: Any) -> str:
    """A metric value in a table cell: 4 significant digits, integers as they are."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def duration(seconds: float) -> str:
    """A time span as a log line reads it: 0.4s, 45s, 7m10s, 2h05m."""
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def rate(value: float) -> str:
    """A speed in three digits: 950, 18.1k, 2.35M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale * 0.9995:  # so that 999,950 reads 1.00M, not 1000k
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def job_tag() -> str:
    """`job 3  ` in a sweep job (parallel jobs' lines interleave in one log), else ""."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    return f"job {HydraConfig.get().job.num}  "


# The epoch-time estimate comes after this many steps, in epochs at least twice as long.
ESTIMATE_AFTER = 20


class EpochDisplay:
    """What a person sees while a run trains. In a terminal, a progress bar per epoch (loss,
    items/s, ETA); elsewhere (a log file, SLURM, CI), where a bar never shows, one plain line
    every `log_seconds`. In both, an estimate of the epoch time after the first steps, and one
    table row per finished epoch. The loss is the one the loop reads back every
    `trainer.log_every` steps: the display never makes the device wait."""

    def __init__(
        self,
        enabled: bool,
        columns: Sequence[str] | None = None,
        *,
        epochs: int | None = None,
        log_seconds: float | None = None,
        unit: str = "items",
    ):
        self.enabled = enabled
        self.columns: list[str] | None = list(columns) if columns else None
        self.epochs, self.unit = epochs, unit
        # A bar needs a terminal that can move the cursor (or a notebook); rich draws nothing elsewhere.
        live = (console.is_terminal and not console.is_dumb_terminal) or console.is_jupyter
        self.log_seconds = log_seconds if enabled and not live and log_seconds else None
        self.estimated = not enabled  # the epoch-time estimate is printed once per run
        self.tag = job_tag()
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not (enabled and live),
        )
        self.task = None
        self.epoch = self.total = self.first = 0
        self.t_start = self.t_line = time.monotonic()
        self.mark: tuple[int, float] | None = None

    def __enter__(self) -> EpochDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, total: int, done: int) -> None:
        """Epoch `epoch` (from 1) of `total` steps begins, `done` of them already trained."""
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task("", total=total, completed=done, epoch=epoch, loss="-", speed="")
        self.epoch, self.total, self.first = epoch, total, done
        self.t_start = time.monotonic()
        self.mark = None  # (steps, time) of the epoch's first loss read, until the estimate is made

    def update(self, completed: int, loss: float, items_per_s: float) -> None:
        """`completed` steps of the epoch are done and `loss` is the latest step's, just read
        back from the device (so the clock here is not ahead of the device)."""
        speed = f"{rate(items_per_s)} {self.unit}/s"
        self.progress.update(self.task, completed=completed, loss=f"{loss:.4f}", speed=speed)
        now = time.monotonic()
        if not self.estimated:
            self.estimate(completed, now)
        if self.log_seconds and now - self.t_line >= self.log_seconds:
            self.t_line = now
            steps_per_s = (completed - self.first) / max(now - self.t_start, 1e-9)
            of = f"/{self.epochs}" if self.epochs else ""
            self.say(
                f"epoch {self.epoch}{of}  step {completed}/{self.total} ({completed / self.total:.0%})  "
                f"loss {loss:.4g}  {speed}  eta {duration((self.total - completed) / steps_per_s)}"
            )

    def estimate(self, completed: int, now: float) -> None:
        """Say once how long an epoch takes, timed over ESTIMATE_AFTER steps from the first
        loss read: the steps before it hold the warm-up (compilation, cuDNN autotuning,
        allocator growth), which later steps do not pay."""
        if self.mark is None:
            self.mark = (completed, now)
            return
        steps, seconds = completed - self.mark[0], now - self.mark[1]
        if steps < ESTIMATE_AFTER:
            return
        self.estimated = True
        if self.total < 2 * ESTIMATE_AFTER:  # a short epoch is over before an estimate helps
            return
        steps_per_s = steps / max(seconds, 1e-9)
        per_epoch = duration(self.total / steps_per_s)
        line = f"about {per_epoch} per epoch ({self.total} steps at {steps_per_s:.3g} steps/s)"
        log.info(line)
        self.say(line)

    def say(self, line: str) -> None:
        """One plain line on stdout, above the bar if there is one: no markup, no colour, never
        wrapped, flushed at once (a redirected stdout is block-buffered)."""
        self.progress.console.print(self.tag + line, markup=False, highlight=False, soft_wrap=True)

    def row(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.columns is None:
            self.columns = list(row)
            self.progress.console.print(
                "  ".join(f"{c:>11}" for c in self.columns), style="bold", soft_wrap=True
            )
        self.progress.console.print(
            "  ".join(f"{fmt(row.get(c, '')):>11}" for c in self.columns), soft_wrap=True
        )


@contextlib.contextmanager
def bar(total: int, what: str) -> Iterator[Callable[[], None]]:
    """A transient progress bar of `total` steps on the terminal's stderr (nothing when `total` is
    0 or stderr is not a terminal); yields the function that advances it by one step."""
    live = err_console.is_terminal and not err_console.is_dumb_terminal
    progress = Progress(
        TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err_console, transient=True, disable=not (total and live),
    )  # fmt: skip
    with progress:
        task = progress.add_task("", total=total or None)
        yield lambda: progress.advance(task)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A rich table of formatted values."""
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right", overflow="fold")
    for r in rows:
        t.add_row(*(fmt(v) for v in r))
    return t


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lay a figure out, write it as PNG atomically (a kill mid-write never leaves half a plot)
    and free it."""
    fig.tight_layout()
    rundir.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    pyplot().close(fig)


def plot_losses(rows: list[dict[str, float]], path: Path) -> None:
    """loss.png: train and valid loss per epoch."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in rows]
    for key in ("train_loss", "valid_loss"):
        ax.plot(epochs, [r[key] for r in rows], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


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
