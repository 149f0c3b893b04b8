"""The one training loop. Every model family, `dlrun train`, `dlrun lr-find` and every
sweep job runs through `prepare` and `train_step`; `fit` is the epoch loop around them.

Order of one step, as in a hand-written loop: forward under autocast, loss, backward,
clip, decoupled weight decay, optimizer step. The loss stays on the device and is read
back once per `trainer.log_every` steps.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import platform
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

import dlrun
from dlrun import report, rundir
from dlrun.data import Data, build_data
from dlrun.errors import DlrunError
from dlrun.metrics import better
from dlrun.models import build_model
from dlrun.optim import DecoupledDecay, build_optimizer, set_hyper
from dlrun.schedule import build_schedule

log = logging.getLogger("dlrun")


class Diverged(DlrunError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped the run after its checkpoint was saved."""


# --- set-up ------------------------------------------------------------------


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


@dataclass
class Learner:
    """Everything a training step needs, built once per run by `prepare`."""

    cfg: DictConfig
    device: torch.device
    data: Data
    model: torch.nn.Module
    forward: Callable[[Any], Any]  # the model, or its torch.compile'd version
    optimizer: torch.optim.Optimizer
    precision: str
    autocast: Callable[[], Any]
    scaler: Any
    grad_clip: float | None
    params: list[torch.Tensor] = field(default_factory=list)  # what gradient clipping sees
    decay: DecoupledDecay | None = None  # regularization.wd_mode=decoupled


def prepare(cfg: DictConfig) -> Learner:
    """Seed, pick the device and precision, build data, model and optimizer."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.trainer.device)
    precision, autocast, scaler = pick_precision(str(cfg.trainer.precision), device)
    data = build_data(cfg, device)
    model = build_model(cfg, data).to(device)
    if device.type == "cuda" and cfg.model.get("channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    optimizer, decay = build_optimizer(cfg, model, device)
    forward = torch.compile(model) if cfg.trainer.compile else model
    return Learner(
        cfg,
        device,
        data,
        model,
        forward,
        optimizer,
        precision,
        autocast,
        scaler,
        cfg.trainer.grad_clip,
        [p for p in model.parameters() if p.requires_grad],
        decay,
    )


def reset_state(model: torch.nn.Module) -> None:
    """Start a pass over the data afresh (an RNN forgets its hidden state)."""
    reset = getattr(model, "reset_state", None)
    if reset is not None:
        reset()


# --- one step, one validation pass ---------------------------------------------


def train_step(learner: Learner, x: Any, y: Any, lr: float, momentum: float | None) -> torch.Tensor:
    """One optimizer step at (lr, momentum); returns the loss, still on the device."""
    opt, scaler = learner.optimizer, learner.scaler
    set_hyper(opt, lr, momentum)
    with learner.autocast():
        loss = learner.data.loss(learner.forward(x), y)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    if learner.grad_clip:
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(learner.params, learner.grad_clip, foreach=True)
    if learner.decay is not None:
        learner.decay.apply(lr)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(learner: Learner, limit: int | None = None) -> tuple[dict[str, float], str]:
    """Validation loss and metrics over the valid split (at most `limit` batches),
    read back from the device once; also returns the name of the monitored metric."""
    model, data = learner.model, learner.data
    model.eval()
    reset_state(model)
    metrics = data.metrics()
    loss_sum = torch.zeros((), device=learner.device)
    n = 0
    for i, (x, y) in enumerate(data.valid.epoch(0)):
        if limit is not None and i >= limit:
            break
        with learner.autocast():
            out = learner.forward(x)
            loss = data.loss(out, y)
        k = y.numel()
        loss_sum += loss.float() * k
        n += k
        metrics.update(out, y)
    valid_loss = (loss_sum / max(n, 1)).item()
    return {"valid_loss": valid_loss, **metrics.compute(valid_loss)}, metrics.monitor


# --- the epoch loop --------------------------------------------------------------


@dataclass
class RunState:
    """Where a run stands; saved in checkpoint.pt so that a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch already done
    step: int = 0  # optimizer steps so far
    lr: float = 0.0  # the peak learning rate (the finder's suggestion with lr=find)
    last_lr: float = 0.0  # the rate of the last step taken (metrics.csv's lr column)
    loss_sum: Any = 0.0  # training loss of the current epoch so far, summed over items
    items: int = 0  # items of the current epoch so far
    epoch_seconds: float = 0.0  # training time of the current epoch so far
    train_items: int = 0  # items and seconds of all training, for items/s
    train_seconds: float = 0.0
    wall_before: float = 0.0  # wall time of earlier sessions of this run
    best: dict[str, float] | None = None
    best_epoch: int = 0

    def count_time(self, seconds: float, items: int) -> None:
        """Add a stretch of training time and the items trained in it."""
        self.epoch_seconds += seconds
        self.train_seconds += seconds
        self.train_items += items


