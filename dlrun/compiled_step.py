"""`trainer.compile`: the whole training step (forward, loss, backward, clipping, decoupled
weight decay, optimizer update, zero_grad) as one `torch.compile`d function, and whether to use it.

`true` compiles at the run's first step; `false` never; `auto` (the default) compiles only when
the run is long enough to repay it: it times the first eager steps of the run and compiles when
the remaining steps x the time compiling would save exceed what compiling costs (COMPILE_S,
SAVED; measured, README "Speed"). After a compiled run's first steps it checks that they are
faster than the eager ones, and goes back to eager for good when they are not (the compile
time is spent, the rest of the run need not pay twice). lr-find never compiles: it runs before
the training loop says how many steps are left. A compilation that fails prints one warning
line and the run continues eagerly.

The step is compiled with the learning rate, and Adam's first beta, held in 0-d tensors that
the schedule fills in place, so that a new value each step does not recompile the graph.
Runs with fp16 loss scaling, mixup, gradient accumulation or a model carrying state between
batches (language models) stay eager: their step is not one plain function of (x, y).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import TYPE_CHECKING, Any

from dlrun import report

if TYPE_CHECKING:
    import torch

    from dlrun.learner import Learner

log = logging.getLogger("dlrun")

PROBE = 12  # eager steps timed before deciding (the first two warm up and are not counted)
CHECK = 12  # compiled steps timed after compiling, to see that they are faster
# What compiling the whole step costs (seconds) and saves (a fraction of an eager step's time).
# CPU (Adult's tabular net, README "Speed"): compiling took 10-18 s on the idle 2-core machine
# and 33-38 s on the busy one; 33 s is the cautious side. At best it saved about a quarter of an
# eager step (bs 64, idle); 0.18 (the model-only compile at bs 1024) is the cautious side
# again; at bs 1024 the compiled step was slower, which the check after compiling catches. No
# GPU was at hand to measure: the same numbers stand in for CUDA.
COMPILE_S = {"cpu": 33.0, "cuda": 33.0}
SAVED = {"cpu": 0.18, "cuda": 0.18}


class StepCompiler:
    """Runs a step compiled or says it did not (`step` returns None: take the eager step)."""

    def __init__(self, mode: bool | str, device: torch.device):
        self.mode, self.device = mode, device
        self.remaining: int | None = None  # set by the loop: steps left in the run
        self.state = "off" if mode is False else "probe"
        self.fn: Any = None
        self.eager: list[float] = []
        self.compiled: list[float] = []
        self.compile_s = 0.0  # the first compiled call, compilation included, less one eager step
        self.last: float | None = None

    def begin(self, remaining: int) -> None:
        """The training loop starts: `remaining` optimizer steps are left in the run."""
        self.remaining = remaining
        if self.mode is True and self.state == "probe":
            self.state = "compile"

    @property
    def live(self) -> bool:
        """Whether a step may still be compiled or timed (not once the run is eager for good)."""
        return self.state not in ("off", "eager")

    def eligible(self, learner: Learner, weight: float, update: bool) -> bool:
        """Whether this step is one plain function of (x, y) that a compiled step can take."""
        return (
            self.remaining is not None
            and update
            and weight == 1.0
            and learner.scaler is None
            and learner.mixup is None
            and getattr(learner.model, "carried_state", None) is None
        )

    def step(self, learner: Learner, x: Any, y: Any, lr: float, momentum: float | None) -> Any:
        """The compiled step's loss, or None when this step is to be taken eagerly."""
        if not self.live or self.remaining is None:
            return None
        self.remaining -= 1
        if self.state == "probe":
            self.tick(self.eager)
            if len(self.eager) < PROBE:
                return None
            self.decide()
            if self.state != "compile":
                return None
        return self.run(learner, x, y, lr, momentum)

    def tick(self, times: list[float]) -> None:
        """Append the time since the previous call (the step in between) to `times`."""
        self.sync()
        now = time.perf_counter()
        if self.last is not None:
            times.append(now - self.last)
        self.last = now

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def decide(self) -> None:
        """Compile when the rest of the run repays it, at the eager step time just measured."""
        step = statistics.median(self.eager[2:])
        kind = self.device.type if self.device.type in COMPILE_S else "cpu"
        gain = (self.remaining or 0) * step * SAVED[kind]
        self.state = "compile" if gain > COMPILE_S[kind] else "eager"
        log.info(
            "trainer.compile=auto: %d steps left at %.2f ms: compiling saves ~%.1f s for ~%.0f s: %s",
            self.remaining,
            step * 1e3,
            gain,
            COMPILE_S[kind],
            "compiling" if self.state == "compile" else "eager",
        )

    def run(self, learner: Learner, x: Any, y: Any, lr: float, momentum: float | None) -> Any:
        first = self.fn is None
        try:
            if first:
                self.fn = build(learner)
                self.sync()
                self.last = t0 = time.perf_counter()
            loss = self.fn(learner, x, y, lr, momentum)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager step does the work
            self.state, self.fn = "eager", None
            untensor(learner.optimizer)
            line = f"trainer.compile: compiling the training step failed ({first_line(e)}); training eagerly"
            log.warning(line)
            report.err_console.print(line, style="yellow", markup=False, soft_wrap=True)
            return None
        if first:
            self.sync()
            eager = statistics.median(self.eager[2:]) if len(self.eager) > 2 else 0.0
            self.compile_s = time.perf_counter() - t0 - eager
            self.last = time.perf_counter()
            log.info("trainer.compile: the training step compiled in %.1f s", self.compile_s)
            return loss
        self.tick(self.compiled)
        if self.mode == "auto" and len(self.compiled) == CHECK and len(self.eager) > 2:
            eager, compiled = statistics.median(self.eager[2:]), statistics.median(self.compiled[2:])
            if compiled >= eager:
                self.state, self.fn = "eager", None
                untensor(learner.optimizer)
                log.info(
                    "trainer.compile=auto: compiled steps take %.2f ms, eager %.2f ms: back to eager",
                    compiled * 1e3,
                    eager * 1e3,
                )
        return loss


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def tensor_hypers(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Hold each group's lr (and Adam's betas) in 0-d tensors, so that the compiled step reads
    the scheduled value instead of baking one in (`optim.set_hyper` fills them in place)."""
    import torch

    for g in optimizer.param_groups:
        # torch's multi-tensor path refuses a tensor lr off CUDA graphs; the compiler fuses the
        # per-tensor loop instead.
        g["foreach_eager"], g["foreach"] = g.get("foreach"), False
        g["lr"] = torch.tensor(float(g["lr"]), device=device)
        if "betas" in g:
            g["betas"] = tuple(torch.tensor(float(b), device=device) for b in g["betas"])


def untensor(optimizer: torch.optim.Optimizer) -> None:
    """Plain floats again (the eager optimizer's fastest path)."""
    import torch

    for g in optimizer.param_groups:
        if "foreach_eager" in g:
            g["foreach"] = g.pop("foreach_eager")
        if isinstance(g["lr"], torch.Tensor):
            g["lr"] = float(g["lr"])
        if "betas" in g:
            g["betas"] = tuple(float(b) if isinstance(b, torch.Tensor) else b for b in g["betas"])


def build(learner: Learner) -> Any:
    """The compiled step function (lr and momentum reach it through the optimizer's tensors)."""
    import torch

    from dlrun.optim import set_hyper

    if learner.fused_step is not None:
        learner.fused_step.release()  # the optimizer's own step counts each tensor itself
    tensor_hypers(learner.optimizer, learner.device)
    lr_now = torch.zeros((), device=learner.device)

    @torch.compile
    def body(x: Any, y: Any) -> torch.Tensor:
        with learner.autocast():
            loss = learner.loss(learner.model(x), y)
        loss.backward()
        if learner.grad_clip:
            torch.nn.utils.clip_grad_norm_(learner.params, learner.grad_clip, foreach=True)
        if learner.decay is not None:
            learner.decay.apply(lr_now)
        learner.optimizer.step()
        learner.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def step(learner: Learner, x: Any, y: Any, lr: float, momentum: float | None) -> torch.Tensor:
        set_hyper(learner.optimizer, lr, momentum)
        lr_now.fill_(lr)
        return body(x, y)

    return step
