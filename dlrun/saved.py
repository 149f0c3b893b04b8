"""A run directory as a model you can use: `model.json` and the weights, nothing else.

`dlrun train` writes `model.json` into the run directory when training starts: the model's
constructor arguments (its name, the `model` and `regularization` config sections) and the
data family's preprocessing state as plain JSON (`Data.inputs`: a table's columns, levels,
fill values and normalisation; images' classes, size and mean/std; text's vocabulary).
`load` rebuilds the network from it alone and loads `best.pt` with `weights_only=True`:
`dlrun predict`, `dlrun export` and `dlrun interpret` never read the training data through it.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dlrun
from dlrun import rundir
from dlrun.errors import DlrunError, first_line

if TYPE_CHECKING:
    import torch

    from dlrun.family import Data, Facts

MODEL_FILE = "model.json"
FORMAT = 1
# family name in model.json -> the module whose `facts_from(prep)` rebuilds the model's facts
# (a fixed list: a run directory is data, and never names code to import).
FAMILIES = {
    "table": "dlrun.data.tabular",
    "images": "dlrun.data.images",
    "text": "dlrun.data.text",
}


def model_doc(cfg: Any, data: Data) -> dict[str, Any]:
    """What model.json holds for a run of `cfg` on `data`."""
    from omegaconf import OmegaConf

    return {
        "format": FORMAT,
        "dlrun": dlrun.__version__,
        "model": {
            "name": str(cfg.model.name),
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "regularization": OmegaConf.to_container(cfg.regularization, resolve=True),
        },
        "data": {"name": str(cfg.data.get("name", "")), "kind": str(cfg.data.kind)},
        "preprocess": data.inputs,
    }


def write(cfg: Any, data: Data, run_dir: Path) -> None:
    """Write model.json into `run_dir` (atomically), if the data family can be rebuilt."""
    if data.inputs:
        rundir.write_json(Path(run_dir) / MODEL_FILE, model_doc(cfg, data))


@dataclass
class Saved:
    """A saved model, rebuilt: the network with its weights (eval mode, on `device`) and what
    turns raw inputs into its inputs."""

    run_dir: Path
    doc: dict[str, Any]  # model.json
    model: torch.nn.Module
    facts: Facts
    device: torch.device

    @property
    def family(self) -> str:
        return self.doc["preprocess"]["family"]

    @property
    def prep(self) -> dict[str, Any]:
        """The family's preprocessing state (`Data.inputs` of the run)."""
        return self.doc["preprocess"]

    @property
    def name(self) -> str:
        """The model's name (`model.name`)."""
        return self.doc["model"]["name"]


def read_doc(run_dir: Path) -> dict[str, Any]:
    """model.json of `run_dir`, checked; an older run directory or a damaged file is a user error."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise DlrunError(
            f"{run_dir} has no {MODEL_FILE}: it was trained by an older dlrun, which did not "
            f"save the model's preprocessing; train it again (or use `dlrun eval`, which rebuilds it "
            f"from the training data)"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        ok = (
            isinstance(doc, dict)
            and isinstance(doc.get("model"), dict)
            and isinstance(doc["model"].get("name"), str)
            and isinstance(doc.get("preprocess"), dict)
        )
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DlrunError(f"{path} cannot be read ({first_line(e)}): the run directory is damaged") from None
    if not ok:
        raise DlrunError(f"{path} is not a dlrun model description: the run directory is damaged")
    if doc.get("format", 0) > FORMAT:
        raise DlrunError(f"{path} was written by a newer dlrun ({doc.get('dlrun')}): upgrade dlrun to use it")
    bs = doc["preprocess"].get("bs", 1)
    if not (isinstance(bs, int) and bs >= 1):
        raise DlrunError(f"{path} has the batch size {bs!r}: the run directory is damaged")
    family = doc["preprocess"].get("family")
    if family not in FAMILIES:
        raise DlrunError(f"{path} names an unknown data family {family!r}: the run directory is damaged")
    return doc


def build(doc: dict[str, Any], where: str | Path = MODEL_FILE) -> tuple[torch.nn.Module, Facts]:
    """The network model.json (at `where`) describes, with random weights, and its facts."""
    from omegaconf import OmegaConf

    from dlrun.family import build_model

    module = importlib.import_module(FAMILIES[doc["preprocess"]["family"]])
    m = doc["model"]
    try:
        facts = module.facts_from(doc["preprocess"])
        cfg = OmegaConf.create({"model": m["model"], "regularization": m["regularization"]})
        return build_model(cfg, facts), facts
    except DlrunError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DlrunError(
            f"{where} does not describe a model dlrun can build ({type(e).__name__}: {first_line(e)}): "
            "the run directory is damaged"
        ) from None


def load(run_dir: str | Path, weights: str = rundir.BEST, device: str = "auto") -> Saved:
    """The run's model with `weights` (best.pt or checkpoint.pt), in eval mode on `device`."""
    from dlrun.learner import pick_device

    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise DlrunError(f"run directory {run_dir} does not exist: give a directory that `dlrun train` wrote")
    doc = read_doc(path)
    dev = pick_device(device)
    model, facts = build(doc, path / MODEL_FILE)
    rundir.load_weights(model, path, weights, dev)
    return Saved(path, doc, model.to(dev).eval(), facts, dev)
