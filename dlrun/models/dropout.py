"""Dropout whose mask is cheap to draw on the CPU.

torch's CPU dropout draws one Bernoulli sample per element from its Mersenne Twister, about
7 ns each: on Adult's tabular net at batch 1024 that is more than a fifth of a training step,
and the largest single cost (README "Speed"). Here each element's keep/drop is decided by
16 random bits, four elements to one 64-bit draw from the same generator (`random_` over the
full int64 range), compared with a threshold: a quarter of the draws, then one vectorised
comparison. The drop probability is `p` rounded to a multiple of 1/65536 (0.1 becomes
0.100006), the kept elements are scaled by 1 / (1 - p) as usual, and the draws come from
torch's default CPU generator, so `torch.manual_seed` (dlrun's `seed`) repeats them.

On other devices (CUDA's Philox draws are already cheap) and inside `torch.compile` (which
has its own random-number lowering), the mask is torch's own Bernoulli one.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


def keep_mask(shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """A mask of `shape` in `like`'s dtype and device: 0 where dropped (probability p), else
    1 / (1 - p)."""
    if p >= 1:
        return like.new_zeros(shape)
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), to=None)
    # Each int16 is uniform on [-32768, 32767], so below the threshold with probability p. The
    # comparison writes 1.0/0.0 straight into a mask of the model's dtype: a bool mask and its
    # conversion take three times as long (12 us more at [64, 200]).
    mask = torch.empty(shape, dtype=like.dtype)
    torch.ge(draws.view(torch.int16)[:n].view(shape), threshold(p), out=mask)
    return mask.mul_(1 / (1 - p))


@functools.cache
def threshold(p: float) -> torch.Tensor:
    """The 16-bit draw at and above which an element is kept, at drop probability p, as a 0-d
    tensor (a Python number is made into one at every comparison, a microsecond each)."""
    return torch.tensor(-32768 + round(p * 65536), dtype=torch.int16)


def drop(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`torch.nn.functional.dropout(x, p, training)`, with `keep_mask`'s mask on the CPU."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training)  # one fused kernel
    return x * keep_mask(tuple(x.shape), p, x)


class Dropout(nn.Dropout):
    """`nn.Dropout` (same arguments, no state) with `keep_mask`'s cheap CPU mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or self.inplace:
            # TorchScript (dlrun export of a Transformer) compiles this branch only.
            return F.dropout(x, self.p, self.training, self.inplace)
        else:
            return drop(x, self.p, self.training)
