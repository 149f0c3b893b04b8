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
    # One fused kernel per step on CUDA and the CPU (torch's fused Adam and SGD, both devices
    # since torch 2.4), the multi-tensor (foreach) path where torch has no fused kernel.
    if device.type in ("cuda", "cpu"):
        try:
            return make(groups, lr, opt_cfg, {"fused": True}), decay
        except (RuntimeError, ValueError, TypeError):
            pass
    return make(groups, lr, opt_cfg, {"foreach": True}), decay


class FusedStep:
    """`optimizer.step()` for torch's fused Adam, AdamW and SGD, made by calling the very kernel
    that step calls (`torch._fused_adam_`, `_fused_adamw_`, `_fused_sgd_`) on the optimizer's own
    state tensors, with the bookkeeping torch.optim redoes every step (hooks, grouping tensors by
    device and dtype, looking up each parameter's state) done once. On the CPU at batch 64 that
    bookkeeping cost more than the update itself (README "Speed").

    The tensor lists are taken after a step of the optimizer's own (the first step, which also
    creates the state) and taken again whenever they may no longer hold: a parameter gained or
    lost its gradient (freezing, unfreezing), or the state was replaced (`load_state_dict` on
    resume). Hyperparameters are read from the param groups at every step, so a schedule that
    writes lr, betas or momentum into them is followed. `usable` says when this applies at all:
    fused optimizers without amsgrad, maximize, capturable, differentiable or step hooks; the
    same arguments torch.optim would pass, so the parameters come out bit for bit the same
    (tests/test_optim.py).

    With `decay` (regularization.wd_mode=decoupled), `step(lr)` also applies it: an Adam group's
    decayed parameters go through torch's fused AdamW kernel, which multiplies them by
    1 - group lr x wd (DecoupledDecay's factor) in the pass that updates them, instead of one more
    pass over them first; equal to DecoupledDecay then Adam up to rounding. SGD groups, and any
    step taken by the optimizer itself, get `decay.apply(lr)` first as before.

    Adam's step counts (one 0-d tensor per parameter, which torch.optim adds 1 to one tensor at
    a time: about 20 us a group on the CPU) are made views into one tensor of counts when the
    lists are taken, so that one `add_` counts a step for every parameter. Each parameter still
    has its own count tensor, so the optimizer's own step, a saved state dict and a loaded one
    count as before; `release` gives each back a tensor of its own storage, for code that steps
    the optimizer in other ways (the compiled step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, decay: DecoupledDecay | None = None):
        self.optimizer, self.decay = optimizer, decay
        self.state: Any = None  # the optimizer.state the lists below were taken from
        self.groups: list[tuple[list[bool], list[list[torch.Tensor]]]] = []
        self.mixed = False  # parameters on several devices or of several dtypes: torch.optim's step
        self.counts: torch.Tensor | None = None  # Adam's step counts, every stepped parameter's
        self.sgd = "betas" not in optimizer.defaults  # SGD: its fused kernel's weight decay is L2

    @staticmethod
    def usable(optimizer: torch.optim.Optimizer) -> bool:
        """Whether `step` can stand in for `optimizer.step()`: torch's Adam, AdamW or SGD with
        fused kernels, none of the options those kernels are not called with here, no step hooks."""
        import torch

        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD):
            return False
        if getattr(optimizer, "_optimizer_step_pre_hooks", None) or getattr(
            optimizer, "_optimizer_step_post_hooks", None
        ):
            return False
        kernels = ("_fused_adam_", "_fused_adamw_", "_fused_sgd_")
        if not all(hasattr(torch, k) for k in kernels):
            return False
        off = ("amsgrad", "maximize", "capturable", "differentiable")
        return all(g.get("fused") and not any(g.get(k) for k in off) for g in optimizer.param_groups)

    def step(self, lr: float = 0.0) -> None:
        """One update of every parameter that has a gradient, after the decoupled decay at the
        scheduled rate `lr` (with `decay`)."""
        opt = self.optimizer
        if self.mixed:
            return self.own_step(lr)  # torch.optim sorts the tensors by device and dtype
        if opt.state is not self.state or len(self.groups) != len(opt.param_groups):
            return self.step_and_take(lr)
        for group, (has, _) in zip(opt.param_groups, self.groups):
            if [p.grad is not None for p in group["params"]] != has:
                return self.step_and_take(lr)
        if self.decay is not None and self.sgd:
            self.decay.apply(lr)  # fused SGD's weight decay is L2: the decoupled one comes first
        if self.counts is not None:
            self.counts.add_(1)  # this step, counted for every parameter the kernels update
        for group, (_, lists) in zip(opt.param_groups, self.groups):
            self.kernel(group, lists)

    def own_step(self, lr: float) -> None:
        """The optimizer's own step, after the decoupled decay."""
        if self.decay is not None:
            self.decay.apply(lr)
        self.optimizer.step()

    def zero_grad(self) -> None:
        """`optimizer.zero_grad(set_to_none=True)` without its per-call profiler scope (about
        35 us a step on the CPU for Adult's 13 tensors, a twentieth of the step at batch 64)."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def step_and_take(self, lr: float) -> None:
        """A step of the optimizer's own, then the lists for the next ones."""
        opt = self.optimizer
        self.own_step(lr)
        self.groups = []
        decayed = {id(p) for ps, _ in self.decay.active for p in ps} if self.decay is not None else set()
        for group in opt.param_groups:
            has = [p.grad is not None for p in group["params"]]
            params = [p for p, h in zip(group["params"], has) if h]
            self.mixed |= len({(p.device, p.dtype) for p in params}) > 1
            if "betas" in group:
                # Adam: the decayed parameters, then the others, each as the kernel's lists
                parts = [[p for p in params if id(p) in decayed], [p for p in params if id(p) not in decayed]]
                lists = [self.adam_lists(part) for part in parts]
            else:  # SGD: no buffers without momentum
                buffers = [opt.state[p].get("momentum_buffer") for p in params]
                lists = [[params, [] if any(b is None for b in buffers) else buffers]]
            self.groups.append((has, lists))
        self.state = opt.state
        self.count_together()

    def count_together(self) -> None:
        """Make the Adam step counts in the lists views into one tensor, `counts` (their values
        kept), so that `counts.add_(1)` counts a step for all of them."""
        import torch

        self.counts = None
        adam = [lists for _, groups in self.groups for lists in groups if len(lists) == 4]
        every = [t for lists in adam for t in lists[3]]
        if not every or self.mixed:
            return
        self.counts = torch.stack([t.detach().reshape(()) for t in every])
        views = iter(self.counts.unbind(0))
        for lists in adam:
            lists[3] = [next(views) for _ in lists[3]]
            for p, view in zip(lists[0], lists[3]):
                self.optimizer.state[p]["step"] = view

    def release(self) -> None:
        """Give every parameter's step count a storage of its own again, and take the lists
        anew at the next `step`: for code that steps the optimizer other than through `step`."""
        if self.counts is not None:
            shared = self.counts.untyped_storage().data_ptr()
            for state in self.optimizer.state.values():
                step = state.get("step")
                if step is not None and step.untyped_storage().data_ptr() == shared:
                    state["step"] = step.clone()
        self.counts, self.state = None, None

    def adam_lists(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """params, exp_avgs, exp_avg_sqs, steps: Adam's state for `params`."""
        states = [self.optimizer.state[p] for p in params]
        return [params, *([s[k] for s in states] for k in ("exp_avg", "exp_avg_sq", "step"))]

    def kernel(self, group: dict, lists: list[list[list[torch.Tensor]]]) -> None:
        """One param group's update: the kernels and arguments torch.optim's fused path uses."""
        import torch

        if "betas" in group:
            decoupled = isinstance(self.optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay")
            beta1, beta2 = group["betas"]
            for i, (params, exp_avgs, exp_avg_sqs, steps) in enumerate(lists):
                if not params:
                    continue
                # lists[0]: the parameters DecoupledDecay decays, folded into AdamW's kernel
                fold = i == 0 and self.decay is not None
                fused = torch._fused_adamw_ if decoupled or fold else torch._fused_adam_
                # `steps` are views into `counts`, which `step` has already added this step to
                fused(
                    params,
                    [p.grad for p in params],
                    exp_avgs,
                    exp_avg_sqs,
                    [],
                    steps,
                    amsgrad=False,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=self.decay.wd if fold else group["weight_decay"],
                    eps=group["eps"],
                    maximize=False,
                    grad_scale=None,
                    found_inf=None,
                )
        else:
            ((params, buffers),) = lists
            torch._fused_sgd_(
                params,
                [p.grad for p in params],
                buffers,
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=False,
                is_first_step=False,
                grad_scale=None,
                found_inf=None,
            )


def set_hyper(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None) -> None:
    """Set the learning rate (times the group's `lr_factor`) and momentum / Adam's beta1, when
    scheduled, of every group."""
    for g in optimizer.param_groups:
        rate = lr * g.get("lr_factor", 1.0)
        if isinstance(g["lr"], (float, int)):
            g["lr"] = rate
        else:  # a compiled step's tensor (dlrun.compiled_step): filled in place, no recompiling
            g["lr"].fill_(rate)
        if momentum is not None:
            if "betas" in g:
                if isinstance(g["betas"][0], (float, int)):
                    g["betas"] = (momentum, g["betas"][1])
                else:
                    g["betas"][0].fill_(momentum)
            elif g.get("momentum", 0) > 0:
                g["momentum"] = momentum
