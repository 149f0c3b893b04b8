"""`dlrun train`: the epoch loop. Every model family and every sweep job runs through `fit`,
which reads top to bottom: resume or start, then per epoch: train steps, validation, the
metrics row, the best weights, the checkpoint. A step and a validation pass are the
learner's (`dlrun.learner`); what is written where is the run directory's (`dlrun.rundir`).

The loss stays on the device and is read back once per `trainer.log_every` steps.

Training control: `trainer.accumulate=K` takes one optimizer step per K batches (the schedule
counts optimizer steps; a checkpoint is only ever taken between them, so resuming stays
exact); `trainer.early_stop` ends the run once the monitored metric has stopped improving,
judged from the metrics rows alone, so a resumed run stops where an uninterrupted one would.
"""

from __future__ import annotations

import itertools
import logging
import math
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

import dlrun
from dlrun import distributed, finetune, report, rundir, saved
from dlrun.checkpoint import RunState, load_checkpoint, save_best, save_checkpoint
from dlrun.errors import DlrunError
from dlrun.family import better, save_state
from dlrun.learner import Learner, evaluate, prepare, train_step
from dlrun.loggers import Loggers, Run, chosen, open_loggers, require
from dlrun.lr_find import lr_find
from dlrun.schedule import build_schedule

log = logging.getLogger("dlrun")


