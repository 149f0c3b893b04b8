"""Out of memory: the message names the batch size (and bptt); auto_bs halves and retries."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, metrics_rows, summary
from torch import nn

import dlrun.learner
import dlrun.train
from dlrun.errors import DlrunError


class OutOfMemoryAbove(nn.Module):
    """Wraps a model and raises CUDA's out-of-memory error for batches larger than `limit`,
    as a GPU with too little memory would."""

    def __init__(self, model: nn.Module, limit: int):
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []

    def forward(self, x):
        size = (x[0] if isinstance(x, (tuple, list)) else x).shape[0]
        self.sizes.append(size)
        if size > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


@pytest.fixture
def oom_above(monkeypatch):
    made = []

    def install(limit: int):
        build = dlrun.learner.build_model

        def build_small(cfg, facts):
            made.append(OutOfMemoryAbove(build(cfg, facts), limit))
            return made[-1]

        monkeypatch.setattr(dlrun.learner, "build_model", build_small)
        return made

    return install


def test_out_of_memory_names_the_batch_size(tmp_path, oom_above):
    oom_above(16)
    cfg = compose("data.bs=64", "trainer.epochs=1", "trainer.limit_batches=2", "trainer.progress=false")
    with pytest.raises(
        DlrunError, match=r"out of .*memory with data.bs=64: lower data.bs.*trainer.auto_bs=true"
    ):
        dlrun.train.train(cfg, tmp_path)
    assert summary(tmp_path)["status"] == "failed"


def test_out_of_memory_in_a_language_model_names_bptt_too(tmp_path, oom_above):
    oom_above(4)
    cfg = compose(
        "model=rnn",
        "data.bs=8",
        "data.bptt=20",
        "trainer.epochs=1",
        "trainer.limit_batches=2",
        "trainer.progress=false",
        "model.n_hid=16",
        "model.emb_sz=8",
        "model.n_layers=1",
    )
    with pytest.raises(DlrunError, match=r"data.bs=8, data.bptt=20: lower data.bs or data.bptt"):
        dlrun.train.train(cfg, tmp_path)


def test_auto_bs_retries_at_half_the_batch_size_until_it_fits(tmp_path, oom_above):
    made = oom_above(16)
    cfg = compose(
        "data.bs=64",
        "trainer.epochs=1",
        "trainer.limit_batches=2",
        "trainer.progress=false",
        "trainer.auto_bs=true",
    )
    result = dlrun.train.train(cfg, tmp_path)
    assert result["status"] == "completed"
    assert [m.sizes[0] for m in made] == [64, 32, 16]  # each attempt starts afresh at half the size
    assert cfg.data.bs == 16


class StopAfter:
    """Stands in for the Ctrl-C handler: asks the loop to stop once `steps` steps are done
    (the loop looks at `requested` once after every step)."""

    def __init__(self, steps: int):
        self.steps, self.seen = steps, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def requested(self) -> bool:
        self.seen += 1
        return self.seen == self.steps


@pytest.mark.parametrize("stop_at", [6, 7, 8], ids=["epoch-end", "epoch-start", "mid-epoch"])
def test_resume_from_any_step_gives_the_uninterrupted_metrics(tmp_path, monkeypatch, stop_at):
    # 3 batches an epoch: step 6 ends epoch 2, step 7 is the first of epoch 3.
    args = ("trainer.epochs=4", "trainer.limit_batches=3", "trainer.progress=false", "seed=2")
    full = tmp_path / "full"
    full.mkdir()
    dlrun.train.fit(compose(*args), full)
    cut = tmp_path / "cut"
    cut.mkdir()
    monkeypatch.setattr(dlrun.train, "StopRequest", lambda: StopAfter(stop_at))
    with pytest.raises(dlrun.train.Interrupted):
        dlrun.train.fit(compose(*args), cut)
    assert summary(cut)["status"] == "interrupted"
    monkeypatch.undo()
    dlrun.train.fit(compose(*args, f"resume={cut}"), cut)
    assert metrics_rows(cut) == metrics_rows(full)
