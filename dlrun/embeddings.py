"""`dlrun embeddings RUN_DIR`: what a tabular run's entity embeddings learned.

Writes each categorical column's embedding to `RUN_DIR/embeddings/<column>.csv` (one
row per level: the level, then the vector), then trains scikit-learn's k-NN, random
forest and histogram gradient boosting on the run's own train/valid split twice: with
each category as its ordinal code, and with each category replaced by its learned
vector. As in Table III of Guo & Berkhahn's "Entity Embeddings of Categorical
Variables" (Rossmann MAPE: KNN 0.315 -> 0.099, RF 0.167 -> 0.089, GBM 0.122 -> 0.071),
the embeddings should help every one of them. The table, beside the network's own
best metric, is printed and saved as `embeddings/comparison.csv`.

A large table is compared on a seeded sample of each split (`--max-rows`, the same rows with
codes and with embeddings; k-NN on `--knn-rows` of them), so that a million rows take minutes,
not hours; each fit prints its score and its time as it ends.
"""

from __future__ import annotations

import argparse
import csv
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dlrun import rundir
from dlrun.config import load_saved
from dlrun.errors import DlrunError, parse_args

USAGE = "dlrun embeddings RUN_DIR [--max-rows N] [--knn-rows N] [--seed S]"
MAX_ROWS = 100_000  # rows of each split the comparison models see (a seeded sample)
KNN_ROWS = 20_000  # k-NN's training rows: each prediction is a distance to every one of them
# Each tree of the random forest sees a bootstrap sample of at most this many rows: a forest of
# full-depth trees grows with the rows, and 100 of them on 100,000 rows take minutes.
FOREST_ROWS = 20_000
# Below this many training rows the models run on one thread: OpenMP's barriers then cost more
# than the threads save, hundreds of times more on a machine that other jobs keep busy.
SERIAL_ROWS = 20_000


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dlrun embeddings",
        description="Export a tabular run's entity embeddings and compare k-NN, random forest and "
        "gradient boosting on ordinal codes against the same models on the embeddings.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `dlrun train model=tabular ...` run directory")
    parser.add_argument(
        "--max-rows",
        type=int,
        default=MAX_ROWS,
        help=f"rows of each split the models see, a seeded sample (default {MAX_ROWS:,}; 0: all)",
    )
    parser.add_argument(
        "--knn-rows",
        type=int,
        default=KNN_ROWS,
        help=f"training rows k-NN compares each row with, from that sample (default {KNN_ROWS:,}; 0: all)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the sample and the models (default: the run's)"
    )
    args = parse_args(parser, argv, USAGE)
    for flag, value in (("--max-rows", args.max_rows), ("--knn-rows", args.knn_rows)):
        if value < 0:
            raise DlrunError(f"{flag} {value} is not allowed: give a number of rows, or 0 for all")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise DlrunError(f"--seed {args.seed} is not allowed: use an integer from 0 to {2**32 - 1}")
    return args


def embedding_tables(model: Any, cat_names: list[str]) -> dict[str, np.ndarray]:
    """Column name -> its embedding matrix [n_levels, width] (row i is level i)."""
    return {name: t.detach().cpu().numpy() for name, t in zip(cat_names, model.embeds.tables())}


def write_embeddings(
    out_dir: Path, tables: dict[str, np.ndarray], levels: dict[str, list[str]]
) -> list[Path]:
    """One CSV per column: `level, e0, e1, ...`."""
    paths = []
    for name, weights in tables.items():
        # Column names may hold characters a file name cannot.
        path = out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["level"] + [f"e{i}" for i in range(weights.shape[1])])
            for level, vector in zip(levels[name], weights):
                w.writerow([level] + [f"{v:.6g}" for v in vector])
        paths.append(path)
    return paths


def features(cat: np.ndarray, cont: np.ndarray, tables: dict[str, np.ndarray] | None) -> np.ndarray:
    """Model inputs: categories as ordinal codes (tables=None) or as their embedding vectors."""
    if tables is None:
        return np.hstack([cat.astype(np.float32), cont])
    vectors = [weights[cat[:, i]] for i, weights in enumerate(tables.values())]
    return np.hstack([*vectors, cont]).astype(np.float32)


