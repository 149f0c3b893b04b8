"""Which lr-finder suggestion trains best: for each task and seed, `dlrun train
optimizer.lr=find lr_find.suggest=RULE` (the finder, then a short one-cycle training at the
rule's rate) through the command line, and the mean and spread of the monitored metric
per rule and task, with each rule's mean rank across the tasks (lr_find.suggest's default
should be the best). Combined rules that dlrun does not have (--combined) are computed
from the same run's lr_find.json and trained with optimizer.lr=VALUE.

    taskset -c 1 .venv/bin/python benchmarks/bench_lr_suggest.py [--seeds 0 1 2] [--tasks digits adult]

A rule whose rate equals one already trained for the same task and seed reuses that run:
the same seed and rate train the same numbers (tests/test_lr_find.py checks it).
Run by hand, never in the test suite: 9 minutes on an idle CPU core, 16 on a shared one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlrun.metrics import MODES  # noqa: E402  (torch-free: which way each metric is better)

RULES = ("minimum", "steep", "valley", "slide")
# Candidates for a default that dlrun does not name: rate from the four suggestions.
COMBINED = {
    "geomean(valley,steep)": lambda s: math.sqrt(s["valley"] * s["steep"]),
    "min(steep,minimum)": lambda s: min(s["steep"], s["minimum"]),
}
DIABETES_NUMBERS = ["age", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


def tasks(adult: Path, tmp: Path) -> dict[str, list[str]]:
    """Task name -> dlrun overrides: short trainings, a few CPU seconds to a minute each."""
    diabetes = tmp / "diabetes.csv"
    if not diabetes.is_file():  # scikit-learn's bundled copy: nothing is downloaded
        from sklearn.datasets import load_diabetes

        load_diabetes(as_frame=True, scaled=False).frame.to_csv(diabetes, index=False)
    return {
        "digits (cnn, 5 ep)": ["trainer.epochs=5"],
        "penguins (tabular, 10 ep)": ["model=tabular", "trainer.epochs=10"],
        "adult (tabular, 5 ep)": ["experiment=adult", f"data.path={adult}", "trainer.epochs=5"],
        "prose (char lstm, 3x100 b)": [
            "model=rnn",
            "model.n_hid=128",
            "model.emb_sz=64",
            "model.n_layers=1",
            "trainer.limit_batches=100",
            "trainer.epochs=3",
        ],
        "diabetes (tabular regr., 20 ep)": [
            "model=tabular",
            "data=csv",
            f"data.path={diabetes}",
            "data.y_name=target",
            "data.cat_names=[sex]",
            f"data.cont_names=[{','.join(DIABETES_NUMBERS)}]",
            "data.task=regression",
            "trainer.epochs=20",
        ],
    }


def train(run_dir: Path, overrides: list[str]) -> dict:
    """`dlrun train` in a subprocess; its summary.json, or a failed record."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    args = [
        sys.executable,
        "-m",
        "dlrun",
        "train",
        "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not (run_dir / "summary.json").is_file():
        print(
            f"  FAILED ({proc.returncode}): {' '.join(overrides)}\n{proc.stdout[-800:]}{proc.stderr[-800:]}"
        )
        return {"status": "failed", "seconds": time.perf_counter() - t0}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**summary, "seconds": time.perf_counter() - t0}


def score(summary: dict) -> float:
    """The best epoch's monitored metric; NaN for a run that did not complete (diverged)."""
    if summary.get("status") != "completed":
        return math.nan
    return float(summary["best"][summary["monitor"]])


def run_task(name: str, overrides: list[str], seeds: list[int], out: Path) -> dict:
    """Every rule (and combined candidate) on every seed of one task."""
    scores: dict[str, list[float]] = {r: [] for r in (*RULES, *COMBINED)}
    lrs: dict[str, list[float]] = {r: [] for r in scores}
    monitor = None
    for seed in seeds:
        trained: dict[float, dict] = {}  # lr -> summary, for this seed
        base = out / name.split()[0] / f"seed{seed}"
        found = None
        for rule in RULES:
            lr = found[rule] if found else None
            if lr is None or lr not in trained:
                summary = train(
                    base / rule, [*overrides, f"seed={seed}", "optimizer.lr=find", f"lr_find.suggest={rule}"]
                )
                if found is None:
                    found = json.loads((base / rule / "lr_find.json").read_text())["suggestions"]
                lr = found[rule]
                if summary.get("lr") not in (None, lr):
                    print(f"  warning: {rule} trained at {summary['lr']!r}, its lr_find.json says {lr!r}")
                trained[lr] = summary
            scores[rule].append(score(trained[lr]))
            lrs[rule].append(lr)
            monitor = monitor or trained[lr].get("monitor")
        for cname, combine in COMBINED.items():
            lr = combine(found)
            if lr not in trained:
                trained[lr] = train(
                    base / re.sub(r"\W+", "_", cname), [*overrides, f"seed={seed}", f"optimizer.lr={lr!r}"]
                )
            scores[cname].append(score(trained[lr]))
            lrs[cname].append(lr)
        seconds = sum(s["seconds"] for s in trained.values())
        print(f"{name} seed {seed}: {len(trained)} trainings, {seconds:.0f} s", flush=True)
    return {"monitor": monitor, "scores": scores, "lrs": lrs}


