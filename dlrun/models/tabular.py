"""The tabular entity-embedding net (Guo & Berkhahn 2016, as taught in the fast.ai course).

Each categorical column gets its own embedding (all held in one `ColumnEmbeddings` table, so
a batch takes one lookup); the embeddings (after dropout) and the batch-normalised continuous
columns are concatenated and fed through Linear-ReLU-BatchNorm-Dropout blocks to a linear
head. A regression head can be squashed into `model.y_range`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dlrun.data.tabular import TableFacts
from dlrun.errors import DlrunError
from dlrun.family import dropout
from dlrun.mixup import blend
from dlrun.models.dropout import Dropout
from dlrun.rules import PROB, Float, Int

RULES = {
    "model.layers": Int(1, each=True),
    "model.y_range": Float(each=True, nullable=True),
    "model.emb_szs": Int(1, keyed=True, nullable=True),  # +model.emb_szs.<column>=10
    "regularization.emb_dropout": PROB,
}


def emb_size(n_levels: int) -> int:
    """Embedding width for a column with `n_levels` levels (the unknown index included):
    fastai's rule of thumb, min(600, round(1.6 * n_levels**0.56))."""
    return min(600, round(1.6 * n_levels**0.56))


class ColumnEmbeddings(nn.Module):
    """One embedding per categorical column, stored as one table so that a batch takes one
    lookup instead of one per column (on the CPU at batch 64, 13 lookups and their backward
    cost more than the rest of the net).

    Column i owns rows offsets[i] .. offsets[i] + n_levels[i] of `weight`, a table as wide as
    the widest column; a narrower column uses its first emb_szs[i] entries and the rest of its
    rows stay zero (they are never read, so they get no gradient, and weight decay keeps a zero
    at zero). One lookup gives [batch, columns, max width]; one `index_select` keeps each
    column's own width, in column order, which is the concatenation the net feeds on.
    Measured against one table per distinct width and against a flat table indexed per entry
    (README "Speed"), this is the fastest layout: two kernels forward, two backward.

    A state dict of the earlier layout (one `embeds.N.weight` per column) still loads: the
    per-column tables are copied into place (`upgrade_state_dict`)."""

    def __init__(self, n_levels: list[int], emb_szs: list[int]):
        super().__init__()
        self.n_levels, self.widths = list(n_levels), list(emb_szs)
        width = max(emb_szs, default=0)
        self.weight = nn.Parameter(torch.zeros(sum(n_levels), width))
        starts = [0]
        for n in n_levels[:-1]:
            starts.append(starts[-1] + n)
        self.starts = starts
        keep = [i * width + j for i, w in enumerate(emb_szs) for j in range(w)]
        # Derived from the sizes, so not saved: the state dict holds the weights only.
        self.register_buffer("offsets", torch.tensor(starts, dtype=torch.long), persistent=False)
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.long), persistent=False)
        with torch.no_grad():
            for table in self.tables():
                # fastai's init: small vectors, so that a fresh embedding does not swamp the
                # standardised continuous inputs.
                nn.init.trunc_normal_(table, std=0.01)

    def __len__(self) -> int:
        return len(self.widths)

    def tables(self) -> list[torch.Tensor]:
        """Column i's embedding matrix [n_levels[i], emb_szs[i]] (a view into `weight`)."""
        return [self.weight[s : s + n, :w] for s, n, w in zip(self.starts, self.n_levels, self.widths)]

    def forward(self, cat: torch.Tensor) -> torch.Tensor:
        """Category codes [batch, columns] -> the columns' embeddings side by side [batch, sum(widths)]."""
        # index_select, not nn.functional.embedding: the same rows, and a backward (index_add)
        # about a quarter cheaper than embedding's on the CPU.
        rows = self.weight.index_select(0, (cat + self.offsets).view(-1))
        return rows.view(cat.shape[0], -1).index_select(1, self.keep)

    def upgrade_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Turn the per-column layout (`{prefix}N.weight`) of runs saved before the one table
        into `{prefix}weight`, in place; a state dict in the new layout is left as it is."""
        old = [f"{prefix}{i}.weight" for i in range(len(self))]
        if f"{prefix}weight" in state or not old or old[0] not in state:
            return
        weight = torch.zeros_like(self.weight)
        for key, s, n, w in zip(old, self.starts, self.n_levels, self.widths):
            table = state.pop(key, None)
            if table is None or tuple(table.shape) != (n, w):
                return  # not this net's columns: load_state_dict names the mismatch
            weight[s : s + n, :w] = table
        state[f"{prefix}weight"] = weight

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        self.upgrade_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TabularNet(nn.Module):
    """Embeddings + continuous inputs -> [Linear, ReLU, BatchNorm, Dropout] * len(layers) -> Linear."""

    def __init__(
        self,
        n_levels: list[int],
        emb_szs: list[int],
        n_cont: int,
        layers: list[int],
        dropout: list[float],
        emb_dropout: float,
        n_out: int,
        y_range: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.embeds = ColumnEmbeddings(n_levels, emb_szs)
        self.emb_drop = Dropout(emb_dropout)
        self.bn_cont = nn.BatchNorm1d(n_cont) if n_cont else None
        blocks: list[nn.Module] = []
        n_in = sum(emb_szs) + n_cont
        for width, p in zip(layers, dropout):
            blocks += [nn.Linear(n_in, width), nn.ReLU(inplace=True), nn.BatchNorm1d(width), Dropout(p)]
            n_in = width
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(n_in, n_out)
        self.y_range = y_range

    def forward(
        self, x: tuple[torch.Tensor, torch.Tensor], mix: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """`mix=(perm, lam)` (mixup, `dlrun.mixup`): category codes cannot be blended, so each
        row's embeddings and continuous inputs are, with those of row `perm[i]`."""
        cat, cont = x
        parts = []
        if len(self.embeds):
            emb = self.embeds(cat)
            parts.append(self.emb_drop(emb if mix is None else blend(emb, *mix)))
        if self.bn_cont is not None:
            parts.append(self.bn_cont(cont if mix is None else blend(cont, *mix)))
        out = self.head(self.layers(torch.cat(parts, 1)))
        if self.y_range is not None:
            lo, hi = self.y_range
            out = lo + (hi - lo) * torch.sigmoid(out)
        return out

    def upgrade_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of `state` with an earlier run's per-column embeddings in today's layout
        (`model.init_from` matches tensors by name, so it converts first)."""
        state = dict(state)
        self.embeds.upgrade_state_dict(state, "embeds.")
        return state


def embedding_sizes(facts: TableFacts, overrides: dict[str, int]) -> list[int]:
    """One width per categorical column: the rule, or `model.emb_szs.<column>`."""
    unknown = sorted(set(overrides) - set(facts.cat_names))
    if unknown:
        raise DlrunError(
            f"model.emb_szs names {', '.join(unknown)}, which are not categorical columns; "
            f"the categorical columns are: {', '.join(facts.cat_names) or '(none)'}"
        )
    return [int(overrides.get(name, emb_size(n))) for name, n in zip(facts.cat_names, facts.n_levels)]


def layer_groups(model: TabularNet) -> list[list[nn.Module]]:
    """Embeddings (and the continuous inputs' batch norm), the hidden layers, the head."""
    inputs = [model.embeds] + ([model.bn_cont] if model.bn_cont is not None else [])
    return [inputs, [model.layers], [model.head]]


def build(cfg: Any, facts: TableFacts) -> nn.Module:
    """The tabular net for the table's columns and outputs."""
    m, reg = cfg.model, cfg.regularization
    layers = [int(w) for w in m.layers]
    y_range = None
    if m.get("y_range") is not None:
        if facts.task != "regression":
            raise DlrunError("model.y_range applies to regression only: set model.y_range=null")
        bounds = list(m.y_range) if isinstance(m.y_range, Sequence) else [m.y_range]
        y_range = tuple(float(v) for v in bounds)
        if len(y_range) != 2 or not y_range[0] < y_range[1]:
            given = f"[{','.join(str(v) for v in bounds)}]" if isinstance(m.y_range, Sequence) else m.y_range
            raise DlrunError(
                f"model.y_range={given} must be two numbers, the lowest and the highest target "
                "with low < high: for example model.y_range=[0,5]"
            )
    overrides = {str(k): int(v) for k, v in (m.get("emb_szs") or {}).items()}
    net = TabularNet(
        n_levels=facts.n_levels,
        emb_szs=embedding_sizes(facts, overrides),
        n_cont=len(facts.cont_names),
        layers=layers,
        dropout=dropout(reg, "tabular", layers=len(layers)),
        emb_dropout=float(reg.get("emb_dropout", 0.0)),
        n_out=facts.n_out,
        y_range=y_range,
    )
    if facts.y_mean is not None and y_range is None:
        # Start a regression head at the training mean: a log-sales target sits near 8, and
        # climbing there from 0 would take the first epochs.
        with torch.no_grad():
            net.head.bias.fill_(facts.y_mean)
    return net
