"""Learning-rate (and momentum) schedules as plain arithmetic on the step number."""

from __future__ import annotations

import math
from collections.abc import Callable

from omegaconf import DictConfig

from dlrun.rules import POSITIVE, Float, Int, Registry

# step -> (lr, momentum or None when momentum is not scheduled)
Schedule = Callable[[int], tuple[float, float | None]]


def cos_anneal(start: float, end: float, pct: float) -> float:
    """Cosine from `start` (pct=0) to `end` (pct=1)."""
    return end + (start - end) / 2 * (1 + math.cos(math.pi * min(max(pct, 0.0), 1.0)))


def one_cycle(
    lr: float,
    total: int,
    pct_start: float = 0.25,
    div: float = 25.0,
    final_div: float = 1e5,
    moms: tuple[float, float] | None = (0.95, 0.85),
) -> Schedule:
    """fastai's one-cycle: lr/div -> lr over the first pct_start of the steps, then down to
    lr/final_div, both by cosine; momentum moves the opposite way (high lr, low momentum)."""
    warm = max(1, round(total * pct_start))

    def at(step: int) -> tuple[float, float | None]:
        if step < warm:
            pct, lrs = step / warm, (lr / div, lr)
            mom = moms and (moms[0], moms[1])
        else:
            pct, lrs = (step - warm) / max(1, total - warm), (lr, lr / final_div)
            mom = moms and (moms[1], moms[0])
        return cos_anneal(*lrs, pct), (cos_anneal(*mom, pct) if mom else None)

    return at


def cosine(lr: float, total: int, eta_min: float = 0.0) -> Schedule:
    """Cosine annealing from lr to eta_min over the whole run."""
    return lambda step: (cos_anneal(lr, eta_min, step / max(1, total)), None)


def sgdr(
    lr: float, steps_per_epoch: int, cycle_len: int = 1, cycle_mult: int = 2, eta_min: float = 0.0
) -> Schedule:
    """SGDR (Loshchilov & Hutter): cosine from lr to eta_min, restarted at the end of each
    cycle; cycle k lasts cycle_len * cycle_mult**k epochs."""

    def at(step: int) -> tuple[float, float | None]:
        length = cycle_len * steps_per_epoch
        while step >= length:
            step -= length
            length *= cycle_mult
        return cos_anneal(lr, eta_min, step / length), None

    return at


def constant(lr: float) -> Schedule:
    """The same lr at every step."""
    return lambda step: (lr, None)


def build_onecycle(cfg: DictConfig, lr: float, total: int, steps_per_epoch: int) -> Schedule:
    moms = tuple(cfg.moms) if cfg.get("moms") else None
    return one_cycle(lr, total, cfg.pct_start, cfg.div, cfg.final_div, moms)


def build_cosine(cfg: DictConfig, lr: float, total: int, steps_per_epoch: int) -> Schedule:
    return cosine(lr, total, cfg.eta_min)


def build_sgdr(cfg: DictConfig, lr: float, total: int, steps_per_epoch: int) -> Schedule:
    return sgdr(lr, steps_per_epoch, cfg.cycle_len, cfg.cycle_mult, cfg.eta_min)


def build_constant(cfg: DictConfig, lr: float, total: int, steps_per_epoch: int) -> Schedule:
    return constant(lr)


ETA_MIN = {"schedule.eta_min": Float(0)}
SCHEDULES = Registry("schedule", "schedule.name")
SCHEDULES.register(
    "onecycle",
    build_onecycle,
    {
        "schedule.pct_start": Float(0, 1),
        "schedule.div": POSITIVE,
        "schedule.final_div": POSITIVE,
        "schedule.moms": Float(0, 1, length=2, nullable=True),  # [start/end, lowest], or null
    },
)
SCHEDULES.register("cosine", build_cosine, ETA_MIN)
SCHEDULES.register(
    "sgdr", build_sgdr, {"schedule.cycle_len": Int(1), "schedule.cycle_mult": Int(1), **ETA_MIN}
)
SCHEDULES.register("constant", build_constant, {})


def build_schedule(cfg: DictConfig, lr: float, total: int, steps_per_epoch: int) -> Schedule:
    """The schedule named by `cfg.name` for a run of `total` steps."""
    return SCHEDULES.get(cfg.name)(cfg, lr, total, steps_per_epoch)
