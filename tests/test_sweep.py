"""Sweeps: one job per value, a failing job does not stop the others, the summary table."""

from __future__ import annotations

import csv

from conftest import QUICK, dlrun


def test_a_sweep_summarises_every_job_even_a_diverged_one(tmp_path):
    proc = dlrun(
        "train",
        "-m",
        f"hydra.sweep.dir={tmp_path}",
        *QUICK,
        "trainer.epochs=1",
        "trainer.limit_batches=3",
        "trainer.log_every=1",
        "optimizer=sgd",
        "schedule=constant",
        "optimizer.lr=0.05,1e12",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # not every job completed
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["optimizer.lr"]) for r in rows] == [0.05, 1e12]  # best (completed) first
    assert [r["status"] for r in rows] == ["completed", "diverged"]
    assert (tmp_path / "sweep.png").is_file()
    assert "diverged" in proc.stdout and "sweep of 2 jobs" in proc.stdout
    again = dlrun("runs", str(tmp_path))
    assert again.returncode == 0 and "diverged" in again.stdout and "0.05" in again.stdout


def test_runs_on_a_folder_without_runs_is_an_error(tmp_path):
    proc = dlrun("runs", str(tmp_path))
    assert proc.returncode == 2 and "no runs under" in proc.stderr