def score(task: str, log_y: bool, metric: str, pred: np.ndarray, y: np.ndarray) -> float:
    """The run's own metric (as dlrun computes it) of predictions against targets."""
    if task == "classification":
        return float((pred == y).mean())
    if log_y:
        pred, y = np.exp(pred), np.exp(y)
    err = pred - y
    return {
        "rmse": lambda: float(np.sqrt(np.mean(err**2))),
        "mae": lambda: float(np.mean(np.abs(err))),
        "rmspe": lambda: float(np.sqrt(np.mean((err / y) ** 2))),
    }[metric]()


def estimators(task: str, n_train: int, seed: int, n_jobs: int) -> dict[str, Any]:
    """The paper's three comparison models, in their fast forms: k-NN (fitted on a sample, see
    `compare`), a random forest whose trees each see at most FOREST_ROWS rows, and histogram
    gradient boosting (binned features; early stopping on large tables)."""
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

    classify = task == "classification"
    knn = KNeighborsClassifier if classify else KNeighborsRegressor
    forest = RandomForestClassifier if classify else RandomForestRegressor
    boosting = HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor
    return {
        "k-NN (k=10)": knn(n_neighbors=10, n_jobs=n_jobs),
        "random forest": forest(
            n_estimators=100,
            max_samples=min(1.0, FOREST_ROWS / max(n_train, 1)),
            # sqrt (scikit-learn's default for classes) also for regression: a third of the
            # features is the usual choice, but the embeddings add hundreds of columns.
            max_features="sqrt",
            n_jobs=n_jobs,
            random_state=seed,
        ),
        "gradient boosting": boosting(random_state=seed),
    }


def sample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices: all `n` rows, or `k` of them drawn without replacement (in row order)."""
    return np.arange(n) if k == 0 or n <= k else np.sort(rng.choice(n, k, replace=False))


def compare(
    table: Any,
    tables: dict[str, np.ndarray],
    metric: str,
    seed: int = 0,
    max_rows: int = MAX_ROWS,
    knn_rows: int = KNN_ROWS,
    progress: Callable[[str, str, int, tuple[float, float] | None], None] = lambda *_: None,
) -> list[dict]:
    """Fit each estimator without and with the embeddings on the same sampled rows; one row per
    estimator with both scores and both times (fit and predict). `progress(model, inputs,
    training rows, result)` is called before each fit (result None) and after it ((score, seconds))."""
    from threadpoolctl import threadpool_limits

    a = table.arrays()
    rng = np.random.default_rng(seed)
    train = sample(len(a["y_train"]), max_rows, rng)
    valid = sample(len(a["y_valid"]), max_rows, rng)
    knn = train[sample(len(train), knn_rows, rng)]
    y_train, y_valid = a["y_train"], a["y_valid"][valid]
    serial = len(train) < SERIAL_ROWS
    rows = []
    for label, est in estimators(table.task, len(train), seed, 1 if serial else -1).items():
        fit_rows = knn if label.startswith("k-NN") else train
        row: dict[str, Any] = {"model": label, "metric": metric, "train_rows": len(fit_rows)}
        for column, tabs, inputs in (
            ("without_embeddings", None, "ordinal codes"),
            ("with_embeddings", tables, "learned embeddings"),
        ):
            progress(label, inputs, len(fit_rows), None)
            t0 = time.perf_counter()
            x_train = features(a["cat_train"][fit_rows], a["cont_train"][fit_rows], tabs)
            with threadpool_limits(1 if serial else None):
                est.fit(x_train, y_train[fit_rows])
                pred = est.predict(features(a["cat_valid"][valid], a["cont_valid"][valid], tabs))
            seconds = time.perf_counter() - t0
            row[column] = score(table.task, table.log_y, metric, pred, y_valid)
            row[f"seconds_{column}"] = round(seconds, 2)
            progress(label, inputs, len(fit_rows), (row[column], seconds))
        rows.append(row)
    return rows


def load_run(run: Path) -> tuple[Any, Any, Any]:
    """The run's config, processed table and model with the best weights."""
    from dlrun.data.tabular import load_table, table_facts
    from dlrun.family import build_model

    cfg = load_saved(run)
    if cfg.get("model", {}).get("family") != "tabular":
        family = cfg.get("model", {}).get("family")
        raise DlrunError(f"{run} is a run of the {family} family: dlrun embeddings needs a model=tabular run")
    table = load_table(cfg.data)
    model = build_model(cfg, table_facts(table))
    rundir.load_weights(model, run)
    return cfg, table, model.eval()


