"""fastai and Lightning doing the work of run.py's training cases, where they are importable.

Each rival trains a fresh copy of the case's model (`dlrun.family.build_model`, the same seed)
on the case's own training tensors (`learner.data.train`), at the same batch size, for the
same epochs and steps per epoch (`trainer.limit_batches`), with Adam and decoupled weight
decay at the config's lr, betas, eps and wd, under the config's one-cycle (warm-up share,
div, final div, momenta), without validation, logging or progress display. Like run.py's
plain loop and dlrun's `seconds`, it times training epochs after the first (warm-up), and
the seconds are scaled to the same items as dlrun's.

- fastai: a `fastai.learner.Learner` over fastai `DataLoader`s that slice the tensors a batch
  at a time (as fastai's own `TabularDL` does with a table), fastai's `Adam` (`decouple_wd`),
  `fit_one_cycle`, the default callbacks but the progress bar; biases and normalisation
  weights get no decay, as in dlrun (fastai's `wd_bn_bias=False`).
- fastai_tabular (the Adult cases): fastai's own `tabular_learner` on the same adult.data
  columns (its Categorify / FillMissing / Normalize, its embedding widths, its random 20%
  validation rows), layers and dropout from the config: what a fastai user would write.
- Lightning: a `LightningModule` around the model, `torch.optim.AdamW` (weight decay on
  every parameter, as run.py's plain loop) with `OneCycleLR` stepped every batch, a torch
  `DataLoader` drawing whole batches of indices from a `TensorDataset` (no per-item collate).

Cases whose batches are not plain shuffled tensors (the language models, whose batches
carry a hidden state in order; images augmented on the device) are left to dlrun and the
plain loop. `python benchmarks/rivals.py` trains the Adult cases once each way and prints
the validation accuracy each reaches (that the work is the same).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The rivals, in the order of their columns: the library a column needs, and its runner.
LIBRARIES = {"fastai": "fastai", "fastai_tabular": "fastai", "lightning": "lightning"}


@dataclasses.dataclass
class Timed:
    """A rival's run: training seconds and items of the epochs after the first, the model."""

    seconds: float
    items: int
    model: Any
    accuracy: float | None = None  # on the rival's own validation rows (fastai_tabular)

    def per(self, items: int) -> float:
        """Seconds for `items` items at this run's rate."""
        return self.seconds * items / self.items


