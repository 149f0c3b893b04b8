"""The learner: data, model and optimizer on a device, one training step and one validation
pass. `dlrun.train` (the epoch loop) and `dlrun.lr_find` (the range test) are both built on
it; it knows nothing of either, nor of any model family.

Order of one step, as in a hand-written loop: forward under autocast, loss, backward,
clip, decoupled weight decay, optimizer step. The loss stays on the device. With gradient
accumulation (`trainer.accumulate=K`) a step is K calls: each adds its share of the gradient,
the last one clips, decays and steps.

The training loss is the data's, with label smoothing when `regularization.label_smoothing`
is set and blended by mixup when `regularization.mixup` is; validation always uses the plain
loss, so validation losses compare across runs whatever their regularization.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from dlrun import distributed
from dlrun.compiled_step import StepCompiler
from dlrun.errors import DlrunError
from dlrun.family import Data, build_data, build_model
from dlrun.losses import classification_loss
from dlrun.mixup import Mixup
from dlrun.optim import DecoupledDecay, FusedStep, build_optimizer, set_hyper

log = logging.getLogger("dlrun")


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA, then MPS, then CPU; a named device must be there."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise DlrunError(
            f"trainer.device={name} but no {name.upper()} device is available here: "
            "use trainer.device=auto or trainer.device=cpu"
        )
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> tuple[str, Callable[[], Any], Any]:
    """(precision, autocast context factory, GradScaler or None) for `trainer.precision`."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        name = "bf16" if bf16 else "32"
    if name == "32":
        return name, contextlib.nullcontext, None
    if name == "16" and device.type == "cpu":
        raise DlrunError("trainer.precision=16 needs a GPU: use trainer.precision=bf16 or 32 on the CPU")
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if name == "16" else None
    return name, lambda: torch.autocast(device.type, dtype=dtype), scaler


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(kw_only=True)
class Learner:
    """Everything a training step needs, built once per run by `prepare`."""

    device: torch.device
    data: Data
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable[[Any], Any] | None = None  # the model's torch.compile'd version, else the model
    # (wrapped in DistributedDataParallel when the run has several processes)
    evaluate_forward: Callable[[Any], Any] | None = None  # validation's: without DDP (default: forward)
    compiler: StepCompiler | None = None  # trainer.compile: the whole step compiled, when it pays
    fused_step: FusedStep | None = None  # optimizer.step() without torch.optim's per-step bookkeeping
    precision: str = "32"
    autocast: Callable[[], Any] = contextlib.nullcontext
    scaler: Any = None  # GradScaler for fp16
    grad_clip: float | None = None
    decay: DecoupledDecay | None = None  # regularization.wd_mode=decoupled
    loss: Callable[[Any, Any], torch.Tensor] | None = None  # the training loss (default: the data's)
    mixup: Mixup | None = None  # regularization.mixup > 0
    params: list[torch.Tensor] = field(init=False)  # what gradient clipping sees

    def __post_init__(self) -> None:
        # `is None`, not `or`: a compiled module's truth value asks the model for len().
        self.forward = self.forward if self.forward is not None else self.model
        self.evaluate_forward = self.evaluate_forward if self.evaluate_forward is not None else self.forward
        self.loss = self.loss or self.data.loss
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def reset_state(self) -> None:
        """Start a pass over the data afresh (a model that carries state forgets it)."""
        reset = getattr(self.model, "reset_state", None)
        if reset is not None:
            reset()

    def carried_state(self) -> Any:
        """What the model carries from one batch to the next (None if nothing)."""
        get = getattr(self.model, "carried_state", None)
        return get() if get is not None else None

    def load_carried_state(self, state: Any) -> None:
        """Give the model back what `carried_state` returned, so the next batch continues it."""
        load = getattr(self.model, "load_carried_state", None)
        if load is not None:
            load(state)


def start_from(model: torch.nn.Module, run_dir: str) -> None:
    """`model.init_from`: another run's weights where they fit, and say which did not."""
    from dlrun import report, rundir

    loaded, left = rundir.init_from(model, run_dir)
    line = f"model.init_from: loaded {len(loaded)} of {len(loaded) + len(left)} tensors from {run_dir}"
    if left:
        line += f"; left as initialised: {', '.join(left[:6])}" + (
            f" (+{len(left) - 6} more)" if len(left) > 6 else ""
        )
    log.info(line)
    report.console.print(line, markup=False, highlight=False, soft_wrap=True)


