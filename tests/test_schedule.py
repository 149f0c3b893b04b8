"""The schedules' shapes, by their defining numbers."""

from __future__ import annotations

import math

import pytest

from dlrun.schedule import cosine, one_cycle, sgdr


def test_one_cycle_follows_fastai():
    s = one_cycle(1.0, total=100, pct_start=0.25, div=25, final_div=1e5, moms=(0.95, 0.85))
    assert s(0) == (pytest.approx(1 / 25), pytest.approx(0.95))
    lr, mom = s(25)
    assert lr == pytest.approx(1.0) and mom == pytest.approx(0.85)
    assert s(12)[0] < 1.0 and 0.85 < s(12)[1] < 0.95
    lr_end, mom_end = s(100)
    assert lr_end == pytest.approx(1e-5) and mom_end == pytest.approx(0.95)
    lrs = [s(i)[0] for i in range(101)]
    assert all(a <= b for a, b in zip(lrs[:25], lrs[1:26]))  # warms up
    assert all(a >= b for a, b in zip(lrs[25:], lrs[26:]))  # then anneals


def test_cosine_goes_from_lr_to_eta_min():
    s = cosine(0.5, total=10, eta_min=0.01)
    assert s(0)[0] == pytest.approx(0.5) and s(10)[0] == pytest.approx(0.01)
    assert s(5)[0] == pytest.approx((0.5 + 0.01) / 2)


def test_sgdr_restarts_after_cycles_of_growing_length():
    steps = 10
    s = sgdr(1.0, steps_per_epoch=steps, cycle_len=1, cycle_mult=2)
    restarts = [i for i in range(1, 7 * steps) if s(i)[0] > s(i - 1)[0]]
    assert restarts == [10, 30]  # cycles of 1, 2, 4 epochs: restarts at epochs 1 and 3
    assert s(0)[0] == 1.0 and s(10)[0] == 1.0 and s(30)[0] == 1.0
    assert s(29)[0] < 0.01 and math.isclose(s(20)[0], 0.5, abs_tol=1e-9)
