"""The checks every composed config passes before any work.

Hydra's struct mode already refuses unknown keys; the rules catch values of the wrong type
or out of range, names that nothing implements, and a model that does not fit the data.
The rules of the run-wide keys (seed, data.bs, regularization, trainer, lr_find) are here;
each optimizer, schedule, data kind and model declares the rules of its own keys beside
its code (`RULES`). This module must stay light: `dlrun train --cfg job` imports it, and
torch is not allowed on that path (`validate(cfg, deep=False)` skips the family modules).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from dlrun.config_tree import configs_dir, group_options, option_values
from dlrun.errors import DlrunError
from dlrun.rules import BOOL, POSITIVE, Choice, Float, Int, Rule

__all__ = ["configs_dir", "group_options", "validate"]

GROUPS = (
    "data",
    "model",
    "optimizer",
    "regularization",
    "schedule",
    "trainer",
    "finetune",
    "experiment",
    "lr_find",
    "sweep",
    "logger",
)
# The groups a run can do without (`~experiment`); deleting any other is refused.
# `sweep` is a named search space (configs/sweep/), added with +sweep=NAME.
OPTIONAL_GROUPS = ("experiment", "sweep")


# The run-wide keys, checked when present in the composed config.
RULES: dict[str, Rule] = {
    "seed": Int(0, 2**32 - 1),  # NumPy's seed is 32 bits (torch's 64)
    # data, every kind
    "data.bs": Int(1),
    "data.valid_pct": Float(0, 1, lo_open=True),
    # every model (a model family adds its own keys)
    "model.init_from": Rule("str", nullable=True),
    # regularization, every model
    "regularization.dropout": Rule("float", 0, 1, each=True),
    "regularization.wd": Float(0),
    "regularization.wd_mode": Choice("decoupled", "l2"),
    "regularization.label_smoothing": Float(0, 1, hi_open=True),
    "regularization.mixup": Float(0),
    # trainer
    "trainer.epochs": Int(1),
    "trainer.device": Choice("auto", "cpu", "cuda", "mps"),
    "trainer.devices": Int(1),
    "trainer.threads": Int(1, words=("auto",)),
    "trainer.precision": Choice("auto", "32", "bf16", "16"),
    "trainer.compile": Rule("bool", words=("auto",)),
    "trainer.grad_clip": Float(0, lo_open=True, nullable=True),
    "trainer.accumulate": Int(1),
    "trainer.early_stop.patience": Int(1, nullable=True),
    "trainer.early_stop.min_delta": Float(0),
    "trainer.limit_batches": Int(1, nullable=True),
    "trainer.log_every": Int(1),
    "trainer.auto_bs": BOOL,
    "trainer.progress": BOOL,
    "trainer.log_seconds": Float(0, nullable=True),
    "trainer.checkpoint": BOOL,
    # fine-tuning phases
    "finetune.freeze_epochs": Int(0),
    "finetune.train_bn": BOOL,
    "finetune.lr_div": Float(0, lo_open=True),
    # lr finder
    "lr_find.start_lr": POSITIVE,
    "lr_find.end_lr": POSITIVE,
    "lr_find.num_it": Int(1),
    "lr_find.beta": Float(0, 1),
    "lr_find.stop_div": Float(1, lo_open=True),
    "lr_find.suggest": Choice("minimum", "steep", "valley", "slide"),
    # experiment tracking (logger=[...,mlflow])
    "logger.mlflow.tracking_uri": Rule("str"),
    "logger.mlflow.experiment": Rule("str"),
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


def check_values(cfg: Any, rules: dict[str, Rule]) -> None:
    """Refuse the first key whose value its rule does not accept."""
    # OmegaConf keeps numbers given as `1e-3` on the command line as floats, and
    # `lr=1` as an int: both are numbers, which is all a float key asks.
    for key, rule in rules.items():
        present, value = _select(cfg, key)
        if present and rule.keyed and isinstance(value, dict):  # name the entry that is wrong
            one = replace(rule, keyed=False, nullable=False)
            for name, v in value.items():
                if not one.accepts(v):
                    raise DlrunError(
                        f"{key}.{name}={v!r} is not allowed: {key}.{name} must be {one.describe()}"
                    )
        if present and not rule.accepts(value):
            raise DlrunError(f"{key}={value!r} is not allowed: {key} must be {rule.describe()}")


def named_parts(deep: bool = True) -> list[tuple[Any, str, str]]:
    """(registry, group, key) of each part a config names: its optimizer and schedule, and with
    `deep` (which imports torch when their rules are read) its data kind and model."""
    from dlrun.family import DATA, MODELS
    from dlrun.optim import OPTIMIZERS
    from dlrun.schedule import SCHEDULES

    parts = [(OPTIMIZERS, "optimizer", "name"), (SCHEDULES, "schedule", "name")]
    return parts + ([(DATA, "data", "kind"), (MODELS, "model", "name")] if deep else [])


def validate(cfg: Any, deep: bool = True) -> None:
    """Refuse a composed config with an unknown optimizer, schedule, data kind or model, a model
    that does not fit the data, or a bad value. `deep` also checks the keys each data kind and
    model declares, which imports their modules (and torch)."""
    for registry, group, key in named_parts():  # names are checked without importing anything
        if group in cfg:
            registry.check(cfg[group][key])
    check_family(cfg)
    check_values(cfg, rules_for(cfg, deep))


def load_saved(run_dir: Path) -> Any:
    """A run's saved config, checked like one from the command line: a run directory is data,
    and a bad value (or an unknown package, model or data kind) in it is a user error."""
    from dlrun import rundir

    cfg = rundir.load_config(run_dir)
    try:
        validate(cfg)
    except DlrunError as e:
        raise DlrunError(f"{Path(run_dir) / rundir.CONFIG}: {e}") from None
    return cfg


def rules_for(cfg: Any, deep: bool = True) -> dict[str, Rule]:
    """Every key rule that applies to `cfg`: the run-wide ones, its optimizer's and schedule's,
    and with `deep` (which imports torch) its data kind's and model's. Unknown names add none:
    `validate` reports them."""
    rules = dict(RULES)
    for registry, group, key in named_parts(deep):
        name = cfg.get(group, {}).get(key)
        if name in registry.names():
            rules |= registry.rules(name)
    return rules


def check_family(cfg: Any) -> None:
    """A model family trains only on data made for it (`model=rnn data=digits` is an error)."""
    model_family = cfg.get("model", {}).get("family")
    data_family = cfg.get("data", {}).get("family")
    if model_family is None or data_family is None or model_family == data_family:
        return
    fitting = [name for name, fam in option_values("data", "family").items() if fam == model_family]
    raise DlrunError(
        f"model={cfg.model.name} ({model_family} family) cannot train on data={cfg.data.name} "
        f"({data_family} data): use one of data={', data='.join(fitting)}"
    )
