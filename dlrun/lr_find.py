"""The learning-rate range test (Smith 2015, as fastai's `lr_find`).

Train from `start_lr` to `end_lr` on an exponential schedule, one optimizer step per rate
(one mini-batch, or `trainer.accumulate` of them),
with the run's own loss, regularization, precision and clipping (`learner.train_step`);
watch a smoothed loss; stop when it blows up; put everything back as it was; suggest
a rate.
"""

from __future__ import annotations

import copy
import csv
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from dlrun import report, rundir
from dlrun.learner import Learner, prepare, train_step

# --- the suggestion rules: plain arithmetic on the recorded curve ---------------------
# Each takes (lrs, losses): the smoothed losses that `suggestions` hands over (as fastai's
# `lr_find` hands its rules), in float64 where fastai uses float32 tensors.


def suggest_minimum(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai's `minimum` (the course's rule): a tenth of the lr at the lowest loss (at the
    minimum the loss is about to blow up; a tenth of it still descends fast)."""
    return float(lrs[int(np.argmin(losses))] / 10)


def suggest_steep(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai's `steep`: the slope of each segment between neighbouring points against
    log(lr); the lr at the left end of the steepest falling segment."""
    slopes = np.diff(losses) / np.diff(np.log(lrs))
    return float(lrs[int(np.argmin(slopes))])


