"""`dlrun runs [DIR]`: a table of past runs (or of one sweep), best first, rebuilt from disk."""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Any

from dlrun import report, rundir
from dlrun.errors import DlrunError

STATUSES = ("completed", "interrupted", "diverged", "failed")
# A summary.json that is not one dlrun wrote (not JSON, or JSON of another shape) is shown as
# `unreadable`, after every run that could be read.
STATUS_ORDER = {status: i for i, status in enumerate((*STATUSES, "unreadable"))}


def overrides_of(run_dir: Path) -> dict[str, str]:
    """The command-line overrides a run was started with, as key -> value ({} when there
    are none or the file cannot be read)."""
    path = run_dir / rundir.OVERRIDES
    if not path.is_file():
        return {}
    from omegaconf import ListConfig, OmegaConf

    try:
        saved = OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - a damaged file: the run is still listed
        return {}
    if not isinstance(saved, ListConfig):
        return {}
    pairs = [str(o).split("=", 1) for o in saved]
    return {k.lstrip("+~"): v for k, v in (p for p in pairs if len(p) == 2) if k != "resume"}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_summary(path: Path) -> dict[str, Any] | None:
    """A run's summary.json, or None when it is not one that dlrun wrote: not JSON, or JSON
    of another shape (not an object, no known status, metrics that are not numbers)."""
    try:
        s = rundir.read_json(path)
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if not isinstance(s, dict) or s.get("status") not in STATUSES:
        return None
    best = s.get("best") or {}
    if not isinstance(best, dict) or not all(is_number(v) for v in best.values()):
        return None
    if not all(s.get(k) is None or is_number(s[k]) for k in ("epochs", "wall_s")):
        return None
    if not all(s.get(k) is None or isinstance(s[k], str) for k in ("monitor", "mode", "message")):
        return None
    return s


def monitor_of(summary: dict[str, Any]) -> tuple[str, str]:
    """The metric a summary's run monitored and which way is better (valid_loss, min when it
    does not say)."""
    monitor = summary.get("monitor") or "valid_loss"
    # Older summaries carry no mode: accuracy was their only higher-is-better metric.
    return monitor, summary.get("mode") or ("max" if monitor == "accuracy" else "min")


def collect(root: Path) -> list[dict[str, Any]]:
    """One record per run directory under `root` that has a summary.json."""
    records = []
    for path in sorted(root.rglob(rundir.SUMMARY)):
        if rundir.MLFLOW_ARTIFACTS in path.relative_to(root).parts:
            continue
        s = read_summary(path)
        if s is None:
            s = {"status": "unreadable", "epochs": math.nan}
        monitor, mode = monitor_of(s)
        best = s.get("best") or {}
        records.append(
            {
                "run": str(path.parent.relative_to(root)) if path.parent != root else ".",
                "overrides": overrides_of(path.parent),
                "status": s["status"],
                "monitor": monitor,
                "mode": mode,
                "value": best.get(monitor, math.nan),
                "valid_loss": best.get("valid_loss", math.nan),
                "epochs": s.get("epochs", 0),
                "wall_s": s.get("wall_s", math.nan),
            }
        )
    return rank(records)


def rank(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed runs first, then each by its monitored metric, best first."""

    def key(r: dict[str, Any]) -> tuple:
        v = r["value"]
        v = math.inf if v is None or v != v else (v if r["mode"] == "min" else -v)
        return (STATUS_ORDER.get(r["status"], 9), r["monitor"], v)

    return sorted(records, key=key)


def swept_keys(records: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between runs (what a sweep varied)."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r["overrides"] if k not in keys]
    return [k for k in keys if len({r["overrides"].get(k) for r in records}) > 1]


def table_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    swept = swept_keys(records)
    # Name the metric column after what the runs with a value monitor: a failed or
    # unreadable run's valid_loss is only a placeholder.
    monitors = sorted({r["monitor"] for r in records if r["value"] == r["value"]} or {"valid_loss"})
    metric = monitors[0] if len(monitors) == 1 else "best"
    columns = ["run", *swept, metric, "valid_loss", "status", "epochs", "time (s)"]
    rows = [
        [
            r["run"],
            *(r["overrides"].get(k, "") for k in swept),
            r["value"],
            r["valid_loss"],
            r["status"],
            r["epochs"],
            r["wall_s"],
        ]
        for r in records
    ]
    return columns, rows


def show(records: list[dict[str, Any]], title: str) -> None:
    columns, rows = table_rows(records)
    report.console.print(report.table(title, columns, rows))


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    columns, rows = table_rows(records)

    def write(f: Any) -> None:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)

    rundir.write_atomic(path, write)


def plot_sweep(records: list[dict[str, Any]], path: Path) -> None:
    """The monitored metric against each swept value, one panel per swept key."""
    swept = swept_keys(records)
    done = [r for r in records if r["value"] == r["value"]]
    if not swept or not done:
        return
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(swept), figsize=(4.5 * len(swept), 3.6), squeeze=False)
    for ax, key in zip(axes[0], swept):
        values = [r["overrides"].get(key, "") for r in done]
        try:
            xs: list[Any] = [float(v) for v in values]
        except ValueError:
            xs = values
        ax.scatter(xs, [r["value"] for r in done])
        ax.set_xlabel(key)
        ax.set_ylabel(done[0]["monitor"])
        ax.grid(alpha=0.3)
    report.save_figure(fig, path)


def main(argv: list[str]) -> None:
    """`dlrun runs [DIR] [--csv FILE] [--plot [FILE]] [--metric NAME]`."""
    parser = argparse.ArgumentParser(prog="dlrun runs", description="Table of past runs, best first.")
    parser.add_argument("dir", nargs="?", default="outputs", help="a sweep directory or any folder of runs")
    parser.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    parser.add_argument(
        "--plot", nargs="?", const="", metavar="FILE",
        help="every run's per-epoch curve of --metric on one figure (default FILE: DIR/curves.png)",
    )  # fmt: skip
    parser.add_argument("--metric", help="the metric to plot (default: the one the runs monitor)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        raise DlrunError(f"{args.dir} is not a directory: give a sweep directory or outputs/")
    records = collect(root)
    if not records:
        raise DlrunError(f"no runs under {args.dir} (no summary.json found)")
    show(records, f"{len(records)} runs in {args.dir}, best first")
    if args.csv:
        write_csv(records, Path(args.csv))
        report.console.print(f"table: {args.csv}")
    if args.plot is not None:
        from dlrun.compare import plot_curves

        path = Path(args.plot) if args.plot else root / "curves.png"
        swept = swept_keys(records) if len(records) > 1 else []
        plot_curves(root, records, swept, args.metric, path)
        report.console.print(f"curves: {path}")
