"""A compact conv net for images from 8x8 to 224x224."""

from __future__ import annotations

import math

from omegaconf import DictConfig
from torch import nn

from dlrun.data.images import ImageFacts
from dlrun.family import dropout
from dlrun.models.dropout import Dropout
from dlrun.rules import BOOL, Int

RULES = {
    "model.channels": Int(1, each=True),
    "model.blocks": Int(1),
    "model.grid": Int(1),
    "model.channels_last": BOOL,
}


def conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias: BatchNorm follows), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def halve(size: tuple[int, int]) -> tuple[int, int]:
    """The map a stride-2 3x3 conv (or max-pool) with padding 1 leaves of `size`."""
    return math.ceil(size[0] / 2), math.ceil(size[1] / 2)


def receptive_field(layers: nn.Module) -> int:
    """How many input pixels across one output feature of `layers` sees (convs and pools)."""
    field, step = 1, 1
    for layer in layers.modules():
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            k, s = layer.kernel_size, layer.stride
            k, s = (k if isinstance(k, int) else k[0]), (s if isinstance(s, int) else s[0])
            field, step = field + (k - 1) * step, step * s
    return field


class CNN(nn.Module):
    """One conv-BN-ReLU block at the input's resolution, then one stage per further entry of
    `channels`: a stride-2 block and `blocks - 1` more at half the size. Inputs of 64 px or
    more first get a strided stem and a max-pool, so that 224x224 costs about what 56x56 would.

    The head averages the last map globally only when each of its features sees the whole
    image (8x8 digits). Otherwise global pooling would throw away where a stroke or a part
    lies, which the features alone cannot tell: the map is kept, average-pooled by 2 until it
    is at most `grid` wide, and flattened (28x28 MNIST: 7x7, 32x32 CIFAR-10: 4x4)."""

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        channels: list[int],
        blocks: int,
        grid: int,
        dropout: float,
        image_size: tuple[int, int],
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, tuple(image_size)
        if min(size) >= 64:
            layers += [conv_block(c, channels[0], 2), nn.MaxPool2d(3, stride=2, padding=1)]
            c, size = channels[0], halve(halve(size))
        layers.append(conv_block(c, channels[0], 1))
        c = channels[0]
        for width in channels[1:]:
            layers.append(conv_block(c, width, 2))
            layers += [conv_block(width, width, 1) for _ in range(blocks - 1)]
            c, size = width, halve(size)
        self.features = nn.Sequential(*layers)
        pooled = (1, 1) if receptive_field(self.features) >= max(image_size) else size
        while max(pooled) > grid:
            pooled = halve(pooled)
        # A pooling that changes nothing still costs a tenth of a step on the CPU.
        pool = nn.AdaptiveAvgPool2d(pooled) if pooled != size else nn.Identity()
        self.head = nn.Sequential(
            pool, nn.Flatten(), Dropout(dropout), nn.Linear(c * pooled[0] * pooled[1], n_classes)
        )

    def forward(self, x):
        return self.head(self.features(x))


def layer_groups(model: CNN) -> list[list[nn.Module]]:
    """The first half of the feature blocks, the second half, the head."""
    blocks = list(model.features)
    half = len(blocks) // 2
    return [blocks[:half], blocks[half:], [model.head]]


def build(cfg: DictConfig, facts: ImageFacts) -> CNN:
    """The CNN sized for the images (channels, classes, size)."""
    m = cfg.model
    return CNN(
        in_channels=facts.channels,
        n_classes=facts.n_out,
        channels=[m.channels] if isinstance(m.channels, int) else list(m.channels),
        blocks=m.blocks,
        grid=m.grid,
        dropout=dropout(cfg.regularization, "cnn"),
        image_size=tuple(facts.size),
    )
