"""The family contract: one place, no import cycle, registries that refuse unknown names, and a
family added from outside the package that trains through the one loop."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_user_error, compose, dlrun, metrics_rows, summary
from omegaconf import OmegaConf

from dlrun.config import validate
from dlrun.errors import DlrunError

PACKAGE = REPO / "dlrun"


# --- imports -----------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported(path: Path, modules: set[str]) -> set[str]:
    """The dlrun modules `path` imports anywhere (module level and inside functions), other than
    under `if TYPE_CHECKING:`; importing a.b.c imports the packages a and a.b too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and is_type_checking(node)
            for n in ast.walk(node)}  # fmt: skip
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules
    return found - {me}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert "dlrun.learner" in graph and "dlrun.lr_find" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert "dlrun.train" not in graph["dlrun.lr_find"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", ["train.py", "learner.py"])
def test_the_loop_knows_no_family(module):
    text = (PACKAGE / module).read_text()
    for word in ("bptt", "vocab", "n_classes", "reset_state(model", "data.info"):
        assert word not in text, f"{module} mentions {word}"


# --- registries ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, known",
    [
        ("optimizer.name=lamb", "adam, adamw, sgd"),
        ("schedule.name=linear", "constant, cosine, onecycle, sgdr"),
        ("data.kind=parquet", "digits, imagefolder, tabular, text, torchvision_sets"),
        ("model.name=vgg", "cnn, resnet, rnn, tabular, timm, transformer"),
    ],
)
def test_an_unknown_name_lists_the_known_ones(override, known, run_dir):
    proc = dlrun("train", override, f"hydra.run.dir={run_dir}")
    assert_user_error(proc, f"{override} is not a known", f"use one of {known}")
    assert not run_dir.exists()


def test_adam_means_l2_decay_and_adamw_decoupled():
    from dlrun.optim import build_optimizer

    model = torch.nn.Linear(3, 2)
    for choice, mode in (("adam", "l2"), ("adamw", "decoupled")):
        cfg = compose(f"optimizer={choice}")
        assert cfg.regularization.wd_mode == mode
        opt, decay = build_optimizer(cfg, model, torch.device("cpu"))
        assert (decay is None) == (mode == "l2")
        assert max(g["weight_decay"] for g in opt.param_groups) == (0.01 if mode == "l2" else 0.0)
    assert compose("optimizer=adam", "regularization.wd_mode=decoupled").regularization.wd_mode == "decoupled"


def test_a_model_with_one_dropout_refuses_a_list(run_dir):
    proc = dlrun("train", "regularization.dropout=[0.1,0.2]", f"hydra.run.dir={run_dir}", "trainer.epochs=1")
    assert_user_error(proc, "model=cnn takes one number")


def test_family_keys_are_checked_before_any_work(run_dir):
    proc = dlrun("train", "model=rnn", "model.n_hid=0", f"hydra.run.dir={run_dir}")
    assert_user_error(proc, "model.n_hid=0 is not allowed", "an integer >= 1")
    assert not run_dir.exists()


# --- a fourth family, added from outside ---------------------------------------------------


class Score:
    """The validation loss itself, declared higher-is-better: training lowers it, so the best
    epoch under this metric is the first one (lower-is-better would pick the last)."""

    monitor, mode = "score", "max"

    def update(self, out, y) -> None:
        pass

    def compute(self, valid_loss: float) -> dict[str, float]:
        return {"score": valid_loss}


def toy_data(cfg, device):
    """Random linear regression as whole tensors; noise from the family's own key."""
    from dlrun.data import TensorBatches
    from dlrun.family import Data, Facts

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + cfg.data.noise * torch.randn(512, generator=g)
    train = TensorBatches(x[:448].to(device), y[:448].to(device), cfg.data.bs, shuffle=True, seed=cfg.seed)
    valid = TensorBatches(x[448:].to(device), y[448:].to(device), cfg.data.bs, shuffle=False)
    loss = lambda out, y: torch.nn.functional.mse_loss(out.squeeze(-1), y)
    return Data(train=train, valid=valid, loss=loss, metrics=Score, facts=Facts(n_out=1))


def toy_model(cfg, facts):
    return torch.nn.Linear(4, facts.n_out)


@pytest.fixture
def toy_family():
    from dlrun.family import DATA, MODELS, register_data, register_model
    from dlrun.rules import Float

    register_data("toy_regression", types.SimpleNamespace(build=toy_data, RULES={"data.noise": Float(0)}))
    register_model("toy_linear", types.SimpleNamespace(build=toy_model))
    yield
    DATA._added.pop("toy_regression")
    MODELS._added.pop("toy_linear")


def toy_config(**data):
    cfg = compose("trainer.epochs=3", "trainer.progress=false", "schedule=constant", "optimizer.lr=0.05")
    OmegaConf.set_struct(cfg, False)
    cfg.data = {"name": "toy", "kind": "toy_regression", "family": "toy", "bs": 32, "noise": 0.1, **data}
    cfg.model = {"name": "toy_linear", "family": "toy"}
    return cfg


def test_a_family_registered_from_outside_trains_through_fit(toy_family, tmp_path):
    from dlrun.train import fit

    cfg = toy_config()
    validate(cfg)
    result = fit(cfg, tmp_path)
    rows = metrics_rows(tmp_path)
    scores = [float(r["score"]) for r in rows]
    assert result["status"] == "completed" and len(rows) == 3
    assert scores[0] > scores[-1]  # training lowers the loss the toy metric reports
    assert result["monitor"] == "score" and result["mode"] == "max"
    assert result["best_epoch"] == 1 and result["best"]["score"] == max(scores)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1
    assert summary(tmp_path)["mode"] == "max"


def test_a_registered_family_keys_are_checked(toy_family):
    with pytest.raises(DlrunError, match="data.noise=-1 is not allowed"):
        validate(toy_config(noise=-1))
    cfg = toy_config()
    cfg.model.family = "image"
    with pytest.raises(DlrunError, match="cannot train on data=toy"):
        validate(cfg)
