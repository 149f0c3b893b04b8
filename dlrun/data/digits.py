"""scikit-learn's bundled 8x8 digits: 1,797 images, 10 classes, no download needed."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from dlrun.data import Data, TensorBatches
from dlrun.data.augment import Augmented
from dlrun.losses import classification_loss
from dlrun.metrics import Accuracy


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
    n_classes: int,
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
    info = {
        "n_classes": n_classes,
        "in_channels": x.shape[1],
        "image_size": tuple(x.shape[-2:]),
        "mean": mean.reshape(-1).tolist(),
        "std": std.reshape(-1).tolist(),
    }
    return Data(train=train, valid=valid, loss=classification_loss, metrics=Accuracy, info=info)


def build(cfg: DictConfig, device: torch.device) -> Data:
    """The digits as [N, 1, 8, 8] float tensors in [0, 1], split by `data.valid_pct`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, valid_idx = split_indices(len(y), cfg.data.valid_pct, cfg.data.split_seed)
    return image_data(x, y, train_idx, valid_idx, cfg, device, n_classes=10)
