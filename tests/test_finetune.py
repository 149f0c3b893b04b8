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
    assert torch.equal(state["embeds.weight"], source["embeds.weight"])
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


# --- two phases: the body frozen, then everything (finetune.freeze_epochs) ------------

TINY = ("trainer.limit_batches=4", "trainer.progress=false", "seed=3")


def test_frozen_phase_trains_only_the_head_and_norms_then_everything(tmp_path: Path, monkeypatch) -> None:
    from dlrun import finetune
    from dlrun import train as loop
    from dlrun.learner import prepare

    cfg = compose("model=cnn", *TINY, "finetune.freeze_epochs=1", "trainer.epochs=1", "optimizer.lr_mult=0.1")
    learner = prepare(cfg)
    start = {k: v.clone() for k, v in learner.model.state_dict().items()}
    at_boundary = {}
    unfreeze = finetune.unfreeze

    def record(model) -> None:
        at_boundary.update({k: v.clone() for k, v in model.state_dict().items()})
        unfreeze(model)

    monkeypatch.setattr(finetune, "unfreeze", record)
    summary = loop.fit(cfg, tmp_path, learner)
    conv, bn, head = "features.0.0.weight", "features.0.1.weight", "head.3.weight"
    assert torch.equal(at_boundary[conv], start[conv])  # the body's convolutions: frozen
    assert not torch.equal(at_boundary[bn], start[bn])  # its batch norm: trained (train_bn)
    assert not torch.equal(at_boundary[head], start[head])
    after = learner.model.state_dict()
    assert not torch.equal(after[conv], at_boundary[conv])  # then everything trains
    assert summary["epochs"] == 2 and summary["lr_unfrozen"] == pytest.approx(summary["lr"] / 2)
    assert all(p.requires_grad for p in learner.model.parameters())


def test_phases_with_lr_find_resume_exactly(tmp_path: Path, monkeypatch) -> None:
    from test_failures import StopAfter

    from dlrun import train as loop

    args = ("model=tabular", *TINY, "finetune.freeze_epochs=1", "trainer.epochs=2", "optimizer.lr=find")
    args += ("lr_find.num_it=20", "optimizer.lr_mult=0.01")
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    whole = loop.fit(compose(*args), full)
    assert (full / "lr_find.png").is_file() and (full / "lr_find_unfrozen.png").is_file()
    monkeypatch.setattr(loop, "StopRequest", lambda: StopAfter(2))  # inside the frozen epoch
    with pytest.raises(loop.Interrupted):
        loop.fit(compose(*args), cut)
    monkeypatch.undo()
    resumed = loop.fit(compose(*args, f"resume={cut}"), cut)
    assert resumed["final"] == whole["final"] and resumed["lr_unfrozen"] == whole["lr_unfrozen"]


