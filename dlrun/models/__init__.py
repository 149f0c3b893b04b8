"""Model families. `configs/model/<name>.yaml` names the module `dlrun/models/<name>.py`,
whose `build(cfg, data) -> nn.Module` makes the network for that data.

A model may define `reset_state()`: the loop calls it before every training epoch
and every validation pass (an RNN's hidden state).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import nn

    from dlrun.data import Data


def build_model(cfg: "DictConfig", data: "Data") -> "nn.Module":
    """Build the model named by `cfg.model.name` for `data`."""
    module = importlib.import_module(f"dlrun.models.{cfg.model.name}")
    return module.build(cfg, data)
