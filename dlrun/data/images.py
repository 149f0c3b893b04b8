"""What every image data kind shares: the facts an image model is sized from, the keys an
image data config may hold, and whole-tensor image sets on the device (digits, MNIST, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from dlrun.data import TensorBatches
from dlrun.data.augment import Augmented
from dlrun.family import Data, Facts
from dlrun.losses import classification_loss
from dlrun.metrics import Accuracy
from dlrun.rules import BOOL, Float, Int

# The keys of `configs/data/*.yaml` for images (each kind adds its own).
RULES = {
    "data.size": Int(1, nullable=True),
    "data.split_seed": Int(0),
    "data.augment.flip": BOOL,
    "data.augment.crop_pad": Int(0),
    "data.augment.scale_min": Float(0, 1, lo_open=True),
}


@dataclass(frozen=True)
class ImageFacts(Facts):
    """Images of `channels` x `size` (height, width) pixels in `n_out` classes, normalised
    per channel with `mean` and `std` (of the pixel values in [0, 1])."""

    channels: int
    size: tuple[int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def split_indices(n: int, valid_pct: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random train/valid split of n items (the seed is the data's, not the run's)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_valid = max(1, int(round(n * valid_pct)))
    return perm[n_valid:], perm[:n_valid]


def image_data(
    x: torch.Tensor,
    y: torch.Tensor,
    train_idx: np.ndarray,
    valid_idx: np.ndarray,
    cfg: DictConfig,
    device: torch.device,
    classes: list[str],
) -> Data:
    """Normalise images [N, C, H, W] with training-split statistics, put both splits on
    `device`, and batch them by index slices with on-device augmentation."""
    d = cfg.data
    if d.get("size"):
        x = F.interpolate(x, size=(d.size, d.size), mode="bilinear", align_corners=False)
    train_x = x[train_idx]
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = x.to(device).contiguous(memory_format=memory_format)
    y = y.to(device)
    tr = torch.as_tensor(train_idx, device=device)
    va = torch.as_tensor(valid_idx, device=device)
    train = TensorBatches(x[tr], y[tr], d.bs, shuffle=True, seed=cfg.seed, drop_last=True, split="train")
    valid = TensorBatches(x[va], y[va], d.bs, shuffle=False, split="valid")
    aug = d.get("augment") or {}
    if aug.get("crop_pad", 0) or aug.get("flip", False):
        background = ((0.0 - mean) / std).reshape(-1).to(device)  # the value of a black pixel
        train = Augmented(train, aug.get("crop_pad", 0), aug.get("flip", False), background)
    facts = ImageFacts(
        n_out=len(classes),
        channels=x.shape[1],
        size=(x.shape[-2], x.shape[-1]),
        classes=tuple(classes),
        mean=tuple(mean.reshape(-1).tolist()),
        std=tuple(std.reshape(-1).tolist()),
    )
    state = {"classes.json": list(classes)}
    inputs = image_inputs(
        facts,
        "tensor",
        int(d.bs),
        {"flip": bool(aug.get("flip", False)), "crop_pad": int(aug.get("crop_pad", 0))},
    )
    return Data(
        train=train,
        valid=valid,
        loss=classification_loss,
        metrics=Accuracy,
        facts=facts,
        state=state,
        unit="images",
        mixup="inputs",
        inputs=inputs,
    )


def image_inputs(facts: ImageFacts, pixels: str, bs: int, augment: dict[str, Any]) -> dict[str, Any]:
    """An image run's `Data.inputs`: the facts, and how its pixels were read. `pixels` is
    `tensor` (whole images scaled to [0, 1], resized bilinearly to `size`, then normalised) or
    `files` (imagefolder: the centre square resized to `size` in PIL, then normalised)."""
    return {
        "family": "images",
        "pixels": pixels,
        "classes": list(facts.classes),
        "channels": facts.channels,
        "size": list(facts.size),
        "mean": list(facts.mean),
        "std": list(facts.std),
        "bs": bs,
        "augment": augment,
    }


def facts_from(inputs: dict[str, Any]) -> ImageFacts:
    """The facts of a saved image model, from its `Data.inputs` (model.json)."""
    return ImageFacts(
        n_out=len(inputs["classes"]),
        channels=int(inputs["channels"]),
        size=tuple(int(v) for v in inputs["size"]),
        classes=tuple(str(c) for c in inputs["classes"]),
        mean=tuple(float(v) for v in inputs["mean"]),
        std=tuple(float(v) for v in inputs["std"]),
    )