class StopRequest:
    """Turns the first Ctrl-C (or SIGTERM) into a flag the loop checks between steps,
    so the checkpoint never holds a half-applied update; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        report.err_console.print("[yellow]stopping after this step (Ctrl-C again to abort)...")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def save_torch(path: Path, obj: Any) -> None:
    """torch.save through a temporary file and a rename."""
    rundir.write_atomic(path, lambda f: torch.save(obj, f), mode="wb")


def save_checkpoint(path: Path, learner: Learner, state: RunState) -> None:
    """Model, optimizer, run state and RNG state, written atomically."""
    ckpt = {
        "model": learner.model.state_dict(),
        "optimizer": learner.optimizer.state_dict(),
        "scaler": learner.scaler.state_dict() if learner.scaler is not None else None,
        "state": asdict(state),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if learner.device.type == "cuda" else [],
    }
    save_torch(path, ckpt)


def load_checkpoint(path: Path, learner: Learner) -> RunState:
    """Restore what `save_checkpoint` saved; only tensors and plain data are unpickled."""
    if not path.is_file():
        raise DlrunError(
            f"cannot resume: {path} does not exist (the run never finished an epoch "
            "or was started with trainer.checkpoint=false)"
        )
    ckpt = torch.load(path, map_location=learner.device, weights_only=True)
    learner.model.load_state_dict(ckpt["model"])
    learner.optimizer.load_state_dict(ckpt["optimizer"])
    if learner.scaler is not None and ckpt["scaler"]:
        learner.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng_cpu"].cpu())
    if ckpt["rng_cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng_cuda"]])
    return RunState(**ckpt["state"])


class MetricsLog:
    """metrics.csv, one row per epoch, flushed as each epoch ends."""

    def __init__(self, path: Path, keep_epochs: int):
        self.path = path
        rows = [r for r in rundir.read_metrics(path.parent) if r["epoch"] <= keep_epochs]
        self.rows: list[dict[str, float]] = rows
        self._write_all()

    def _write_all(self) -> None:
        def write(f: Any) -> None:
            if self.rows:
                f.write(",".join(self.rows[0]) + "\n")
                for r in self.rows:
                    f.write(",".join(repr(float(v)) if k != "epoch" else str(int(v)) for k, v in r.items()))
                    f.write("\n")

        rundir.write_atomic(self.path, write)

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        self._write_all()


def advice(cfg: DictConfig) -> str:
    """What usually fixes a diverging run."""
    fixes = [f"a lower optimizer.lr (now {cfg.optimizer.lr})"]
    if not cfg.trainer.grad_clip:
        fixes.append("gradient clipping (trainer.grad_clip=1.0)")
    if "bptt" in cfg.data:
        fixes.append(f"a shorter data.bptt (now {cfg.data.bptt})")
    return "try " + ", ".join(fixes)


def fit(cfg: DictConfig, run_dir: Path, learner: Learner | None = None) -> dict[str, Any]:
    """Train `cfg`'s experiment, writing metrics, checkpoints, plots and the summary into
    `run_dir`; return the summary. Resumes from run_dir's checkpoint when `cfg.resume` is set."""
    started = time.time()
    learner = learner or prepare(cfg)
    data, model, tr = learner.data, learner.model, cfg.trainer
    steps = len(data.train) if tr.limit_batches is None else min(len(data.train), tr.limit_batches)
    state = load_checkpoint(run_dir / rundir.CHECKPOINT, learner) if cfg.resume else RunState()
    if not cfg.resume:
        state.lr = find_lr(cfg, learner, run_dir) if cfg.optimizer.lr == "find" else float(cfg.optimizer.lr)
    if data.save is not None:
        data.save(run_dir)
    schedule = build_schedule(cfg.schedule, state.lr, steps * tr.epochs, steps)
    metrics_log = MetricsLog(run_dir / rundir.METRICS, keep_epochs=state.epoch)
    summary = Summary(cfg, run_dir, learner, started, state)
    if state.epoch == 0 and state.batch == 0:
        log.info("training on %s (%s) at lr %.3g", learner.device, learner.precision, state.lr)

    with StopRequest() as stop, report.EpochDisplay(tr.progress) as display:
        for row in metrics_log.rows:
            display.row(row)
        for epoch in range(state.epoch, tr.epochs):
            model.train()
            reset_state(model)
            if state.batch == 0:
                state.loss_sum, state.items, state.epoch_seconds = (
                    torch.zeros((), device=learner.device),
                    0,
                    0.0,
                )
            display.start_epoch(epoch + 1, steps, state.batch)
            t0, items0 = time.perf_counter(), state.items
            batches = itertools.islice(data.train.epoch(epoch, state.batch), steps - state.batch)
            for i, (x, y) in enumerate(batches, start=state.batch):
                lr, momentum = schedule(state.step)
                if data.lr_scale is not None:
                    lr *= data.lr_scale(x)
                loss = train_step(learner, x, y, lr, momentum)
                state.last_lr = lr
                k = y.numel()
                state.loss_sum.add_(loss, alpha=k)  # one kernel, no host sync
                state.items += k
                state.step += 1
                state.batch = i + 1
                if state.batch % tr.log_every == 0 or state.batch == steps:
                    current = loss.item()
                    if not math.isfinite(current):
                        summary.write(
                            "diverged", metrics_log.rows, f"loss became {current} at step {state.step}"
                        )
                        raise Diverged(
                            f"the loss became {current} at step {state.step} (epoch {epoch + 1}): "
                            f"{advice(cfg)}"
                        )
                    seconds = state.epoch_seconds + time.perf_counter() - t0
                    display.update(state.batch, current, state.items / max(seconds, 1e-9))
                if stop.requested:
                    # Checked after the step and before the next batch is drawn: the saved
                    # RNG state has not yet been used for the next batch's augmentation.
                    state.count_time(time.perf_counter() - t0, state.items - items0)
                    if tr.checkpoint:
                        save_checkpoint(run_dir / rundir.CHECKPOINT, learner, state)
                    summary.write("interrupted", metrics_log.rows)
                    raise Interrupted
            state.count_time(time.perf_counter() - t0, state.items - items0)
            train_loss = (state.loss_sum / max(state.items, 1)).item()
            valid, monitor = evaluate(learner, tr.limit_batches)
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                **valid,
                "lr": state.last_lr,
                "seconds": state.epoch_seconds,
            }
            metrics_log.append(row)
            display.row(row)
            log.info("epoch %d: %s", epoch + 1, {k: v for k, v in row.items() if k != "epoch"})
            state.epoch, state.batch = epoch + 1, 0
            if not all(math.isfinite(v) for v in (train_loss, valid["valid_loss"])):
                summary.write("diverged", metrics_log.rows, f"loss became non-finite in epoch {epoch + 1}")
                raise Diverged(f"the loss became non-finite in epoch {epoch + 1}: {advice(cfg)}")
            metrics = {"train_loss": train_loss, **valid}
            if better(monitor, metrics[monitor], state.best and state.best[monitor]):
                state.best, state.best_epoch = metrics, epoch + 1
                if tr.checkpoint:
                    best = {"model": model.state_dict(), "epoch": epoch + 1, "metrics": metrics}
                    save_torch(run_dir / rundir.BEST, best)
            if tr.checkpoint:
                save_checkpoint(run_dir / rundir.CHECKPOINT, learner, state)
    return summary.write("completed", metrics_log.rows)


