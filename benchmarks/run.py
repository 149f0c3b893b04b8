"""dlrun's speed, every case in one run: dlrun against a plain hand-written PyTorch loop over the
same model, data and batch size, in the same process, interleaved, repeated; median and spread.

    .venv/bin/python benchmarks/run.py [--quick] [--json FILE] [--only NAME ...] [--repeats N]
                                       [--device auto|cpu|cuda] [--threads N] [--no-rivals]

Cases: the CNN on digits and on MNIST (../shared/data/mnist), the tabular net on UCI Adult
(../shared/data/adult) at batch 64 and 1024, the LSTM and QRNN language models, the Transformer
language model, lr-find's 100 iterations against 100 plain steps, and start-up: `dlrun --help`,
`dlrun train --cfg job` and the time to the first training step, each against a bare
`python -c "import torch"` (the floor of any PyTorch script). A case whose data is missing is
skipped with a line saying so.

Training cases time training seconds only (dlrun's metrics.csv `seconds`, the same clock around
the plain loop's epochs), epochs after the first (warm-up), except the Adult cases, which time
all 5 epochs of the experiment (compile time included, as a user's run pays it) and report the
accuracy reached. The plain loop trains the same model built by the same builder, with torch's
`nn.Dropout` where dlrun's builder puts its own, with torch.optim.AdamW (fused on CUDA,
foreach elsewhere: faster than torch's default for-loop on the CPU) and the same gradient
clipping, without schedule or logging. `ratio` is dlrun / plain (above 1: dlrun is
slower); `spread` is (max - min) / median of the per-repeat ratios. Where fastai or Lightning
is importable (not a dlrun dependency: a scratch environment), a training case also times them
doing the same work in the same alternation (benchmarks/rivals.py; `--no-rivals`: not), as
`fastai_s`, `lightning_s` (and `fastai_tabular_s`, fastai's own tabular_learner, for Adult)
for dlrun's items, and `<name>_ratio`, rival / dlrun per repeat, median.

Distance to the limit: each training case's model FLOPs per item (forward + backward of one
batch under torch.utils.flop_counter.FlopCounterMode, which counts matrix products and
convolutions, not element-wise work) times dlrun's items/s, as a fraction of the machine's
matrix-multiply rate (a 2048 x 2048 fp32 matmul timed at the start and at the end of the run,
the faster of the two).

`--quick` (a few steps per case, one repeat) takes under a minute on an idle 2-core CPU;
`--json FILE` writes {"machine": {...}, "results": [{"name", "dlrun_s", "plain_s", "ratio",
"spread", "peak_rss_mb", "peak_gpu_mb", ...}]}: peak_rss_mb is the command's own for start-up
cases, and this process's during the case for training cases (what earlier cases left allocated
included). Run by hand (`make bench`), never in the test
suite's pass/fail.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # common.py, when run.py is imported from elsewhere
SHARED = REPO.parent / "shared" / "data"
ADULT = SHARED / "adult" / "adult.data"
MNIST = SHARED / "mnist"

# The keys every result carries (the JSON schema the README and tests/test_bench.py rely on).
RESULT_KEYS = ("name", "dlrun_s", "plain_s", "ratio", "spread", "peak_rss_mb", "peak_gpu_mb")


@dataclass
class Case:
    """One benchmark: a training run through dlrun's loop against the plain loop (`overrides`
    compose dlrun's config), or a command line against bare `import torch` (`command`)."""

    name: str
    overrides: list[str] = field(default_factory=list)
    steps: int | None = None  # training steps per epoch in a full run (None: the whole epoch)
    quick_steps: int = 5
    epochs: int = 3
    warmup: bool = True  # the first epoch is warm-up, not counted (False: every epoch counts,
    # compiling and first-call costs included, as a user's run pays them)
    lr_find: bool = False  # lr-find's range test instead of training epochs
    command: list[str] | None = None
    needs: Path | None = None  # data the case reads; skipped when missing

    def missing(self) -> str | None:
        """Why the case cannot run here, or None."""
        if self.needs is not None and not self.needs.exists():
            return f"no {self.needs}"
        return None