def main(argv: list[str]) -> None:
    """Export a tabular run's embeddings and compare k-NN / RF / GBM without and with them."""
    args = parse(argv)
    run = rundir.existing_run(args.run_dir, need=rundir.BEST)

    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    t0 = time.perf_counter()
    with console.status(f"reading the table of {run.name} and its best weights"):
        cfg, table, model = load_run(run)
    if not table.cat_names:
        raise DlrunError(f"{run} has no categorical columns, so no embeddings to export")
    console.print(f"read the table ({len(table.y):,} rows) and the model in {time.perf_counter() - t0:.1f} s")
    out_dir = run / "embeddings"
    out_dir.mkdir(exist_ok=True)
    tables = embedding_tables(model, table.cat_names)
    written = write_embeddings(out_dir, tables, table.levels)
    console.print(f"wrote {len(written)} embedding tables to {out_dir}/")

    summary = rundir.read_json(run / rundir.SUMMARY) if (run / rundir.SUMMARY).is_file() else {}
    from dlrun.data.tabular import loss_and_metrics

    metrics = loss_and_metrics(table)[1]()
    metric = metrics.monitor
    n_train, n_valid = int((~table.is_valid).sum()), int(table.is_valid.sum())
    limit = lambda n: n if args.max_rows == 0 else min(n, args.max_rows)  # noqa: E731
    sampled = " (a sample: --max-rows)" if limit(n_train) < n_train or limit(n_valid) < n_valid else ""
    console.print(
        f"k-NN, random forest and gradient boosting on {limit(n_train):,} of {n_train:,} training rows, "
        f"scored on {limit(n_valid):,} of {n_valid:,} validation rows{sampled}"
    )
    with console.status("") as status:

        def progress(label: str, inputs: str, n_rows: int, result: tuple[float, float] | None) -> None:
            if result is None:
                status.update(f"fitting {label} on {inputs} ({n_rows:,} rows)")
            else:
                console.print(f"  {label}, {inputs}: {metric} {result[0]:.4f} in {result[1]:.1f} s")

        seed = int(cfg.get("seed", 0)) if args.seed is None else args.seed
        rows = compare(table, tables, metric, seed, args.max_rows, args.knn_rows, progress)
    network = summary.get("best", {}).get(metric)
    rows.append({"model": "neural network (this run)", "metric": metric, "with_embeddings": network})

    path = out_dir / "comparison.csv"
    fields = ["model", "metric", "without_embeddings", "with_embeddings"]
    fields += ["train_rows", "seconds_without_embeddings", "seconds_with_embeddings"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: row.get(k, "") for k in fields} for row in rows)

    shown = Table(
        title=f"{metric} on the validation split of {run.name}"
        f" ({'higher' if metrics.mode == 'max' else 'lower'} is better)"
    )
    for name, justify in (("model", "left"), ("ordinal codes", "right"), ("learned embeddings", "right")):
        shown.add_column(name, justify=justify)
    shown.add_column("seconds", justify="right")
    for row in rows:
        cells = (
            "-" if row.get(k) is None else f"{row[k]:.4f}" for k in ("without_embeddings", "with_embeddings")
        )
        seconds = (
            f"{row['seconds_without_embeddings']:.1f} + {row['seconds_with_embeddings']:.1f}"
            if "seconds_with_embeddings" in row
            else "-"
        )
        shown.add_row(row["model"], *cells, seconds)
    console.print(shown)
    console.print(f"saved {path}; done in {time.perf_counter() - t0:.1f} s")
