"""Transformer language model: a small GPT (Radford et al. 2019, as nanoGPT writes it).

Token and learned position embeddings -> `n_layers` pre-norm blocks (LayerNorm ->
causal self-attention -> residual; LayerNorm -> 4x MLP with GELU -> residual) ->
final LayerNorm -> linear decoder tied to the token embedding. One dropout
probability, `regularization.dropout`, on the embeddings, the attention weights and
each residual branch. No hidden state is carried between BPTT windows: a window is
all the model sees, and a window longer than its `context` learned positions is read
as consecutive chunks of `context` tokens. For generation, `feed` keeps the last
`context` tokens and reads them again at every step (a sliding window, no key-value cache).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlrun.data.text import TextFacts
from dlrun.errors import DlrunError
from dlrun.family import dropout
from dlrun.models.dropout import Dropout
from dlrun.rules import BOOL, Int

RULES = {
    "model.n_embd": Int(1),
    "model.n_head": Int(1),
    "model.n_layers": Int(1),
    "model.context": Int(1, nullable=True),
    "model.bias": BOOL,
    "model.tie_weights": BOOL,
}


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions <= t only."""

    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # all heads' q, k, v in one product
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # [B, heads, T, head size]
            for z in self.qkv(x).split(c, dim=2)
        )
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    """Position-wise feed-forward layer: n_embd -> 4 n_embd -> GELU -> n_embd."""

    def __init__(self, n_embd: int, bias: bool, dropout: float):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """A pre-norm Transformer block: the residual stream is never normalised, only each branch's input."""

    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float):
        super().__init__()
        self.ln_attn = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias, dropout)
        self.ln_mlp = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, bias, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class TransformerLanguageModel(nn.Module):
    """Embeddings -> `n_layers` blocks -> LayerNorm -> decoder (tied to the token embedding).

    forward(x [B, T] token ids) returns logits [B, T, vocab].
    """

    def __init__(
        self,
        vocab_size: int,
        n_embd: int,
        n_head: int,
        n_layers: int,
        context: int,
        bias: bool,
        tie_weights: bool,
        dropout: float,
    ):
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(context, n_embd)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, bias, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.decoder = nn.Linear(n_embd, vocab_size, bias=bias)
        self.apply(_init_weights)
        for block in self.blocks:
            # GPT-2: each block adds two branches to the residual stream; scaling their last
            # layer keeps the stream's variance from growing with depth at initialisation.
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))
        if tie_weights:
            self.decoder.weight = self.tok_emb.weight  # Press & Wolf 2017: one matrix in and out
        self.buffer: torch.Tensor | None = None  # the tokens `feed` has seen, at most `context`

    def reset_state(self) -> None:
        """Forget the generation buffer (a new text starts); training needs no state."""
        self.buffer = None

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of one window of at most `context` tokens."""
        pos = torch.arange(x.shape[1], device=x.device)
        h = self.drop(self.tok_emb(x) + self.pos_emb(pos))
        for block in self.blocks:
            h = block(h)
        return self.decoder(self.ln_f(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] <= self.context:
            return self._window(x)
        # Longer than the learned positions (a variable-length BPTT window): consecutive
        # chunks, each attending within itself, as if they were separate windows.
        return torch.cat([self._window(chunk) for chunk in x.split(self.context, dim=1)], dim=1)

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [vocab] of the token after `ids` [1, t], reading them after the tokens fed
        since `reset_state()`, of which the last `context` are kept (a sliding window)."""
        seen = ids if self.buffer is None else torch.cat([self.buffer, ids], dim=1)
        self.buffer = seen[:, -self.context :]
        return self._window(self.buffer)[0, -1]


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: normal(0, 0.02) weights, zero biases (LayerNorms keep 1 and 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def layer_groups(model: TransformerLanguageModel) -> list[list[nn.Module]]:
    """The embeddings, the blocks, the final norm and the decoder (a tied decoder weight stays
    with the token embedding)."""
    return [[model.tok_emb, model.pos_emb], [model.blocks], [model.ln_f, model.decoder]]


def build(cfg: Any, facts: TextFacts) -> nn.Module:
    """The Transformer named by `cfg.model`, for the vocabulary, with room for windows of
    about `data.bptt` tokens."""
    m = cfg.model
    if m.n_embd % m.n_head:
        raise DlrunError(
            f"model.n_embd={m.n_embd} is not a multiple of model.n_head={m.n_head}: each head gets "
            f"n_embd / n_head dimensions, so set model.n_embd to a multiple of {m.n_head} "
            f"(e.g. {m.n_head * max(1, round(m.n_embd / m.n_head))}) or change model.n_head"
        )
    # null: as long as the windows it trains on. With fixed windows, positions past bptt would
    # never be trained and generation's sliding window would read them (2 x bptt: validation
    # perplexity 3.9 per window, 25 read as generation reads; bptt: 3.8 and 3.7). Longer
    # variable-length windows are read in chunks.
    context = facts.bptt if m.context is None else m.context
    return TransformerLanguageModel(
        vocab_size=facts.vocab_size,
        n_embd=m.n_embd,
        n_head=m.n_head,
        n_layers=m.n_layers,
        context=context,
        bias=m.bias,
        tie_weights=m.tie_weights,
        dropout=dropout(cfg.regularization, "transformer"),
    )