def find_lr(cfg: DictConfig, learner: Learner, run_dir: Path) -> float:
    """`optimizer.lr=find`: run the lr finder on this very learner and use its suggestion."""
    from dlrun.lr_find import lr_find

    return lr_find(cfg, learner, run_dir)["lr"]


class Summary:
    """summary.json: status, best and final metrics, timing, device and versions."""

    def __init__(
        self, cfg: DictConfig, run_dir: Path, learner: Learner | None, started: float, state: RunState | None
    ):
        self.cfg, self.run_dir, self.learner, self.started, self.state = cfg, run_dir, learner, started, state

    def write(self, status: str, rows: list[dict[str, float]], message: str = "") -> dict[str, Any]:
        state = self.state or RunState()
        wall = state.wall_before + time.time() - self.started
        if status != "completed":
            state.wall_before = wall  # a resumed run's wall time continues from here
        metric_names = [k for k in (rows[-1] if rows else {}) if k not in ("epoch", "lr", "seconds")]
        monitor = self.learner.data.metrics().monitor if self.learner else None
        summary = {
            "status": status,
            "message": message,
            "monitor": monitor,
            "best": state.best or {},
            "best_epoch": state.best_epoch,
            "final": {k: rows[-1][k] for k in metric_names} if rows else {},
            "epochs": len(rows),
            "lr": state.lr,
            "wall_s": round(wall, 3),
            "items_per_s": state.train_items / state.train_seconds if state.train_seconds else None,
            "device": str(self.learner.device) if self.learner else None,
            "precision": self.learner.precision if self.learner else None,
            "versions": {
                "dlrun": dlrun.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
        rundir.write_json(self.run_dir / rundir.SUMMARY, summary)
        if rows:
            report.plot_losses(rows, self.run_dir / rundir.LOSS_PLOT)
        return summary


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; MPS and some CUDA paths a RuntimeError that says so."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error)
    )


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """`dlrun train`: fit, with out-of-memory retries at half the batch size when
    `trainer.auto_bs` is set, and a failed-run summary for any user error."""
    started = time.time()
    try:
        while True:
            try:
                return fit(cfg, run_dir)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled here
                if not is_out_of_memory(e):
                    raise
                what = f"data.bs={cfg.data.bs}" + (
                    f", data.bptt={cfg.data.bptt}" if "bptt" in cfg.data else ""
                )
                if not (cfg.trainer.auto_bs and cfg.data.bs > 1):
                    raise DlrunError(
                        f"out of {'GPU ' if torch.cuda.is_available() else ''}memory with {what}: "
                        "lower data.bs"
                        + (" or data.bptt" if "bptt" in cfg.data else "")
                        + ", or set trainer.auto_bs=true to retry at half the batch size"
                    ) from e
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                cfg.data.bs = cfg.data.bs // 2
                report.err_console.print(
                    f"[yellow]out of memory with {what}; retrying with data.bs={cfg.data.bs}"
                )
    except Diverged:
        raise
    except DlrunError as e:
        if not (run_dir / rundir.SUMMARY).is_file():  # never overwrite an earlier run's summary
            Summary(cfg, run_dir, None, started, None).write("failed", rundir.read_metrics(run_dir), str(e))
        raise


def resume_command(run_dir: Path) -> str:
    """The command that continues an interrupted run."""
    return f"dlrun train resume={run_dir}"


def main(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The task behind `dlrun train`: train, then say where everything is."""
    try:
        summary = train(cfg, run_dir)
    except Interrupted:
        report.err_console.print(
            f"[yellow]interrupted; checkpoint saved. Resume with:\n  {resume_command(run_dir)}"
        )
        sys.exit(130)
    best = summary["best"]
    shown = {k: v for k, v in best.items() if k in (summary["monitor"], "valid_loss")}
    report.console.print(
        f"[green]done[/] in {summary['wall_s']:.1f} s; best epoch {summary['best_epoch']}: "
        + ", ".join(f"{k} {report.fmt(v)}" for k, v in shown.items())
        + f"\nrun directory: {run_dir}"
    )
    return summary
