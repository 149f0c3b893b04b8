"""Training control: early stopping, gradient accumulation, label smoothing and mixup, each
a config key of the one loop; what each changes, and the runs it refuses."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_user_error, compose, dlrun, metrics_rows, summary, train
from test_failures import StopAfter
from torch import nn

from dlrun import train as loop
from dlrun.errors import DlrunError
from dlrun.family import build_data
from dlrun.learner import Learner, evaluate, prepare, train_step
from dlrun.mixup import blend
from dlrun.optim import build_optimizer

QUICK = ("trainer.progress=false", "seed=3")


pytestmark = pytest.mark.usefixtures("one_thread")


# --- early stopping ----------------------------------------------------------------


class Rule:
    def __init__(self, patience, min_delta=0.0):
        self.patience, self.min_delta = patience, min_delta


class Monitored:
    def __init__(self, monitor, mode):
        self.monitor, self.mode = monitor, mode


def rows(values, monitor="accuracy"):
    return [{"epoch": i + 1, monitor: v} for i, v in enumerate(values)]


@pytest.mark.parametrize(
    "values, mode, patience, min_delta, expected",
    [
        ([0.5, 0.6, 0.6, 0.6], "max", 2, 0.0, {"epoch": 4, "best_epoch": 2, "patience": 2}),
        ([0.5, 0.6, 0.6], "max", 2, 0.0, None),  # one epoch without improvement: not yet
        ([0.5, 0.6, 0.7, 0.8], "max", 1, 0.0, None),
        # Gains of at most 0.04 over the best are not more than min_delta 0.05: none counts.
        ([0.5, 0.54, 0.53, 0.54], "max", 3, 0.05, {"epoch": 4, "best_epoch": 1, "patience": 3}),
        ([0.5, 0.54, 0.58, 0.56], "max", 1, 0.05, {"epoch": 4, "best_epoch": 3, "patience": 1}),
        ([2.0, 1.0, 1.5, 0.9], "min", 2, 0.0, None),  # epoch 4 improved
        ([2.0, 1.0, 1.5, 1.2], "min", 2, 0.0, {"epoch": 4, "best_epoch": 2, "patience": 2}),
        ([2.0, 1.0, 1.5, 1.2], "min", None, 0.0, None),  # off
    ],
)
def test_early_stop_counts_epochs_without_improvement_from_the_metrics_rows(
    values, mode, patience, min_delta, expected
):
    monitor = "accuracy" if mode == "max" else "valid_loss"
    found = loop.early_stop(rows(values, monitor), Monitored(monitor, mode), Rule(patience, min_delta))
    assert found == expected


def test_a_run_stops_early_says_so_and_resuming_it_is_already_complete(run_dir):
    # No accuracy gain is more than 1.0: the run stops once `patience` epochs followed the first.
    args = ("trainer.epochs=6", "trainer.limit_batches=2", "trainer.early_stop.patience=2")
    args += ("trainer.early_stop.min_delta=1.0",)
    proc = train(run_dir, *args)
    assert "stopped early after epoch 3: no accuracy improvement for 2 epochs" in proc.stdout
    done = summary(run_dir)
    assert done["status"] == "completed" and done["epochs"] == 3
    assert done["stopped_early"] == {"epoch": 3, "best_epoch": 1, "patience": 2}
    assert len(metrics_rows(run_dir)) == 3
    with pytest.raises(loop.AlreadyComplete, match=r"complete \(stopped early after 3 of 6 epochs\)"):
        loop.fit(compose(*QUICK, *args, f"resume={run_dir}"), run_dir)


def test_early_stopping_survives_a_resume_mid_run(tmp_path, monkeypatch):
    args = (*QUICK, "trainer.epochs=6", "trainer.limit_batches=3", "trainer.early_stop.patience=2")
    args += ("trainer.early_stop.min_delta=1.0",)
    full, cut, plain = tmp_path / "full", tmp_path / "cut", tmp_path / "plain"
    for d in (full, cut, plain):
        d.mkdir()
    loop.fit(compose(*args), full)
    monkeypatch.setattr(loop, "StopRequest", lambda: StopAfter(5))  # in epoch 2
    with pytest.raises(loop.Interrupted):
        loop.fit(compose(*args), cut)
    monkeypatch.undo()
    loop.fit(compose(*args, f"resume={cut}"), cut)
    assert metrics_rows(cut) == metrics_rows(full) and len(metrics_rows(full)) == 3
    stopped = {"epoch": 3, "best_epoch": 1, "patience": 2}
    assert summary(cut)["stopped_early"] == summary(full)["stopped_early"] == stopped
    # Off (the default), the run trains every epoch and its summary says it did not stop early.
    done = loop.fit(compose(*QUICK, "trainer.epochs=2", "trainer.limit_batches=1"), plain)
    assert done["stopped_early"] is None and done["epochs"] == 2


# --- gradient accumulation ---------------------------------------------------------


def mlp_learner(cfg) -> Learner:
    """The run's data and optimizer around a small net without batch norm (whose statistics
    depend on the batch size), always initialised the same."""
    device = torch.device("cpu")
    data = build_data(cfg, device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer, decay = build_optimizer(cfg, model, device)
    return Learner(
        device=device,
        data=data,
        model=model,
        optimizer=optimizer,
        grad_clip=cfg.trainer.grad_clip,
        decay=decay,
    )


@pytest.mark.parametrize(
    "optimizer",
    [
        ("optimizer=adamw", "trainer.grad_clip=0.5"),
        # Without clipping, which hides the gradient's scale (as Adam does): the loss's 1/K shows.
        ("optimizer=sgd", "optimizer.lr=0.3"),
    ],
    ids=["adamw-clipped", "sgd"],
)
def test_accumulating_two_batches_of_32_equals_one_batch_of_64(tmp_path, optimizer):
    # Decoupled weight decay, clipping and the one-cycle schedule each happen once a step.
    common = (*QUICK, *optimizer, "trainer.epochs=2", "regularization.wd=0.1")
    big_cfg = compose(*common, "data.bs=64", "trainer.limit_batches=3")
    small_cfg = compose(*common, "data.bs=32", "trainer.limit_batches=6", "trainer.accumulate=2")
    big, small = mlp_learner(big_cfg), mlp_learner(small_cfg)
    start = copy.deepcopy(big.model.state_dict())
    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    loop.fit(big_cfg, tmp_path / "big", big)
    loop.fit(small_cfg, tmp_path / "small", small)
    for name, w in big.model.state_dict().items():
        assert not torch.allclose(w, start[name])  # it trained
        torch.testing.assert_close(small.model.state_dict()[name], w, rtol=1e-5, atol=1e-6)
    lrs = [[float(r["lr"]) for r in metrics_rows(tmp_path / d)] for d in ("big", "small")]
    assert lrs[0] == pytest.approx(lrs[1])  # the schedule counted optimizer steps
    ckpt = torch.load(tmp_path / "small" / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["step"] == 6 and ckpt["state"]["batch"] == 0


def test_a_partial_group_at_the_end_of_an_epoch_still_steps_with_its_own_weight(tmp_path):
    # 5 batches with accumulate=2: steps of 2, 2 and 1 batches, each the mean of its batches.
    cfg = compose(
        *QUICK,
        "trainer.epochs=1",
        "data.bs=16",
        "trainer.limit_batches=5",
        "trainer.accumulate=2",
        "optimizer=sgd",
        "optimizer.momentum=0",
        "schedule=constant",
        "optimizer.lr=0.1",
        "regularization.wd=0",
    )
    learner = mlp_learner(cfg)
    reference = copy.deepcopy(learner.model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    batches = list(learner.data.train.epoch(0))[:5]
    for group in (batches[0:2], batches[2:4], batches[4:5]):
        for x, y in group:
            (F.cross_entropy(reference(x), y) / len(group)).backward()
        opt.step()
        opt.zero_grad()
    loop.fit(cfg, tmp_path, learner)
    for mine, theirs in zip(learner.model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_resume_mid_epoch_with_accumulation_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    # 5 batches an epoch in steps of 2, 2, 1; stopped after the 4th step (in epoch 2).
    args = (*QUICK, "trainer.epochs=2", "trainer.limit_batches=5", "trainer.accumulate=2", "data.bs=32")
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    loop.fit(compose(*args), full)
    monkeypatch.setattr(loop, "StopRequest", lambda: StopAfter(4))
    with pytest.raises(loop.Interrupted):
        loop.fit(compose(*args), cut)
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert (ckpt["state"]["epoch"], ckpt["state"]["batch"], ckpt["state"]["step"]) == (1, 2, 4)
    monkeypatch.undo()
    loop.fit(compose(*args, f"resume={cut}"), cut)
    assert metrics_rows(cut) == metrics_rows(full)


# --- label smoothing ---------------------------------------------------------------


def test_label_smoothing_changes_the_training_loss_and_not_the_validation_loss():
    learner = prepare(compose(*QUICK, "regularization.label_smoothing=0.2", "regularization.dropout=0"))
    x, y = next(iter(learner.data.train.epoch(0)))
    learner.model.train()
    with torch.no_grad():
        out = learner.model(x)
    loss = train_step(learner, x, y, 1e-3, None)
    torch.testing.assert_close(loss, F.cross_entropy(out, y, label_smoothing=0.2))
    assert abs(loss.item() - F.cross_entropy(out, y).item()) > 1e-3
    learner.model.eval()
    with torch.no_grad():
        plain = [
            F.cross_entropy(learner.model(xv), yv, reduction="sum") for xv, yv in learner.data.valid.epoch(0)
        ]
    n = sum(len(yv) for _, yv in learner.data.valid.epoch(0))
    valid, _ = evaluate(learner)
    assert valid["valid_loss"] == pytest.approx(sum(plain).item() / n, rel=1e-5)


@pytest.fixture(scope="module")
def regression(tmp_path_factory) -> tuple[str, ...]:
    """Overrides for a small regression table: y = 2 x - z + the shop's level + noise."""
    rng = np.random.default_rng(0)
    n = 200
    shop, x, z = rng.choice(["a", "b", "c"], n), rng.normal(size=n), rng.normal(size=n)
    y = 2 * x - z + (shop == "b") + 0.1 * rng.normal(size=n)
    path = tmp_path_factory.mktemp("table") / "sales.csv"
    pd.DataFrame({"shop": shop, "x": x, "z": z, "y": y}).to_csv(path, index=False)
    return ("model=tabular", "data=csv", f"data.path={path}", "data.y_name=y", "data.cat_names=[shop]")