def suggest_valley(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai's `valley`: the longest descending subsequence of the loss (each point lower
    than the one before it in the subsequence; of equally long ones, the first to end)
    ends at point `end` with `length` points. The stretch is taken as the `length` points
    up to `end`, as if the descent had no gaps: `start = end - length` (one before it),
    `sections = (end - start) / 3`, and the lr at `start + int(sections) + int(sections /
    2)`, about halfway along. One deliberate difference: where the longest descent is two
    points ending at the second, fastai's index is -1 (the last, largest lr); dlrun's is 0."""
    n = len(losses)
    length = [1] * n  # length of the longest descent ending at point i
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and length[j] + 1 > length[i]:
                length[i] = length[j] + 1
        if length[i] > length[end]:
            start, end = i - length[i], i
    sections = (end - start) / 3
    return float(lrs[max(0, start + int(sections) + int(sections / 2))])


def suggest_slide(
    lrs: np.ndarray, losses: np.ndarray, lr_diff: int = 15, thresh: float = 0.005, adjust_value: float = 1.0
) -> float:
    """fastai's `slide` (interval slide rule): with the loss's gradient per point, walk a
    pair of points `lr_diff` apart leftwards from the end of the curve while their
    gradients differ by more than `thresh`; the lr at the left point of the last pair that
    still differed (or of the first pair), times `adjust_value`. Deliberate difference: on a
    curve of at most `lr_diff` points fastai fails (index out of range); dlrun narrows the
    pair to the whole curve."""
    grad = np.gradient(losses)
    right = len(losses) - 1
    left = right - min(lr_diff, right)
    found = lrs[left]
    while left >= 0 and abs(grad[right] - grad[left]) > thresh:
        found = lrs[left]
        right, left = right - 1, left - 1
    return float(found * adjust_value)


# name -> rule, as fastai's `suggest_funcs`: `lr_find.suggest` picks one (the list in
# dlrun/config.py's RULES names the same rules).
SUGGESTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "minimum": suggest_minimum,
    "steep": suggest_steep,
    "valley": suggest_valley,
    "slide": suggest_slide,
}


def suggestions(lrs: list[float], smoothed: list[float], num_it: int) -> dict[str, float]:
    """Every rule's suggestion on the smoothed curve less its first num_it//10 and last 5
    points (the start is noise around the initial loss, the end is the blow-up), cut before
    its first non-finite value: what fastai's `lr_find` feeds its rules (it cuts at the
    first NaN). Deliberate difference: a curve too short to leave 3 points (fastai fails on
    it) keeps its start and as much of its end as it can."""
    skip_start, skip_end = num_it // 10, 5
    if len(lrs) - skip_start - skip_end < 3:  # stopped very early: keep what there is
        skip_start, skip_end = 0, min(skip_end, max(0, len(lrs) - 3))
    end = len(lrs) - skip_end
    x = np.asarray(lrs[skip_start:end], dtype=float)
    y = np.asarray(smoothed[skip_start:end], dtype=float)
    finite = np.isfinite(y)
    if not finite.all():
        x, y = x[: np.argmin(finite)], y[: np.argmin(finite)]
    if len(x) < 2:
        return {name: float(lrs[0]) for name in SUGGESTIONS}
    return {name: rule(x, y) for name, rule in SUGGESTIONS.items()}


# --- the range test ---------------------------------------------------------------


class Snapshot:
    """Model (parameters and buffers such as batch-norm statistics), optimizer, grad
    scaler and every RNG, copied so that they can be put back exactly."""

    def __init__(self, learner: Learner):
        self.model = copy.deepcopy(learner.model.state_dict())
        self.optimizer = copy.deepcopy(learner.optimizer.state_dict())
        self.scaler = copy.deepcopy(learner.scaler.state_dict()) if learner.scaler is not None else None
        self.training = learner.model.training
        self.rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        self.cuda_rng = torch.cuda.get_rng_state_all() if learner.device.type == "cuda" else None

    def restore(self, learner: Learner) -> None:
        learner.model.load_state_dict(self.model)
        learner.optimizer.load_state_dict(self.optimizer)
        if self.scaler is not None:
            learner.scaler.load_state_dict(self.scaler)
        learner.optimizer.zero_grad(set_to_none=True)
        learner.model.train(self.training)
        learner.reset_state()
        torch.set_rng_state(self.rng[0])
        random.setstate(self.rng[1])
        np.random.set_state(self.rng[2])
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def batches(learner: Learner, limit: int | None) -> Any:
    """Training batches without end: epoch after epoch (each at most `limit` batches)."""
    epoch = 0
    while True:
        for i, batch in enumerate(learner.data.train.epoch(epoch)):
            if limit is not None and i >= limit:
                break
            yield batch
        epoch += 1


def range_test(
    learner: Learner,
    start_lr: float,
    end_lr: float,
    num_it: int,
    beta: float = 0.98,
    stop_div: float = 4.0,
    limit: int | None = None,
    accumulate: int = 1,
) -> dict[str, Any]:
    """Train one optimizer step (of `accumulate` batches) per lr from start_lr to end_lr
    (exponential steps), record the raw and smoothed loss, stop early when the smoothed loss
    exceeds stop_div times its best or is not finite, and restore the learner exactly as it was."""
    num_it = max(6, num_it)
    snapshot = Snapshot(learner)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best, stopped_early = 0.0, math.inf, False
    learner.model.train()
    learner.reset_state()
    data = learner.data
    # Eager steps: a range test is too short to repay compiling (trainer.compile), even mid-run.
    compiler, learner.compiler = learner.compiler, None
    try:
        stream = batches(learner, limit)
        for i in range(num_it):
            lr = start_lr * (end_lr / start_lr) ** (i / (num_it - 1))
            step_losses = []
            for j, (x, y) in zip(range(accumulate), stream):
                scaled = lr * data.lr_scale(x) if data.lr_scale is not None else lr
                last = j == accumulate - 1
                step_losses.append(train_step(learner, x, y, scaled, None, 1 / accumulate, last))
            loss = (step_losses[0] if accumulate == 1 else torch.stack(step_losses).mean()).item()
            # Debiased exponential moving average: early values are not pulled to zero.
            avg = beta * avg + (1 - beta) * loss
            smooth = avg / (1 - beta ** (i + 1))
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(smooth)
            if not math.isfinite(smooth) or smooth > stop_div * best:
                stopped_early = i < num_it - 1
                break
            best = min(best, smooth)
    finally:
        snapshot.restore(learner)
        learner.compiler = compiler
    return {
        "lrs": lrs,
        "losses": losses,
        "smoothed": smoothed,
        "stopped_early": stopped_early,
        "num_it": num_it,
        "suggestions": suggestions(lrs, smoothed, num_it),
    }


def lr_find(cfg: DictConfig, learner: Learner, run_dir: Path, stem: str = "lr_find") -> dict[str, Any]:
    """Run the range test for `cfg`, write <stem>.csv/.json/.png into run_dir, show the
    curve, and return the result with `lr`, the suggestion `lr_find.suggest` picks."""
    lf = cfg.lr_find
    result = range_test(
        learner,
        float(lf.start_lr),
        float(lf.end_lr),
        int(lf.num_it),
        float(lf.beta),
        float(lf.stop_div),
        cfg.trainer.limit_batches,
        cfg.trainer.accumulate,
    )
    result["suggest"] = lf.suggest
    result["lr"] = result["suggestions"][lf.suggest]
    save(result, run_dir, stem)
    show(result)
    return result


def save(result: dict[str, Any], run_dir: Path, stem: str = "lr_find") -> None:
    """lr_find.csv (lr, loss, smoothed_loss), lr_find.json, lr_find.png (or another `stem`)."""

    def write_csv(f: Any) -> None:
        w = csv.writer(f)
        w.writerow(["lr", "loss", "smoothed_loss"])
        w.writerows(zip(result["lrs"], result["losses"], result["smoothed"]))

    rundir.write_atomic(run_dir / f"{stem}.csv", write_csv)
    summary = {k: result[k] for k in ("suggestions", "suggest", "lr", "stopped_early", "num_it")}
    summary["points"] = len(result["lrs"])
    summary["min_smoothed_loss"] = min(result["smoothed"], default=None)
    rundir.write_json(run_dir / f"{stem}.json", summary)
    plot([(None, result)], run_dir / f"{stem}.png")


def plot(curves: list[tuple[str | None, dict[str, Any]]], path: Path) -> None:
    """Smoothed loss against lr (log scale), the suggestions marked; one curve per run."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"minimum": "v", "steep": "o", "valley": "*", "slide": "D"}
    for label, r in curves:
        line = ax.plot(r["lrs"], r["smoothed"], label=label)[0]
        for name, lr in r["suggestions"].items():
            y = np.interp(np.log(lr), np.log(r["lrs"]), r["smoothed"]) if r["lrs"] else 0
            ax.plot(
                [lr],
                [y],
                markers[name],
                color=line.get_color(),
                markersize=9,
                label=f"{name} {lr:.2e}" if label is None else None,
            )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed loss")
    finite = [v for _, r in curves for v in r["smoothed"] if math.isfinite(v)]
    if finite:  # the blow-up at the end would squash the interesting part
        lo, first = min(finite), max(r["smoothed"][0] for _, r in curves if r["smoothed"])
        ax.set_ylim(lo - 0.05 * abs(lo), max(first, lo) * 1.5 + 1e-3)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    report.save_figure(fig, path)


def show(result: dict[str, Any]) -> None:
    """The curve drawn in the terminal and a table of the suggestions."""
    report.console.print(report.text_curve(result["lrs"], result["smoothed"], result["suggestions"]))
    # The chosen rule is marked in a column of its own: a legend in the title made the title
    # wider than this narrow table, and rich wrapped it into two broken lines.
    rows = [
        (name, lr, "*" if name == result["suggest"] else "") for name, lr in result["suggestions"].items()
    ]
    report.console.print(report.table("suggestions", ["rule", "lr", "lr=find"], rows))
    if result["stopped_early"]:
        report.console.print(
            f"stopped after {len(result['lrs'])} of {result['num_it']} batches: the loss blew up"
        )


def main(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The task behind `dlrun lr-find`."""
    result = lr_find(cfg, prepare(cfg), run_dir)
    report.console.print(
        f"suggested lr: {result['lr']:.3g} ({result['suggest']}); "
        f"use it with optimizer.lr={result['lr']:.3g}, or train with optimizer.lr=find\n"
        f"plot and data: {run_dir}/lr_find.png, lr_find.csv"
    )
    return result
