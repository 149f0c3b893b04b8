"""Resume: a run stopped anywhere and resumed ends exactly as an uninterrupted one, for every
family; a run killed at any moment leaves only complete files and resumes to the end; the run's
wall time, the leftovers of a kill and the resume of a finished run."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DLRUN, QUICK, assert_user_error, compose, dlrun, metrics_rows, prose, summary, train
from test_failures import StopAfter
from test_images import image_folder

from dlrun import train as loop
from dlrun.errors import DlrunError
from dlrun.family import build_data, build_model

# Tiny versions of each family: 4 batches an epoch, 3 epochs, a few seconds each.
TINY = ("trainer.epochs=3", "trainer.limit_batches=4", "trainer.progress=false", "seed=5")
RNN = ("model=rnn", "model.emb_sz=16", "model.n_hid=24", "model.n_layers=2", "data.bs=8", "data.bptt=12")
FAMILIES = {
    "cnn-digits": ("model=cnn", "data=digits"),
    "tabular-penguins": ("model=tabular",),
    "rnn-lstm": (*RNN, "model.cell=lstm"),
    "rnn-qrnn-variable-bptt": (*RNN, "model.cell=qrnn", "data.variable_bptt=true"),
    "cnn-image-folder": ("model=cnn", "data=imagefolder", "data.size=16", "data.bs=4", "data.num_workers=0"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 8 KB of real English prose, as a user's .txt file."""
    return prose(tmp_path_factory.mktemp("corpus"), 8, 8_000)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("pics"), n=10)


def family_args(name: str, corpus: Path, pictures: Path) -> tuple[str, ...]:
    extra = ()
    if name.startswith("rnn"):
        extra = ("data=text", f"data.path={corpus}")
    elif name == "cnn-image-folder":
        extra = (f"data.path={pictures}",)
    return (*TINY, *FAMILIES[name], *extra)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, monkeypatch, family, corpus, pictures):
    args = family_args(family, corpus, pictures)
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    loop.fit(compose(*args), full)
    # Step 6 of 4-batch epochs: halfway through epoch 2, where an RNN carries its hidden state.
    monkeypatch.setattr(loop, "StopRequest", lambda: StopAfter(6))
    with pytest.raises(loop.Interrupted):
        loop.fit(compose(*args), cut)
    assert summary(cut)["status"] == "interrupted" and len(metrics_rows(cut)) == 1
    monkeypatch.undo()
    loop.fit(compose(*args, f"resume={cut}"), cut)
    assert summary(cut)["status"] == "completed"
    assert metrics_rows(cut) == metrics_rows(full)


# --- SIGKILL at random moments ------------------------------------------------------


def check_complete(run_dir: Path) -> None:
    """Every file a killed run left is whole: tables and JSON parse, checkpoints load."""
    rows = metrics_rows(run_dir, drop=())
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(math.isfinite(float(v)) for r in rows for v in r.values())
    if (run_dir / "summary.json").exists():
        json.loads((run_dir / "summary.json").read_text())
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["epoch"] in (len(rows), len(rows) - 1)  # the row is written just before it
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert 1 <= best["epoch"] <= len(rows)
    for path in run_dir.rglob("*"):
        if path.suffix in (".json", ".yaml"):
            yaml.safe_load(path.read_text())  # JSON is YAML


def rows_so_far(run_dir: Path) -> int:
    try:
        return len(metrics_rows(run_dir))
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_a_run_killed_at_random_moments_leaves_whole_files_and_resumes_exactly(tmp_path, corpus):
    # A language model (the family that carries state between batches), 4 batches an epoch.
    args = [*QUICK, *RNN, "data=text", f"data.path={corpus}", "data.variable_bptt=true", "seed=3"]
    args += ["trainer.epochs=200", "trainer.limit_batches=4"]
    one_thread = {"OMP_NUM_THREADS": "1"}
    full, run = tmp_path / "full", tmp_path / "run"
    proc = dlrun("train", *args, f"hydra.run.dir={full}", env=one_thread)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rng = random.Random(0)
    command, stops = [DLRUN, "train", *args, f"hydra.run.dir={run}"], 0
    # SIGKILL mostly (no warning: whatever was being written is cut short), SIGTERM too (the run
    # saves a checkpoint after the current step, usually mid-epoch).
    kill, term = signal.SIGKILL, signal.SIGTERM
    for sig in (kill, term, kill, kill, term, kill):
        before = rows_so_far(run)
        proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **one_thread},
        )
        # Let this session train an epoch of its own, then stop it at a random moment (tiny
        # epochs: much of their time goes into writing metrics.csv, best.pt and checkpoint.pt).
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if rows_so_far(run) > before and (run / "checkpoint.pt").exists():
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if sig == term and proc.returncode == 0:  # it came after the last step: the run completed
            assert summary_status(run) == "completed", err
            break
        assert proc.returncode == (-kill if sig == kill else 130), err
        stops += 1
        check_complete(run)
        command = [DLRUN, "train", f"resume={run}"]
    assert stops >= 4
    if summary_status(run) != "completed":
        finish = dlrun("train", f"resume={run}", env=one_thread)
        assert finish.returncode == 0, finish.stdout + finish.stderr
    check_complete(run)
    assert summary(run)["status"] == "completed"
    assert metrics_rows(run) == metrics_rows(full)
    assert not list(run.glob(".*.tmp"))  # what a kill left mid-write is gone


def summary_status(run_dir: Path) -> str | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


# --- item by item: wall time, leftovers, a finished run, overflow, bad values -------------


