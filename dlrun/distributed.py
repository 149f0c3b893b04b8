"""One run in several processes (DistributedDataParallel), and how many CPU threads a process
takes.

`torchrun --nproc_per_node=N -m dlrun train ...` starts N copies of dlrun; torchrun tells each
its place in the environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, and where to
meet: MASTER_ADDR, MASTER_PORT). `trainer.devices=N` starts the same N processes through
torch.distributed's elastic launcher itself. Then:

- the process group starts before the run directory is claimed: rank 0 claims it and tells
  the others (`agree`), so all ranks write into one directory and separate runs still get
  their own;
- NCCL on CUDA (each rank on its LOCAL_RANK GPU), gloo on the CPU;
- `data.bs` is the global batch: each rank takes its `data.bs / WORLD_SIZE` items of every
  batch (`shard` on each data source), so the gradient DDP averages is the one a single
  process would get with `data.bs`, and `optimizer.lr` means what it means there;
- losses and validation sums are added up across ranks (`mean`, `reduce_metrics`), the losses
  read back every `trainer.log_every` steps carry every rank's stop request with them, so one
  Ctrl-C stops all ranks at the same step;
- only rank 0 writes the run directory, the log, the progress display and the checkpoints.

With one process nothing here does anything: no process group, no wrapper, no extra sync.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dlrun.errors import DlrunError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run (torchrun's environment)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes, logs and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from the variables torchrun (or `trainer.devices`) set; one
    process of its own when they are absent."""
    env = os.environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        if size <= 1:
            return World()
        return World(
            rank=int(env["RANK"]),
            size=size,
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            local_size=int(env.get("LOCAL_WORLD_SIZE", size)),
        )
    except (KeyError, ValueError) as e:
        raise DlrunError(
            f"WORLD_SIZE={env.get('WORLD_SIZE')} is set but the distributed environment is incomplete "
            f"({e}): start several processes with torchrun (torchrun --nproc_per_node=N -m dlrun train ...)"
        ) from None


# --- starting and ending the process group -------------------------------------------


def check_config(cfg: Any, sweep: bool, command: str) -> None:
    """The user mistakes of a distributed run, found before any process waits for another."""
    w = world()
    if not w.distributed:
        return
    if sweep:
        raise DlrunError(
            "torchrun (or trainer.devices) trains one run in several processes and cannot run a "
            "sweep: drop -m, or sweep with one process per job (hydra/launcher=joblib)"
        )
    if command != "train":
        raise DlrunError(f"dlrun {command} runs in one process: start it without torchrun")
    if str(cfg.optimizer.lr) == "find":
        raise DlrunError(
            "optimizer.lr=find runs the lr finder in one process: run `dlrun lr-find ...` first "
            "and train with optimizer.lr=<its suggestion>"
        )
    bs = int(cfg.data.bs)
    if bs % w.size:
        raise DlrunError(
            f"data.bs={bs} is the global batch, split evenly over {w.size} processes: "
            f"use a multiple of {w.size} (data.bs={max(w.size, bs // w.size * w.size)})"
        )
    devices = int(cfg.trainer.get("devices", 1))
    if devices not in (1, w.local_size):
        raise DlrunError(
            f"trainer.devices={devices}, but {w.local_size} processes were started on this machine: "
            "under torchrun, leave trainer.devices out (--nproc_per_node sets the processes)"
        )
    if int(cfg.finetune.get("freeze_epochs", 0)):
        raise DlrunError(
            "finetune.freeze_epochs trains in one process (DDP needs the same trainable parameters "
            "throughout): set finetune.freeze_epochs=0, or fine-tune without torchrun"
        )
    device = str(cfg.trainer.device)
    if device == "mps":
        raise DlrunError(
            "trainer.device=mps trains in one process: use trainer.device=cuda or cpu with torchrun"
        )


