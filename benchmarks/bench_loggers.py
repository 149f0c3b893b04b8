"""What logging to TensorBoard and MLflow costs per epoch on the digits CNN, at the default
`trainer.log_every`: `train.fit` with `logger=[csv]` against `logger=[csv,tensorboard,mlflow]`,
in the same process, alternated so that machine noise hits both.

    .venv/bin/python benchmarks/bench_loggers.py [--epochs 4] [--repeats 5]

An epoch's time is taken between two consecutive metrics.csv rows (train steps, validation,
the row, the checkpoint, and the loggers' calls), from the second epoch on: the run's start
(MLflow's run and params) and end (artifacts) happen once per run and are timed separately.
The MLflow store is a SQLite file in a temporary folder, created before timing starts.

On a shared machine the wall-clock ratio is noisy (other processes' load moves an epoch by
more than logging costs), so the loggers' own work is measured too: the CPU time the loggers'
thread spends on each epoch's calls (per-step points and the epoch's row), which is an upper
bound of what it can take from the training thread through the interpreter lock.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import compose

from dlrun import loggers, rundir
from dlrun.learner import prepare
from dlrun.train import fit


def timed_fit(cfg, run_dir: Path) -> tuple[list[float], float]:
    """(seconds of each epoch after the first, the whole fit's seconds)."""
    ends: list[float] = []
    append = rundir.MetricsLog.append

    def stamped(self, row):
        append(self, row)
        ends.append(time.perf_counter())

    rundir.MetricsLog.append = stamped
    try:
        t0 = time.perf_counter()
        fit(cfg, run_dir, prepare(cfg))
        total = time.perf_counter() - t0
    finally:
        rundir.MetricsLog.append = append
    return [b - a for a, b in zip(ends, ends[1:])], total


def count_cpu(busy: list[float]) -> None:
    """Add the loggers' thread CPU time of every per-step and per-epoch call to `busy`."""
    for cls in (loggers.TensorBoardLogger, loggers.MlflowLogger):
        for name in ("metrics", "epoch"):
            method = getattr(cls, name)

            def timed(self, *args, _method=method):
                t0 = time.thread_time()
                try:
                    return _method(self, *args)
                finally:
                    busy.append(time.thread_time() - t0)

            setattr(cls, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    busy: list[float] = []
    count_cpu(busy)
    common = ["trainer.progress=false", f"trainer.epochs={args.epochs}", f"trainer.device={args.device}"]
    store = f"logger.mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}"
    configs = {
        "csv": compose(*common, "logger=[csv]"),
        "csv+tensorboard+mlflow": compose(*common, "logger=[csv,tensorboard,mlflow]", store),
    }
    print(f"digits CNN, {args.epochs} epochs, log_every {configs['csv'].trainer.log_every}, {args.device}")
    epochs: dict[str, list[float]] = {name: [] for name in configs}
    totals: dict[str, list[float]] = {name: [] for name in configs}
    thread_cpu: list[float] = []  # the loggers' thread, CPU seconds per epoch
    for i in range(args.repeats + 1):  # the first round warms up (and creates the MLflow store)
        for name, cfg in configs.items():
            run_dir = work / f"{name}-{i}"
            run_dir.mkdir()
            busy.clear()
            per_epoch, total = timed_fit(cfg, run_dir)
            if i and name != "csv":
                thread_cpu.append(sum(busy) / args.epochs)
            if i:
                epochs[name].append(statistics.median(per_epoch))
                totals[name].append(total)
        if i:
            a, b = (epochs[name][-1] for name in configs)
            print(f"pair {i}: epoch {a:.4f} s / {b:.4f} s, ratio {b / a:.3f}", flush=True)
    base, logged = epochs["csv"], epochs["csv+tensorboard+mlflow"]
    ratios = [b / a for a, b in zip(base, logged)]  # each pair ran back to back
    for name in configs:
        print(
            f"{name:<24} epoch {statistics.median(epochs[name]):.4f} s "
            f"(min {min(epochs[name]):.4f}, max {max(epochs[name]):.4f})   "
            f"whole run {statistics.median(totals[name]):.3f} s"
        )
    print(
        f"per-epoch ratio logged/csv: median {statistics.median(ratios):.3f} "
        f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)})"
    )
    cpu = statistics.median(thread_cpu)
    print(
        f"loggers' thread: {cpu * 1000:.1f} ms CPU per epoch (max {max(thread_cpu) * 1000:.1f}), "
        f"{cpu / min(base):.2%} of the fastest csv epoch"
    )


if __name__ == "__main__":
    main()
