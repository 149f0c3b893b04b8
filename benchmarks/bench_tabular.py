"""Tabular epoch time on UCI Adult: dlrun's loop against a plain PyTorch loop over the same
model, data tensors and batch size, in the same process (and fastai when it is installed).

    .venv/bin/python benchmarks/bench_tabular.py [--adult PATH] [--bs 64 1024] [--epochs 3] [--rounds 2]
                                                 [--threads N]

Seconds are training seconds per epoch (validation excluded), the median over epochs
after the first (warm-up) of each round. Target: dlrun / plain <= 1.05.
Reference on a 2-core CPU (shared/data/adult/README.md): fastai 2.18 s/epoch at batch 64 and
0.22 s at 1024; a plain loop 0.60 s and 0.09 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlrun.config import validate  # noqa: E402
from dlrun.family import build_data, build_model  # noqa: E402

FASTAI_REFERENCE = {64: 2.18, 1024: 0.22}  # s/epoch, measured once on the 2-core CPU (fastai 2.8.12)


def config(adult: Path, bs: int, epochs: int):
    overrides = [
        "experiment=adult",
        f"data.path={adult}",
        f"data.bs={bs}",
        f"trainer.epochs={epochs}",
        "trainer.device=cpu",
        "trainer.progress=false",
        "trainer.checkpoint=false",
        "seed=0",
    ]
    with initialize_config_dir(version_base=None, config_dir=str(REPO / "configs")):
        cfg = compose("train", overrides=overrides)
    validate(cfg)
    return cfg


def dlrun_epochs(cfg) -> list[float]:
    """Training seconds of each epoch as dlrun's loop records them (metrics.csv `seconds`)."""
    from dlrun import rundir, train

    with tempfile.TemporaryDirectory() as tmp:
        train.fit(cfg, Path(tmp))
        return [row["seconds"] for row in rundir.read_metrics(Path(tmp))]


def plain_epochs(cfg) -> list[float]:
    """The same model and whole-tensor batches, trained by the shortest loop that does the job."""
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, torch.device("cpu"))
    model = build_model(cfg, data.facts)
    # foreach: the multi-tensor update dlrun uses on the CPU (the per-tensor default costs
    # several times more per step for a net of ~30 small tensors).
    opt = torch.optim.AdamW(
        model.parameters(), lr=float(cfg.optimizer.lr), weight_decay=cfg.regularization.wd, foreach=True
    )
    times = []
    for epoch in range(cfg.trainer.epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in data.train.epoch(epoch):
            loss = data.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return times


def fastai_epochs(adult: Path, bs: int, epochs: int) -> list[float] | None:
    """fastai's tabular_learner on the same columns, when fastai is installed."""
    try:
        from fastai.tabular.all import Categorify, FillMissing, Normalize, TabularDataLoaders, tabular_learner
    except ImportError:
        return None
    import pandas as pd
    from omegaconf import OmegaConf

    d = OmegaConf.load(REPO / "configs" / "experiment" / "adult.yaml").data
    df = pd.read_csv(adult, sep=",", header=None, names=list(d.names), skipinitialspace=True, na_values=["?"])
    procs = [Categorify, FillMissing, Normalize]
    dls = TabularDataLoaders.from_df(
        df, y_names=d.y_name, cat_names=list(d.cat_names), cont_names=list(d.cont_names), procs=procs, bs=bs
    )
    learn = tabular_learner(dls, layers=[200, 100])
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        learn.fit_one_cycle(1, 1e-2)
        times.append(time.perf_counter() - t0)
    return times


def steady(times: list[float]) -> float:
    """Median epoch time after the first (warm-up) epoch."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adult", type=Path, default=REPO.parent / "shared" / "data" / "adult" / "adult.data")
    p.add_argument("--bs", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternate dlrun and plain this many times")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if not args.adult.is_file():
        sys.exit(f"UCI Adult not found at {args.adult}: pass --adult PATH/adult.data")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"UCI Adult, CPU, {torch.get_num_threads()} threads, {args.epochs} epochs x {args.rounds} rounds")
    print(f"{'bs':>6} {'dlrun s/ep':>11} {'plain s/ep':>11} {'ratio':>7} {'fastai s/ep':>12}")
    for bs in args.bs:
        cfg = config(args.adult, bs, args.epochs)
        ours, plain = [], []
        for _ in range(args.rounds):  # alternate, so load changes hit both alike
            ours.append(steady(dlrun_epochs(cfg)))
            plain.append(steady(plain_epochs(cfg)))
        a, b = min(ours), min(plain)
        fa = fastai_epochs(args.adult, bs, args.epochs)
        fastai = f"{steady(fa):.3f}" if fa else f"({FASTAI_REFERENCE.get(bs, float('nan')):.2f} ref)"
        print(f"{bs:>6} {a:>11.3f} {b:>11.3f} {a / b:>7.3f} {fastai:>12}")


if __name__ == "__main__":
    main()