class Clock:
    """Training seconds and items per epoch; a CUDA clock waits for the queued work first."""

    def __init__(self, device: Any, count: Callable[[Any], int], warmup: bool = True):
        self.device, self.count, self.warmup = device, count, warmup
        self.epochs: list[tuple[float, int]] = []

    def start(self) -> None:
        """An epoch's training begins."""
        self.t0, self.n = self.now(), 0

    def batch(self, y: Any) -> None:
        """A batch with targets `y` was trained on."""
        self.n += self.count(y)

    def stop(self) -> None:
        """The epoch's training ended."""
        self.epochs.append((self.now() - self.t0, self.n))

    def now(self) -> float:
        """The clock, once the device has done what was queued."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def timed(self, model: Any, accuracy: float | None = None) -> Timed:
        """The run: the epochs after the first (the only one, if one), or with `warmup` false
        every epoch."""
        kept = self.epochs[1:] if len(self.epochs) > 1 and self.warmup else self.epochs
        return Timed(sum(s for s, _ in kept), sum(n for _, n in kept), model, accuracy)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No library warnings in the benchmark's table: fastai's use of the deprecated
    torch.jit.script and of read-only arrays, Lightning's advice to use loader workers (a
    batch here is one gather)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def available() -> list[str]:
    """The rivals whose library is importable here."""
    return [name for name, lib in LIBRARIES.items() if importlib.util.find_spec(lib) is not None]


def runners(cfg: Any, learner: Any, steps: int) -> dict[str, Callable[..., Timed]]:
    """The rivals that can do this case's work here: importable, and over plain shuffled
    tensors; fastai_tabular for a table read from a CSV file (data=csv) trained whole epochs
    (its pipeline has no step limit)."""
    from dlrun.data import TensorBatches

    if type(learner.data.train) is not TensorBatches:
        return {}
    run = {"fastai": fastai_epochs, "fastai_tabular": fastai_tabular_epochs, "lightning": lightning_epochs}
    names = available()
    if cfg.data.name != "csv" or cfg.model.name != "tabular" or steps < len(learner.data.train):
        names = [n for n in names if n != "fastai_tabular"]
    return {name: run[name] for name in names}


def columns(times: dict[str, list[float]], ours: list[float]) -> dict[str, float]:
    """A row's rival columns: `<name>_s`, the median seconds, and `<name>_ratio`, the median
    per-repeat rival / dlrun (how many times slower the rival is)."""
    row = {}
    for name, seconds in times.items():
        row[f"{name}_s"] = statistics.median(seconds)
        row[f"{name}_ratio"] = statistics.median(s / d for s, d in zip(seconds, ours))
    return row


def fresh_model(cfg: Any, learner: Any) -> Any:
    """The case's model as `dlrun.learner.prepare` builds it, from the run's seed, with torch's
    `nn.Dropout` (what a fastai or Lightning user has)."""
    import torch
    from common import stock_dropout

    from dlrun.family import build_model

    torch.manual_seed(cfg.seed)
    model = stock_dropout(build_model(cfg, learner.data.facts)).to(learner.device)
    if learner.device.type == "cuda" and cfg.model.get("channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return model


def one_cycle(cfg: Any) -> dict[str, Any]:
    """The config's one-cycle schedule as (lr, pct_start, div, final_div, moms)."""
    s = cfg.schedule
    if s.name != "onecycle":
        raise ValueError(f"the rivals run one-cycle only, not schedule={s.name}")
    return {
        "lr": float(cfg.optimizer.lr),
        "pct_start": float(s.pct_start),
        "div": float(s.div),
        "final_div": float(s.final_div),
        "moms": tuple(float(m) for m in s.moms),
    }


def fastai_timing(clock: Clock) -> Any:
    """A fastai callback that times each epoch's training on `clock` and cancels validation
    (dlrun's seconds count training only) while its `cancel_valid` is set."""
    with quiet():
        from fastai.callback.core import Callback, CancelValidException

    class Timing(Callback):
        cancel_valid = True

        def before_train(self) -> None:
            clock.start()

        def after_batch(self) -> None:
            if self.training:
                clock.batch(self.yb[0])

        def after_train(self) -> None:
            clock.stop()

        def before_validate(self) -> None:
            if self.cancel_valid:
                raise CancelValidException

    return Timing()


def fit_one_cycle(learn: Any, cfg: Any, epochs: int) -> None:
    """fastai's `fit_one_cycle` with the config's one-cycle (lr, warm-up share, div, momenta)."""
    s = one_cycle(cfg)
    learn.fit_one_cycle(
        epochs,
        s["lr"],
        div=s["div"],
        div_final=s["final_div"],
        pct_start=s["pct_start"],
        moms=(*s["moms"], s["moms"][0]),
    )


