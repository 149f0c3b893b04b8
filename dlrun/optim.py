"""Optimizers with both kinds of weight decay, for every optimizer.

`l2`: wd*p is added to the gradient (the gradient of wd/2*|p|^2 in the loss), so
with Adam it is rescaled by the adaptive denominator like any gradient.
`decoupled`: p -= lr*wd*p before the update, independent of the gradient (AdamW,
Loshchilov & Hutter). With SGD without momentum the two are the same; with
momentum or Adam they differ. Biases and normalisation parameters (1-d tensors)
are never decayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn


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

    @torch.no_grad()
    def apply(self, lr: float) -> None:
        torch._foreach_mul_(self.params, 1.0 - lr * self.wd)


def build_optimizer(
    cfg: DictConfig, model: nn.Module, device: torch.device
) -> tuple[torch.optim.Optimizer, DecoupledDecay | None]:
    """The optimizer `cfg.optimizer.name`, and the decoupled decay to apply before each of
    its steps (None in l2 mode, where the optimizer adds wd*p to the gradient itself)."""
    opt_cfg, reg = cfg.optimizer, cfg.regularization
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
    if opt_cfg.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups,
            lr=lr,
            momentum=float(opt_cfg.momentum),
            nesterov=bool(opt_cfg.nesterov) and opt_cfg.momentum > 0,
            **fast,
        )
    else:
        # adam and adamw run the same Adam update; regularization.wd_mode decides the decay.
        opt = torch.optim.Adam(groups, lr=lr, betas=tuple(opt_cfg.betas), eps=float(opt_cfg.eps), **fast)
    return opt, decay


def set_hyper(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None) -> None:
    """Set the learning rate (and momentum / Adam's beta1 when scheduled) of every group."""
    for g in optimizer.param_groups:
        g["lr"] = lr
        if momentum is not None:
            if "betas" in g:
                g["betas"] = (momentum, g["betas"][1])
            elif g.get("momentum", 0) > 0:
                g["momentum"] = momentum