def test_a_model_of_one_layer_group_cannot_be_frozen(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from dlrun.errors import DlrunError
    from dlrun.family import register_model
    from dlrun.finetune import freeze

    register_model("one_linear", SimpleNamespace(build=lambda cfg, facts: torch.nn.Linear(2, 2)))
    cfg = compose("model=cnn", "finetune.freeze_epochs=1")
    cfg.model.name = "one_linear"
    with pytest.raises(DlrunError, match="is one layer group: set finetune.freeze_epochs=0"):
        freeze(cfg, torch.nn.Linear(2, 2))
    proc = dlrun("train", "finetune.freeze_epochs=-1", f"hydra.run.dir={tmp_path / 'r'}")
    assert_user_error(proc, "finetune.freeze_epochs=-1 is not allowed")


def test_experiment_finetune_with_local_weights(tmp_path: Path) -> None:
    """The ready recipe: a pretrained ResNet (weights written from a random init, as torchvision
    saves them), one frozen epoch, lr_mult 0.01."""
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    run = tmp_path / "run"
    proc = train(run, "experiment=finetune", f"model.weights_path={weights}", "trainer.epochs=1", *TINY)
    assert "all layers unfrozen" in proc.stdout and "first layer group at" in proc.stdout


def test_fine_tuning_a_pretrained_model_on_an_image_folder(tmp_path: Path, monkeypatch) -> None:
    """The acceptance run: a tiny timm network with weights saved as timm publishes them (1000
    classes, from a random init), fine-tuned on a generated image folder. While the body is
    frozen its weights stay as loaded and the head's change; once unfrozen everything changes;
    the first layer group's rate is lr * lr_mult at each phase's peak."""
    import timm
    from test_images import image_folder

    from dlrun import finetune
    from dlrun import learner as learner_module
    from dlrun import train as loop

    torch.manual_seed(0)
    weights = tmp_path / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), weights)
    folder = image_folder(tmp_path / "pics", "split", n=8)
    lr, lr_mult = 2e-3, 0.01
    cfg = compose(
        "model=timm", "model.arch=test_resnet", "model.pretrained=true", f"model.weights_path={weights}",
        "data=imagefolder", f"data.path={folder}", "data.size=32", "data.bs=4", "data.num_workers=0",
        "finetune.freeze_epochs=1", "trainer.epochs=1", f"optimizer.lr={lr}", f"optimizer.lr_mult={lr_mult}",
        "trainer.progress=false", "trainer.device=cpu",
    )  # fmt: skip
    learner = learner_module.prepare(cfg)
    loaded = {k: v.clone() for k, v in learner.model.state_dict().items()}
    source = torch.load(weights, weights_only=True)
    stem, head = "conv1.0.weight", "fc.weight"
    assert torch.equal(loaded[stem], source[stem])  # the pretrained body was loaded
    first = {id(p) for p in finetune_groups(cfg, learner.model)[0]}

    at_boundary: dict[str, torch.Tensor] = {}
    unfreeze = finetune.unfreeze
    monkeypatch.setattr(
        finetune, "unfreeze", lambda model: (at_boundary.update(clone(model)), unfreeze(model))
    )
    rates: list[tuple[float, float]] = []  # (head rate, first group's rate) at every step
    set_hyper = learner_module.set_hyper

    def record(optimizer, rate, momentum) -> None:
        set_hyper(optimizer, rate, momentum)
        groups = optimizer.param_groups
        head_lr = max(g["lr"] for g in groups)
        first_lr = next(g["lr"] for g in groups if any(id(p) in first for p in g["params"]))
        rates.append((head_lr, first_lr))

    monkeypatch.setattr(learner_module, "set_hyper", record)
    (tmp_path / "run").mkdir()
    summary = loop.fit(cfg, tmp_path / "run", learner)

    norms = norm_keys(learner.model)
    body = [k for k in loaded if k.startswith(("conv1.", "layer1.")) and k not in norms]
    assert body and all(torch.equal(at_boundary[k], loaded[k]) for k in body)  # frozen
    assert not torch.equal(at_boundary[head], loaded[head])  # the head trained
    after = learner.model.state_dict()
    weights_after = [k for k in loaded if k.endswith(".weight")]
    assert all(not torch.equal(after[k], at_boundary[k]) for k in weights_after)  # then all of it
    steps = len(rates) // 2  # 4 updates in each phase
    for phase, peak in ((rates[:steps], lr), (rates[steps:], summary["lr_unfrozen"])):
        head_lr, first_lr = max(phase)
        assert head_lr == pytest.approx(peak, rel=1e-9)
        assert first_lr == pytest.approx(peak * lr_mult, rel=1e-9)
    assert summary["lr_unfrozen"] == pytest.approx(lr / 2)


def finetune_groups(cfg, model):
    from dlrun.family import layer_groups

    return layer_groups(cfg, model)


def clone(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def norm_keys(model) -> set[str]:
    """The state-dict keys of normalisation layers (they train while the body is frozen)."""
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
    return {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, norms)
        for key in module.state_dict()
    }
