"""scikit-learn's bundled 8x8 digits: 1,797 images, 10 classes, no download needed."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dlrun.data import images
from dlrun.family import Data

RULES = images.RULES


def build(cfg: DictConfig, device: torch.device) -> Data:
    """The digits as [N, 1, 8, 8] float tensors in [0, 1], split by `data.valid_pct`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, valid_idx = images.split_indices(len(y), cfg.data.valid_pct, cfg.data.split_seed)
    classes = [str(c) for c in range(10)]
    return images.image_data(x, y, train_idx, valid_idx, cfg, device, classes)
