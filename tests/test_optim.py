"""Weight decay done right: decoupled (AdamW) versus L2, for Adam and SGD."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dlrun.optim import build_optimizer, param_groups


def config(name: str, wd_mode: str, wd: float = 0.1, lr: float = 0.01, momentum: float = 0.9):
    return OmegaConf.create(
        {
            "optimizer": {
                "name": name,
                "lr": lr,
                "betas": [0.9, 0.99],
                "eps": 1e-8,
                "momentum": momentum,
                "nesterov": False,
            },
            "regularization": {"wd": wd, "wd_mode": wd_mode, "dropout": 0.0},
        }
    )


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def run_steps(model: nn.Module, step, n: int = 5) -> list[torch.Tensor]:
    """n steps on fixed random data; `step(opt)` is how the optimizer steps."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 1, generator=g)
    for _ in range(n):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        step()
        for p in model.parameters():
            p.grad = None
    return [p.detach().clone() for p in model.parameters()]


def dlrun_steps(cfg) -> list[torch.Tensor]:
    model = make_model()
    opt, decay = build_optimizer(cfg, model, torch.device("cpu"))

    def step():
        if decay is not None:
            decay.apply(opt.param_groups[0]["lr"])
        opt.step()

    return run_steps(model, step)


def torch_steps(make_opt) -> list[torch.Tensor]:
    model = make_model()
    groups = param_groups(list(model.parameters()), 0.1)
    opt = make_opt([{"params": g["params"], "weight_decay": g["wd"]} for g in groups])
    return run_steps(model, opt.step)


def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(a, b))


# The references use torch's fused kernels, as dlrun does on the CPU: the first Linear's bias
# sits before a BatchNorm, so its gradient is rounding noise around zero, which Adam scales up
# to whole steps; the for-loop and fused kernels round that noise differently.
FUSED = {"fused": True}


def test_decoupled_adam_matches_adamw_step_for_step():
    for name in ("adam", "adamw"):
        ours = dlrun_steps(config(name, "decoupled"))
        ref = torch_steps(lambda g: torch.optim.AdamW(g, lr=0.01, betas=(0.9, 0.99), eps=1e-8, **FUSED))
        assert close(ours, ref)


def test_l2_adam_matches_adam_with_weight_decay():
    ours = dlrun_steps(config("adam", "l2"))
    ref = torch_steps(lambda g: torch.optim.Adam(g, lr=0.01, betas=(0.9, 0.99), eps=1e-8, **FUSED))
    assert close(ours, ref)


def test_the_two_modes_differ_for_adam():
    assert not close(dlrun_steps(config("adam", "l2")), dlrun_steps(config("adam", "decoupled")))


def test_sgd_without_momentum_the_two_modes_are_the_same():
    # p -= lr*(g + wd*p) and p -= lr*wd*p; p -= lr*g are the same update.
    l2 = dlrun_steps(config("sgd", "l2", momentum=0.0))
    decoupled = dlrun_steps(config("sgd", "decoupled", momentum=0.0))
    assert close(l2, decoupled)


def test_sgd_with_momentum_l2_is_torch_weight_decay_and_decoupled_differs():
    l2 = dlrun_steps(config("sgd", "l2"))
    ref = torch_steps(lambda g: torch.optim.SGD(g, lr=0.01, momentum=0.9))
    assert close(l2, ref)
    # Decoupled: the decay is not fed into the momentum buffer, so it is not amplified by it.
    assert not close(l2, dlrun_steps(config("sgd", "decoupled")))


@pytest.mark.parametrize("mode", ["l2", "decoupled"])
def test_biases_and_norm_parameters_are_not_decayed(mode):
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    opt, decay = build_optimizer(
        config("sgd", mode, wd=0.5, lr=0.1, momentum=0.0), model, torch.device("cpu")
    )
    for p in model.parameters():  # zero gradient: only weight decay moves parameters
        p.grad = torch.zeros_like(p)
    if decay is not None:
        decay.apply(0.1)
    opt.step()
    after = model.state_dict()
    for name, p in after.items():
        if "running" in name or "num_batches" in name:
            continue
        if p.ndim > 1:
            assert torch.allclose(p, before[name] * (1 - 0.1 * 0.5)), name
        else:
            assert torch.equal(p, before[name]), name


# --- layer groups and discriminative rates (optimizer.lr_mult) -----------------------


def tabular_config(lr_mult: float, wd_mode: str = "decoupled"):
    cfg = config("adamw", wd_mode, wd=0.5, lr=0.1)
    cfg.optimizer.lr_mult = lr_mult
    cfg.model = {"name": "tabular"}
    return cfg


