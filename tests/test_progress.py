"""Progress while a run trains: plain lines every `trainer.log_seconds` when stdout is not a
terminal (a log file, SLURM, CI), the bar in a terminal, the epoch-time estimate in both."""

from __future__ import annotations

import io
import os
import re
import subprocess
import time
import types

import pytest
import torch
from conftest import DLRUN, REPO, assert_user_error, compose, dlrun
from omegaconf import OmegaConf
from rich.console import Console

from dlrun import report

LINE = re.compile(
    r"^(?:job \d+  )?epoch (\d+)/(\d+)  step (\d+)/(\d+) \((\d+)%\)  loss (\S+)  (\S+) (\w+)/s  eta (\S+)$"
)
ESTIMATE = re.compile(r"^about (\S+) per epoch \((\d+) steps at (\S+) steps/s\)$")
ANSI = "\x1b"

STEPS, BS, PAUSE = 48, 8, 0.005


class SlowBatches:
    """Batches of 8 rows, each `pause` seconds late, like a slow data pipeline."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, pause: float):
        self.x, self.y, self.pause = x, y, pause

    def __len__(self) -> int:
        return len(self.y) // BS

    def epoch(self, epoch: int, start: int = 0):
        for i in range(start, len(self)):
            time.sleep(self.pause)
            yield self.x[i * BS : (i + 1) * BS], self.y[i * BS : (i + 1) * BS]


class ValidLoss:
    monitor, mode = "valid_loss", "min"

    def update(self, out, y) -> None:
        pass

    def compute(self, valid_loss: float) -> dict[str, float]:
        return {}


def slow_data(cfg, device):
    from dlrun.family import Data, Facts

    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BS + 64, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return Data(
        train=SlowBatches(x[: STEPS * BS], y[: STEPS * BS], cfg.data.pause),
        valid=SlowBatches(x[STEPS * BS :], y[STEPS * BS :], 0.0),
        loss=lambda out, y: torch.nn.functional.mse_loss(out.squeeze(-1), y),
        metrics=ValidLoss,
        facts=Facts(n_out=1),
        unit="rows",
    )


@pytest.fixture
def slow_family():
    from dlrun.family import DATA, MODELS, register_data, register_model

    register_data("slow_rows", types.SimpleNamespace(build=slow_data, RULES={}))
    register_model("slow_linear", types.SimpleNamespace(build=lambda cfg, facts: torch.nn.Linear(4, 1)))
    yield
    DATA._added.pop("slow_rows")
    MODELS._added.pop("slow_linear")


def train_slow(tmp_path, *overrides: str, pause: float = PAUSE) -> None:
    """Two epochs of 48 slow steps through `dlrun.train.fit`, progress on, a line every 20 ms."""
    from dlrun.train import fit

    cfg = compose(
        "trainer.epochs=2",
        "trainer.log_every=4",
        "trainer.log_seconds=0.02",
        "schedule=constant",
        "optimizer.lr=0.01",
        "trainer.checkpoint=false",
        *overrides,
    )
    OmegaConf.set_struct(cfg, False)
    cfg.data = {"name": "slow", "kind": "slow_rows", "family": "toy", "bs": BS, "pause": pause}
    cfg.model = {"name": "slow_linear", "family": "toy"}
    fit(cfg, tmp_path)


def progress_lines(out: str) -> list[re.Match]:
    return [m for m in map(LINE.match, out.splitlines()) if m]


def test_lines_show_step_loss_and_speed_when_stdout_is_not_a_terminal(slow_family, tmp_path, capsys):
    train_slow(tmp_path)
    out = capsys.readouterr().out
    assert ANSI not in out
    lines = progress_lines(out)
    for epoch in ("1", "2"):  # each epoch lasts > 0.24 s: a line at least every 20 ms of it
        assert len([m for m in lines if m[1] == epoch]) >= 2, out
    for m in lines:
        epoch, epochs, step, steps, pct, loss, speed, unit, eta = m.groups()
        assert epochs == "2" and steps == str(STEPS) and unit == "rows"
        assert int(step) % 4 == 0 and int(pct) == round(100 * int(step) / STEPS)
        assert float(loss) >= 0 and float(speed.rstrip("kM")) > 0
    # Every other line is the estimate or the per-epoch table.
    other = [line for line in out.splitlines() if not LINE.match(line)]
    estimates = [m for m in map(ESTIMATE.match, other) if m]
    assert len(estimates) == 1, out
    assert estimates[0][2] == str(STEPS)
    assert 0 < float(estimates[0][3]) <= 1 / PAUSE  # timed over real steps, each >= 5 ms
    assert out.index("about") < out.index("train_loss")  # said during the first epoch
    assert len(other) == 1 + 1 + 2, out  # estimate, table header, two rows


def test_a_terminal_shows_the_bar_and_the_estimate_but_no_lines(slow_family, tmp_path, monkeypatch):
    screen = io.StringIO()
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(report, "console", Console(file=screen, force_terminal=True, width=150))
    train_slow(tmp_path)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue()).replace("\r", "\n")
    assert "rows/s" in text  # the bar drew
    assert "  step " not in text
    assert len(re.findall(r"about \S+ per epoch \(48 steps at \S+ steps/s\)", text)) == 1


@pytest.mark.parametrize(
    ("override", "estimate"), [("trainer.log_seconds=0", True), ("trainer.progress=false", False)]
)
def test_log_seconds_0_stops_the_lines_and_progress_false_stops_everything(
    slow_family, tmp_path, capsys, override, estimate
):
    train_slow(tmp_path, override, pause=0.001)
    out = capsys.readouterr().out
    assert not progress_lines(out)
    assert ("about" in out) == estimate
    if not estimate:
        assert out == ""


def test_no_estimate_for_short_epochs(slow_family, tmp_path, capsys):
    train_slow(tmp_path, "trainer.limit_batches=30", "trainer.log_every=1")
    out = capsys.readouterr().out
    assert "about" not in out
    lines = progress_lines(out)
    assert lines and {m[4] for m in lines} == {"30"}, out


def test_lines_reach_a_redirected_stdout_while_the_run_trains(tmp_path):
    """The real command with stdout a pipe and Python's default block buffering: the first
    line arrives while the run still trains, not when an epoch (or the run) ends."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "HYDRA_FULL_ERROR")}
    args = ["data.bs=8", "trainer.epochs=4", "trainer.log_every=5", "trainer.log_seconds=0.1"]
    with subprocess.Popen(
        [DLRUN, "train", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        seen = [proc.stdout.readline()]  # the estimate may come first
        while seen[-1] and not LINE.match(seen[-1].rstrip("\n")):
            seen.append(proc.stdout.readline())
        still_training = proc.poll() is None
        rest, err = proc.communicate(timeout=300)
    out = "".join(seen) + rest
    assert proc.returncode == 0, err
    assert seen[-1].startswith("epoch 1/4  step "), out
    assert still_training
    assert ANSI not in out
    assert {m[8] for m in progress_lines(out)} == {"images"}
    assert len(re.findall(r"^about \S+ per epoch \(179 steps at \S+ steps/s\)$", out, re.M)) == 1


def test_sweep_jobs_tag_their_lines(tmp_path):
    proc = dlrun(
        "train",
        "-m",
        "data.bs=16",
        "trainer.epochs=1",
        "trainer.log_every=2",
        "trainer.log_seconds=0.05",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = progress_lines(proc.stdout)
    assert {m[0].split("  ")[0] for m in lines} == {"job 0", "job 1"}, proc.stdout


def test_a_negative_interval_is_refused():
    assert_user_error(dlrun("train", "trainer.log_seconds=-1"), "trainer.log_seconds=-1", ">= 0 or null")


def test_durations_and_speeds_read_short():
    assert [report.duration(s) for s in (0.42, 9.96, 45, 431, 7505)] == [
        "0.4s",
        "10s",
        "45s",
        "7m11s",
        "2h05m",
    ]
    assert [report.rate(v) for v in (0.5, 950, 18_100, 999_950, 2_345_678)] == [
        "0.5",
        "950",
        "18.1k",
        "1M",
        "2.35M",
    ]
