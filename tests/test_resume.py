"""Resume: a run stopped anywhere and resumed ends exactly as an uninterrupted one, for every
family; a run killed at any moment leaves only complete files and resumes to the end; the run's
wall time, the leftovers of a kill and the resume of a finished run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose, metrics_rows, summary
from test_failures import StopAfter
from test_images import image_folder

from dlrun import train as loop

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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one CPU thread, and stay fast when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 8 KB of real English prose, as a user's .txt file."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "book.txt"
    path.write_text("\n".join(topics[k] for k in list(topics)[:8])[:8_000], encoding="utf-8")
    return path


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
