"""A compact conv net for images from 8x8 to 224x224."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from dlrun.data.images import ImageFacts
from dlrun.family import dropout
from dlrun.rules import BOOL, Int

RULES = {"model.channels": Int(1, each=True), "model.channels_last": BOOL}


def conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias: BatchNorm follows), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CNN(nn.Module):
    """conv-BN-ReLU blocks, stride 2 after the first; large inputs get a strided stem
    and a max-pool so that 224x224 costs about what 56x56 would."""

    def __init__(
        self, in_channels: int, n_classes: int, channels: list[int], dropout: float, image_size: int
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        if image_size >= 64:
            layers += [conv_block(c, channels[0], 2), nn.MaxPool2d(3, stride=2, padding=1)]
            c = channels[0]
        for i, width in enumerate(channels):
            layers.append(conv_block(c, width, 1 if i == 0 else 2))
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, n_classes)
        )

    def forward(self, x):
        return self.head(self.features(x))


def build(cfg: DictConfig, facts: ImageFacts) -> CNN:
    """The CNN sized for the images (channels, classes, size)."""
    return CNN(
        in_channels=facts.channels,
        n_classes=facts.n_out,
        channels=list(cfg.model.channels),
        dropout=dropout(cfg.regularization, "cnn"),
        image_size=min(facts.size),
    )
