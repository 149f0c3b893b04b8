"""Optimizers with both kinds of weight decay, for every optimizer.

`l2`: wd*p is added to the gradient (the gradient of wd/2*|p|^2 in the loss), so
with Adam it is rescaled by the adaptive denominator like any gradient.
`decoupled`: p -= lr*wd*p before the update, independent of the gradient (AdamW,
Loshchilov & Hutter). With SGD without momentum the two are the same; with
momentum or Adam they differ. Biases and normalisation parameters (1-d tensors)
are never decayed. `optimizer=adam` picks l2 and `optimizer=adamw` decoupled by default
(as torch.optim.Adam and AdamW do); `regularization.wd_mode` overrides either.

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
    "optimizer.betas": Float(0, 1, hi_open=True, length=2),
    "optimizer.eps": POSITIVE,
}
OPTIMIZERS = Registry("optimizer", "optimizer.name")
OPTIMIZERS.register(
    "sgd",
    sgd,
    {"optimizer.lr": LR, "optimizer.momentum": Float(0, 1), "optimizer.nesterov": BOOL},
)
# adam and adamw run the same Adam update: regularization.wd_mode decides the decay.
OPTIMIZERS.register("adam", adam, ADAM_RULES)
OPTIMIZERS.register("adamw", adam, ADAM_RULES)


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    """Two groups: weights (decayed) and biases/normalisation parameters (not)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "wd": wd}, {"params": no_decay, "wd": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class DecoupledDecay:
    """p *= 1 - lr*wd for the decayed parameters, applied just before optimizer.step()
    (the order torch.optim.AdamW uses)."""

    params: list[torch.Tensor]
    wd: float

    def apply(self, lr: float) -> None:
        import torch

        with torch.no_grad():
            torch._foreach_mul_(self.params, 1.0 - lr * self.wd)


def build_optimizer(
    cfg: DictConfig, model: nn.Module, device: torch.device
) -> tuple[torch.optim.Optimizer, DecoupledDecay | None]:
    """The optimizer `cfg.optimizer.name`, and the decoupled decay to apply before each of
    its steps (None in l2 mode, where the optimizer adds wd*p to the gradient itself)."""
    opt_cfg, reg = cfg.optimizer, cfg.regularization
    make: Callable[..., torch.optim.Optimizer] = OPTIMIZERS.get(opt_cfg.name)
    wd = float(reg.wd)
    groups = param_groups(model, wd)
    decay = None
    if reg.wd_mode == "l2":
        for g in groups:
            g["weight_decay"] = g.pop("wd")
    else:
        # The optimizer itself decays nothing, so one group holds every parameter: half the
        # multi-tensor kernel launches of two groups per step.
        if wd and groups[0]["wd"]:
            decay = DecoupledDecay(list(groups[0]["params"]), wd)
        groups = [{"params": [p for g in groups for p in g["params"]], "weight_decay": 0.0}]
    lr = 1e-3 if opt_cfg.lr == "find" else float(opt_cfg.lr)
    # One fused kernel per step on CUDA; the multi-tensor (foreach) path elsewhere.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return make(groups, lr, opt_cfg, fast), decay


def set_hyper(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None) -> None:
    """Set the learning rate (and momentum / Adam's beta1 when scheduled) of every group."""
    for g in optimizer.param_groups:
        g["lr"] = lr
        if momentum is not None:
            if "betas" in g:
                g["betas"] = (momentum, g["betas"][1])
            elif g.get("momentum", 0) > 0:
                g["momentum"] = momentum