def cases() -> list[Case]:
    """Every case, in the order they are printed."""
    adult = ["experiment=adult", f"data.path={ADULT}"]
    mnist = ["data=mnist", f"data.root={MNIST}", "data.download=false"]
    dlrun = [sys.executable, "-m", "dlrun"]
    five: dict[str, Any] = {"epochs": 5, "warmup": False}
    return [
        Case("cnn_digits", ["data.augment.crop_pad=0"], quick_steps=5),
        Case("cnn_mnist", [*mnist, "data.augment.crop_pad=0"], steps=100, needs=MNIST / "MNIST"),
        # The runs: Adult's 5 epochs, every one counted (trainer.compile=auto's compile
        # time included), and the validation accuracy reached.
        Case("tabular_adult_bs64", [*adult, "data.bs=64"], quick_steps=40, **five, needs=ADULT),
        Case("tabular_adult_bs1024", [*adult, "data.bs=1024"], quick_steps=8, **five, needs=ADULT),
        Case("rnn_lstm", ["model=rnn"], steps=30, quick_steps=3),
        Case("rnn_qrnn", ["model=rnn", "model.cell=qrnn"], steps=30, quick_steps=3),
        Case("transformer_lm", ["model=transformer"], steps=30, quick_steps=3),
        Case("lr_find_100", [], lr_find=True),
        Case("cli_help", command=[*dlrun, "--help"]),
        Case("cli_cfg_job", command=[*dlrun, "train", "--cfg", "job"]),
        Case(
            "time_to_first_step",
            command=[
                *dlrun,
                "train",
                "trainer.epochs=1",
                "trainer.limit_batches=1",
                "trainer.progress=false",
            ],
        ),
    ]


# --- measuring ----------------------------------------------------------------------------


def reset_peak_rss() -> None:
    """Start a new peak of resident memory (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory since `reset_peak_rss` (where Linux allows it; else of the process)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def matmul_rate(device: Any, n: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 matrix-multiply rate in FLOP/s: the best of `repeats` n x n products."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def sync(device: Any) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def flops_per_item(model: Any, loss: Callable, x: Any, y: Any, count: int) -> float:
    """Forward + backward FLOPs of one batch, per item (matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    reset = getattr(model, "reset_state", None)
    if reset is not None:
        reset()
    with FlopCounterMode(display=False) as counter:
        loss(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    if reset is not None:
        reset()
    return counter.get_total_flops() / max(count, 1)


def compose(overrides: list[str]) -> Any:
    """dlrun's composed and validated config."""
    from common import compose as compose_config

    from dlrun.config import validate

    cfg = compose_config(*overrides)
    validate(cfg)
    return cfg


def plain_epochs(
    cfg: Any, learner: Any, model: Any, opt: Any, epochs: int, steps: int, warmup: bool = True
) -> tuple[float, int]:
    """The shortest loop that does the job, over dlrun's batches: training seconds and items of
    the epochs after the first (with `warmup`), or of all of them."""
    import torch

    data, seconds, items = learner.data, 0.0, 0
    clip = cfg.trainer.grad_clip
    for epoch in range(epochs):
        model.train()
        reset = getattr(model, "reset_state", None)
        if reset is not None:
            reset()
        sync(learner.device)
        t0, n = time.perf_counter(), 0
        for x, y in itertools.islice(data.train.epoch(epoch), steps):
            with learner.autocast():
                loss = data.loss(model(x), y)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            n += data.count(y)
        loss.item()
        sync(learner.device)
        if epoch > 0 or epochs == 1 or not warmup:
            seconds, items = seconds + time.perf_counter() - t0, items + n
    return seconds, items


def dlrun_epochs(cfg: Any, learner: Any, warmup: bool = True) -> tuple[float, float, dict[str, float]]:
    """dlrun's loop (`train.fit`): training seconds of the epochs after the first (with
    `warmup`) or of all of them, the compile seconds it reports, and the last epoch's row."""
    from dlrun import rundir
    from dlrun.train import fit

    with tempfile.TemporaryDirectory() as tmp:
        summary = fit(cfg, Path(tmp), learner)
        rows = rundir.read_metrics(Path(tmp))
    kept = rows[1:] if len(rows) > 1 and warmup else rows
    return sum(r["seconds"] for r in kept), float(summary.get("compile_s") or 0.0), rows[-1]


def training_case(case: Case, quick: bool, repeats: int, device: str, rivals: bool = True) -> dict[str, Any]:
    """dlrun's loop and the plain loop, alternately, `repeats` times; with `rivals`, fastai's and
    Lightning's too where they are importable (benchmarks/rivals.py)."""
    import rivals as rival_libs
    import torch
    from common import stock_dropout

    from dlrun.family import build_model
    from dlrun.learner import prepare

    steps = case.quick_steps if quick else case.steps
    epochs = 2 if quick else case.epochs
    overrides = [
        *case.overrides,
        f"trainer.device={device}",
        f"trainer.epochs={epochs}",
        "trainer.progress=false",
        "trainer.checkpoint=false",
        "seed=0",
    ]
    if steps is not None:
        overrides.append(f"trainer.limit_batches={steps}")
    cfg = compose(overrides)

    def fresh() -> tuple[Any, Any, Any]:
        """A run from the start: dlrun's learner, and the plain loop's model and optimizer."""
        learner = prepare(cfg)
        torch.manual_seed(cfg.seed)
        model = stock_dropout(build_model(cfg, learner.data.facts)).to(learner.device)
        fast = {"fused": True} if learner.device.type == "cuda" else {"foreach": True}
        wd = float(cfg.regularization.wd)
        opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.optimizer.lr), weight_decay=wd, **fast)
        return learner, model, opt

    learner, model, opt = fresh()
    data = learner.data
    steps = steps or len(data.train)
    x, y = next(iter(data.train.epoch(0)))
    flops = flops_per_item(model, data.loss, x, y, data.count(y))
    ours, plain, ratios, compile_s, rate, last = [], [], [], 0.0, 0.0, {}
    runners = rival_libs.runners(cfg, learner, steps) if rivals and not case.lr_find else {}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(repeats):  # alternate, so a busy spell of the machine hits both
        if i:  # each repeat a whole run from a fresh model: what a user's run does
            learner, model, opt = fresh()
            data = learner.data
        if case.lr_find:
            a = lr_find_seconds(learner)
            b = plain_steps(learner, model, opt, 100)
            rate = 100 * data.count(y) / a
        else:
            a, spent, last = dlrun_epochs(cfg, learner, case.warmup)
            compile_s = max(compile_s, spent)
            b, items = plain_epochs(cfg, learner, model, opt, epochs, steps, case.warmup)  # the same batches
            rate = items / a if a else 0.0
            for name, rival in runners.items():
                times[name].append(rival(cfg, learner, epochs, steps, case.warmup).per(items))
        ours.append(a)
        plain.append(b)
        ratios.append(a / b)
    return {
        "dlrun_s": statistics.median(ours),
        "plain_s": statistics.median(plain),
        "ratio": statistics.median(ratios),
        "spread": (max(ratios) - min(ratios)) / statistics.median(ratios),
        "dlrun_each": ours,
        "plain_each": plain,
        "compile_s": compile_s,
        "epochs_timed": epochs - 1 if case.warmup and epochs > 1 else epochs,
        "valid": {k: v for k, v in last.items() if k not in ("epoch", "lr", "seconds")},
        "items_per_s": rate,
        "flops_per_item": flops,
        "device": str(learner.device),
        **rival_libs.columns(times, ours),
    }


