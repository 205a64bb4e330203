"""Polarized self-attention (Liu et al. 2021): 2C^2 + 3C parameters, both gates in (0, 1), both layouts."""

from __future__ import annotations

import pytest
import torch

from module_checks import count_params
from plugin_helpers import assert_rank_one, away_from_zero, seeded, single_thread  # noqa: F401
from visattn.nn.plugins.polarized import PolarizedSelfAttention, SequentialPolarizedSelfAttention


@pytest.mark.parametrize("channels", [16, 64, 512])
def test_param_count(channels):
    c = channels
    # channel branch: W_q C->1, W_v C->C/2, W_z C/2->C, LayerNorm(C); spatial: W_q', W_v' C->C/2.
    expected = c + c * c // 2 + c // 2 * c + 2 * c + 2 * (c * c // 2)
    assert expected == 2 * c * c + 3 * c
    assert count_params(PolarizedSelfAttention(c)) == count_params(SequentialPolarizedSelfAttention(c)) == expected


def test_channel_gate_is_per_channel_in_0_1_and_ignores_pixel_order():
    m = seeded(PolarizedSelfAttention(16)).double()
    x = away_from_zero(2, 16, 5, 7)
    g = m.channel_gate(x)
    assert g.shape == (2, 16, 1, 1) and (g > 0).all() and (g < 1).all()
    perm = torch.randperm(35, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(m.channel_gate(x.flatten(2)[..., perm].view_as(x)), g)


def test_spatial_gate_is_per_position_in_0_1_and_follows_pixel_order():
    m = seeded(PolarizedSelfAttention(16)).double()
    x = away_from_zero(2, 16, 5, 7)
    s = m.spatial_gate(x)
    assert s.shape == (2, 1, 5, 7) and (s > 0).all() and (s < 1).all()
    perm = torch.randperm(35, generator=torch.Generator().manual_seed(3))
    s_perm = m.spatial_gate(x.flatten(2)[..., perm].view_as(x))
    torch.testing.assert_close(s_perm, s.flatten(2)[..., perm].view_as(s))


def test_parallel_layout_adds_the_two_gates():
    m = seeded(PolarizedSelfAttention(16, mode="parallel")).double()
    x = away_from_zero(2, 16, 5, 7)
    ratio = m(x) / x
    torch.testing.assert_close(ratio, m.channel_gate(x) + m.spatial_gate(x))
    assert (ratio > 0).all() and (ratio < 2).all()


def test_sequential_layout_multiplies_channel_then_spatial_gate():
    m = seeded(PolarizedSelfAttention(16, mode="sequential")).double()
    x = away_from_zero(2, 16, 5, 7)
    ratio = m(x) / x
    assert (ratio > 0).all() and (ratio < 1).all()
    assert_rank_one(ratio.flatten(2))  # [B, C, HW] = channel gate (x) spatial gate
    z = x * m.channel_gate(x)
    torch.testing.assert_close(ratio, m.channel_gate(x) * m.spatial_gate(z))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"PolarizedSelfAttention: channels=15 must be divisible by 2"):
        PolarizedSelfAttention(15)
    with pytest.raises(ValueError, match="mode='serial' is not one of"):
        PolarizedSelfAttention(16, mode="serial")
