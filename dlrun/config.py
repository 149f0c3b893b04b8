"""Where the configs live, and the checks every composed config passes before any work.

Hydra's struct mode already refuses unknown keys; the rules here catch values of
the wrong type or out of range, and a model that does not fit the data. This
module must stay light: `dlrun train --cfg job` imports it, and torch is not
allowed on that path.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlrun.errors import DlrunError

GROUPS = ("data", "model", "optimizer", "regularization", "schedule", "trainer", "experiment", "lr_find")


def configs_dir() -> Path:
    """The `configs/` tree: inside the package when installed from a wheel, beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise DlrunError(f"cannot find dlrun's configs/ beside {here}: reinstall dlrun")


@functools.cache
def group_options(group: str) -> list[str]:
    """The option names of a config group (`data` -> ['cifar10', 'csv', 'digits', ...])."""
    folder = configs_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def closest(word: str, options: Iterable[str]) -> str | None:
    """The option most like a misspelt `word`, if any is close."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return match[0] if match else None


# --- value rules -----------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What a key accepts. `kind`: int, float, bool, str, choice; `words`: strings also accepted."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself not allowed
    choices: tuple[str, ...] = ()
    words: tuple[str, ...] = ()
    nullable: bool = False
    each: bool = False  # a list of such values is accepted too

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind in ("bool", "str"):
            text = {"bool": "true or false", "str": "a string"}[self.kind]
        else:
            noun = "an integer" if self.kind == "int" else "a number"
            if self.lo is not None and self.hi is not None:
                text = f"{noun} {'>' if self.lo_open else '>='} {self.lo:g} and <= {self.hi:g}"
            elif self.lo is not None:
                text = f"{noun} {'>' if self.lo_open else '>='} {self.lo:g}"
            else:
                text = noun
        if self.words:
            text += " or " + " or ".join(repr(w) for w in self.words)
        if self.each:
            text += " (or a list of them)"
        if self.nullable:
            text += " or null"
        return text

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.each and isinstance(value, (list, tuple)):
            return len(value) > 0 and all(self.accepts(v) for v in value)
        if isinstance(value, str) and value in self.words:
            return True
        if self.kind == "choice":  # `trainer.precision=16` arrives as the int 16
            return not isinstance(value, bool) and str(value) in self.choices
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return self.hi is None or value <= self.hi


def Int(lo: float | None = None, hi: float | None = None, **kw: Any) -> Rule:
    return Rule("int", lo, hi, **kw)


def Float(lo: float | None = None, hi: float | None = None, **kw: Any) -> Rule:
    return Rule("float", lo, hi, **kw)


def Choice(*choices: str, **kw: Any) -> Rule:
    return Rule("choice", choices=choices, **kw)


PROB = Float(0, 1)
POSITIVE = Float(0, lo_open=True)

# Keys checked when they are present in the composed config. Each family adds
# the keys of its data and model configs under its own heading.
RULES: dict[str, Rule] = {
    "seed": Int(0),
    # data, every kind
    "data.bs": Int(1),
    "data.valid_pct": Float(0, 1, lo_open=True),
    # images
    "data.size": Int(1, nullable=True),
    "data.num_workers": Int(0),
    "data.augment.flip": Rule("bool"),
    "data.augment.crop_pad": Int(0),
    "data.augment.scale_min": Float(0, 1, lo_open=True),
    # images: torchvision sets (mnist, fashion_mnist, cifar10), imagefolder, resnet weights
    "data.root": Rule("str"),
    "data.download": Rule("bool", words=("auto",)),
    "data.path": Rule("str", nullable=True),
    "data.mean": Float(each=True),
    "data.std": Float(0, lo_open=True, each=True),
    "model.weights_path": Rule("str", nullable=True),
    # model: cnn / resnet
    "model.channels": Int(1, each=True),
    "model.channels_last": Rule("bool"),
    "model.arch": Choice("resnet18", "resnet34", "resnet50"),
    "model.pretrained": Rule("bool"),
    # tabular (data=csv / penguins, model=tabular, regularization=tabular); column lists may
    # be empty, so they are checked against the file when it is read, not here.
    "data.sep": Rule("str"),
    "data.header": Rule("bool"),
    "data.skip_rows": Int(0),
    "data.task": Choice("auto", "classification", "regression"),
    "data.log_y": Rule("bool"),
    "data.valid_by": Rule("str", nullable=True),
    "model.layers": Int(1, each=True),
    "model.y_range": Float(each=True, nullable=True),
    "regularization.emb_dropout": PROB,
    # text (data=text / pydoc, model=rnn, regularization=rnn)
    "data.bundled": Choice("pydoc_data.topics", nullable=True),
    "data.tokens": Choice("char", "word"),
    "data.min_freq": Int(1),
    "data.max_vocab": Int(2, nullable=True),
    "data.bptt": Int(1),
    "data.variable_bptt": Rule("bool"),
    "model.cell": Choice("lstm", "gru", "qrnn"),
    "model.emb_sz": Int(1),
    "model.n_hid": Int(1),
    "model.n_layers": Int(1),
    "model.tie_weights": Rule("bool"),
    "model.qrnn_window": Int(1),
    **{f"regularization.dropouts.{site}": PROB for site in ("embed", "input", "hidden", "weight", "output")},
    "regularization.ar": Float(0),
    "regularization.tar": Float(0),
    # optimizer
    "optimizer.name": Choice("sgd", "adam", "adamw"),
    "optimizer.lr": Float(0, lo_open=True, words=("find",)),
    "optimizer.momentum": Float(0, 1),
    "optimizer.nesterov": Rule("bool"),
    "optimizer.betas": Float(0, 1, each=True),
    "optimizer.eps": POSITIVE,
    # regularization
    "regularization.dropout": Rule("float", 0, 1, each=True),
    "regularization.wd": Float(0),
    "regularization.wd_mode": Choice("decoupled", "l2"),
    # schedule
    "schedule.name": Choice("onecycle", "cosine", "sgdr", "constant"),
    "schedule.pct_start": Float(0, 1),
    "schedule.div": POSITIVE,
    "schedule.final_div": POSITIVE,
    "schedule.moms": Float(0, 1, each=True, nullable=True),
    "schedule.cycle_len": Int(1),
    "schedule.cycle_mult": Int(1),
    "schedule.eta_min": Float(0),
    # trainer
    "trainer.epochs": Int(1),
    "trainer.device": Choice("auto", "cpu", "cuda", "mps"),
    "trainer.precision": Choice("auto", "32", "bf16", "16"),
    "trainer.compile": Rule("bool"),
    "trainer.grad_clip": Float(0, lo_open=True, nullable=True),
    "trainer.limit_batches": Int(1, nullable=True),
    "trainer.log_every": Int(1),
    "trainer.auto_bs": Rule("bool"),
    "trainer.progress": Rule("bool"),
    "trainer.checkpoint": Rule("bool"),
    # lr finder
    "lr_find.start_lr": POSITIVE,
    "lr_find.end_lr": POSITIVE,
    "lr_find.num_it": Int(1),
    "lr_find.beta": Float(0, 1),
    "lr_find.stop_div": Float(1, lo_open=True),
    "lr_find.suggest": Choice("minimum", "steep", "valley", "slide"),
}


def _select(cfg: Any, key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False, None
        node = node[part]
    if hasattr(node, "keys"):
        return True, dict(node)
    if hasattr(node, "__iter__") and not isinstance(node, str):
        return True, list(node)
    return True, node


def validate(cfg: Any) -> None:
    """Refuse a composed config with a bad value or a model that does not fit the data."""
    # OmegaConf keeps numbers given as `1e-3` on the command line as floats, and
    # `lr=1` as an int: both are numbers, which is all a float key asks.
    for key, rule in RULES.items():
        present, value = _select(cfg, key)
        if present and not rule.accepts(value):
            raise DlrunError(f"{key}={value!r} is not allowed: {key} must be {rule.describe()}")
    check_family(cfg)


@functools.cache
def data_families() -> dict[str, str]:
    """data config name -> the model family it feeds (read from configs/data/*.yaml)."""
    import yaml

    families = {}
    for name in group_options("data"):
        doc = yaml.safe_load((configs_dir() / "data" / f"{name}.yaml").read_text()) or {}
        families[name] = doc.get("family", "?")
    return families


def check_family(cfg: Any) -> None:
    """A model family trains only on data made for it (`model=rnn data=digits` is an error)."""
    model_family = cfg.get("model", {}).get("family")
    data_family = cfg.get("data", {}).get("family")
    if model_family is None or data_family is None or model_family == data_family:
        return
    fitting = [name for name, fam in data_families().items() if fam == model_family]
    raise DlrunError(
        f"model={cfg.model.name} ({model_family} family) cannot train on data={cfg.data.name} "
        f"({data_family} data): use one of data={', data='.join(fitting)}"
    )
