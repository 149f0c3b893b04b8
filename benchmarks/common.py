"""Shared pieces of the benchmarks: composing dlrun's config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compose(*overrides: str, config_name: str = "train"):
    """dlrun's composed config with these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dlrun.config import configs_dir

    with initialize_config_dir(str(configs_dir()), version_base="1.3", job_name="bench"):
        return hydra_compose(config_name, overrides=list(overrides))


def stock_dropout(model: Any) -> Any:
    """The model with torch's own `nn.Dropout` where dlrun's builder put its CPU-fast one (the plain
    loop and the rivals are what a hand-written script or another library would train)."""
    from torch import nn

    from dlrun.models.dropout import Dropout

    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, Dropout):
                setattr(module, name, nn.Dropout(child.p))
    return model