def backend(device: str) -> str:
    """NCCL when the run trains on CUDA, gloo on the CPU."""
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def start(cfg: Any) -> None:
    """Join the run's process group (once per process), on CUDA with this rank's own GPU."""
    w = world()
    if not w.distributed:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    name = backend(str(cfg.trainer.device))
    if name == "nccl":
        have = torch.cuda.device_count()
        if w.local_rank >= have:
            raise DlrunError(
                f"{w.local_size} processes on this machine need {w.local_size} GPUs, but {have} "
                f"{'is' if have == 1 else 'are'} visible: start at most {have} per machine "
                "(--nproc_per_node / trainer.devices) or train on the CPU (trainer.device=cpu)"
            )
        torch.cuda.set_device(w.local_rank)
    dist.init_process_group(name)
    if not w.main:
        # One voice: rank 0 shows the progress, the table and the messages, and writes the log.
        import logging

        from dlrun import report

        report.console.quiet = report.err_console.quiet = True
        logging.getLogger("dlrun").setLevel(logging.WARNING)


def devices_to_launch(cfg: Any, sweep: bool) -> int:
    """How many processes `trainer.devices` asks this command to start (0: none, train here).
    Checked before any starts: one run, not a sweep; enough GPUs for a run on CUDA."""
    devices = int(cfg.trainer.get("devices", 1))
    if devices == 1 or world().distributed:
        return 0
    if sweep:
        raise DlrunError(
            f"trainer.devices={devices} trains one run in several processes and cannot run a sweep: "
            "drop -m, or sweep with one process per job (hydra/launcher=joblib)"
        )
    import torch

    device = str(cfg.trainer.device)
    if device == "mps":
        raise DlrunError(
            "trainer.devices needs CUDA or the CPU: use trainer.device=cuda or trainer.device=cpu"
        )
    have = torch.cuda.device_count()
    if device == "cuda" and have < devices:
        raise DlrunError(
            f"trainer.devices={devices} on trainer.device=cuda needs {devices} GPUs, but {have} "
            f"{'is' if have == 1 else 'are'} visible: use trainer.devices={max(have, 1)}"
            + ("" if have > 1 else ", or trainer.device=cpu for processes on the CPU")
        )
    if device == "auto" and 0 < have < devices:
        raise DlrunError(
            f"trainer.devices={devices} needs {devices} GPUs, but {have} {'is' if have == 1 else 'are'} "
            f"visible: use trainer.devices={have}, or trainer.device=cpu for processes on the CPU"
        )
    return devices


def launch(devices: int, argv: list[str]) -> int:
    """Run `python -m dlrun ARGV` in `devices` processes through torch.distributed's elastic
    launcher (what torchrun --standalone does) and return their exit code: 0, or the first
    failed rank's (2 for a user error, 130 after Ctrl-C). The run directory was claimed here
    and is in ARGV, so the ranks take it as given."""
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=devices,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port of this machine
        max_restarts=0,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "dlrun", *argv)
    except ChildFailedError as e:
        first = min(e.failures.values(), key=lambda f: f.timestamp)
        return first.exitcode if first.exitcode > 0 else 1
    except SignalException:  # Ctrl-C here: the launcher handed it on to the ranks, which saved and stopped
        return 130
    return 0


def finish() -> None:
    """Leave the process group (at the end of the run, however it ended)."""
    import sys

    if "torch.distributed" not in sys.modules:  # a run that never started one: keep torch out
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def agree(make: Any) -> Any:
    """`make()` on rank 0, its result on every rank. A user error on rank 0 is raised on every
    rank, so none waits for an answer that never comes."""
    w = world()
    if not w.distributed:
        return make()
    import torch.distributed as dist

    box: list[Any] = [None]
    if w.main:
        try:
            box[0] = ("ok", make())
        except DlrunError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise DlrunError(value)
    return value


def hydra_overrides() -> list[str]:
    """What Hydra must not do in ranks other than 0: write `.hydra/` and the log file into the
    run directory (rank 0 writes them)."""
    if world().main:
        return []
    return ["hydra.output_subdir=null", f"hydra.job_logging.handlers.file.filename={os.devnull}"]


# --- the training run ---------------------------------------------------------------


def device(picked: torch.device) -> torch.device:
    """The device of this rank: its LOCAL_RANK GPU on CUDA, else the one picked."""
    import torch

    w = world()
    if w.distributed and picked.type == "cuda":
        return torch.device("cuda", w.local_rank)
    return picked


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model as the training step calls it: DistributedDataParallel when the run has several
    processes (gradients averaged across ranks in the backward pass), else the model itself.
    The learner keeps the bare model too: checkpoints hold its state_dict, as in one process."""
    if not world().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def same_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank, before validation: each
    rank updated its own in the last step, and the checkpoint holds rank 0's."""
    if not world().distributed:
        return
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def shard(data: Any) -> None:
    """Give this rank its share of every batch of both splits (each source's `shard`)."""
    w = world()
    if w.distributed:
        data.train.shard(w.rank, w.size)
        data.valid.shard(w.rank, w.size)