def fastai_epochs(cfg: Any, learner: Any, epochs: int, steps: int, warmup: bool = True) -> Timed:
    """fastai's Learner and `fit_one_cycle` over the case's tensors."""
    from functools import partial

    with quiet():
        import fastai.callback.all  # noqa: F401 (adds fit_one_cycle, no_bar, to_bf16 to Learner)
        from fastai.callback.training import GradientClip
        from fastai.data.core import DataLoaders
        from fastai.data.load import DataLoader
        from fastai.learner import Learner
        from fastai.optimizer import Adam

    from dlrun.data import take

    data, device = learner.data, learner.device
    clock = Clock(device, data.count, warmup)

    class TensorDL(DataLoader):
        """`steps` batches an epoch, each one index slice of the tensors (fastai's TabularDL
        does the same with a table: the items are indices, a batch is one gather)."""

        def __init__(self, x: Any, y: Any, **kwargs: Any):
            super().__init__(dataset=y, drop_last=True, device=device, **kwargs)
            self.x, self.y = x, y

        def get_idxs(self) -> list[int]:
            idxs = list(range(len(self.y)))
            return (self.shuffle_fn(idxs) if self.shuffle else idxs)[: self.n]

        def do_item(self, s: int) -> int:
            return s

        # The batch as it is: fastai's retain_types would cast it to the type of an index.
        def do_batch(self, b: list[int]) -> tuple[Any, Any]:
            index = self.y.new_tensor(b)
            return take(self.x, index), self.y[index]

    train, valid = data.train, data.valid
    bs = train.bs
    dls = DataLoaders(
        TensorDL(train.x, train.y, bs=bs, n=steps * bs, shuffle=True),
        TensorDL(valid.x, valid.y, bs=bs, n=len(valid.y) // bs * bs),
        device=device,
    )
    opt = cfg.optimizer
    cbs = [fastai_timing(clock)] + ([GradientClip(cfg.trainer.grad_clip)] if cfg.trainer.grad_clip else [])
    learn = Learner(
        dls,
        fresh_model(cfg, learner),
        loss_func=data.loss,
        opt_func=partial(Adam, sqr_mom=float(opt.betas[1]), eps=float(opt.eps)),
        wd=float(cfg.regularization.wd),
        cbs=cbs,
    )
    learn.logger = lambda *a: None  # no per-epoch table
    if learner.precision == "bf16":
        learn.to_bf16()
    with learn.no_bar():
        fit_one_cycle(learn, cfg, epochs)
    return clock.timed(learn.model)


def fastai_tabular_epochs(cfg: Any, learner: Any, epochs: int, steps: int, warmup: bool = True) -> Timed:
    """fastai's own tabular pipeline on the case's CSV file: `tabular_learner`, `fit_one_cycle`."""
    from functools import partial

    import pandas as pd

    with quiet():
        from fastai.data.block import CategoryBlock
        from fastai.data.transforms import RandomSplitter
        from fastai.metrics import accuracy
        from fastai.optimizer import Adam
        from fastai.tabular.all import Categorify, FillMissing, Normalize, TabularPandas, tabular_learner
        from fastai.tabular.learner import tabular_config
        from fastcore.foundation import range_of

    d = cfg.data
    clock = Clock(learner.device, lambda y: len(y), warmup)
    df = pd.read_csv(
        d.path,
        sep=d.sep,
        header=0 if d.header else None,
        names=list(d.names) if d.names else None,
        na_values=list(d.na_values or []),
        engine="python",
    )
    splits = RandomSplitter(valid_pct=float(d.valid_pct), seed=int(cfg.seed))(range_of(df))
    table = TabularPandas(
        df,
        procs=[Categorify, FillMissing, Normalize],
        cat_names=list(d.cat_names),
        cont_names=list(d.cont_names),
        y_names=d.y_name,
        y_block=CategoryBlock(),
        splits=splits,
    )
    with quiet():
        dls = table.dataloaders(bs=int(d.bs), device=learner.device)
    timing = fastai_timing(clock)
    reg, opt = cfg.regularization, cfg.optimizer
    learn = tabular_learner(
        dls,
        layers=list(cfg.model.layers),
        config=tabular_config(ps=float(reg.dropout), embed_p=float(reg.emb_dropout)),
        opt_func=partial(Adam, sqr_mom=float(opt.betas[1]), eps=float(opt.eps)),
        wd=float(reg.wd),
        metrics=accuracy,
        cbs=[timing],
    )
    learn.logger = lambda *a: None
    with learn.no_bar():
        fit_one_cycle(learn, cfg, epochs)
        timing.cancel_valid = False  # validation at the end only, for the accuracy
        _, acc = learn.validate()
    return clock.timed(learn.model, float(acc))


def lightning_epochs(cfg: Any, learner: Any, epochs: int, steps: int, warmup: bool = True) -> Timed:
    """A LightningModule and Lightning's Trainer over a torch DataLoader of the case's tensors."""
    import lightning as L
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    data, device = learner.data, learner.device
    clock = Clock(device, data.count, warmup)
    train = data.train
    xs = tuple(train.x) if isinstance(train.x, (tuple, list)) else (train.x,)
    s, opt = one_cycle(cfg), cfg.optimizer

    class Module(L.LightningModule):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            *x, y = batch
            return data.loss(self.model(x[0] if len(x) == 1 else tuple(x)), y)

        def configure_optimizers(self) -> dict[str, Any]:
            fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
            optimizer = torch.optim.AdamW(
                self.parameters(),
                lr=s["lr"],
                betas=tuple(float(b) for b in opt.betas),
                eps=float(opt.eps),
                weight_decay=float(cfg.regularization.wd),
                **fast,
            )
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=s["lr"],
                total_steps=epochs * steps,
                pct_start=s["pct_start"],
                div_factor=s["div"],
                final_div_factor=s["final_div"] / s["div"],  # torch divides lr/div by it
                max_momentum=s["moms"][0],
                base_momentum=s["moms"][1],
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    class Timing(L.Callback):
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            clock.start()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, i: int) -> None:
            clock.batch(batch[-1])

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            clock.stop()

    dataset = TensorDataset(*xs, train.y)
    order = RandomSampler(dataset, generator=torch.Generator().manual_seed(int(cfg.seed)))
    loader = DataLoader(dataset, sampler=BatchSampler(order, train.bs, drop_last=True), batch_size=None)
    module = Module(fresh_model(cfg, learner))
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # its start-up lines
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=epochs,
        limit_train_batches=steps,
        precision="bf16-mixed" if learner.precision == "bf16" else "32-true",
        gradient_clip_val=cfg.trainer.grad_clip,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Timing()],
    )
    with quiet():
        trainer.fit(module, train_dataloaders=loader)
    return clock.timed(module.model)