def tabular_net():
    from dlrun.models.tabular import TabularNet

    torch.manual_seed(0)
    return TabularNet(
        n_levels=[4, 5], emb_szs=[3, 3], n_cont=2, layers=[8], dropout=[0.0], emb_dropout=0.0, n_out=2
    )


def test_layer_groups_cover_every_parameter_once_head_last():
    from dlrun.family import layer_groups

    model = tabular_net()
    groups = layer_groups(tabular_config(0.01), model)
    assert len(groups) == 3
    flat = [id(p) for g in groups for p in g]
    assert sorted(flat) == sorted(id(p) for p in model.parameters())
    assert [id(p) for p in groups[-1]] == [id(p) for p in model.head.parameters()]
    assert id(model.embeds.weight) in {id(p) for p in groups[0]}


@pytest.mark.parametrize("wd_mode", ["l2", "decoupled"])
def test_lr_mult_spreads_rates_geometrically_from_first_group_to_head(wd_mode):
    from dlrun.optim import set_hyper

    model = tabular_net()
    opt, decay = build_optimizer(tabular_config(0.01, wd_mode), model, torch.device("cpu"))
    set_hyper(opt, 0.1, None)
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rate[id(model.embeds.weight)] == pytest.approx(0.1 * 0.01)
    assert rate[id(model.layers[0].weight)] == pytest.approx(0.1 * 0.1)  # 0.01 ** (1/2)
    assert rate[id(model.head.weight)] == pytest.approx(0.1)
    if decay is not None:  # each group's weights decay at its own rate
        head, emb = model.head.weight.detach().clone(), model.embeds.weight.detach().clone()
        decay.apply(0.1)
        assert torch.allclose(model.head.weight, head * (1 - 0.1 * 0.5))
        assert torch.allclose(model.embeds.weight, emb * (1 - 0.001 * 0.5))


def test_frozen_parameters_are_not_decayed():
    model = tabular_net()
    opt, decay = build_optimizer(tabular_config(0.01), model, torch.device("cpu"))
    model.embeds.weight.requires_grad_(False)
    decay.refresh()
    before = model.embeds.weight.detach().clone()
    decay.apply(0.1)
    assert torch.equal(model.embeds.weight, before)


@pytest.mark.parametrize(
    ("name", "wd_mode", "momentum"),
    [("adam", "l2", 0.9), ("adamw", "decoupled", 0.9), ("sgd", "l2", 0.9), ("sgd", "l2", 0.0)],
)
def test_the_fused_step_moves_every_tensor_exactly_as_the_optimizers_own_step(name, wd_mode, momentum):
    """FusedStep calls torch's fused kernel itself: bit for bit torch.optim's step, through
    scheduled hyperparameters, freezing, unfreezing and a state loaded mid-run."""
    from dlrun.optim import FusedStep, set_hyper

    cfg = config(name, wd_mode, momentum=momentum)
    models = [make_model(), make_model()]
    built = [build_optimizer(cfg, m, torch.device("cpu")) for m in models]
    (ours, decay_a), (theirs, decay_b) = built
    assert all(g["fused"] for g in ours.param_groups)
    assert FusedStep.usable(ours)
    fused = FusedStep(ours)
    own_steps = []
    step = ours.step
    ours.step = lambda: (own_steps.append(i), step())[1]  # count the optimizer's own steps
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 1, generator=g)
    for i in range(12):
        if i in (3, 6):  # freeze the first layer, then unfreeze it
            for model, decay in ((m, d) for m, (_, d) in zip(models, built)):
                model[0].weight.requires_grad_(i == 6)
                if decay is not None:
                    decay.refresh()
        if i == 9:  # resume: the state is replaced by a loaded one
            ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
        lr, beta = 0.01 * (1 + i) / 12, 0.95 - 0.01 * i
        for model, (opt, decay), take in ((models[0], built[0], fused.step), (models[1], built[1], None)):
            nn.functional.mse_loss(model(x), y).backward()
            set_hyper(opt, lr, beta if momentum else None)
            if decay is not None:
                decay.apply(lr)
            (take or opt.step)()
            fused.zero_grad() if take else opt.zero_grad(set_to_none=True)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    for sa, sb in zip(ours.state.values(), theirs.state.values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # torch's own step ran where the tensor lists had to be taken: the first step, after
    # freezing, after unfreezing and after loading; every other step was the fused kernel's.
    assert own_steps == [0, 3, 6, 9]


def test_the_fused_steps_counts_share_one_tensor_and_are_released_to_other_steppers():
    """Adam's step counts become views into one tensor (one add_ counts a step for all), yet each
    parameter keeps a count of its own; after `release` the optimizer's own step (what the
    compiled step calls) counts each tensor once, and FusedStep takes over again exactly."""
    from dlrun.optim import FusedStep

    models = [make_model(), make_model()]
    built = [build_optimizer(config("adamw", "decoupled"), m, torch.device("cpu")) for m in models]
    (ours, decay), (theirs, decay_b) = built
    fused = FusedStep(ours, decay)
    x, y = torch.randn(16, 5), torch.randn(16, 1)

    def storages() -> set[int]:
        return {s["step"].untyped_storage().data_ptr() for s in ours.state.values()}

    for i in range(9):
        for model, opt, d, mine in ((models[0], ours, decay, True), (models[1], theirs, decay_b, False)):
            nn.functional.mse_loss(model(x), y).backward()
            if mine and not 3 <= i < 6:
                fused.step(0.01)
            else:
                d.apply(0.01)
                opt.step()
            opt.zero_grad(set_to_none=True)
        if i == 2:
            assert len(storages()) == 1  # one tensor of counts, a view of it per parameter:
            assert len({id(s["step"]) for s in ours.state.values()}) == len(ours.state)
            fused.release()
            assert len(storages()) == len(ours.state)
    for sa, sb in zip(ours.state.values(), theirs.state.values()):
        assert torch.equal(sa["step"], sb["step"]) and float(sa["step"]) == 9
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)  # the decay folded in: equal up to rounding
    assert len(storages()) == 1