def share(n: int, rank: int, size: int) -> slice:
    """Rank `rank`'s part of n items split over `size` ranks: n / size each when it divides,
    else parts that differ by one at most (a last, smaller validation batch)."""
    return slice(n * rank // size, n * (rank + 1) // size)


def mean(loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
    """(the loss averaged over ranks, whether any rank asked to stop): one read-back. With
    one process, the loss itself and the request as it is."""
    if not world().distributed:
        return loss.item(), stop
    import torch
    import torch.distributed as dist

    both = torch.stack([loss.detach().float(), torch.tensor(float(stop), device=loss.device)])
    dist.all_reduce(both)
    total, stops = both.tolist()
    return total / world().size, stops > 0


def mean_sum(loss_sum: torch.Tensor) -> torch.Tensor:
    """An epoch's training-loss sum as the mean over ranks (every rank trains as many items):
    in a checkpoint taken mid-epoch it stands for all ranks, and the ranks that resume from it
    add their own sums to it."""
    if not world().distributed:
        return loss_sum
    import torch.distributed as dist

    total = loss_sum.detach().clone()
    dist.all_reduce(total)
    return total / world().size


def reduce_metrics(metrics: Any, loss_sum: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Add up a validation pass over the ranks: the loss sum, the item count and every number
    the metrics object accumulates (they are sums over the batches it saw: `family.Metrics`)."""
    if not world().distributed:
        return loss_sum, n
    import torch
    import torch.distributed as dist

    names = [k for k, v in vars(metrics).items() if is_number(v)]
    values = [loss_sum.float(), torch.tensor(float(n), device=loss_sum.device)]
    values += [torch.as_tensor(getattr(metrics, k), device=loss_sum.device).double() for k in names]
    packed = torch.stack([v.double() for v in values])
    dist.all_reduce(packed)
    total, count, *sums = packed.tolist()  # one read-back
    for k, v in zip(names, sums):
        setattr(metrics, k, round(v) if isinstance(getattr(metrics, k), int) else v)
    return torch.tensor(total), round(count)


def is_number(value: Any) -> bool:
    """A metrics sum: a number or a one-element tensor (not a flag)."""
    import torch

    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)


# --- CPU threads --------------------------------------------------------------------


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask: taskset, cgroups, SLURM)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def parallel_jobs(n_jobs: int | None, local_size: int, n_cores: int) -> int:
    """How many processes of this kind share the machine: the joblib launcher's jobs (`n_jobs`,
    -1 meaning one per core, -2 all cores but one, as joblib counts) times the ranks torchrun
    starts on this machine."""
    jobs = 1
    if n_jobs is not None and n_jobs != 0:
        jobs = n_jobs if n_jobs > 0 else max(1, n_cores + 1 + n_jobs)
    return jobs * max(1, local_size)


def threads(value: Any, n_jobs: int | None, local_size: int, n_cores: int) -> int:
    """`trainer.threads` as a number: an integer as given; `auto` the cores divided among the
    parallel jobs on this machine, at least one."""
    if value != "auto":
        return int(value)
    return max(1, math.floor(n_cores / parallel_jobs(n_jobs, local_size, n_cores)))


def launcher_jobs() -> int | None:
    """The joblib launcher's `n_jobs` when this job runs under it (None otherwise)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().launcher
    n_jobs = (
        launcher.get("n_jobs") if launcher is not None and "joblib" in str(launcher.get("_target_")) else None
    )
    return int(n_jobs) if n_jobs is not None else None


def set_threads(cfg: Any) -> int:
    """Set torch's intra-op and inter-op threads from `trainer.threads`, before any work (the
    inter-op pool can only be sized before it first runs). Returns the intra-op count."""
    import torch

    n = threads(cfg.trainer.get("threads", "auto"), launcher_jobs(), world().local_size, cores())
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already started in this process (a second run in one process, a test)
        pass
    return n
