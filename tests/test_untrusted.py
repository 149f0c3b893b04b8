"""Untrusted input (issue 9, items 4, 5, 6, 8): a run directory is data and cannot act, any path
a shell can pass works, damaged checkpoints and bad values are one-line errors, and a full or
read-only disk is a one-line error that keeps the last good checkpoint."""

from __future__ import annotations

import errno
import importlib.resources
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import DLRUN, QUICK, assert_user_error, compose, dlrun, metrics_rows, summary, train

import dlrun.train as loop
from dlrun import rundir
from dlrun.errors import DlrunError

TINY = ["trainer.epochs=1", "trainer.limit_batches=2"]
RNN = ["model=rnn", "model.emb_sz=8", "model.n_hid=16", "model.n_layers=1", "data.bs=8", "data.bptt=10"]
PENGUINS = Path(str(importlib.resources.files("palmerpenguins") / "data" / "penguins.csv"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished tiny run of each family the commands read, trained when a test first asks:
    cnn (eval, resume), tabular (embeddings), rnn (generate)."""
    root = tmp_path_factory.mktemp("runs")
    families = {"cnn": [], "tabular": ["model=tabular"], "rnn": RNN}

    class Runs(dict):
        def __missing__(self, family: str) -> Path:
            train(root / family, *TINY, *families[family])
            self[family] = root / family
            return self[family]

    return Runs()


def copy_run(runs: dict[str, Path], family: str, dest: Path) -> Path:
    shutil.copytree(runs[family], dest)
    return dest


# --- item 4: a run directory is data ------------------------------------------------


def test_resume_replays_no_hydra_override_found_in_the_run_dir(runs, tmp_path):
    run = copy_run(runs, "cnn", tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    with open(run / rundir.OVERRIDES, "a") as f:  # what an attacker appends
        f.write(f"- ++hydra.callbacks.x._target_=builtins.open\n- ++hydra.callbacks.x._args_=[{victim},w]\n")
    proc = dlrun("train", f"resume={run}", "trainer.epochs=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert victim.read_text() == "keep me"
    assert "ignoring ++hydra.callbacks.x._target_=builtins.open" in proc.stderr
    assert summary(run)["epochs"] == 2


def test_resume_refuses_a_damaged_overrides_file(runs, tmp_path):
    run = copy_run(runs, "cnn", tmp_path / "run")
    (run / rundir.OVERRIDES).write_text("- trainer.epochs=2\n- [trainer.limit_batches=1\n")  # cut short
    assert_user_error(dlrun("train", f"resume={run}"), "cannot read", "the run directory is damaged")


def test_a_saved_config_cannot_make_dlrun_import_a_module(runs, tmp_path):
    """`data.package` names what importlib would import: only a known data package is used."""
    run = copy_run(runs, "tabular", tmp_path / "run")
    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = run / rundir.CONFIG
    config.write_text(config.read_text().replace("package: palmerpenguins", "package: evilmod"))
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    refused = ["data.package='evilmod' is not allowed", "palmerpenguins"]
    for command in (["eval", str(run)], ["embeddings", str(run)]):
        assert_user_error(dlrun(*command, env=env), str(config), *refused)
    assert not marker.exists()
    assert_user_error(dlrun("train", "model=tabular", "data.package=evilmod", env=env), *refused)
    assert not marker.exists()


# --- item 5: any path a shell can pass ----------------------------------------------


def test_paths_with_spaces_accents_commas_apostrophes_and_tilde(tmp_path):
    home = tmp_path / "home"
    (home / "my data").mkdir(parents=True)
    shutil.copy(PENGUINS, home / "my data" / "pen guin's, café.csv")
    run = tmp_path / "café run, it's"
    table = ["model=tabular", "data=csv", "data.y_name=species", "data.cat_names=[island,sex]"]
    proc = dlrun(
        "train",
        *QUICK,
        *TINY,
        *table,
        "data.path=~/my data/pen guin's, café.csv",
        f"hydra.run.dir={run}",
        env={"HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(run)["status"] == "completed"
    resumed = dlrun("train", f"resume={run}", "trainer.epochs=2", env={"HOME": str(home)})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert len(metrics_rows(run)) == 2


def test_a_sweep_over_paths_with_spaces(tmp_path):
    for name in ("a b.csv", "c'd.csv"):
        shutil.copy(PENGUINS, tmp_path / name)
    table = ["model=tabular", "data=csv", "data.y_name=species", "data.cat_names=[island]"]
    paths = ",".join(str(tmp_path / name) for name in ("a b.csv", "c'd.csv"))
    sweep = tmp_path / "sweep dir"
    proc = dlrun("train", "-m", *QUICK, *TINY, *table, f"data.path={paths}", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(sweep / "0")["status"] == summary(sweep / "1")["status"] == "completed"


def test_an_interrupted_run_prints_a_resume_command_the_shell_can_run(tmp_path):
    run = tmp_path / "my run (café) [v2]"  # brackets: shell text, not terminal markup
    proc = subprocess.Popen(
        [DLRUN, "train", *QUICK, "trainer.epochs=200", "trainer.limit_batches=2", f"hydra.run.dir={run}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "40"},  # narrower than the command: it must not be wrapped
    )
    deadline = time.time() + 60
    while time.time() < deadline and not (run / rundir.METRICS).is_file():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    command = err.strip().splitlines()[-1].strip()
    assert command == "dlrun train " + shlex.quote(f"resume={run}")
    # The printed command as a user pastes it into a shell; trainer.epochs=1: the epoch done
    # before the interruption is all that is left to train.
    resumed = subprocess.run(
        ["bash", "-c", f"{shlex.quote(DLRUN)} {command.removeprefix('dlrun ')} trainer.epochs=1"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert summary(run)["status"] == "completed"


# --- item 6: damaged checkpoints, bad values ----------------------------------------


class RunsCode:
    """A pickle that would run code when loaded without weights_only."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif how == "malicious":
        torch.save({"model": RunsCode()}, path)
    elif how == "plain pickle":
        path.write_bytes(pickle.dumps({"model": [1, 2]}))
    elif how == "not a checkpoint":
        torch.save(torch.zeros(3), path)
    elif how == "another model":
        torch.save({"model": {"w": torch.zeros(2)}}, path)


@pytest.mark.parametrize(
    "how", ["empty", "truncated", "garbage", "malicious", "plain pickle", "not a checkpoint", "another model"]
)
def test_a_damaged_weights_file_is_one_user_error(runs, tmp_path, how):
    run = copy_run(runs, "cnn", tmp_path / "run")
    damage(run / rundir.BEST, how)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(DlrunError) as e:
        rundir.load_weights(model, run)
    message = str(e.value)
    assert str(run / rundir.BEST) in message and "\n" not in message
    assert "weights_only" not in message  # never advice to unpickle a file that runs code
    assert ("does not fit" if how == "another model" else "is not a dlrun checkpoint") in message


@pytest.mark.parametrize(
    "family, command, name, how",
    [
        ("cnn", "eval", rundir.BEST, "truncated"),
        ("cnn", "resume", rundir.CHECKPOINT, "garbage"),
        ("rnn", "generate", rundir.BEST, "empty"),
        ("tabular", "embeddings", rundir.BEST, "malicious"),
        ("tabular", "eval", rundir.BEST, "another model"),
    ],
)
def test_every_command_says_a_checkpoint_is_damaged_in_one_line(runs, tmp_path, family, command, name, how):
    run = copy_run(runs, family, tmp_path / "run")
    damage(run / name, how)
    args = ["train", f"resume={run}", "trainer.epochs=2"] if command == "resume" else [command, str(run)]
    proc = dlrun(*args)
    assert_user_error(proc, str(run / name))
    assert "weights_only" not in proc.stderr and "pwned" not in proc.stdout


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["seed=4294967296"], ["seed=4294967296 is not allowed", "<= 4294967295"]),
        (["optimizer.betas=[0.9]"], ["optimizer.betas=[0.9] is not allowed", "exactly 2 values"]),
        (["optimizer.betas=[0.9,1.0]"], ["optimizer.betas", "< 1"]),
        (["schedule.moms=[0.95]"], ["schedule.moms=[0.95] is not allowed", "exactly 2 values"]),
        (["~optimizer.lr"], ["~optimizer.lr would delete optimizer.lr, which dlrun needs"]),
        (["~schedule"], ["~schedule would remove the schedule group", "schedule=constant"]),
        (["model=tabular", "+model.emb_szs.island=abc"], ["model.emb_szs.island='abc' is not allowed"]),
        (["-m", "seed=0,1", "--cfg", "job"], ["--cfg shows one job's config and cannot be combined with -m"]),
    ],
)
def test_bad_values_are_one_line_errors(args, fragments):
    assert_user_error(dlrun("train", *args), *fragments)


