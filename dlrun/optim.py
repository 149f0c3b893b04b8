"""Optimizers with both kinds of weight decay, for every optimizer.

`l2`: wd*p is added to the gradient (the gradient of wd/2*|p|^2 in the loss), so
with Adam it is rescaled by the adaptive denominator like any gradient.
`decoupled`: p -= lr*wd*p before the update, independent of the gradient (AdamW,
Loshchilov & Hutter). With SGD without momentum the two are the same; with
momentum or Adam they differ. Biases and normalisation parameters (1-d tensors)
are never decayed.
"""

from __future__ import annotations

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


def build_optimizer(cfg: DictConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer.name` with `regularization.wd` applied as `wd_mode` says."""
    opt_cfg, reg = cfg.optimizer, cfg.regularization
    groups = param_groups(model, float(reg.wd))
    l2 = reg.wd_mode == "l2"
    for g in groups:
        g["weight_decay"] = g["wd"] if l2 else 0.0
        g["decoupled_wd"] = 0.0 if l2 else g["wd"]
    lr = 1e-3 if opt_cfg.lr == "find" else float(opt_cfg.lr)
    # One fused kernel per step on CUDA; the multi-tensor (foreach) path elsewhere.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if opt_cfg.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=float(opt_cfg.momentum),
            nesterov=bool(opt_cfg.nesterov) and opt_cfg.momentum > 0,
            **fast,
        )
    # adam and adamw run the same Adam update; regularization.wd_mode decides the decay.
    return torch.optim.Adam(groups, lr=lr, betas=tuple(opt_cfg.betas), eps=float(opt_cfg.eps), **fast)


def set_hyper(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None) -> None:
    """Set the learning rate (and momentum / Adam's beta1 when scheduled) of every group."""
    for g in optimizer.param_groups:
        g["lr"] = lr
        if momentum is not None:
            if "betas" in g:
                g["betas"] = (momentum, g["betas"][1])
            elif g.get("momentum", 0) > 0:
                g["momentum"] = momentum


@torch.no_grad()
def decay_weights(optimizer: torch.optim.Optimizer) -> None:
    """Decoupled weight decay, p *= 1 - lr*wd, applied just before optimizer.step()
    (the order torch.optim.AdamW uses)."""
    for g in optimizer.param_groups:
        wd = g.get("decoupled_wd", 0.0)
        if wd:
            params = [p for p in g["params"] if p.grad is not None]
            if params:
                torch._foreach_mul_(params, 1.0 - g["lr"] * wd)
