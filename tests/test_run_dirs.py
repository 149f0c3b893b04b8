"""Run and sweep directories: each run has its own however many start in the same second,
a sweep keeps its summary whatever its jobs do, `dlrun runs` reads past any bad summary.json."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import DLRUN, QUICK, assert_user_error, dlrun, metrics_rows, summary

TINY = [*QUICK, "trainer.limit_batches=1"]

# Loaded by every dlrun process (and every joblib worker) started with `faulty_env`: the
# model of a run with seed FAIL_SEED raises a KeyError, a bug as dlrun's own code could have.
SITECUSTOMIZE = """
import os

import dlrun.learner

_build_model = dlrun.learner.build_model


def build_model(cfg, facts):
    if cfg.seed == int(os.environ["FAIL_SEED"]):
        raise KeyError("injected fault")
    return _build_model(cfg, facts)


dlrun.learner.build_model = build_model
"""


def faulty_env(tmp_path: Path, seed: int) -> dict[str, str]:
    folder = tmp_path / "fault"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "FAIL_SEED": str(seed)}


def start(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [DLRUN, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def taken(folder: Path, seconds: int = 300) -> set[Path]:
    """Directories named for every second from now on, as earlier runs would have left them:
    whichever second a new run starts in, the name it would pick is in use."""
    folder.mkdir(parents=True)
    now = datetime.now()
    dirs = set()
    for s in range(-2, seconds):
        d = folder / (now + timedelta(seconds=s)).strftime("%Y-%m-%d_%H-%M-%S")
        d.mkdir()
        (d / "earlier-run.txt").write_text("not yours\n")
        dirs.add(d)
    return dirs


def overrides(run: Path) -> list[str]:
    return [
        line.removeprefix("- ").strip()
        for line in (run / ".hydra" / "overrides.yaml").read_text().splitlines()
    ]


@pytest.mark.slow
def test_runs_started_in_the_same_second_each_get_their_own_directory(tmp_path):
    earlier = taken(tmp_path / "outputs" / "train")
    procs = {n: start("train", *TINY, f"trainer.epochs={n}", cwd=tmp_path) for n in (1, 2, 3)}
    dirs = {}
    for n, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err
        dirs[n] = Path(out.split("run directory: ")[1].split()[0])
    assert len(set(dirs.values())) == 3
    for d in earlier:
        assert [p.name for p in d.iterdir()] == ["earlier-run.txt"]
    for n, run in dirs.items():
        assert "earlier-run.txt" not in os.listdir(run)
        assert f"trainer.epochs={n}" in overrides(run)
        assert len(metrics_rows(run)) == summary(run)["epochs"] == n
        assert summary(run)["status"] == "completed"
        assert (run / "best.pt").is_file() and (run / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_sweeps_started_in_the_same_second_each_get_their_own_directory(tmp_path):
    earlier = taken(tmp_path / "outputs" / "train-multirun")
    launchers = {1: [], 2: ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}
    procs = {
        n: start("train", "-m", *TINY, f"trainer.epochs={n}", "seed=0,1", *launcher, cwd=tmp_path)
        for n, launcher in launchers.items()
    }
    for proc in procs.values():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err
    for d in earlier:
        assert [p.name for p in d.iterdir()] == ["earlier-run.txt"]
    sweeps = sorted(set((tmp_path / "outputs" / "train-multirun").iterdir()) - earlier)
    assert len(sweeps) == 2
    epochs_of = {}
    for sweep in sweeps:
        jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
        assert [j.name for j in jobs] == ["0", "1"]
        epochs = {o for j in jobs for o in overrides(j) if o.startswith("trainer.epochs=")}
        assert len(epochs) == 1
        n = int(epochs.pop().split("=")[1])
        epochs_of[n] = sweep
        for job, seed in zip(jobs, ("0", "1")):
            assert f"seed={seed}" in overrides(job)
            assert len(metrics_rows(job)) == summary(job)["epochs"] == n
        with open(sweep / "summary.csv", newline="") as f:
            assert sorted(r["seed"] for r in csv.DictReader(f)) == ["0", "1"]
    assert sorted(epochs_of) == [1, 2]


def test_a_sweep_job_that_crashes_is_recorded_and_the_summary_is_written(tmp_path):
    sweep = tmp_path / "sweep"
    proc = dlrun(
        "train", "-m", f"hydra.sweep.dir={sweep}", *TINY, "trainer.epochs=1", "seed=0,1,2",
        env=faulty_env(tmp_path, 1),
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    assert "job 1 (seed=1) failed: KeyError: 'injected fault'" in proc.stderr
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["status"], r["seed"]) for r in rows)[-1] == ("failed", "1")  # and listed last
    assert rows[-1]["seed"] == "1" and [r["status"] for r in rows[:2]] == ["completed", "completed"]
    assert (sweep / "sweep.png").is_file()
    assert summary(sweep / "1")["status"] == "failed"
    assert summary(sweep / "1")["message"] == "KeyError: 'injected fault'"
    last = proc.stdout.strip().splitlines()[-2:]
    assert last[0].startswith("1 of 3 jobs did not complete"), out
    assert "1" in last[1] and "seed=1" in last[1] and "failed" in last[1], out
    again = dlrun("runs", str(sweep))
    assert again.returncode == 0 and "3 runs" in again.stdout and "failed" in again.stdout


def test_a_single_run_that_crashes_shows_the_bug_and_records_it(tmp_path):
    run = tmp_path / "run"
    proc = dlrun("train", f"hydra.run.dir={run}", *TINY, "seed=1", env=faulty_env(tmp_path, 1))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" in proc.stderr and "KeyError: 'injected fault'" in proc.stderr  # a bug shows where
    assert summary(run)["status"] == "failed"
    assert summary(run)["message"] == "KeyError: 'injected fault'"


def test_ctrl_c_during_a_sweep_still_writes_its_summary(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(
        [DLRUN, "train", "-m", f"hydra.sweep.dir={sweep}", *TINY, "trainer.epochs=10000", "seed=0,1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (sweep / "0" / "metrics.csv").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err, out + err
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["interrupted"]
    assert summary(sweep / "0")["status"] == "interrupted"
    assert not (sweep / "1").exists()  # Ctrl-C stops the sweep
    assert "did not complete" in out and "interrupted" in out.strip().splitlines()[-1]


def test_runs_shows_unreadable_summaries_and_goes_on(tmp_path):
    good = {
        "status": "completed",
        "monitor": "accuracy",
        "mode": "max",
        "best": {"accuracy": 0.9, "valid_loss": 0.3},
        "epochs": 2,
        "wall_s": 1.5,
    }
    bad = {
        "truncated": '{"status": "completed", "be',
        "empty": "",
        "a-list": "[1, 2]",
        "a-string": '"hello"',
        "no-status": json.dumps({"name": "something else"}),
        "odd-status": json.dumps({**good, "status": 3}),
        "text-metric": json.dumps({**good, "best": {"accuracy": "high"}}),
        "best-a-list": json.dumps({**good, "best": [0.9]}),
    }
    for name, text in {"good": json.dumps(good), **bad}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(text)
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "summary.json").write_bytes(b"\xff\xfe\x00garbage")
    proc = dlrun("runs", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "10 runs" in proc.stdout
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("│")}
    assert "0.9000" in lines["good"] and "completed" in lines["good"]
    for name in [*bad, "binary"]:
        assert "unreadable" in lines[name], proc.stdout


def test_a_run_directory_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_user_error(
        dlrun("train", f"hydra.run.dir={blocker / 'run'}", "trainer.epochs=1"),
        "cannot create the run directory",
        "hydra.run.dir=DIR",
    )
    assert_user_error(
        dlrun("train", "-m", f"hydra.sweep.dir={blocker / 'sweep'}", "seed=0,1"),
        "cannot create the sweep directory",
    )
