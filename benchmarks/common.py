"""Shared pieces of the benchmarks: composing dlrun's config."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compose(*overrides: str, config_name: str = "train"):
    """dlrun's composed config with these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dlrun.config import configs_dir

    with initialize_config_dir(str(configs_dir()), version_base="1.3", job_name="bench"):
        return hydra_compose(config_name, overrides=list(overrides))