def prepare(cfg: DictConfig) -> Learner:
    """Seed, pick the device and precision, build data, model and optimizer."""
    seed_everything(cfg.seed)
    device = distributed.device(pick_device(cfg.trainer.device))
    precision, autocast, scaler = pick_precision(str(cfg.trainer.precision), device)
    data = build_data(cfg, device)
    distributed.shard(data)
    model = build_model(cfg, data.facts)
    if cfg.model.get("init_from") and not cfg.get("resume"):
        start_from(model, cfg.model.init_from)
    model = model.to(device)
    if device.type == "cuda" and cfg.model.get("channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    optimizer, decay = build_optimizer(cfg, model, device)
    # .get: the run directories saved before these keys existed (dlrun eval) have neither.
    reg, name = cfg.regularization, cfg.data.name
    forward = torch.compile(model) if cfg.trainer.compile is True else model
    # Several processes: the model may be compiled (trainer.compile=true), never the whole step,
    # which has not been tried across processes.
    whole_step = cfg.trainer.compile if distributed.world().size == 1 else False
    return Learner(
        device=device,
        data=data,
        model=model,
        optimizer=optimizer,
        forward=distributed.wrap(forward, device),
        evaluate_forward=forward,
        compiler=StepCompiler(whole_step, device),
        fused_step=FusedStep(optimizer, decay) if FusedStep.usable(optimizer) else None,
        precision=precision,
        autocast=autocast,
        scaler=scaler,
        grad_clip=cfg.trainer.grad_clip,
        decay=decay,
        loss=training_loss(float(reg.get("label_smoothing", 0.0)), data, name),
        mixup=mixup(float(reg.get("mixup", 0.0)), data, device, name),
    )


def training_loss(smoothing: float, data: Data, name: str) -> Callable[[Any, Any], torch.Tensor]:
    """The data's loss, with `regularization.label_smoothing`: only a loss over classes has
    labels to smooth (not a regression's number, nor a language model's next token, whose
    perplexity is the very probability smoothing holds back)."""
    if not smoothing:
        return data.loss
    if data.loss is not classification_loss:
        raise DlrunError(
            f"regularization.label_smoothing={smoothing} applies to classification (images, tables "
            f"with classes), but data={name} has no classes to smooth: set regularization.label_smoothing=0"
        )
    return functools.partial(classification_loss, label_smoothing=smoothing)


def mixup(alpha: float, data: Data, device: torch.device, name: str) -> Mixup | None:
    """`regularization.mixup=alpha` where the data says how its inputs blend (`Data.mixup`)."""
    if not alpha:
        return None
    if data.mixup is None:
        raise DlrunError(
            f"regularization.mixup={alpha} applies to images and tables, but data={name} cannot be "
            "blended (a language model's inputs are token ids): set regularization.mixup=0"
        )
    return Mixup(alpha, data.mixup, device)


def train_step(
    learner: Learner,
    x: Any,
    y: Any,
    lr: float,
    momentum: float | None,
    weight: float = 1.0,
    update: bool = True,
) -> torch.Tensor:
    """One batch: its gradient, times `weight` (1/K for one of K accumulated micro-batches),
    added to the parameters' gradients; with `update` (every batch without accumulation), then
    one optimizer step at (lr, momentum). Returns the batch's loss, still on the device."""
    compiler = learner.compiler
    if compiler is not None and compiler.live and compiler.eligible(learner, weight, update):
        loss = compiler.step(learner, x, y, lr, momentum)
        if loss is not None:
            return loss
    opt, scaler = learner.optimizer, learner.scaler
    with learner.autocast():
        if learner.mixup is None:
            loss = learner.loss(learner.forward(x), y)
        else:
            loss = learner.mixup.loss(learner.forward, learner.loss, x, y)
    scaled = loss if weight == 1.0 else loss * weight
    if scaler is not None:
        scaler.scale(scaled).backward()
    else:
        scaled.backward()
    if not update:
        return loss.detach()
    set_hyper(opt, lr, momentum)
    if learner.grad_clip:
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(learner.params, learner.grad_clip, foreach=True)
    if learner.fused_step is not None and scaler is None:
        learner.fused_step.step(lr)  # the decoupled decay included
    else:
        if learner.decay is not None:
            learner.decay.apply(lr)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    if learner.fused_step is not None:
        learner.fused_step.zero_grad()
    else:
        opt.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(learner: Learner, limit: int | None = None) -> tuple[dict[str, float], Any]:
    """Validation loss and metrics over the valid split (at most `limit` batches), read back
    from the device once; also returns the metrics object (its `monitor` and `mode`)."""
    data = learner.data
    learner.model.eval()
    learner.reset_state()
    distributed.same_buffers(learner.model)
    metrics = data.metrics()
    loss_sum = torch.zeros((), device=learner.device)
    n = 0
    for i, (x, y) in enumerate(data.valid.epoch(0)):
        if limit is not None and i >= limit:
            break
        with learner.autocast():
            out = learner.evaluate_forward(x)
            loss = data.loss(out, y)
        k = data.count(y)
        loss_sum += loss.float() * k
        n += k
        metrics.update(out, y)
    loss_sum, n = distributed.reduce_metrics(metrics, loss_sum, n)  # over the ranks' shards
    valid_loss = (loss_sum / max(n, 1)).item()
    return {"valid_loss": valid_loss, **metrics.compute(valid_loss)}, metrics
