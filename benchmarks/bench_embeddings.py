"""`dlrun embeddings` on a large table: a generated Rossmann-like sales table of 1M rows
(seeded), a brief tabular training run, then `dlrun embeddings` timed end to end.

    flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_embeddings.py [--rows 1000000] [--dir DIR]
                                    [--epochs 1] [--max-rows 100000] [--run RUN_DIR]

The table: 1,000 stores (the high-cardinality column, each with its own level of sales),
12 states, 4 store types, a promo flag, a state holiday that is `0` or a text code (`a`,
`b`, `c`), the competitor's distance (3% missing) and the day's temperature (continuous),
and a date; sales are the product of the store's level, the day of the week, promo,
holiday and season effects with 10% noise. Validation is the last 6 weeks
(`data.valid_last=42D`) and the metric rmspe. Ordinal store codes carry no order, so the
tree models should gain most from the store embedding.

`--run RUN_DIR` reuses a finished run instead of training one (the table must exist).
The target: `dlrun embeddings` finishes in under 5 minutes on a 2-core CPU. Measured there:
67 s wall (84 s CPU) on 1M rows after a one-epoch run; the table is in README.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DLRUN = [sys.executable, "-m", "dlrun"]

STORES, STATES = 1000, 12


def make_table(path: Path, rows: int, seed: int = 0) -> None:
    """Write the sales table: `rows` rows, one per store and day (stores x days, in date order)."""
    rng = np.random.default_rng(seed)
    days = -(-rows // STORES)
    store_level = rng.lognormal(0.0, 0.5, STORES)  # what the store embedding can learn
    store_state = rng.integers(0, STATES, STORES)
    store_type = rng.choice(list("abcd"), STORES, p=[0.5, 0.1, 0.3, 0.1])
    distance = rng.lognormal(7.5, 1.2, STORES).round(-1)
    dates = pd.date_range("2013-01-01", periods=days, freq="D")
    store = np.tile(np.arange(STORES), days)[:rows]
    day = np.repeat(np.arange(days), STORES)[:rows]
    date = dates[day]
    dow = date.day_of_week.to_numpy()
    promo = (rng.random(rows) < np.where(dow < 5, 0.45, 0.0)).astype(int)
    holiday = np.where(rng.random(rows) < 0.97, "0", rng.choice(list("abc"), rows))
    season = np.sin(2 * np.pi * date.day_of_year.to_numpy() / 365.25)
    temperature = (12 + 10 * season + rng.normal(0, 3, rows)).round(1)
    dist = distance[store].astype(float)
    dist[rng.random(rows) < 0.03] = np.nan
    log_sales = (
        np.log(5000 * store_level[store])
        + np.array([0.1, 0.0, 0.0, 0.05, 0.15, 0.2, -0.4])[dow]
        + 0.3 * promo
        + np.where(holiday == "0", 0.0, -0.5)
        + 0.08 * season
        + 0.05 * (store_type[store] == "b")
        - 0.03 * np.log1p(np.nan_to_num(dist, nan=2000.0) / 1000)
        + rng.normal(0, 0.1, rows)
    )
    pd.DataFrame(
        {
            "Date": date.strftime("%Y-%m-%d"),
            "Store": store + 1,
            "State": [f"S{s:02d}" for s in store_state[store]],
            "StoreType": store_type[store],
            "Promo": promo,
            "StateHoliday": holiday,
            "CompetitionDistance": dist,
            "Temperature": temperature,
            "Sales": np.exp(log_sales).round(0),
        }
    ).to_csv(path, index=False)


def train_overrides(table: Path, epochs: int) -> list[str]:
    return [
        "model=tabular",
        "data=csv",
        f"data.path={table}",
        "data.y_name=Sales",
        "data.cat_names=[Store,State,StoreType,Promo,StateHoliday]",
        "data.cont_names=[CompetitionDistance,Temperature]",
        "data.date_names=[Date]",
        "data.valid_by=Date",
        "data.valid_last=42D",
        "data.log_y=true",
        "data.bs=1024",
        "optimizer.lr=3e-3",
        f"trainer.epochs={epochs}",
        "trainer.progress=false",
    ]


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Run a command; its wall seconds, its CPU seconds (children included) and its output."""
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out}")
    return wall, cpu, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dir", type=Path, default=Path("/tmp/dlrun-bench-embeddings"))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-rows", type=int, default=None, help="passed to dlrun embeddings (default: its own)")
    p.add_argument("--run", type=Path, default=None, help="a finished run of this table to reuse")
    args = p.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    table = args.dir / f"sales_{args.rows}.csv"
    if not table.is_file():
        t0 = time.perf_counter()
        make_table(table, args.rows)
        mb = table.stat().st_size / 1e6
        print(f"wrote {table} ({args.rows:,} rows, {mb:.0f} MB) in {time.perf_counter() - t0:.1f} s")

    run_dir = args.run
    if run_dir is None:
        run_dir = args.dir / f"run_{args.rows}_{time.strftime('%Y%m%d-%H%M%S')}"
        wall, cpu, out = run(
            [*DLRUN, "train", *train_overrides(table, args.epochs), f"hydra.run.dir={run_dir}"]
        )
        print(f"dlrun train ({args.epochs} epoch): wall {wall:.1f} s, CPU {cpu:.1f} s")
        print("\n".join(line for line in out.splitlines() if "split" in line or "done" in line))

    cmd = [*DLRUN, "embeddings", str(run_dir)]
    if args.max_rows is not None:
        cmd += ["--max-rows", str(args.max_rows)]
    wall, cpu, out = run(cmd)
    print(out)
    print(f"dlrun embeddings, end to end: wall {wall:.1f} s, CPU {cpu:.1f} s (target: under 300 s wall)")
    with open(run_dir / "embeddings" / "comparison.csv", newline="") as f:
        models = [row for row in csv.DictReader(f) if row["seconds_with_embeddings"]]
    print("per model (seconds: ordinal codes + learned embeddings, fit and predict):")
    for row in models:
        codes, embeddings = float(row["seconds_without_embeddings"]), float(row["seconds_with_embeddings"])
        print(
            f"  {row['model']:<20} {row['train_rows']:>7} rows  {codes:6.1f} + {embeddings:6.1f} s   "
            f"{row['metric']} {float(row['without_embeddings']):.4f} -> {float(row['with_embeddings']):.4f}"
        )


if __name__ == "__main__":
    main()
