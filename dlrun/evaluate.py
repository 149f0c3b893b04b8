"""`dlrun eval RUN_DIR`: the validation metrics of a saved run's best weights."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dlrun import report, rundir
from dlrun.config import load_saved

if TYPE_CHECKING:
    from dlrun.learner import Learner


def rebuild(run_dir: str, weights: str = rundir.BEST, device: str | None = None) -> Learner:
    """The run's data and model, rebuilt from its saved config, with `weights` loaded: the
    validation split as training saw it (`dlrun eval`, `dlrun interpret`)."""
    from dlrun.learner import prepare

    path = rundir.existing_run(run_dir, need=weights)
    cfg = load_saved(path)
    cfg.optimizer.lr = 1e-3 if cfg.optimizer.lr == "find" else cfg.optimizer.lr
    if device:
        cfg.trainer.device = device
    learner = prepare(cfg)
    rundir.load_weights(learner.model, path, weights, learner.device)
    return learner


def evaluate_run(run_dir: str, weights: str = rundir.BEST, device: str | None = None) -> dict[str, float]:
    """Rebuild the run's data and model from its saved config, load `weights`, and
    return the validation metrics."""
    from dlrun.learner import evaluate

    metrics, _ = evaluate(rebuild(run_dir, weights, device))
    return metrics


def main(argv: list[str]) -> None:
    """`dlrun eval RUN_DIR [--weights last] [--device cpu]`."""
    parser = argparse.ArgumentParser(prog="dlrun eval", description="Validation metrics of a saved run.")
    parser.add_argument("run_dir", help="a run directory written by dlrun train")
    rundir.add_weights_option(parser)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None)
    args = parser.parse_args(argv)
    weights = rundir.WEIGHTS[args.weights]
    metrics = evaluate_run(args.run_dir, weights, args.device)
    report.console.print(report.table(f"{args.run_dir} ({weights})", list(metrics), [list(metrics.values())]))
