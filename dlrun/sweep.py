"""What a sweep leaves behind once every job is done: Hydra callbacks that write the
summary table and plots into the sweep directory (no process management of our own)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from dlrun import report, rundir, runs


class SweepSummary(Callback):
    """`dlrun train -m ...`: a table of the jobs (best first), summary.csv and sweep.png."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        records = runs.collect(root) if root.is_dir() else []
        if not records:
            return
        runs.write_csv(records, root / "summary.csv")
        runs.plot_sweep(records, root / "sweep.png")
        runs.show(records, f"sweep of {len(records)} jobs, best first ({root})")


def job_dirs(root: Path) -> list[Path]:
    """The jobs of a sweep: directories under `root` that Hydra wrote a config into, in job order."""
    jobs = [p.parent.parent for p in root.glob(f"**/{rundir.CONFIG}") if p.parent.parent != root]
    return sorted(jobs, key=lambda p: (len(p.name), p.name))


def job_end(job: Path) -> tuple[str, str]:
    """How a sweep job ended: (status, message), from its summary.json."""
    summary = job / rundir.SUMMARY
    if summary.is_file():
        s = runs.read_summary(summary)
        return (
            (s["status"], s.get("message") or "") if s else ("unreadable", "its summary.json is not dlrun's")
        )
    if (job / "lr_find.json").is_file():  # an lr-find job writes no summary.json when it succeeds
        return "completed", ""
    return "unknown", "no summary.json: the job was killed before it could write one"


def report_unfinished(root: Path) -> list[str]:
    """The sweep's last lines: every job that did not complete, with its status and why.
    Returns those jobs' directories (relative to `root`)."""
    jobs = job_dirs(root) if root.is_dir() else []
    ends = {job: job_end(job) for job in jobs}
    unfinished = [job for job in jobs if ends[job][0] != "completed"]
    if not unfinished:
        return []
    records = [{"overrides": runs.overrides_of(job)} for job in jobs]
    swept = runs.swept_keys(records) if len(records) > 1 else []
    lines = [f"{len(unfinished)} of {len(jobs)} jobs did not complete:"]
    for job in unfinished:
        values = " ".join(f"{k}={v}" for k, v in runs.overrides_of(job).items() if k in swept)
        status, message = ends[job]
        name = str(job.relative_to(root)) + (f" ({values})" if values else "")
        lines.append(f"  job {name} {status}" + (f": {message}" if message else ""))
    report.console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)
    return [str(job.relative_to(root)) for job in unfinished]


class LrFindSweepSummary(Callback):
    """`dlrun lr-find -m ...`: every job's curve in one plot and a table of suggestions."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from dlrun.lr_find import SUGGESTIONS, plot

        root = Path(config.hydra.sweep.dir)
        curves, rows = [], []
        for job in job_dirs(root):
            path = job / "lr_find.json"
            if not path.is_file():  # a job that failed: report_unfinished lists it
                continue
            label = " ".join(f"{k}={v}" for k, v in runs.overrides_of(job).items()) or job.name
            try:
                result = rundir.read_json(path)
                with open(job / "lr_find.csv", newline="") as f:
                    points = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
                result["lrs"] = [p["lr"] for p in points]
                result["smoothed"] = [p["smoothed_loss"] for p in points]
                rows.append(
                    [label, *(float(result["suggestions"][n]) for n in SUGGESTIONS), float(result["lr"])]
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                report.err_console.print(
                    f"{job}: lr_find.json / lr_find.csv unreadable ({e}); left out", markup=False
                )
                continue
            curves.append((label, result))
        if not curves:
            return
        plot(curves, root / "lr_find.png")
        columns = ["job", *SUGGESTIONS, "used"]
        rundir.write_atomic(
            root / "lr_find_summary.csv",
            lambda f: (csv.writer(f).writerow(columns), csv.writer(f).writerows(rows)),
        )
        rundir.write_json(root / "lr_find_summary.json", [dict(zip(columns, r)) for r in rows])
        report.console.print(report.table(f"lr-find sweep ({root})", columns, rows))
        report.console.print(f"overlay plot: {root / 'lr_find.png'}")