def lr_find_seconds(learner: Any) -> float:
    """Seconds of dlrun's range test, 100 iterations (end_lr 1e-3: no blow-up, so no early stop)."""
    from dlrun.lr_find import range_test

    sync(learner.device)
    t0 = time.perf_counter()
    range_test(learner, 1e-7, 1e-3, 100)
    sync(learner.device)
    return time.perf_counter() - t0


def plain_steps(learner: Any, model: Any, opt: Any, n: int) -> float:
    """Seconds of `n` plain training steps (what the range test does, without its bookkeeping)."""
    data = learner.data
    batches = itertools.chain.from_iterable(data.train.epoch(e) for e in itertools.count())
    model.train()
    sync(learner.device)
    t0 = time.perf_counter()
    for x, y in itertools.islice(batches, n):
        with learner.autocast():
            loss = data.loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    sync(learner.device)
    return time.perf_counter() - t0


def command_case(case: Case, repeats: int) -> dict[str, Any]:
    """The command's wall time against `python -c "import torch"`, alternately."""
    assert case.command is not None
    floor = [sys.executable, "-c", "import torch"]
    ours, plain, peak = [], [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            # Each run its own directory: a run writes one, and `hydra.run.dir` keeps it out of outputs/.
            command = case.command + ([f"hydra.run.dir={tmp}/{i}"] if "train" in case.command else [])
            seconds, rss = wall(command)
            ours.append(seconds)
            plain.append(wall(floor)[0])
            peak = max(peak, rss)
    ratios = [a / b for a, b in zip(ours, plain)]
    return {
        "peak_rss_mb": round(peak, 1),  # the command's, not this process's
        "dlrun_s": statistics.median(ours),
        "plain_s": statistics.median(plain),
        "ratio": statistics.median(ratios),
        "spread": (max(ratios) - min(ratios)) / statistics.median(ratios),
    }


# Runs a command and reports its seconds and peak memory. A small launcher, because a child
# forked straight from this process would start its peak-memory count at this process's size.
LAUNCHER = """import resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[1:])
seconds = time.perf_counter() - t0
print("@@", seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(rc)"""


def wall(command: list[str]) -> tuple[float, float]:
    """Seconds a command takes and its peak resident memory in MB; it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *command], cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stdout}{proc.stderr}")
    _, seconds, kb = proc.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(kb) / 1024


def run_case(
    case: Case, quick: bool, repeats: int, device: str, matmul: float, rivals: bool = True
) -> dict[str, Any]:
    """One case's result row (RESULT_KEYS, plus what the case adds)."""
    import torch

    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if case.command is not None:
        row = command_case(case, repeats)
    else:
        row = training_case(case, quick, repeats, device, rivals)
        achieved = row["flops_per_item"] * row["items_per_s"]
        row["of_matmul"] = achieved / matmul if matmul else None
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"name": case.name, "peak_rss_mb": peak_rss_mb(), **row, "peak_gpu_mb": gpu}