def test_generate_refuses_a_temperature_that_is_not_a_number():
    assert_user_error(dlrun("generate", "no-such-run", "--temperature", "nan"), "--temperature nan")


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_generate_refuses_a_seed_out_of_range(seed):
    assert_user_error(dlrun("generate", "no-such-run", "--seed", seed), f"--seed {seed} is not allowed")


def test_generate_usage_error_is_one_line():
    assert_user_error(dlrun("generate", "no-such-run", "--bogus"), "usage: dlrun generate")


@pytest.mark.parametrize(
    "change, named",
    [
        (["optimizer=sgd"], "optimizer.name (adamw -> sgd)"),
        (["model.channels=[8,16]"], "model.channels"),
        (["regularization.wd_mode=l2"], "regularization.wd_mode (decoupled -> l2)"),
    ],
)
def test_resume_refuses_to_change_the_model_or_the_optimizer(runs, tmp_path, change, named):
    run = copy_run(runs, "cnn", tmp_path / "run")
    proc = dlrun("train", f"resume={run}", "trainer.epochs=2", *change)
    assert_user_error(proc, "resume=", named, "start a new run")


def test_a_misspelt_key_added_with_plus_is_named_with_its_fix(tmp_path):
    # +model.emb_szs.island is a key the tabular model reads, added on purpose: no warning.
    added = ["+regularization.dropuot=0.5", "+model.emb_szs.island=3"]
    proc = train(tmp_path / "run", *TINY, "model=tabular", *added)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning")]
    assert warnings == [
        "warning: +regularization.dropuot adds a key that dlrun does not read "
        "(did you mean regularization.dropout?); the run goes on without it"
    ]


