"""The family contract: what a data kind and a model hand the loop, in one place.

A family is a data module and a model module, each with its YAML file:

- `configs/data/<name>.yaml` names its data module with `kind:` (`dlrun/data/<kind>.py`), whose
  `build(cfg, device) -> Data` returns the batches, the loss and metrics that fit the target,
  and a typed `Facts` record (`n_out` and whatever the family's models need).
- `configs/model/<name>.yaml` is `dlrun/models/<name>.py`, whose `build(cfg, facts) -> nn.Module`
  makes the network from those facts alone (so a saved run can rebuild it without its data).
  A model may also define `reset_state()` (forget a carried hidden state; the loop calls it
  before every pass over the data) and `feed(ids) -> logits` (language models: consume new
  tokens, return the next token's logits; `dlrun generate` needs nothing else).
  A model that carries state from one batch to the next defines `carried_state()` (that
  state as tensors in plain lists, tuples and dicts, or None) and `load_carried_state(state)`:
  the checkpoint holds it, so a run resumed mid-epoch continues exactly where it stopped.
  A model for data whose inputs cannot be blended as they are (`Data.mixup="embeddings"`)
  takes `forward(x, mix=(perm, lam))` and blends its own embedded inputs (`dlrun.mixup`).
- Label smoothing applies to data whose loss is `dlrun.losses.classification_loss`.
- A model module may define `layer_groups(model) -> list[list[nn.Module | nn.Parameter]]`: the
  network's layers from the input side to the head (body stages..., head), the one place a
  family says how it splits. Discriminative rates (`optimizer.lr_mult`) and freezing
  (`finetune.freeze_epochs`: all but the last group) use it; without it a model is one group.
- Either module may define `RULES: dict[str, Rule]` (`dlrun.config.Rule`), the value checks of
  its own config keys, run before any work.
- A metrics object names its `monitor` and whether that is better lower or higher (`mode`).

`register_data` / `register_model` add a family from outside the package (a plugin, a test);
names are otherwise found by convention, and an unknown name is an error listing the known ones.
This module stays free of torch: `dlrun train --cfg job` reads the registries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dlrun import rundir
from dlrun.errors import DlrunError
from dlrun.rules import Registry

if TYPE_CHECKING:
    import torch


class Batches(Protocol):
    """One pass over a split, resumable at any batch."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, Any]]:
        """Yield (x, y) for `epoch`, skipping the first `start` batches; the same epoch number
        gives the same batches, so a resumed run sees what an uninterrupted one would have."""
        ...

    def shard(self, rank: int, world: int) -> None:
        """From now on yield only rank `rank`'s part of each batch, of `world` parts (DDP:
        `dlrun.distributed`); equal parts of every training batch, so ranks step together."""
        ...


class Metrics(Protocol):
    """A validation pass's metrics: `update` per batch (no host sync), `compute` once. Its
    numeric attributes are sums over the batches seen (numbers or one-element tensors; flags
    are bools): with several processes they are added up across ranks before `compute`."""

    monitor: str  # the metric that picks the best epoch and ranks runs
    mode: str  # "min" or "max": which way the monitored metric is better

    def update(self, out: Any, y: Any) -> None: ...

    def compute(self, valid_loss: float) -> dict[str, float]: ...


def better(mode: str, new: float, old: float | None) -> bool:
    """Whether `new` beats `old` in direction `mode` ("min" or "max"); NaN never wins."""
    if new != new:
        return False
    if old is None or old != old:
        return True
    return new < old if mode == "min" else new > old


@dataclass(frozen=True)
class Facts:
    """What a model builder may know about the data: the number of outputs, plus, in each
    family's subclass, the shapes, columns or vocabulary its models are sized from."""

    n_out: int


def batch_items(y: Any) -> int:
    """Items in a batch of targets: its first dimension (images, table rows)."""
    return y.shape[0]


