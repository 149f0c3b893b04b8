"""The lr finder's cost: 100 range-test iterations (loss read back every step, smoothing,
snapshot and exact restore) against 100 plain training steps of the same model and data;
the plot and CSV/JSON writing are timed on their own.

    .venv/bin/python benchmarks/bench_lr_find.py [--device cuda] [model=tabular ...]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from common import compare, compose

from dlrun.learner import prepare
from dlrun.lr_find import range_test, save
from dlrun.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-it", type=int, default=100)
    parser.add_argument("overrides", nargs="*", help="dlrun overrides (model=tabular ...)")
    args = parser.parse_args()
    cfg = compose(f"trainer.device={args.device}", "trainer.progress=false", *args.overrides)
    learner = prepare(cfg)
    device = learner.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    data = learner.data
    # The plain loop trains its own copy: the range test must start from the untrained model
    # every time (from a trained one its 4x-the-best rule stops after a few noisy steps).
    model = copy.deepcopy(learner.model)
    opt, _ = build_optimizer(cfg, model, device)

    def batches():
        epoch = 0
        while True:
            yield from data.train.epoch(epoch)
            epoch += 1

    def plain():
        model.train()
        for _, (x, y) in zip(range(args.num_it), batches()):
            with learner.autocast():
                loss = data.loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()

    result: dict = {}

    def ours():
        # end_lr 1e-3: no blow-up, so both sides run exactly num_it steps
        result.update(range_test(learner, 1e-7, 1e-3, args.num_it, limit=None))

    name = f"lr-find {args.num_it} it, {cfg.model.name} on {cfg.data.name}"
    compare(name, ours, plain, sync=sync)
    print(f"(stopped after {len(result['lrs'])} of {args.num_it} iterations)")
    result.update(suggest="valley", lr=result["suggestions"]["valley"])
    t0 = time.perf_counter()
    save(result, Path(tempfile.mkdtemp()))
    print(f"writing lr_find.csv/.json/.png: {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
