"""The image defaults on real data: `dlrun train data=mnist` and `dlrun train` (digits) as a user
runs them, one run per seed, through the command line. Prints each run's best accuracy, its
epoch, the seconds spent training (the sum of metrics.csv's `seconds`) and the wall seconds of
the whole command (start-up, reading the data, validation and checkpoints included).

    .venv/bin/python benchmarks/bench_mnist.py [--root ../shared/data/mnist] [--seeds 0 1]
        [--digits-seeds 0 1 2] [-- OVERRIDE ...]

Overrides after `--` go to every run (`-- model.grid=1` compares global average pooling).
MNIST is read from --root in torchvision's layout and never downloaded; without the files only
digits runs. Run by hand, never in the test suite: about 4 minutes per MNIST seed on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(overrides: list[str], run_dir: Path) -> dict[str, float]:
    """One `dlrun train` run: best accuracy, best epoch, training and wall seconds."""
    command = [sys.executable, "-m", "dlrun", "train", "trainer.progress=false", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(command + overrides, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"dlrun train {' '.join(overrides)} failed:\n{proc.stdout}{proc.stderr}")
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        train_s = sum(float(row["seconds"]) for row in csv.DictReader(f))
    return {
        "accuracy": summary["best"]["accuracy"],
        "epoch": summary["best_epoch"],
        "epochs": summary["epochs"],
        "train_s": train_s,
        "wall_s": wall,
    }


def report(name: str, rows: list[dict[str, float]], seeds: list[int]) -> None:
    for seed, r in zip(seeds, rows):
        print(
            f"{name:<8} seed {seed}: best accuracy {r['accuracy']:.4f} (epoch {r['epoch']} of "
            f"{r['epochs']}), training {r['train_s']:6.1f} s, wall {r['wall_s']:6.1f} s"
        )
    if len(rows) > 1:
        acc = [r["accuracy"] for r in rows]
        print(
            f"{name:<8} mean {statistics.mean(acc):.4f} ± {statistics.stdev(acc):.4f} over {len(rows)} seeds"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--digits-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*", help="after --: overrides for every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if (args.root / "MNIST" / "raw").is_dir():
            mnist = ["data=mnist", f"data.root={args.root.resolve()}", "data.download=false"]
            rows = [run(mnist + [f"seed={s}"] + args.overrides, Path(tmp) / f"mnist{s}") for s in args.seeds]
            report("mnist", rows, args.seeds)
        else:
            print(f"no MNIST in {args.root / 'MNIST' / 'raw'}: digits only (--root DIR)")
        seeds = args.digits_seeds
        rows = [run([f"seed={s}"] + args.overrides, Path(tmp) / f"digits{s}") for s in seeds]
        report("digits", rows, seeds)


if __name__ == "__main__":
    main()
