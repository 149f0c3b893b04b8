"""`trainer.compile`: the whole training step compiled when the run repays it (`auto`), always
(`true`) or never (`false`); a failing compiler leaves the run training eagerly."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import assert_user_error, compose, dlrun

from dlrun import compiled_step
from dlrun.compiled_step import PROBE, StepCompiler

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["trainer.epochs=1", "trainer.limit_batches=4", "trainer.progress=false", "trainer.checkpoint=false"]


@pytest.mark.parametrize(("steps_left", "decision"), [(1_000, "eager"), (10_000_000, "compile")])
def test_auto_compiles_only_when_the_steps_left_repay_the_compile_time(steps_left, decision):
    compiler = StepCompiler("auto", torch.device("cpu"))
    compiler.begin(steps_left)
    compiler.eager = [0.002] * PROBE  # 2 ms a step
    compiler.decide()
    saved = steps_left * 0.002 * compiled_step.SAVED["cpu"]
    assert (saved > compiled_step.COMPILE_S["cpu"]) == (decision == "compile")
    assert compiler.state == decision


def test_a_short_run_under_auto_stays_eager_and_says_compile_s_zero(tmp_path):
    from dlrun.learner import prepare
    from dlrun.train import fit

    learner = prepare(compose(*TINY))
    assert learner.compiler.mode == "auto"
    summary = fit(compose(*TINY), tmp_path, learner)
    assert summary["status"] == "completed" and summary["compile_s"] == 0.0
    assert learner.compiler.fn is None and learner.compiler.state == "probe"  # 4 steps: still timing


def test_a_failing_compile_warns_once_and_trains_eagerly(tmp_path, monkeypatch, caplog):
    from dlrun.learner import prepare
    from dlrun.train import fit

    def broken(learner):
        raise RuntimeError("no C compiler here\nsecond line")

    monkeypatch.setattr(compiled_step, "build", broken)
    cfg = compose(*TINY, "trainer.compile=true")
    learner = prepare(cfg)
    learner.forward = learner.model  # the evaluation forward need not compile for this test
    with caplog.at_level(logging.WARNING, logger="dlrun"):
        summary = fit(cfg, tmp_path, learner)
    lines = [r.getMessage() for r in caplog.records if "compiling the training step failed" in r.getMessage()]
    assert lines == [
        "trainer.compile: compiling the training step failed (RuntimeError: no C compiler here); "
        "training eagerly"
    ]
    assert summary["status"] == "completed" and summary["compile_s"] == 0.0
    assert all(isinstance(g["lr"], float) for g in learner.optimizer.param_groups)


def test_compile_takes_auto_true_or_false(tmp_path):
    proc = dlrun("train", "trainer.compile=sometimes", f"hydra.run.dir={tmp_path / 'r'}")
    assert_user_error(proc, "trainer.compile", "true or false or 'auto'")


@pytest.mark.slow
def test_the_compiled_step_trains_as_the_eager_one_does(tmp_path):
    """Compiles for real (tens of seconds on a CPU)."""
    from dlrun.learner import prepare
    from dlrun.train import fit

    losses = {}
    for mode in ("false", "true"):
        cfg = compose(
            "model=tabular", "trainer.epochs=2", "trainer.progress=false", f"trainer.compile={mode}"
        )
        learner = prepare(cfg)
        (tmp_path / mode).mkdir()
        summary = fit(cfg, tmp_path / mode, learner)
        assert summary["status"] == "completed"
        assert (summary["compile_s"] > 0) == (mode == "true")
        losses[mode] = summary["final"]["valid_loss"]
    assert losses["true"] == pytest.approx(losses["false"], rel=0.05)


def test_lr_find_never_takes_a_compiled_step(monkeypatch):
    from dlrun.learner import prepare
    from dlrun.lr_find import range_test

    learner = prepare(compose(*TINY, "trainer.compile=true"))
    learner.compiler.begin(10**6)  # as in the middle of a long compiled run (finetune's unfreeze)
    monkeypatch.setattr(compiled_step, "build", lambda learner: pytest.fail("compiled during lr-find"))
    range_test(learner, 1e-7, 1e-3, 8)
    assert learner.compiler.fn is None and learner.compiler.remaining == 10**6
