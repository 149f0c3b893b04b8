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


class LrFindSweepSummary(Callback):
    """`dlrun lr-find -m ...`: every job's curve in one plot and a table of suggestions."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from dlrun.lr_find import plot

        root = Path(config.hydra.sweep.dir)
        curves, rows = [], []
        for path in sorted(root.glob("*/lr_find.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
            job = path.parent
            result = rundir.read_json(path)
            with open(job / "lr_find.csv", newline="") as f:
                points = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
            result["lrs"] = [p["lr"] for p in points]
            result["smoothed"] = [p["smoothed_loss"] for p in points]
            label = " ".join(f"{k}={v}" for k, v in runs.overrides_of(job).items()) or job.name
            curves.append((label, result))
            rows.append(
                [label, *(result["suggestions"][n] for n in ("minimum", "steep", "valley")), result["lr"]]
            )
        if not curves:
            return
        plot(curves, root / "lr_find.png")
        columns = ["job", "minimum", "steep", "valley", "used"]
        rundir.write_atomic(
            root / "lr_find_summary.csv",
            lambda f: (csv.writer(f).writerow(columns), csv.writer(f).writerows(rows)),
        )
        rundir.write_json(root / "lr_find_summary.json", [dict(zip(columns, r)) for r in rows])
        report.console.print(report.table(f"lr-find sweep ({root})", columns, rows))
        report.console.print(f"overlay plot: {root / 'lr_find.png'}")
