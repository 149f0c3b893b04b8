"""Transfer learning (issue 13): starting from another run's weights (`model.init_from`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, compose, dlrun, train

PENGUINS = ["model=tabular", "trainer.epochs=1"]


@pytest.fixture(scope="module")
def penguins_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("source") / "run"
    train(run, *PENGUINS)
    return run


def test_init_from_loads_what_fits_and_names_the_rest(penguins_run: Path, tmp_path: Path) -> None:
    from dlrun.learner import prepare

    source = torch.load(penguins_run / "best.pt", weights_only=True)["model"]
    # Another head width: the embeddings and the first layer fit, the rest does not.
    learner = prepare(compose(*PENGUINS, "model.layers=[200,50]", f"model.init_from={penguins_run}"))
    state = learner.model.state_dict()
    assert torch.equal(state["embeds.0.weight"], source["embeds.0.weight"])
    assert torch.equal(state["layers.0.weight"], source["layers.0.weight"])
    assert state["head.weight"].shape != source["head.weight"].shape
    proc = train(tmp_path / "run", *PENGUINS, "model.layers=[200,50]", f"model.init_from={penguins_run}")
    assert "model.init_from: loaded" in proc.stdout and "left as initialised: layers.4.weight" in proc.stdout


def test_init_from_a_run_of_another_family_is_refused(penguins_run: Path, tmp_path: Path) -> None:
    proc = dlrun(
        "train", "trainer.epochs=1", f"model.init_from={penguins_run}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert_user_error(proc, "none of its weights fit this model")
    proc = dlrun(
        "train", *PENGUINS, f"model.init_from={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'r2'}"
    )
    assert_user_error(proc, "does not exist")
