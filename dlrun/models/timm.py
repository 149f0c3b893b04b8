"""Any of timm's image models (`model=timm model.arch=convnext_atto`), as fastai's
`vision_learner` uses them: `timm.create_model(arch, num_classes=..., in_chans=...)` sizes the
classifier and the stem for the data, `regularization.dropout` is timm's `drop_rate` (before the
classifier), and a model with a fixed input size (ViT) is built for the data's image size.

`model.pretrained=true` loads the pretrained weights the way timm does: from
`model.weights_path` when set (a state dict file: .pth, .bin or .safetensors), else from the
Hugging Face hub cache, fetching them when the machine is online. timm adapts them to the data:
a new classifier for other classes, the stem's filters summed or repeated for other channels.

timm's data config (input size, mean, std of the pretrained weights) is what an image folder is
normalised with unless `data.size` / `data.mean` / `data.std` are given (`input_config`).
timm is imported only when this model is chosen: it takes seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlrun.errors import DlrunError, closest
from dlrun.family import dropout
from dlrun.rules import BOOL, Rule

if TYPE_CHECKING:
    from torch import nn

    from dlrun.data.images import ImageFacts

RULES = {
    "model.arch": Rule("str"),
    "model.pretrained": BOOL,
    "model.weights_path": Rule("str", nullable=True),
    "model.channels_last": BOOL,
}


def import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise DlrunError("model=timm needs the timm package: pip install 'timm>=1.0'") from None
    return timm


def pretrained_cfg(arch: str) -> Any:
    """timm's pretrained config of `arch` (input size, mean, std...), or a user error for an
    unknown name, with the closest known one."""
    timm = import_timm()
    if not timm.is_model(arch):
        near = closest(arch, timm.list_models())
        hint = f" (did you mean {near!r}?)" if near else ""
        raise DlrunError(
            f"model.arch={arch} is not a timm model{hint}: list them with "
            f"python -c \"import timm; print(timm.list_models('*{arch[:4]}*'))\""
        )
    return timm.get_pretrained_cfg(arch)


def input_config(model_cfg: Any) -> dict[str, Any]:
    """The image size and per-channel mean and std the architecture's pretrained weights expect."""
    cfg = pretrained_cfg(str(model_cfg.arch))
    return {"size": int(cfg.input_size[-1]), "mean": list(cfg.mean), "std": list(cfg.std)}


def layer_groups(model: nn.Module) -> list[list[nn.Module]]:
    """timm's own coarse grouping (stem, each stage..., the classifier last)."""
    from timm.models import group_modules

    named = dict(model.named_modules())
    groups = group_modules(model, model.group_matcher(coarse=True))  # {group index: [module names]}
    return [[named[name] for name in groups[k] if name in named] for k in sorted(groups)]


def build(cfg: Any, facts: ImageFacts) -> nn.Module:
    """`timm.create_model` for the data's classes, channels and (fixed-size models) image size."""
    m = cfg.model
    arch = str(m.arch)
    timm = import_timm()
    pcfg = pretrained_cfg(arch)
    kwargs: dict[str, Any] = {
        "num_classes": facts.n_out,
        "in_chans": facts.channels,
        "drop_rate": dropout(cfg.regularization, "timm"),
    }
    if getattr(pcfg, "fixed_input_size", False):
        kwargs["img_size"] = tuple(facts.size)
    pretrained = bool(m.get("pretrained", False))
    if pretrained and m.get("weights_path"):
        path = Path(str(m.weights_path)).expanduser()
        if not path.is_file():
            raise DlrunError(f"model.weights_path={m.weights_path}: no such file")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)  # offline, the hub logs each failed request before raising
        try:
            model = timm.create_model(arch, pretrained=pretrained, **kwargs)
        finally:
            hub_log.setLevel(level)
    except (OSError, RuntimeError, ValueError) as e:
        if not pretrained:
            raise DlrunError(f"timm cannot build model.arch={arch} for these images: {e}") from None
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        raise DlrunError(
            f"cannot load the pretrained weights of {arch} ({why}): offline, timm reads only weights "
            "already in the Hugging Face cache; set model.weights_path=FILE to a downloaded file, "
            "or train from scratch with model.pretrained=false"
        ) from None
    check_size(model, facts, arch, int(pcfg.input_size[-1]))
    return model


def check_size(model: nn.Module, facts: ImageFacts, arch: str, native: int) -> None:
    """One image through the model now: an architecture whose downsampling needs larger images
    (convnext on 8x8 digits) is a user error before training, not a traceback in its first step."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, facts.channels, *facts.size))
    except RuntimeError as e:
        h, w = facts.size
        raise DlrunError(
            f"model.arch={arch} cannot take {h}x{w} images ({str(e).strip().splitlines()[-1][:120]}): "
            f"resize them with data.size=N (its pretrained weights saw {native}x{native}), "
            "or pick another arch"
        ) from None
    finally:
        model.train(was_training)
