"""Fine-tuning in two phases, as fastai's `fine_tune`: with `finetune.freeze_epochs=N` the body
is frozen and only the head (and, with `finetune.train_bn`, the normalisation layers) trains for
N epochs with its own one-cycle; then everything is unfrozen and trains `trainer.epochs` more
with a second cycle, its head rate `lr / finetune.lr_div` (fastai halves it) spread over the
layer groups by `optimizer.lr_mult`. With `optimizer.lr=find` the finder runs for each phase.

The layer groups are the model family's (`dlrun.family.layer_groups`): all but the last are
frozen. Which phase an epoch belongs to follows from its number, so a resumed run needs no
more than the epoch it stopped in.
"""

from __future__ import annotations

from typing import Any

from dlrun.errors import DlrunError


def freeze_epochs(cfg: Any) -> int:
    """Epochs of the frozen phase (0: no fine-tuning phases)."""
    return int(cfg.get("finetune", {}).get("freeze_epochs", 0) or 0)


def total_epochs(cfg: Any) -> int:
    """All epochs of the run: the frozen phase, then `trainer.epochs`."""
    return freeze_epochs(cfg) + int(cfg.trainer.epochs)


def freeze(cfg: Any, model: Any) -> int:
    """Stop the gradients of every layer group but the head (normalisation layers go on training
    with `finetune.train_bn`, fastai's default); returns how many tensors were frozen."""
    import torch

    from dlrun.family import layer_groups

    groups = layer_groups(cfg, model)
    if len(groups) < 2:
        raise DlrunError(
            f"finetune.freeze_epochs={freeze_epochs(cfg)} freezes the body of a model, but model="
            f"{cfg.model.name} is one layer group: set finetune.freeze_epochs=0"
        )
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
    keep: set[int] = set()
    if cfg.finetune.get("train_bn", True):
        keep = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    frozen = 0
    for group in groups[:-1]:
        for p in group:
            if id(p) not in keep:
                p.requires_grad_(False)
                frozen += 1
    return frozen


def unfreeze(model: Any) -> None:
    """Let every parameter train again."""
    for p in model.parameters():
        p.requires_grad_(True)


def phased(first: Any, second: Any, boundary: int) -> Any:
    """One schedule of optimizer steps from two: `first` until step `boundary`, then `second`
    counted from 0 again (each phase has its own cycle)."""
    return lambda step: first(step) if step < boundary else second(step - boundary)
