"""torchvision's ResNets for any number of classes, input channels and image sizes.

The classifier is replaced by dropout (`regularization.dropout`) and a linear
layer for the data's classes. Inputs under 64 pixels get a 3x3 stride-1
stem without max-pooling (the CIFAR ResNet stem), so 8x8 digits and 28x28 MNIST
keep enough resolution for the four stages. Pretrained ImageNet weights come from
`model.weights_path` or torchvision's file in the torch hub cache, which torchvision's weights
API fills when the machine is online.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from torch import nn

from dlrun.errors import DlrunError
from dlrun.family import dropout
from dlrun.models.dropout import Dropout
from dlrun.rules import BOOL, Choice, Rule

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from dlrun.data.images import ImageFacts

# Below this many pixels the ImageNet stem (7x7 stride 2 + max-pool, /4) throws away too much.
SMALL_INPUT = 64

RULES = {
    "model.arch": Choice("resnet18", "resnet34", "resnet50"),
    "model.pretrained": BOOL,
    "model.weights_path": Rule("str", nullable=True),
    "model.channels_last": BOOL,
}

# The torchvision weights each arch loads with `pretrained: true` (their file names are in the hub cache).
WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
}


def build(cfg: "DictConfig", facts: "ImageFacts") -> nn.Module:
    """A ResNet (`model.arch`) with its stem and classifier fitted to the images."""
    arch = cfg.model.arch
    p = dropout(cfg.regularization, "resnet")
    n_classes, in_channels, image_size = facts.n_out, facts.channels, min(facts.size)

    model = getattr(torchvision.models, arch)(weights=None)
    if cfg.model.get("pretrained", False):
        load_pretrained(model, weights_file(arch, cfg.model.get("weights_path")))
    model.conv1 = fit_stem(model.conv1, in_channels, small=image_size < SMALL_INPUT)
    if image_size < SMALL_INPUT:
        model.maxpool = nn.Identity()
    model.fc = nn.Sequential(Dropout(p), nn.Linear(model.fc.in_features, n_classes))
    return model


def layer_groups(model: nn.Module) -> list[list[nn.Module]]:
    """As fastai splits a ResNet: stem and the first two stages, the last two stages, the head."""
    return [[model.conv1, model.bn1, model.layer1, model.layer2], [model.layer3, model.layer4], [model.fc]]


def weights_file(arch: str, weights_path: str | None) -> Path:
    """The pretrained weights file: `model.weights_path`, else torchvision's file in the torch hub
    cache, fetched there by torchvision's weights API when it is missing and the machine is online."""
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise DlrunError(f"model.weights_path={weights_path}: no such file")
        return path
    url = WEIGHTS[arch].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        try:
            WEIGHTS[arch].get_state_dict(progress=False)  # torch.hub's download, into that cache
        except OSError:  # URLError, socket and HTTP errors: no network, or no way to this host
            raise DlrunError(
                f"model.pretrained=true but the {arch} ImageNet weights are not on this machine and "
                f"cannot be fetched (offline?): download {url} and put it at {path} (or set "
                f"model.weights_path=FILE), or train from scratch with model.pretrained=false"
            ) from None
    return path


def load_pretrained(model: nn.Module, path: Path) -> None:
    """Load a torchvision state dict; its classifier (`fc.*`) is dropped, since ours has other classes."""
    state = read_weights(path)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items() if not k.startswith("fc.")}
    wanted = {k for k in model.state_dict() if not k.startswith("fc.")}
    missing, unexpected = sorted(wanted - state.keys()), sorted(state.keys() - wanted)
    if missing or unexpected:
        raise DlrunError(
            f"{path} does not fit a {type(model).__name__} of this arch "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}): check model.arch"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: weights of another arch under the same names
        raise DlrunError(f"{path} does not fit model.arch: {str(e).splitlines()[-1].strip()}") from None


def read_weights(path: Path) -> dict:
    """A state dict from a weights file (a dlrun checkpoint's "model" too), tensors only."""
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle before refusing it
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and tensor errors all mean the same to the user
        raise DlrunError(
            f"cannot read the weights file {path} ({type(e).__name__}): it is not a PyTorch weights "
            "file, or it is damaged or was tampered with; it was not loaded"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a dlrun checkpoint (best.pt) keeps the weights under "model"
    if not isinstance(state, dict):
        raise DlrunError(f"{path} does not hold a state dict of weights")
    return state


def fit_stem(conv: nn.Conv2d, in_channels: int, small: bool) -> nn.Conv2d:
    """The first convolution for `in_channels` inputs: 3x3 stride 1 for small images, else the
    7x7 stride 2 one, whose pretrained RGB filters are summed (grey) or spread over the channels."""
    if small:
        return nn.Conv2d(in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    if in_channels == conv.in_channels:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, 7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        # Keep the pretrained filters' response to a grey image (the mean of the RGB filters, scaled).
        mean = conv.weight.sum(dim=1, keepdim=True) / in_channels
        new.weight.copy_(mean.expand(-1, in_channels, -1, -1))
    return new