class SlowSteps(StopAfter):
    """Ctrl-C after `steps` steps of a run whose steps take `seconds` each (a slow machine)."""

    def __init__(self, steps: int, seconds: float):
        super().__init__(steps)
        self.seconds = seconds

    @property
    def requested(self) -> bool:
        time.sleep(self.seconds)
        return super().requested


def test_wall_time_keeps_the_time_trained_before_an_interruption(tmp_path, monkeypatch):
    args = ("model=cnn", "data=digits", *TINY)
    monkeypatch.setattr(loop, "StopRequest", lambda: SlowSteps(6, 0.2))
    with pytest.raises(loop.Interrupted):
        loop.fit(compose(*args), tmp_path)
    before = summary(tmp_path)["wall_s"]
    assert before >= 1.2
    monkeypatch.undo()
    loop.fit(compose(*args, f"resume={tmp_path}"), tmp_path)
    assert summary(tmp_path)["wall_s"] >= before


def test_resume_removes_the_partial_files_a_kill_left(tmp_path, monkeypatch):
    args = ("model=cnn", "data=digits", *TINY)
    monkeypatch.setattr(loop, "StopRequest", lambda: StopAfter(6))
    with pytest.raises(loop.Interrupted):
        loop.fit(compose(*args), tmp_path)
    monkeypatch.undo()
    # What write_atomic leaves when the process is killed mid-write.
    (tmp_path / ".checkpoint.pt.k3x9_q.tmp").write_bytes(b"PK\x03\x04 half a zip")
    (tmp_path / ".metrics.csv.a1b2c3.tmp").write_text("epoch,train_lo")
    loop.fit(compose(*args, f"resume={tmp_path}"), tmp_path)
    assert summary(tmp_path)["status"] == "completed"
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == []


def test_resuming_a_complete_run_says_so_and_changes_nothing(run_dir):
    train(run_dir, "trainer.epochs=2", "trainer.limit_batches=2")
    files = ("metrics.csv", "summary.json", "checkpoint.pt", "best.pt", "loss.png")
    before = {name: (run_dir / name).read_bytes() for name in files}
    time.sleep(0.05)
    proc = dlrun("train", f"resume={run_dir}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "is already complete (2 of 2 epochs): nothing to resume, nothing changed" in out, out
    assert len(out.strip().splitlines()) == 1, out
    assert {name: (run_dir / name).read_bytes() for name in files} == before


def test_a_language_model_whose_perplexity_overflows_has_diverged(corpus, run_dir):
    # sgd at lr 1000 without clipping: the losses stay finite (about 1e9), exp(loss) does not.
    proc = dlrun(
        "train",
        *QUICK,
        f"hydra.run.dir={run_dir}",
        *RNN,
        "data=text",
        f"data.path={corpus}",
        "trainer.epochs=1",
        "trainer.limit_batches=4",
        "optimizer=sgd",
        "optimizer.lr=1000",
        "schedule=constant",
        "trainer.grad_clip=null",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert_user_error(
        proc, "the loss became so large that perplexity is inf in epoch 1", "lower optimizer.lr"
    )
    assert summary(run_dir)["status"] == "diverged"


TABLE = (
    "model=tabular",
    "data=csv",
    "data.y_name=y",
    "data.cat_names=[c]",
    "data.cont_names=[a]",
    "data.bs=8",
)


def write_table(path: Path, target) -> Path:
    path.write_text("a,c,y\n" + "".join(f"{i % 7},{'xyz'[i % 3]},{target(i)}\n" for i in range(40)))
    return path


def test_a_target_with_one_class_is_refused(tmp_path, run_dir):
    table = write_table(tmp_path / "one.csv", lambda i: "yes")
    proc = dlrun("train", *QUICK, f"hydra.run.dir={run_dir}", *TABLE, f"data.path={table}")
    assert_user_error(proc, "data.y_name='y' has one class ('yes') in all 40 rows", "at least two")


def test_y_range_that_is_not_low_and_high_says_what_it_needs(tmp_path, run_dir):
    table = write_table(tmp_path / "reg.csv", lambda i: i * 1.5)
    regression = (*TABLE, f"data.path={table}", "data.task=regression")
    proc = dlrun("train", *QUICK, f"hydra.run.dir={run_dir}", *regression, "model.y_range=[1]")
    message = "must be two numbers, the lowest and the highest target with low < high"
    assert_user_error(proc, f"model.y_range=[1] {message}: for example model.y_range=[0,5]")
    for value in ("[5,1]", "1"):
        cfg = compose(*regression, f"model.y_range={value}")
        with pytest.raises(DlrunError, match=re.escape(f"model.y_range={value} {message}")):
            build_model(cfg, build_data(cfg, torch.device("cpu")).facts)


def test_generate_has_an_upper_bound_on_n(tmp_path):
    proc = dlrun("generate", str(tmp_path), "-n", "100000000")
    assert_user_error(proc, "-n 100000000 is too many: generate at most 100000 tokens")


def test_wall_time_includes_the_set_up(tmp_path, monkeypatch):
    import dlrun.train

    real = dlrun.train.prepare

    def slow_prepare(cfg):
        time.sleep(0.5)  # a data set that takes a while to load
        return real(cfg)

    monkeypatch.setattr(dlrun.train, "prepare", slow_prepare)
    cfg = compose("trainer.epochs=1", "trainer.limit_batches=2", "trainer.progress=false")
    result = dlrun.train.train(cfg, tmp_path)
    assert result["wall_s"] >= 0.5
