"""dlrun's dropout (dlrun.models.dropout): torch's dropout, with a CPU mask from 16 random bits
an element instead of one Bernoulli draw."""

from __future__ import annotations

import math

import pytest
import torch

from dlrun.models.dropout import Dropout, drop, keep_mask


@pytest.mark.parametrize("p", [0.04, 0.1, 0.5, 0.9])
def test_each_element_is_dropped_with_probability_p_and_the_rest_scaled(p):
    torch.manual_seed(0)
    n = 400_000
    mask = keep_mask((n,), p, torch.empty(0))
    kept = mask != 0
    assert torch.equal(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)))
    # Each of the four 16-bit lanes of a 64-bit draw decides every fourth element: a lane
    # that is not uniform (a draw over fewer than 64 bits) would drop at another rate.
    sigma = math.sqrt(p * (1 - p) / (n / 4))
    for lane in range(4):
        rate = 1 - kept[lane::4].float().mean().item()
        assert abs(rate - p) < 5 * sigma, (lane, rate)


def test_masks_are_independent_from_call_to_call_and_repeat_under_the_same_seed():
    torch.manual_seed(3)
    a, b = keep_mask((200_000,), 0.5, torch.empty(0)), keep_mask((200_000,), 0.5, torch.empty(0))
    agree = (a == b).float().mean().item()
    assert abs(agree - 0.5) < 0.01  # two independent halves agree half the time
    torch.manual_seed(3)
    assert torch.equal(keep_mask((200_000,), 0.5, torch.empty(0)), a)


def test_the_module_is_torch_dropout_in_what_it_does():
    torch.manual_seed(0)
    layer = Dropout(0.25)
    x = torch.randn(64, 33, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    scale = 1 / 0.75
    dropped = out == 0
    assert torch.allclose(out[~dropped], x[~dropped] * scale)
    assert torch.allclose(x.grad, (~dropped).float() * scale)  # the gradient goes through the mask
    layer.eval()
    assert layer(x) is x
    assert drop(x, 0.0, True) is x and torch.equal(drop(x, 1.0, True), torch.zeros_like(x))
    half = torch.ones(8, 8, dtype=torch.bfloat16)
    assert drop(half, 0.5, True).dtype == torch.bfloat16  # autocast's dtype is kept
    assert isinstance(layer, torch.nn.Dropout) and layer.state_dict() == {}
