"""The lr finder's suggestion rules against fastai's (`fastai/callback/schedule.py`:
`minimum`, `steep`, `valley`, `slide`, and what `Learner.lr_find` feeds them), on saved
curves. The expected values come from the literal transcriptions below, not from dlrun."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from dlrun.config import RULES
from dlrun.lr_find import SUGGESTIONS, suggest_slide, suggest_valley, suggestions

CURVES = Path(__file__).parent / "fixtures" / "lr_curves"
NUM_IT = 100  # every saved curve was recorded with lr_find.num_it=100


def load(name: str) -> tuple[list[float], list[float]]:
    with open(CURVES / f"{name}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [float(r["lr"]) for r in rows], [float(r["smoothed_loss"]) for r in rows]


# --- fastai's code, transcribed line by line (plain lists instead of tensors) ---------


def fastai_inputs(lrs: list[float], losses: list[float], num_it: int) -> tuple[list[float], list[float]]:
    """Learner.lr_find: recorder.lrs/losses[num_it//10:-5], cut at the first NaN."""
    lrs, losses = lrs[num_it // 10 : -5], losses[num_it // 10 : -5]
    nan_idxs = [i for i, v in enumerate(losses) if math.isnan(v)]
    if len(nan_idxs) > 0:
        drop_idx = min(nan_idxs)
        lrs, losses = lrs[:drop_idx], losses[:drop_idx]
    return lrs, losses


def fastai_valley(lrs: list[float], losses: list[float]) -> float:
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx])


def fastai_slide(
    lrs: list[float], losses: list[float], lr_diff: int = 15, thresh: float = 0.005, adjust_value: float = 1.0
) -> float:
    loss_grad = np.gradient(np.asarray(losses))
    r_idx = -1
    l_idx = r_idx - lr_diff
    local_min_lr = lrs[l_idx]
    while (l_idx >= -len(losses)) and (abs(loss_grad[r_idx] - loss_grad[l_idx]) > thresh):
        local_min_lr = lrs[l_idx]
        r_idx -= 1
        l_idx -= 1
    return float(local_min_lr) * adjust_value


def fastai_minimum(lrs: list[float], losses: list[float]) -> float:
    argmin = min(range(len(losses)), key=lambda i: losses[i])  # the first lowest, as torch's argmin
    return lrs[argmin] / 10


def fastai_steep(lrs: list[float], losses: list[float]) -> float:
    grads = [
        (losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(len(lrs) - 1)
    ]
    return lrs[min(range(len(grads)), key=lambda i: grads[i])]


FASTAI = {"minimum": fastai_minimum, "steep": fastai_steep, "valley": fastai_valley, "slide": fastai_slide}


# --- the pinned curves --------------------------------------------------------


@pytest.mark.parametrize("curve", ["clean_valley", "noisy_plateau", "never_rises"])
def test_every_rule_equals_fastai_on_a_saved_curve(curve):
    lrs, losses = load(curve)
    got = suggestions(lrs, losses, NUM_IT)
    x, y = fastai_inputs(lrs, losses, NUM_IT)
    assert got == {name: FASTAI[name](x, y) for name in SUGGESTIONS}


def test_a_curve_stopped_after_30_points_as_fastai_except_slide_which_fastai_cannot_compute():
    lrs, losses = load("early_stop_30")
    assert len(lrs) == 30
    got = suggestions(lrs, losses, NUM_IT)
    x, y = fastai_inputs(lrs, losses, NUM_IT)  # 15 points left
    assert len(x) == 15
    for name in ("minimum", "steep", "valley"):
        assert got[name] == FASTAI[name](x, y), name
    with pytest.raises(IndexError):  # fastai's slide needs more than lr_diff=15 points
        fastai_slide(x, y)
    assert got["slide"] == fastai_slide(x, y, lr_diff=len(x) - 1)  # dlrun narrows the pair


def test_valley_is_fastai_formula_not_the_midpoint_of_the_descent():
    # On the digits curve the old rule (halfway from the descent's first point) gave 4.3e-4;
    # fastai's stretch is the last `length` points before the descent's end.
    lrs, losses = load("clean_valley")
    assert suggestions(lrs, losses, NUM_IT)["valley"] == pytest.approx(1.6e-3, rel=0.05)


def test_valley_keeps_to_the_curve_where_fastai_index_wraps_around():
    lrs = [1e-5, 1e-4, 1e-3, 1e-2]
    losses = [2.0, 1.0, 3.0, 4.0]  # the longest descent: the first two points
    assert fastai_valley(lrs, losses) == 1e-2  # index -1: the largest lr
    assert suggest_valley(np.array(lrs), np.array(losses)) == 1e-5
    assert suggest_valley(np.array(lrs[:3]), np.array([3.0, 2.0, 1.0])) == fastai_valley(
        lrs[:3], [3.0, 2.0, 1.0]
    )


def test_slide_with_its_parameters():
    lrs = np.logspace(-6, 0, 40)
    losses = np.concatenate([np.full(20, 2.0), 2.0 - 0.1 * np.arange(1, 21) ** 1.5 / 10])
    for kw in ({}, {"lr_diff": 5}, {"thresh": 0.05, "adjust_value": 0.5}):
        assert suggest_slide(lrs, losses, **kw) == fastai_slide(list(lrs), list(losses), **kw), kw


def test_a_non_finite_loss_cuts_the_curve_there():
    lrs, losses = load("clean_valley")
    losses = losses[:60] + [math.nan] + losses[61:]
    x, y = fastai_inputs(lrs, losses, NUM_IT)
    assert len(x) == 50
    assert suggestions(lrs, losses, NUM_IT) == {name: FASTAI[name](x, y) for name in SUGGESTIONS}


def test_every_rule_is_a_choice_of_lr_find_suggest():
    assert RULES["lr_find.suggest"].choices == tuple(SUGGESTIONS)