def test_help_into_a_closed_pipe_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # `dlrun train --help | head -0`: the reader is gone before dlrun writes
    proc = subprocess.run([DLRUN, "train", "--help"], stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


# --- item 8: full disk, read-only output --------------------------------------------


def full_disk_after(monkeypatch, good_saves: int) -> None:
    """torch.save writes `good_saves` files, then the disk is full: as on a real full disk, the
    write fails part-way and torch reports it as a RuntimeError over the OSError."""
    real_save = torch.save
    calls = []

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            if self.written > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(b)
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    def save(obj, f, *args, **kw):
        calls.append(1)
        return real_save(obj, f if len(calls) <= good_saves else Full(f), *args, **kw)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = compose(*QUICK, "trainer.epochs=3", "trainer.limit_batches=2")
    full_disk_after(monkeypatch, good_saves=2)  # epoch 1's best.pt and checkpoint.pt
    with pytest.raises(DlrunError) as e:
        loop.train(cfg, tmp_path)
    ckpt = tmp_path / rundir.CHECKPOINT
    message = str(e.value)
    assert message.startswith("no space left on device while writing ")
    assert f"the last good checkpoint is {ckpt}" in message and "\n" not in message
    monkeypatch.undo()
    assert torch.load(ckpt, weights_only=True)["state"]["epoch"] == 1
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_permission_error_while_writing_is_one_line(tmp_path, monkeypatch):
    target = tmp_path / rundir.SUMMARY
    target.write_text("{}")

    def refuse(*args, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(DlrunError, match=r"permission denied .* while writing .*summary.json; no checkpoint"):
        rundir.write_json(target, {"status": "completed"})
    assert target.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == [rundir.SUMMARY]  # the temporary file is gone


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_dir_is_one_line(tmp_path):
    target = tmp_path / rundir.SUMMARY
    target.write_text("{}")
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(DlrunError, match="permission denied"):
            rundir.write_json(target, {"status": "completed"})
    finally:
        tmp_path.chmod(0o755)
    assert target.read_text() == "{}"