def mean_sd(values: list[float]) -> tuple[float, float]:
    ok = [v for v in values if math.isfinite(v)]
    if len(ok) < len(values) or not ok:
        return math.nan, math.nan
    return statistics.fmean(ok), statistics.stdev(ok) if len(ok) > 1 else 0.0


def ranks(means: dict[str, float], higher_better: bool) -> dict[str, float]:
    """Rank 1 = best; ties share their mean rank; a rule with a failed run ranks last."""
    key = {r: (m if math.isfinite(m) else -math.inf if higher_better else math.inf) for r, m in means.items()}
    order = sorted(key, key=lambda r: -key[r] if higher_better else key[r])
    out, i = {}, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and key[order[j + 1]] == key[order[i]]:
            j += 1
        for r in order[i : j + 1]:
            out[r] = (i + j) / 2 + 1
        i = j + 1
    return out


def report(results: dict[str, dict], seeds: list[int]) -> str:
    """A markdown table, rule x task: mean ± sd over the seeds (geometric mean of the
    suggested lrs); each rule's rank per task on those means, averaged over the tasks; and
    the default that picks: the best mean rank, ties broken by the mean rank per task and
    seed (each seed's runs ranked on their own)."""
    rules = list(next(iter(results.values()))["scores"])
    task_ranks: dict[str, list[float]] = {r: [] for r in rules}
    seed_ranks: dict[str, list[float]] = {r: [] for r in rules}
    cells: dict[str, list[str]] = {r: [] for r in rules}
    for res in results.values():
        higher = MODES[res["monitor"]] == "max"
        stats = {r: mean_sd(res["scores"][r]) for r in rules}
        for r, rank in ranks({r: s[0] for r, s in stats.items()}, higher).items():
            task_ranks[r].append(rank)
        for i in range(len(seeds)):
            for r, rank in ranks({r: res["scores"][r][i] for r in rules}, higher).items():
                seed_ranks[r].append(rank)
        digits = 4 if higher else 3
        for r in rules:
            m, sd = stats[r]
            lr = math.exp(statistics.fmean(math.log(v) for v in res["lrs"][r]))
            cell = "failed" if not math.isfinite(m) else f"{m:.{digits}f} ± {sd:.{digits}f}"
            cells[r].append(f"{cell} ({lr:.1e})")
    order = sorted(rules, key=lambda r: (statistics.fmean(task_ranks[r]), statistics.fmean(seed_ranks[r])))
    head = [f"{name}: best {res['monitor']}" for name, res in results.items()]
    lines = [
        f"mean ± sd over seeds {seeds} (geometric mean of the suggested lr)",
        "| rule | " + " | ".join(head) + " | mean rank | per seed |",
        "| --- " * (len(head) + 3) + "|",
    ]
    for r in order:
        lines.append(
            f"| {r} | "
            + " | ".join(cells[r])
            + f" | {statistics.fmean(task_ranks[r]):.2f} | {statistics.fmean(seed_ranks[r]):.2f} |"
        )
    lines.append(f"\nbest mean rank (ties: the mean rank per seed): {order[0]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="*", help="first words of task names (default: all)")
    parser.add_argument(
        "--adult", type=Path, default=REPO.parent / "shared" / "data" / "adult" / "adult.data"
    )
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: a temp dir)")
    parser.add_argument("--results", type=Path, help="print the table of a saved results.json, run nothing")
    args = parser.parse_args()
    if args.results:
        saved = json.loads(args.results.read_text())
        print(report(saved["results"], saved["seeds"]))
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_lr_suggest_"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    for name, overrides in tasks(args.adult, out).items():
        if args.tasks and name.split()[0] not in args.tasks:
            continue
        results[name] = run_task(name, overrides, args.seeds, out)
    (out / "results.json").write_text(json.dumps({"seeds": args.seeds, "results": results}, indent=1))
    print(f"\n{report(results, args.seeds)}\n")
    print(f"{time.perf_counter() - t0:.0f} s in all; runs and results.json in {out}")


if __name__ == "__main__":
    main()
