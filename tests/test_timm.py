"""model=timm: any timm architecture sized for the data, its layer groups, pretrained weights read
from a local file in timm's layout (tests never touch the network), timm's data config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, compose, dlrun, summary, train

from dlrun.data.images import ImageFacts
from dlrun.family import build_model, layer_groups

timm = pytest.importorskip("timm")

DIGITS = ImageFacts(n_out=10, channels=1, size=(8, 8), classes=tuple("0123456789"), mean=(0.3,), std=(0.4,))


def test_classifier_and_stem_are_sized_for_the_data() -> None:
    cfg = compose("model=timm", "model.arch=resnet18", "regularization.dropout=0.25")
    model = build_model(cfg, DIGITS)
    assert model.get_classifier().out_features == 10
    assert model.conv1.in_channels == 1
    assert model.drop_rate == 0.25
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    groups = layer_groups(cfg, model)
    assert len(groups) >= 3 and [id(p) for p in groups[-1]] == [id(p) for p in model.fc.parameters()]


def test_fixed_size_models_are_built_for_the_image_size() -> None:
    cfg = compose("model=timm", "model.arch=vit_tiny_patch16_224")
    facts = ImageFacts(
        n_out=3, channels=3, size=(32, 32), classes=("a", "b", "c"), mean=(0,) * 3, std=(1,) * 3
    )
    assert build_model(cfg, facts)(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_pretrained_weights_from_a_local_file_are_adapted(tmp_path: Path) -> None:
    """A weights file as timm publishes it (3 channels, 1000 classes), from a random init."""
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    cfg = compose("model=timm", "model.arch=resnet18", "model.pretrained=true", f"model.weights_path={path}")
    model = build_model(cfg, DIGITS)
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    # One grey channel: timm sums the RGB filters of the stem.
    assert torch.allclose(model.conv1.weight, source.conv1.weight.sum(1, keepdim=True), atol=1e-6)
    assert model.fc.out_features == 10


def test_trains_from_the_command_line_and_predicts(run_dir: Path, tmp_path: Path) -> None:
    train(run_dir, "model=timm", "model.arch=resnet18", "trainer.epochs=1", "trainer.limit_batches=3")
    assert summary(run_dir)["status"] == "completed"
    assert (run_dir / "model.json").is_file()


def test_imagefolder_takes_the_model_input_config() -> None:
    from dlrun.data.imagefolder import input_config

    assert input_config(compose("model=timm", "model.arch=vit_tiny_patch16_224", "data=imagefolder")) == (
        224,
        [0.5, 0.5, 0.5],
        [0.5, 0.5, 0.5],
    )
    assert input_config(compose("model=resnet", "data=imagefolder", "data.size=64"))[0] == 64
    assert input_config(compose("model=timm", "data=imagefolder", "data.mean=[0,0,0]"))[1] == [0.0] * 3


def test_user_errors(run_dir: Path, tmp_path: Path) -> None:
    from dlrun.errors import DlrunError

    assert_user_error(
        dlrun("train", "model=timm", "model.arch=resnt18", f"hydra.run.dir={run_dir}"),
        "model.arch=resnt18 is not a timm model",
        "did you mean 'resnet18'",
    )
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not weights")
    cases = [
        (("model.arch=convnext_atto",), "model.arch=convnext_atto cannot take 8x8 images.*data.size=N"),
        (("model.pretrained=true", f"model.weights_path={tmp_path / 'no.pth'}"), "no such file"),
        (("model.pretrained=true", f"model.weights_path={bad}"), "cannot load the pretrained weights"),
    ]
    for overrides, message in cases:
        with pytest.raises(DlrunError, match=message):
            build_model(compose("model=timm", *overrides), DIGITS)
