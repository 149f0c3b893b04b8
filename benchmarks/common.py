"""Shared pieces of the benchmarks: composing dlrun's config and timing fairly."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compose(*overrides: str, config_name: str = "train"):
    """dlrun's composed config with these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dlrun.config import configs_dir

    with initialize_config_dir(str(configs_dir()), version_base="1.3", job_name="bench"):
        return hydra_compose(config_name, overrides=list(overrides))


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def compare(
    name: str,
    ours: Callable[[], object],
    plain: Callable[[], object],
    repeats: int = 3,
    sync: Callable[[], None] = lambda: None,
) -> float:
    """Time the two alternately (so machine noise hits both), print medians and the ratio."""
    ours(), plain()  # warm-up: allocator, kernels, caches
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(ours, sync))
        b.append(timed(plain, sync))
    ratio = statistics.median(a) / statistics.median(b)
    print(
        f"{name:<44} dlrun {statistics.median(a):8.3f} s   plain {statistics.median(b):8.3f} s   "
        f"ratio {ratio:5.2f}"
    )
    return ratio