def test_optimizers_are_fused_on_the_cpu_and_the_fused_step_steps_aside_for_what_it_does_not_do():
    from dlrun.optim import FusedStep

    model = make_model()
    opt, _ = build_optimizer(config("adamw", "decoupled"), model, torch.device("cpu"))
    assert all(g["fused"] for g in opt.param_groups)
    assert not FusedStep.usable(torch.optim.Adam(model.parameters(), amsgrad=True, fused=True))
    assert not FusedStep.usable(torch.optim.Adam(model.parameters(), foreach=True))
    assert not FusedStep.usable(torch.optim.RMSprop(model.parameters()))
    opt.register_step_pre_hook(lambda *a: None)
    assert not FusedStep.usable(opt)  # a hook only torch.optim's step would call


def test_the_fused_step_leaves_parameters_of_several_dtypes_to_the_optimizer():
    from dlrun.optim import FusedStep

    model = make_model()
    model[3].double()  # one layer in float64: torch.optim sorts the tensors into two kernel calls
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    fused, calls = FusedStep(opt), []
    step = opt.step
    opt.step = lambda: (calls.append(1), step())[1]
    x = torch.randn(16, 5)
    for _ in range(3):
        model[3](model[:3](x).double()).sum().backward()
        fused.step()
        opt.zero_grad(set_to_none=True)
    assert fused.mixed and len(calls) == 3


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_fused_step_applies_the_decoupled_decay_as_decoupled_decay_does(name):
    """With the decay handed to it, FusedStep folds Adam's decoupled decay into torch's fused
    AdamW kernel (SGD's it applies first): the same parameters, up to rounding, through a
    frozen phase."""
    from dlrun.optim import FusedStep, set_hyper

    own_steps = []

    def train(wd: float, fold: bool) -> list[torch.Tensor]:
        # No BatchNorm: a bias before one has a gradient of pure rounding noise, which Adam
        # scales up to whole steps, so the comparison would be of noise.
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
        opt, decay = build_optimizer(config(name, "decoupled", wd=wd), model, torch.device("cpu"))
        fused = FusedStep(opt, decay)
        step = opt.step
        opt.step = lambda: (own_steps.append(fold), step())[1]
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 1, generator=g)
        for i in range(10):
            if i in (3, 6):  # freeze the first layer, then unfreeze it
                model[0].weight.requires_grad_(i == 6)
                if decay is not None:
                    decay.refresh()
            lr = 0.02 * (1 + i) / 10
            nn.functional.mse_loss(model(x), y).backward()
            set_hyper(opt, lr, None)
            if fold:
                fused.step(lr)
            else:
                if decay is not None:
                    decay.apply(lr)
                opt.step()
            opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()]

    folded = train(0.3, fold=True)
    assert own_steps.count(True) == 3  # the first step, after freezing, after unfreezing
    assert close(folded, train(0.3, fold=False))
    assert not close(folded, train(0.0, fold=True))  # the decay did act
