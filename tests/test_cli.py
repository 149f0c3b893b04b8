"""The command line: dispatch, help, startup without torch, and the user mistakes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import DLRUN, REPO, assert_user_error, dlrun


def imported_modules(*args: str) -> str:
    """stderr of `python -X importtime` running dlrun with args: every module imported."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", "from dlrun.cli import main; main()", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_help_lists_every_command():
    proc = dlrun("--help")
    assert proc.returncode == 0
    for command in ("train", "lr-find", "eval", "runs", "embeddings", "generate"):
        assert f"  {command} " in proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["train", "--cfg", "job"], ["lr-find", "--cfg", "job"]])
def test_help_and_cfg_job_do_not_import_torch(args):
    modules = imported_modules(*args)
    assert "| torch" not in modules and "| torch." not in modules


def test_cfg_job_shows_the_composed_config():
    proc = dlrun("train", "--cfg", "job", "model=cnn", "optimizer=sgd", "data.bs=32")
    assert proc.returncode == 0, proc.stderr
    assert "bs: 32" in proc.stdout and "name: sgd" in proc.stdout and "wd_mode: decoupled" in proc.stdout


def test_train_help_lists_config_groups():
    proc = dlrun("train", "--help")
    assert proc.returncode == 0, proc.stderr
    for group in ("data:", "model:", "optimizer:", "regularization:", "schedule:", "trainer:"):
        assert group in proc.stdout
    assert "digits" in proc.stdout and "onecycle" in proc.stdout


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "regularization.dropout=1.5"], ["regularization.dropout=1.5", ">= 0 and <= 1"]),
        (["train", "optimizer.lr=-1"], ["optimizer.lr=-1", "> 0 or 'find'"]),
        (["train", "optimizer.lr=fast"], ["optimizer.lr='fast'"]),
        (["train", "data.bs=0"], ["data.bs=0", "integer >= 1"]),
        (["train", "trainer.epochs=two"], ["trainer.epochs='two'", "integer"]),
        (
            ["train", "regularization.dropuot=0.1"],
            ["regularization.dropuot is not a config key", "did you mean regularization.dropout?"],
        ),
        (["train", "data=nosuch"], ["data=nosuch is not a data config", "digits"]),
        (["train", "data=digit"], ["did you mean data=digits?"]),
        (["train", "optimizer=adamx"], ["optimizer=adamx is not a optimizer config", "adamw"]),
        (["train", "trainer.device=tpu"], ["trainer.device='tpu'", "auto, cpu, cuda, mps"]),
        (["train", "regularization.dropout=0,0.5"], ["is a sweep: add -m"]),
        (["train", "-m", "regularization.dropout=0,1.5"], ["regularization.dropout=1.5"]),
        (["nosuch"], ["unknown command 'nosuch'", "train, lr-find"]),
        (["trian"], ["did you mean 'train'?"]),
        (["eval", "/no/such/run"], ["/no/such/run does not exist"]),
        (["runs", "/no/such/dir"], ["/no/such/dir is not a directory"]),
        (["train", "resume=/no/such/run"], ["/no/such/run does not exist"]),
        (["train", "--resume", "runs/a run"], ["--resume is not an option", "resume=RUN_DIR"]),
        (["train", "-m", "seed=1,2", "--help"], ["leave the swept values out"]),
    ],
)
def test_user_mistakes_exit_2_with_a_message(args, fragments):
    assert_user_error(dlrun(*args), *fragments)


def test_verbose_flag_shows_the_traceback():
    proc = dlrun("eval", "/no/such/run", "-v")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_shell_completion_completes_commands_and_config_groups():
    env = {"COMP_LINE": "dlrun train mod", "COMP_POINT": str(len("dlrun train mod"))}
    proc = dlrun("-sc", "query=bash", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "model=" in proc.stdout.split()
    env = {"COMP_LINE": "dlrun tr", "COMP_POINT": "8"}
    assert dlrun("-sc", "query=bash", env=env).stdout.split() == ["train"]
    env = {"COMP_LINE": "dlrun train model=", "COMP_POINT": str(len("dlrun train model="))}
    options = dlrun("-sc", "query=bash", env=env).stdout.split()
    assert "model=cnn" in options and "model=resnet" in options


def test_shell_completion_install_script_names_dlrun():
    proc = dlrun("--shell-completion", "install=bash")
    assert proc.returncode == 0, proc.stderr
    assert "complete" in proc.stdout and "dlrun" in proc.stdout


def test_console_script_is_installed():
    assert os.access(DLRUN, os.X_OK)


def test_an_error_shows_brackets_in_the_users_own_values(tmp_path):
    missing = tmp_path / "sales[2015].csv"
    proc = dlrun("train", "model=tabular", "data=csv", f"data.path={missing}", "data.y_name=y")
    assert_user_error(proc, "sales[2015].csv")