class Diverged(DlrunError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped the run after its checkpoint was saved."""


class AlreadyComplete(Exception):
    """`resume=` named a run that has already trained all its epochs (or stopped early):
    nothing was changed."""


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


def advice(cfg: DictConfig, learner: Learner) -> str:
    """What usually fixes a diverging run."""
    fixes = [f"a lower optimizer.lr (now {cfg.optimizer.lr})"]
    if not cfg.trainer.grad_clip:
        fixes.append("gradient clipping (trainer.grad_clip=1.0)")
    fixes += learner.data.advice
    return "try " + ", ".join(fixes)


def how_diverged(scores: dict[str, float], monitor: str) -> str:
    """How an epoch's losses diverged, or "" if they did not. A finite loss can still
    overflow the monitored metric (perplexity is exp(loss)): that run has diverged too."""
    if not (math.isfinite(scores["train_loss"]) and math.isfinite(scores["valid_loss"])):
        return "non-finite"
    if not math.isfinite(scores[monitor]):
        return f"so large that {monitor} is {scores[monitor]}"
    return ""


def early_stop(rows: list[dict[str, float]], metrics: Any, rule: Any) -> dict[str, int] | None:
    """Where `trainer.early_stop` ends the run: {"epoch", "best_epoch", "patience"} once the
    last `patience` epochs have not improved the monitored metric by more than `min_delta`
    over the best before them (best_epoch: the last epoch that did), else None."""
    if rule.patience is None or not rows:
        return None
    sign = 1 if metrics.mode == "max" else -1
    best, best_epoch = None, 0
    for row in rows:
        value = row[metrics.monitor]
        if best is None or sign * (value - best) > rule.min_delta:
            best, best_epoch = value, int(row["epoch"])
    epoch = int(rows[-1]["epoch"])
    if epoch - best_epoch < rule.patience:
        return None
    return {"epoch": epoch, "best_epoch": best_epoch, "patience": int(rule.patience)}


def fit(
    cfg: DictConfig, run_dir: Path, learner: Learner | None = None, started: float | None = None
) -> dict[str, Any]:
    """Train `cfg`'s experiment, writing metrics, checkpoints, plots and the summary into
    `run_dir`; return the summary. Resumes from run_dir's checkpoint when `cfg.resume` is set.
    `started`: when the run began (wall_s counts from there; default: now, before any set-up)."""
    started = started or time.time()
    learner = learner or prepare(cfg)
    data, tr = learner.data, cfg.trainer
    steps = len(data.train) if tr.limit_batches is None else min(len(data.train), tr.limit_batches)
    accumulate = tr.accumulate
    log_every = tr.log_every  # read at every step: a config lookup costs more than the check
    updates = math.ceil(steps / accumulate)  # optimizer steps per epoch
    monitored = data.metrics()  # which metric early stopping watches, and which way is better
    epochs, frozen = finetune.total_epochs(cfg), finetune.freeze_epochs(cfg)
    main = distributed.world().main  # with several processes, rank 0 alone writes the run directory
    ranks = distributed.world().size  # items/s counts every rank's items
    loggers = open_loggers(cfg) if main else Loggers([])  # one run, one set of loggers: rank 0's
    found = None  # the lr finder's result, with optimizer.lr=find
    if cfg.resume:
        state = load_checkpoint(run_dir / rundir.CHECKPOINT, learner)
        rows = [r for r in rundir.read_metrics(run_dir) if r["epoch"] <= state.epoch]
        stopped = early_stop(rows, monitored, tr.early_stop)
        if (state.epoch >= epochs or stopped) and finished(run_dir):
            how = f"stopped early after {state.epoch}" if stopped else str(state.epoch)
            raise AlreadyComplete(
                f"{run_dir} is already complete ({how} of {epochs} epochs): "
                "nothing to resume, nothing changed"
            )
        if state.epoch < frozen:
            finetune.freeze(cfg, learner.model)
    else:
        if frozen:
            finetune.freeze(cfg, learner.model)  # before the finder: it picks the head's rate
        found = lr_find(cfg, learner, run_dir) if cfg.optimizer.lr == "find" else None
        state = RunState(lr=found["lr"] if found else float(cfg.optimizer.lr))
    if learner.decay is not None:
        learner.decay.refresh()
    if main:
        for path in rundir.remove_partial_writes(run_dir):
            log.info("removed %s, a partial write of a killed run", path.name)
        save_state(data, run_dir)
        saved.write(cfg, data, run_dir)

    def make_schedule() -> Any:
        """The run's schedule of optimizer steps: one cycle, or with a frozen phase one per phase.
        Not stretched by early stopping: a one-cycle run that stops early ends before its annealing."""
        if not frozen:
            return build_schedule(cfg.schedule, state.lr, updates * tr.epochs, updates)
        first = build_schedule(cfg.schedule, state.lr, updates * frozen, updates)
        second = build_schedule(cfg.schedule, state.lr_unfrozen or state.lr, updates * tr.epochs, updates)
        return finetune.phased(first, second, updates * frozen)

    schedule = make_schedule()
    if learner.compiler is not None:  # trainer.compile=auto weighs the steps left against compiling
        learner.compiler.begin(updates * epochs - state.step)
    metrics_log = rundir.MetricsLog(run_dir / rundir.METRICS, keep_epochs=state.epoch, write=main)
    summary = Summary(run_dir, learner, started, state, loggers, write=main)
    loggers.start(Run(cfg, run_dir, state.epoch * steps + state.batch, bool(cfg.resume), str(learner.device)))
    if found:
        loggers.lr_find(found, run_dir, "lr_find")
    if state.epoch == 0 and state.batch == 0:
        log.info("training on %s (%s) at lr %.3g", learner.device, learner.precision, state.lr)
        for split, facts in data.split.items():
            line = f"{split} split: " + ", ".join(f"{k} {v}" for k, v in facts.items())
            log.info(line)
            report.console.print(line, markup=False, highlight=False)

    def end(status: str, error: Exception) -> None:
        """Record how the run ended in summary.json, then raise `error`."""
        summary.write(status, metrics_log.rows, str(error))
        raise error

    def checkpoint() -> None:
        """checkpoint.pt, with the wall time so far: a resumed run's wall time continues from it."""
        state.wall_before = summary.wall()
        state.loss_sum = distributed.mean_sum(state.loss_sum)  # mid-epoch: it stands for every rank
        if main:
            save_checkpoint(run_dir / rundir.CHECKPOINT, learner, state)

    def unfreeze() -> None:
        """The frozen phase is over: every layer trains, at the rate the finder suggests for the
        whole network (optimizer.lr=find) or optimizer.lr / finetune.lr_div."""
        nonlocal schedule
        finetune.unfreeze(learner.model)
        if learner.decay is not None:
            learner.decay.refresh()
        if cfg.optimizer.lr == "find":
            found = lr_find(cfg, learner, run_dir, stem="lr_find_unfrozen")
            loggers.lr_find(found, run_dir, "lr_find_unfrozen")
            state.lr_unfrozen = found["lr"]
        else:
            state.lr_unfrozen = state.lr / float(cfg.finetune.lr_div)
        schedule = make_schedule()
        line = f"epoch {frozen + 1}: all layers unfrozen, head at lr {state.lr_unfrozen:.3g}"
        if float(cfg.optimizer.get("lr_mult", 1.0)) != 1.0:
            line += f", first layer group at {state.lr_unfrozen * float(cfg.optimizer.lr_mult):.3g}"
        log.info(line)
        display.say(line)

    display = report.EpochDisplay(
        tr.progress and main, epochs=epochs, log_seconds=tr.log_seconds, unit=data.unit
    )
    stopped = None
    # Several processes stop together: at the step after a loss read that carried a request.
    stopping = False
    with StopRequest() as stop_request, display, loggers:
        for row in metrics_log.rows:
            display.row(row)
        for epoch in range(state.epoch, epochs):
            stopped = early_stop(metrics_log.rows, monitored, tr.early_stop)
            if stopped:
                break
            if frozen and epoch == frozen and not state.lr_unfrozen:
                unfreeze()
            # --- train ---
            learner.model.train()
            if state.batch == 0:
                # A fresh epoch; one resumed mid-epoch continues the hidden state its checkpoint holds.
                learner.reset_state()
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
                    lr *= data.lr_scale(x)  # accumulating: the step takes its last batch's factor
                # Batch i is one of the `group` batches of an optimizer step (fewer at the epoch's
                # end): each adds 1/group of the step's gradient, the last one steps.
                group = min(accumulate, steps - i // accumulate * accumulate)
                update = (i + 1) % accumulate == 0 or i + 1 == steps
                loss = train_step(learner, x, y, lr, momentum, 1 / group, update)
                k = data.count(y)
                state.loss_sum.add_(loss, alpha=k)  # one kernel, no host sync
                state.items += k
                state.step, state.batch, state.last_lr = state.step + update, i + 1, lr
                if state.batch % log_every == 0 or state.batch == steps:
                    if ranks > 1:  # the ranks' mean loss, and whether any rank was asked to stop
                        current, stopping = distributed.mean(loss, stop_request.requested)
                    else:
                        current = loss.item()
                    if not math.isfinite(current):
                        end(
                            "diverged",
                            Diverged(
                                f"the loss became {current} at step {state.step} (epoch {epoch + 1}): "
                                f"{advice(cfg, learner)}"
                            ),
                        )
                    seconds = state.epoch_seconds + time.perf_counter() - t0
                    display.update(state.batch, current, state.items * ranks / max(seconds, 1e-9))
                    loggers.step(epoch * steps + state.batch, current, lr)
                if update and (stopping if ranks > 1 else stop_request.requested):
                    # Checked after an optimizer step and before the next batch is drawn: the
                    # saved RNG state has not yet been used for the next batch's augmentation.
                    state.count_time(time.perf_counter() - t0, state.items - items0)
                    if tr.checkpoint:
                        checkpoint()
                    end("interrupted", Interrupted())
            state.count_time(time.perf_counter() - t0, state.items - items0)
            train_loss = (distributed.mean_sum(state.loss_sum) / max(state.items, 1)).item()

            # --- validate, log ---
            valid, metrics = evaluate(learner, tr.limit_batches)
            row = {"epoch": epoch + 1, "train_loss": train_loss, **valid}
            row |= {"lr": state.last_lr, "seconds": state.epoch_seconds}
            metrics_log.append(row)
            loggers.epoch((epoch + 1) * steps, row)
            display.row(row)
            log.info("epoch %d: %s", epoch + 1, {k: v for k, v in row.items() if k != "epoch"})
            state.epoch, state.batch = epoch + 1, 0
            scores = {"train_loss": train_loss, **valid}
            what = how_diverged(scores, metrics.monitor)
            if what:
                why = f"the loss became {what} in epoch {epoch + 1}: {advice(cfg, learner)}"
                end("diverged", Diverged(why))

            # --- best weights, checkpoint ---
            if better(metrics.mode, scores[metrics.monitor], state.best and state.best[metrics.monitor]):
                state.best, state.best_epoch = scores, epoch + 1
                if tr.checkpoint and main:
                    save_best(run_dir / rundir.BEST, learner, epoch + 1, scores)
            if tr.checkpoint:
                checkpoint()
        # Still under StopRequest: a Ctrl-C or SIGTERM now lets the finished run write its summary.
        return summary.write("completed", metrics_log.rows, stopped_early=stopped)


def finished(run_dir: Path) -> bool:
    """Whether run_dir's summary.json says the run completed (a run killed after its last
    checkpoint but before its summary is not: resuming it writes the summary)."""
    try:
        return rundir.read_json(run_dir / rundir.SUMMARY).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


class Summary:
    """summary.json: status, best and final metrics, timing, device and versions."""

    def __init__(
        self,
        run_dir: Path,
        learner: Learner | None,
        started: float,
        state: RunState | None,
        loggers: Loggers | None = None,
        write: bool = True,
    ):
        self.run_dir, self.learner, self.started, self.state = run_dir, learner, started, state
        self.loggers = loggers  # told how the run ended, once its files are written
        self.write_files = write  # False in ranks other than 0: the summary is rank 0's to write
        self.wall_before = state.wall_before if state else 0.0  # earlier sessions of a resumed run

    def wall(self) -> float:
        """Seconds of wall time of the whole run so far, earlier sessions included."""
        return self.wall_before + time.time() - self.started

    def write(
        self,
        status: str,
        rows: list[dict[str, float]],
        message: str = "",
        stopped_early: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        state = self.state or RunState()
        wall = self.wall()
        metric_names = [k for k in (rows[-1] if rows else {}) if k not in ("epoch", "lr", "seconds")]
        metrics = self.learner.data.metrics() if self.learner else None
        compiler = self.learner.compiler if self.learner else None
        summary = {
            "status": status,
            "message": message,
            "monitor": metrics.monitor if metrics else None,
            "mode": metrics.mode if metrics else None,
            "best": state.best or {},
            "best_epoch": state.best_epoch,
            "final": {k: rows[-1][k] for k in metric_names} if rows else {},
            "epochs": len(rows),
            "stopped_early": stopped_early,  # trainer.early_stop ended the run: where, and why
            "lr": state.lr,
            "lr_unfrozen": state.lr_unfrozen or None,  # finetune: the unfrozen phase's peak rate
            "wall_s": round(wall, 3),
            "compile_s": round(compiler.compile_s, 3) if compiler else 0.0,  # trainer.compile, in wall_s
            "items_per_s": (
                state.train_items * distributed.world().size / state.train_seconds
                if state.train_seconds
                else None
            ),
            "split": self.learner.data.split if self.learner else {},
            "device": str(self.learner.device) if self.learner else None,
            "precision": self.learner.precision if self.learner else None,
            "threads": torch.get_num_threads(),  # trainer.threads as resolved (per process)
            "processes": distributed.world().size,  # ranks of a DDP run (1: one process)
            "versions": {
                "dlrun": dlrun.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
        if self.write_files:
            rundir.write_json(self.run_dir / rundir.SUMMARY, summary)
            if rows:
                report.plot_losses(rows, self.run_dir / rundir.LOSS_PLOT)
        if self.loggers is not None:
            self.loggers.finish(summary)
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
    require(chosen(cfg))  # a missing logger package is refused before any set-up
    try:
        while True:
            learner = None
            try:
                attempt = time.time()  # wall_s: set-up included, earlier out-of-memory attempts not
                learner = prepare(cfg)
                return fit(cfg, run_dir, learner, started=attempt)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled here
                if not is_out_of_memory(e):
                    raise
                keys = learner.data.batch_keys if learner else ("bs",)
                what = ", ".join(f"data.{k}={cfg.data[k]}" for k in keys)
                if not (cfg.trainer.auto_bs and cfg.data.bs > 1):
                    raise DlrunError(
                        f"out of {'GPU ' if torch.cuda.is_available() else ''}memory with {what}: "
                        f"lower {' or '.join(f'data.{k}' for k in keys)}, "
                        "or set trainer.auto_bs=true to retry at half the batch size"
                    ) from e
                del learner
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                cfg.data.bs = cfg.data.bs // 2
                report.err_console.print(
                    f"[yellow]out of memory with {what}; retrying with data.bs={cfg.data.bs}"
                )
    except (Diverged, Interrupted):
        raise
    except DlrunError as e:
        if not (run_dir / rundir.SUMMARY).is_file():  # never overwrite an earlier run's summary
            summary = Summary(run_dir, None, started, None, write=distributed.world().main)
            summary.write("failed", rundir.read_metrics(run_dir), str(e))
        raise


def resume_command(run_dir: Path, torchrun: int = 0) -> str:
    """The command that continues an interrupted run, quoted for the shell (spaces, accents...);
    `torchrun`: the processes per machine of a run started with torchrun."""
    import shlex

    start = f"torchrun --nproc_per_node={torchrun} -m dlrun train " if torchrun else "dlrun train "
    return start + shlex.quote(f"resume={run_dir}")


def torchrun_processes(cfg: DictConfig) -> int:
    """The processes per machine torchrun started for this run (0: not started by torchrun, but
    as one process or by `trainer.devices`, which `resume=` replays by itself)."""
    w = distributed.world()
    return w.local_size if w.distributed and int(cfg.trainer.get("devices", 1)) == 1 else 0


def main(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The task behind `dlrun train`: train, then say where everything is."""
    try:
        summary = train(cfg, run_dir)
    except AlreadyComplete as done:
        report.console.print(str(done), style="yellow", markup=False, soft_wrap=True)
        return rundir.read_json(run_dir / rundir.SUMMARY)
    except Interrupted:
        # The command is shell text: a path with [brackets] in it is not rich markup.
        command = resume_command(run_dir, torchrun_processes(cfg))
        report.err_console.print(
            f"interrupted; checkpoint saved. Resume with:\n  {command}",
            style="yellow",
            markup=False,
            soft_wrap=True,  # one line however long the path: it is pasted into a shell
        )
        sys.exit(130)
    best, stopped = summary["best"], summary["stopped_early"]
    shown = {k: v for k, v in best.items() if k in (summary["monitor"], "valid_loss")}
    if stopped:
        report.console.print(
            f"stopped early after epoch {stopped['epoch']}: no {summary['monitor']} improvement "
            f"for {stopped['patience']} epochs (trainer.early_stop.patience)"
        )
    report.console.print(
        f"[green]done[/] in {summary['wall_s']:.1f} s; best epoch {summary['best_epoch']}: "
        + ", ".join(f"{k} {report.fmt(v)}" for k, v in shown.items())
        + f"\nrun directory: {run_dir}"
    )
    return summary