def accuracy(learner: Any, model: Any) -> float:
    """Validation accuracy of `model` on the case's valid split, by dlrun's own evaluation."""
    from dlrun.learner import evaluate

    other = dataclasses.replace(learner, model=model, forward=model, evaluate_forward=model, compiler=None)
    return evaluate(other)[0]["accuracy"]


def main(argv: list[str] | None = None) -> None:
    """Train the Adult cases once with dlrun and each rival; print the validation accuracy."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run

    from dlrun import rundir
    from dlrun.learner import prepare
    from dlrun.train import fit

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--only", nargs="+", default=["tabular_adult_bs64", "tabular_adult_bs1024"])
    parser.add_argument("--epochs", type=int, default=3, help="run.py's epochs a case")
    args = parser.parse_args(argv)
    known = {c.name: c for c in run.cases()}
    for name in args.only:
        case = known[name]
        cfg = run.compose(
            [*case.overrides, f"trainer.epochs={args.epochs}", "trainer.progress=false"]
            + ["trainer.checkpoint=false", "seed=0"]
        )
        learner = prepare(cfg)
        steps = len(learner.data.train)
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
            fit(cfg, Path(tmp), learner)
            ours = rundir.read_metrics(Path(tmp))[-1]["accuracy"]
        line = f"{name}: validation accuracy after {args.epochs} epochs: dlrun {ours:.4f}"
        for rival, train in runners(cfg, learner, steps).items():
            timed = train(cfg, learner, args.epochs, steps)
            acc = timed.accuracy if timed.accuracy is not None else accuracy(learner, timed.model)
            line += f", {rival} {acc:.4f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
