"""Epoch time of dlrun's loop against a minimal hand-written PyTorch loop: same CNN,
same data on the device, same batch size, same optimizer, in the same process.

    .venv/bin/python benchmarks/bench_train.py [--device cuda] [--epochs 2]

Both sides train and then validate once per epoch. dlrun's side is `train.fit` with
progress display and checkpoints as configured (off by default here; --checkpoints
and --progress turn them on), so the ratio is the cost of the loop itself.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import compare, compose

from dlrun.data import TensorBatches
from dlrun.data.images import ImageFacts
from dlrun.family import Data, build_model
from dlrun.learner import Learner, pick_precision, prepare
from dlrun.losses import classification_loss
from dlrun.metrics import Accuracy
from dlrun.optim import build_optimizer
from dlrun.train import fit


def plain_epochs(model, opt, x, y, xv, yv, bs, epochs, autocast):
    """What a person writes by hand: permute, slice, forward, loss, backward, step; then validate."""
    n = len(y) // bs * bs
    for epoch in range(epochs):
        model.train()
        g = torch.Generator().manual_seed(epoch)
        perm = torch.randperm(len(y), generator=g).to(y.device)
        xs, ys = x[perm], y[perm]
        for i in range(0, n, bs):
            with autocast():
                loss = F.cross_entropy(model(xs[i : i + bs]).float(), ys[i : i + bs])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        correct = torch.zeros((), device=y.device)
        with torch.no_grad():
            for i in range(0, len(yv), bs):
                with autocast():
                    correct += (model(xv[i : i + bs]).argmax(-1) == yv[i : i + bs]).sum()
        correct.item()


def synthetic_learner(cfg, n_train: int, n_valid: int, size: int) -> Learner:
    """A Learner on random MNIST-sized images (what the loop does does not depend on the pixels)."""
    device = torch.device(
        cfg.trainer.device
        if cfg.trainer.device != "auto"
        else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = torch.randn(n_train + n_valid, 1, size, size, generator=g).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (n_train + n_valid,), generator=g).to(device)
    bs = cfg.data.bs
    classes = tuple(str(c) for c in range(10))
    facts = ImageFacts(n_out=10, channels=1, size=(size, size), classes=classes, mean=(0.0,), std=(1.0,))
    data = Data(
        train=TensorBatches(x[:n_train], y[:n_train], bs, shuffle=True, drop_last=True),
        valid=TensorBatches(x[n_train:], y[n_train:], bs, shuffle=False),
        loss=classification_loss,
        metrics=Accuracy,
        facts=facts,
    )
    model = build_model(cfg, facts).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    precision, autocast, scaler = pick_precision(str(cfg.trainer.precision), device)
    opt, decay = build_optimizer(cfg, model, device)
    return Learner(
        device=device,
        data=data,
        model=model,
        optimizer=opt,
        precision=precision,
        autocast=autocast,
        scaler=scaler,
        decay=decay,
    )


def run(name: str, cfg, learner: Learner, epochs: int) -> float:
    data = learner.data
    plain_model = build_model(cfg, data.facts).to(learner.device)
    if learner.device.type == "cuda":
        plain_model = plain_model.to(memory_format=torch.channels_last)
    # A hand-written loop's AdamW, weight decay on every parameter, one group.
    fast = {"fused": True} if learner.device.type == "cuda" else {"foreach": True}
    plain_opt = torch.optim.AdamW(
        plain_model.parameters(),
        lr=float(cfg.optimizer.lr),
        weight_decay=float(cfg.regularization.wd),
        **fast,
    )
    tr, va = data.train, data.valid
    tr = getattr(tr, "batches", tr)  # the plain loop does no augmentation
    run_dir = Path(tempfile.mkdtemp())
    sync = torch.cuda.synchronize if learner.device.type == "cuda" else (lambda: None)

    def ours():
        fit(cfg, run_dir, learner)

    def plain():
        plain_epochs(plain_model, plain_opt, tr.x, tr.y, va.x, va.y, cfg.data.bs, epochs, learner.autocast)

    return compare(f"{name} ({learner.device}, {learner.precision})", ours, plain, sync=sync)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--n", type=int, default=10000, help="synthetic 28x28 training images")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--checkpoints", action="store_true")
    args = parser.parse_args()
    common = [
        f"trainer.device={args.device}",
        f"trainer.epochs={args.epochs}",
        f"data.bs={args.bs}",
        f"trainer.progress={str(args.progress).lower()}",
        f"trainer.checkpoint={str(args.checkpoints).lower()}",
        "data.augment.crop_pad=0",
        "schedule=constant",
    ]
    cfg = compose(*common)
    run(f"digits 8x8, epochs x{args.epochs}", cfg, prepare(cfg), args.epochs)
    run(
        f"synthetic 28x28 x{args.n}, epochs x{args.epochs}",
        cfg,
        synthetic_learner(cfg, args.n, args.n // 6, 28),
        args.epochs,
    )


if __name__ == "__main__":
    main()
