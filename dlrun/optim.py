"""Optimizers with both kinds of weight decay, for every optimizer.

`l2`: wd*p is added to the gradient (the gradient of wd/2*|p|^2 in the loss), so
with Adam it is rescaled by the adaptive denominator like any gradient.
`decoupled`: p -= lr*wd*p before the update, independent of the gradient (AdamW,
Loshchilov & Hutter). With SGD without momentum the two are the same; with
momentum or Adam they differ. Biases and normalisation parameters (1-d tensors)
are never decayed. `optimizer=adam` picks l2 and `optimizer=adamw` decoupled by default
(as torch.optim.Adam and AdamW do); `regularization.wd_mode` overrides either.

Discriminative rates (`optimizer.lr_mult`, fastai's `lr=slice(lr * lr_mult, lr)`): the model's
layer groups (`dlrun.family.layer_groups`) get rates spread geometrically from `lr * lr_mult`
(the first group) to `lr` (the head); each torch param group carries its `lr_factor`, which
`set_hyper` and the decoupled decay apply to the scheduled rate.

Light at import (torch is imported where it is used): the config checks read `OPTIMIZERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dlrun.rules import BOOL, POSITIVE, Float, Registry

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torch import nn

LR = Float(0, lo_open=True, words=("find",))
LR_MULT = Float(0, 1, lo_open=True)


def sgd(groups: list[dict], lr: float, opt_cfg: Any, fast: dict) -> torch.optim.Optimizer:
    """SGD with (optionally Nesterov) momentum."""
    import torch

    momentum = float(opt_cfg.momentum)
    nesterov = bool(opt_cfg.nesterov) and momentum > 0
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **fast)


def adam(groups: list[dict], lr: float, opt_cfg: Any, fast: dict) -> torch.optim.Optimizer:
    """Adam; which decay it gets is the groups' (l2) or DecoupledDecay's business."""
    import torch

    return torch.optim.Adam(groups, lr=lr, betas=tuple(opt_cfg.betas), eps=float(opt_cfg.eps), **fast)


# Adam's two betas (momentum, squared-gradient average) each lie in [0, 1), as torch checks.
ADAM_RULES = {
    "optimizer.lr": LR,
    "optimizer.lr_mult": LR_MULT,
    "optimizer.betas": Float(0, 1, hi_open=True, length=2),
    "optimizer.eps": POSITIVE,
}
OPTIMIZERS = Registry("optimizer", "optimizer.name")
OPTIMIZERS.register(
    "sgd",
    sgd,
    {
        "optimizer.lr": LR,
        "optimizer.lr_mult": LR_MULT,
        "optimizer.momentum": Float(0, 1),
        "optimizer.nesterov": BOOL,
    },
)
# adam and adamw run the same Adam update: regularization.wd_mode decides the decay.
OPTIMIZERS.register("adam", adam, ADAM_RULES)
OPTIMIZERS.register("adamw", adam, ADAM_RULES)


def lr_factors(n: int, lr_mult: float) -> list[float]:
    """Rate factors of `n` layer groups, geometric from `lr_mult` (first) to 1 (last)."""
    if n == 1:
        return [1.0]
    return [lr_mult ** ((n - 1 - i) / (n - 1)) for i in range(n)]


def param_groups(params: list[torch.nn.Parameter], wd: float, factor: float = 1.0) -> list[dict]:
    """Two groups: weights (decayed) and biases/normalisation parameters (not)."""
    decay, no_decay = [], []
    for p in params:
        (decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "wd": wd, "lr_factor": factor},
        {"params": no_decay, "wd": 0.0, "lr_factor": factor},
    ]
    return [g for g in groups if g["params"]]


@dataclass
class DecoupledDecay:
    """p *= 1 - lr*factor*wd for the decayed parameters of each rate group (`parts`: the
    parameters and their lr factor), applied just before optimizer.step() (the order
    torch.optim.AdamW uses). Frozen parameters (requires_grad false) are left alone."""

    parts: list[tuple[list[torch.Tensor], float]]
    wd: float

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Take the parameters to decay again (after freezing or unfreezing layers)."""
        self.active = [([p for p in ps if p.requires_grad], f) for ps, f in self.parts]
        self.active = [(ps, f) for ps, f in self.active if ps]

    def apply(self, lr: float) -> None:
        import torch

        with torch.no_grad():
            for params, factor in self.active:
                torch._foreach_mul_(params, 1.0 - lr * factor * self.wd)


def build_optimizer(
    cfg: DictConfig, model: nn.Module, device: torch.device
) -> tuple[torch.optim.Optimizer, DecoupledDecay | None]:
    """The optimizer `cfg.optimizer.name`, and the decoupled decay to apply before each of
    its steps (None in l2 mode, where the optimizer adds wd*p to the gradient itself)."""
    from dlrun.family import layer_groups

    opt_cfg, reg = cfg.optimizer, cfg.regularization
    make: Callable[..., torch.optim.Optimizer] = OPTIMIZERS.get(opt_cfg.name)
    wd = float(reg.wd)
    lr_mult = float(opt_cfg.get("lr_mult", 1.0))
    if lr_mult == 1.0:
        layers = [[p for p in model.parameters() if p.requires_grad]]
    else:
        layers = [[p for p in g if p.requires_grad] for g in layer_groups(cfg, model)]
    factors = lr_factors(len(layers), lr_mult)
    groups = [g for params, f in zip(layers, factors) for g in param_groups(params, wd, f)]
    decay = None
    if reg.wd_mode == "l2":
        for g in groups:
            g["weight_decay"] = g.pop("wd")
    else:
        # The optimizer itself decays nothing, so one group per rate holds its parameters:
        # with one rate, half the multi-tensor kernel launches of two groups per step.
        if wd:
            parts = [(g["params"], g["lr_factor"]) for g in groups if g["wd"]]
            decay = DecoupledDecay(parts, wd) if parts else None
        merged: dict[float, list] = {}
        for g in groups:
            merged.setdefault(g["lr_factor"], []).extend(g["params"])
        groups = [{"params": ps, "weight_decay": 0.0, "lr_factor": f} for f, ps in merged.items()]
    lr = 1e-3 if opt_cfg.lr == "find" else float(opt_cfg.lr)
    # One fused kernel per step on CUDA; the multi-tensor (foreach) path elsewhere.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return make(groups, lr, opt_cfg, fast), decay


def set_hyper(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None) -> None:
    """Set the learning rate (times the group's `lr_factor`) and momentum / Adam's beta1, when
    scheduled, of every group."""
    for g in optimizer.param_groups:
        rate = lr * g.get("lr_factor", 1.0)
        if isinstance(g["lr"], float | int):
            g["lr"] = rate
        else:  # a compiled step's tensor (dlrun.compiled_step): filled in place, no recompiling
            g["lr"].fill_(rate)
        if momentum is not None:
            if "betas" in g:
                if isinstance(g["betas"][0], float | int):
                    g["betas"] = (momentum, g["betas"][1])
                else:
                    g["betas"][0].fill_(momentum)
            elif g.get("momentum", 0) > 0:
                g["momentum"] = momentum