@dataclass
class Data:
    """What a data kind hands the loop."""

    train: Batches
    valid: Batches
    loss: Callable[[Any, Any], torch.Tensor]  # mean over the batch's items
    metrics: Callable[[], Metrics]
    facts: Facts
    # The preprocessing a saved model needs to be applied again, as JSON files of the run
    # directory: file name -> content ({"vocab.json": ...} for text, classes for images).
    state: dict[str, Any] = field(default_factory=dict)
    # Items in a target batch: what the loss is a mean over (tokens for a language model),
    # the weight of the batch in the epoch's mean loss, and what items/s counts; `unit` names
    # them in the progress display (tokens, rows, images).
    count: Callable[[Any], int] = batch_items
    unit: str = "items"
    # How `regularization.mixup` blends two batches of this data (`dlrun.mixup`): "inputs" (the
    # input tensors themselves: images), "embeddings" (the model blends what it makes of them,
    # called as `model(x, mix=(perm, lam))`: a table's embeddings and numbers), or None (inputs
    # that cannot be blended, such as token ids: mixup is refused).
    mixup: str | None = None
    # Per-batch learning-rate factor (variable-length BPTT windows); None means 1.
    lr_scale: Callable[[Any], float] | None = None
    # The data keys that set the memory one batch takes (named when memory runs out).
    batch_keys: tuple[str, ...] = ("bs",)
    # What else usually helps when the loss diverges on this data, beyond a lower lr.
    advice: tuple[str, ...] = ()
    # Facts about each split, JSON-ready ({"train": {"rows": ..., "first_date": "2015-01-01", ...},
    # "valid": {...}}): printed at the start of a run and kept in summary.json.
    split: dict[str, dict[str, Any]] = field(default_factory=dict)
    # How raw inputs become model inputs, as plain JSON: `{"family": "table" | "images" | "text",
    # ...}`, written into model.json (`dlrun.saved`) so that predict, export and interpret work
    # from the run directory alone; the family's module rebuilds the facts with `facts_from(it)`.
    inputs: dict[str, Any] = field(default_factory=dict)


# --- registries ----------------------------------------------------------------------


DATA = Registry("data kind", "data.kind", "dlrun.data")
MODELS = Registry("model", "model.name", "dlrun.models")


def register_data(kind: str, module: Any) -> None:
    """Add a data kind: `module.build(cfg, device) -> Data`, optional `module.RULES`."""
    DATA.register(kind, module)


def register_model(name: str, module: Any) -> None:
    """Add a model: `module.build(cfg, facts) -> nn.Module`, optional `module.RULES`."""
    MODELS.register(name, module)


def build_data(cfg: Any, device: torch.device) -> Data:
    """Build the data named by `cfg.data.kind` on `device`."""
    return DATA.get(cfg.data.kind).build(cfg, device)


def build_model(cfg: Any, facts: Facts) -> torch.nn.Module:
    """Build the model named by `cfg.model.name` from the data's facts."""
    return MODELS.get(cfg.model.name).build(cfg, facts)


def layer_groups(cfg: Any, model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """The model's parameters in its layer groups, input side first, head last (the model
    module's `layer_groups`, else one group). Each parameter is in one group only: a weight
    tied between two layers (an LM's embedding and decoder) stays in the first; parameters no
    group names join the head."""
    import torch

    split = getattr(MODELS.get(cfg.model.name), "layer_groups", None)
    parts = split(model) if split is not None else [[model]]
    seen: set[int] = set()
    groups: list[list[torch.nn.Parameter]] = []
    for part in parts:
        params = []
        for item in part:
            for p in item.parameters() if isinstance(item, torch.nn.Module) else [item]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        groups.append(params)
    groups[-1] += [p for p in model.parameters() if id(p) not in seen]
    return [g for g in groups if g]


def dropout(reg: Any, model: str, layers: int | None = None) -> list[float] | float:
    """`regularization.dropout` as a model takes it: one probability for a model with one
    dropout site (or one strength for all its sites); with `layers`, one per hidden layer
    (a single value applies to every layer)."""
    p = reg.dropout
    if layers is None:
        if not isinstance(p, (int, float)):
            raise DlrunError(
                f"regularization.dropout={list(p)} is a list, but model={model} takes one number: "
                "give one probability"
            )
        return float(p)
    if isinstance(p, (int, float)):
        return [float(p)] * layers
    p = [float(v) for v in p]
    if len(p) != layers:
        raise DlrunError(
            f"regularization.dropout lists {len(p)} values for {layers} layers of model={model}: "
            "give one value, or one per layer"
        )
    return p


# --- the run directory's copy of the preprocessing state ------------------------------


def save_state(data: Data, run_dir: Path) -> None:
    """Write the data's preprocessing state files into the run directory (atomically)."""
    for name, doc in data.state.items():
        rundir.write_json(Path(run_dir) / name, doc)
