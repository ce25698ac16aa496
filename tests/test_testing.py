"""mmzoo.testing: spread weights and parity assertions whose negative controls must fail."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmzoo.testing import assert_parity, deviation, spread_weights_


def test_spread_weights_keeps_constants_as_centres_and_redraws_the_rest():
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    spread_weights_(model, std=0.1, seed=3)
    weight, bias = model[0].weight, model[0].bias
    scale, shift = model[1].weight, model[1].bias
    assert 0.08 < weight.std().item() < 0.12 and abs(weight.mean().item()) < 0.02
    assert 0.07 < scale.std().item() < 0.13 and abs(scale.mean().item() - 1) < 0.04  # ones + noise
    assert abs(shift.mean().item()) < 0.04 and shift.std().item() > 0.07  # zeros + noise
    assert bias.std().item() > 0.07
    again = spread_weights_(nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)), std=0.1, seed=3)
    assert torch.equal(again[0].weight, weight) and torch.equal(again[1].weight, scale)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def test_spread_weights_moves_a_swapped_activation_past_the_tolerance():
    """The reason for spreading: at a small init a wrong activation hides inside the tolerance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(8, 32)

    def outputs():
        with torch.no_grad():
            right = model(x)
            model[1] = QuickGELU()
            wrong = model(x)
            model[1] = nn.GELU()
        return right, wrong

    right, wrong = outputs()
    assert deviation(wrong, right, atol=2e-4, rtol=1e-4) < 1  # invisible at init scale
    spread_weights_(model, std=0.3)
    right, wrong = outputs()
    assert_parity(right, right.clone(), controls={"quick_gelu for gelu": wrong}, atol=2e-4, rtol=1e-4)


def test_assert_parity_fails_on_a_mismatch_and_on_a_control_that_passes():
    expected = torch.linspace(-1, 1, 50)
    far = expected + 0.1
    assert_parity(expected + 1e-7, expected, controls={"off": far}, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="not close"):
        assert_parity(expected + 1e-3, expected, controls={"off": far}, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="negative control 'near'"):
        assert_parity(expected, expected, controls={"near": expected + 5e-5}, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="at least one negative control"):
        assert_parity(expected, expected, controls={}, atol=1e-5, rtol=1e-5)
