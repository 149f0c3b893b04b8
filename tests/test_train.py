"""`dlrun train` on the bundled digits: outputs, determinism, failures, resume, eval."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch
from conftest import DLRUN, QUICK, assert_user_error, dlrun, metrics_rows, summary, train

SHORT = ["trainer.epochs=2", "trainer.limit_batches=4"]


def test_a_run_writes_every_output(run_dir):
    proc = train(run_dir, *SHORT)
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "train.log",
        "metrics.csv",
        "summary.json",
        "checkpoint.pt",
        "best.pt",
        "loss.png",
    ):
        assert (run_dir / name).is_file(), name
    rows = metrics_rows(run_dir, drop=())
    assert list(rows[0]) == ["epoch", "train_loss", "valid_loss", "accuracy", "lr", "seconds"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    s = summary(run_dir)
    assert s["status"] == "completed" and s["epochs"] == 2 and s["device"] == "cpu"
    assert set(s["best"]) == {"train_loss", "valid_loss", "accuracy"} == set(s["final"])
    assert 0 <= s["best"]["accuracy"] <= 1 and s["wall_s"] > 0 and s["versions"]["torch"]
    assert "run directory" in proc.stdout
    # Checkpoints are plain tensors and data: they load with weights_only=True.
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 2 and "model" in ckpt and "optimizer" in ckpt


@pytest.mark.slow  # make test-slow: the fast suite stays under 10 minutes on 2 cores
def test_same_seed_gives_the_same_numbers(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b):
        train(d, *SHORT, "seed=3")
    train(c, *SHORT, "seed=4")
    assert metrics_rows(a) == metrics_rows(b)
    assert metrics_rows(a) != metrics_rows(c)


def test_a_diverging_run_stops_with_advice(run_dir):
    proc = dlrun(
        "train",
        *QUICK,
        f"hydra.run.dir={run_dir}",
        "optimizer=sgd",
        "optimizer.lr=1e12",
        "schedule=constant",
        "trainer.log_every=1",
        *SHORT,
    )
    assert_user_error(proc, "loss became", "lower optimizer.lr", "trainer.grad_clip")
    s = summary(run_dir)
    assert s["status"] == "diverged" and "loss became" in s["message"]


def test_batch_size_larger_than_the_data_is_refused(run_dir):
    proc = dlrun("train", *QUICK, f"hydra.run.dir={run_dir}", "data.bs=5000")
    assert_user_error(proc, "data.bs=5000 is larger than the train split")
    assert summary(run_dir)["status"] == "failed"


def test_precision_16_on_cpu_is_refused(run_dir):
    assert_user_error(
        dlrun("train", *QUICK, f"hydra.run.dir={run_dir}", "trainer.precision=16"),
        "trainer.precision=16 needs a GPU",
    )


@pytest.mark.slow  # make test-slow: the fast suite stays under 10 minutes on 2 cores
def test_bf16_autocast_and_clipping_and_every_optimizer_and_schedule_train(tmp_path):
    for i, extra in enumerate(
        [
            ["trainer.precision=bf16", "trainer.grad_clip=0.5"],
            ["optimizer=sgd", "optimizer.nesterov=true", "schedule=sgdr", "regularization.wd_mode=l2"],
            ["optimizer=adam", "schedule=cosine"],
            ["optimizer=adamw", "schedule=constant", "regularization=none"],
        ]
    ):
        run_dir = tmp_path / str(i)
        train(run_dir, *SHORT, *extra)
        assert summary(run_dir)["status"] == "completed", extra


def test_eval_reports_the_best_epoch_metrics(run_dir):
    train(run_dir, "trainer.epochs=2")  # no limit_batches: eval reads the whole valid split
    proc = dlrun("eval", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    best = summary(run_dir)["best"]
    assert f"{best['accuracy']:.4f}" in proc.stdout


@pytest.mark.slow  # make test-slow: the fast suite stays under 10 minutes on 2 cores
def test_ctrl_c_saves_a_checkpoint_and_resume_ends_like_an_uninterrupted_run(tmp_path):
    args = [*QUICK, "trainer.epochs=40", "trainer.limit_batches=3", "seed=1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(full, *args)
    proc = subprocess.Popen(
        [DLRUN, "train", *args, f"hydra.run.dir={cut}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(read_rows(cut)) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert f"dlrun train resume={cut}" in err
    s = summary(cut)
    assert s["status"] == "interrupted" and s["epochs"] < 40
    resumed = dlrun("train", f"resume={cut}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert summary(cut)["status"] == "completed"
    assert metrics_rows(cut) == metrics_rows(full)
    assert "epochs: 40" in (cut / ".hydra" / "config.yaml").read_text()


def read_rows(run_dir):
    try:
        return metrics_rows(run_dir)
    except (FileNotFoundError, KeyError):
        return []


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "r" / ".hydra").mkdir(parents=True)
    (tmp_path / "r" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    assert_user_error(dlrun("train", f"resume={tmp_path / 'r'}"), "has no checkpoint.pt")


@pytest.mark.slow
def test_default_run_reaches_97_percent_on_digits(run_dir):
    start = time.time()
    train(run_dir)
    assert summary(run_dir)["best"]["accuracy"] >= 0.97
    assert time.time() - start < 120