def test_label_smoothing_is_refused_for_a_regression_table(regression):
    with pytest.raises(DlrunError, match="label_smoothing=0.1 applies to classification"):
        prepare(compose(*regression, "data.cont_names=[x,z]", "regularization.label_smoothing=0.1"))


def test_label_smoothing_and_mixup_are_refused_for_a_language_model(tmp_path):
    proc = dlrun("train", "model=rnn", "regularization.label_smoothing=0.1", f"hydra.run.dir={tmp_path}")
    assert_user_error(proc, "regularization.label_smoothing=0.1 applies to classification", "=0")
    with pytest.raises(DlrunError, match="mixup=0.4 applies to images and tables.*token ids"):
        prepare(compose("model=transformer", "regularization.mixup=0.4"))


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("regularization.label_smoothing=1", "a number >= 0 and < 1"),
        ("regularization.mixup=-0.2", "a number >= 0"),
        ("trainer.accumulate=0", "an integer >= 1"),
        ("trainer.early_stop.patience=0", "an integer >= 1 or null"),
        ("trainer.early_stop.min_delta=-1", "a number >= 0"),
    ],
)
def test_bad_training_control_values_are_refused(override, allowed):
    with pytest.raises(DlrunError, match=f"must be {allowed}"):
        compose(override)