def machine(device: Any, matmul: float) -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "matmul_gflops": round(matmul / 1e9, 2),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if getattr(device, "type", "") == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def fmt_row(r: dict[str, Any]) -> str:
    from rivals import LIBRARIES

    frac = r.get("of_matmul")
    extra = f"{frac:9.2%}" if frac is not None else f"{'':9}"
    if r.get("compile_s"):
        extra += f"  compile {r['compile_s']:.1f} s"
    if "accuracy" in r.get("valid", {}):
        extra += f"  accuracy {r['valid']['accuracy']:.4f}"
    for name in LIBRARIES:
        if f"{name}_s" in r:
            extra += f"  {name} {r[f'{name}_s']:.3f} s x{r[f'{name}_ratio']:.2f}"
    return (
        f"{r['name']:<22} {r['dlrun_s']:9.3f} {r['plain_s']:9.3f} {r['ratio']:6.2f} {r['spread']:7.1%} "
        f"{r['peak_rss_mb']:8.0f} {extra}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps a case, one repeat")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these cases only")
    parser.add_argument("--repeats", type=int, default=None, help="alternations (default 3, quick 1)")
    parser.add_argument("--device", default="auto", help="trainer.device for the training cases")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--rivals",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time fastai and Lightning on the training cases, where they are importable",
    )
    args = parser.parse_args(argv)
    import torch

    from dlrun.learner import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    known = {c.name: c for c in cases()}
    unknown = sorted(set(args.only or []) - set(known))
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}; the cases are: {', '.join(known)}")
    chosen = [known[n] for n in args.only] if args.only else list(known.values())
    repeats = args.repeats or (1 if args.quick else 3)
    device = pick_device(args.device)
    matmul = matmul_rate(device)
    info = machine(device, matmul)
    print(
        f"{info['device']}, {info['threads']} threads, torch {info['torch']}, fp32 matmul "
        f"{info['matmul_gflops']} GFLOP/s, load {info['load_avg_1min']}; {repeats} repeat(s)"
    )
    heads = ("dlrun s", "plain s", "ratio", "spread", "RSS MB", "matmul")
    print(f"{'case':<22} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, (9, 9, 6, 7, 8, 9))))
    results = []
    for case in chosen:
        why = case.missing()
        if why:
            print(f"{case.name:<22} skipped: {why}")
            continue
        row = run_case(case, args.quick, repeats, args.device, matmul, args.rivals)
        results.append(row)
        print(fmt_row(row), flush=True)
    # On a busy machine one timing of the matmul can come out low: measured again at the end,
    # the faster of the two is the machine's rate, and the fractions are taken against it.
    again = matmul_rate(device)
    if again > matmul:
        info["matmul_gflops"] = round(again / 1e9, 2)
        for row in results:
            if row.get("of_matmul") is not None:
                row["of_matmul"] *= matmul / again
        print(f"fp32 matmul measured again: {info['matmul_gflops']} GFLOP/s (the fractions use it)")
    report = {"machine": info, "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