# --- mixup -------------------------------------------------------------------------


def test_blend_is_lam_of_each_item_and_one_minus_lam_of_its_partner():
    x, perm = torch.randn(4, 3), torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(blend(x, perm, torch.tensor(0.7)), 0.7 * x + 0.3 * x[perm])


def test_the_tabular_net_blends_its_embeddings_and_numbers():
    learner = prepare(compose("model=tabular"))
    net = learner.model.eval()
    (cat, cont), _ = next(iter(learner.data.train.epoch(0)))
    perm = torch.randperm(len(cat))
    with torch.no_grad():
        own, partner = net((cat, cont)), net((cat[perm], cont[perm]))
        torch.testing.assert_close(net((cat, cont), mix=(perm, torch.tensor(1.0))), own)
        torch.testing.assert_close(net((cat, cont), mix=(perm, torch.tensor(0.0))), partner)
        halfway = net((cat, cont), mix=(perm, torch.tensor(0.5)))
    assert not torch.allclose(halfway, own) and not torch.allclose(halfway, partner)


@pytest.mark.parametrize(
    "family", [(), ("model=tabular", "regularization.emb_dropout=0")], ids=["images", "table"]
)
def test_mixup_trains_on_blends_and_validates_on_the_real_items(family):
    args = (*QUICK, *family, "regularization.dropout=0")
    mixed, plain = prepare(compose(*args, "regularization.mixup=0.4")), prepare(compose(*args))
    plain.model.load_state_dict(mixed.model.state_dict())
    x, y = next(iter(mixed.data.train.epoch(0)))
    # Validation is the same with or without mixup.
    assert evaluate(mixed)[0] == evaluate(plain)[0]
    # Training: the loss is lam * loss(y) + (1 - lam) * loss(y[perm]) on the blended batch.
    model = copy.deepcopy(mixed.model.train())
    torch.manual_seed(7)
    loss = train_step(mixed, x, y, 1e-3, None)
    torch.manual_seed(7)
    lam = mixed.mixup.beta.sample()
    perm = torch.randperm(len(y))
    with torch.no_grad():
        out = model(blend(x, perm, lam)) if isinstance(x, torch.Tensor) else model(x, mix=(perm, lam))
        unmixed = mixed.data.loss(model(x), y)
    expected = lam * mixed.data.loss(out, y) + (1 - lam) * mixed.data.loss(out, y[perm])
    torch.testing.assert_close(loss, expected)
    assert 0 < lam < 1 and abs(loss.item() - unmixed.item()) > 1e-4


def test_mixup_and_label_smoothing_train_images_and_tables_end_to_end(tmp_path, regression):
    # Mixup of a regression table trains towards the blend of the two targets.
    regression += ("data.cont_names=[x,z]",)
    for name, family in {"images": (), "table": ("model=tabular",), "regression": regression}.items():
        smoothing = () if name == "regression" else ("regularization.label_smoothing=0.1",)
        run_dir = tmp_path / name
        run_dir.mkdir()
        mixup = ("regularization.mixup=0.4", "trainer.epochs=2", "trainer.limit_batches=4")
        loop.fit(compose(*QUICK, *family, *smoothing, *mixup), run_dir)
        assert summary(run_dir)["status"] == "completed", name
