"""Triplet attention (Misra et al. 2021): 300 parameters at k=7 whatever C, three rotated gates averaged."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params
from plugin_helpers import away_from_zero, seeded, single_thread  # noqa: F401
from visattn.nn.plugins.triplet import TripletAttention


@pytest.mark.parametrize("channels", [16, 64, 2048])
def test_param_count_is_three_2_to_1_convs_plus_bn_independent_of_channels(channels):
    # The paper: +4.8K parameters on ResNet-50 = 16 blocks x 300.
    assert count_params(TripletAttention(channels)) == 3 * (2 * 7 * 7 + 2) == 300
    assert 16 * count_params(TripletAttention(channels)) == 4800


def test_kernel_size_and_no_spatial_variant():
    assert count_params(TripletAttention(16, kernel_size=5)) == 3 * (2 * 25 + 2)
    assert count_params(TripletAttention(16, no_spatial=True)) == 2 * (2 * 49 + 2)
    torch.manual_seed(0)
    check_all(TripletAttention(16, no_spatial=True), torch.randn(2, 16, 5, 9))


def test_output_is_x_times_the_mean_of_three_gates():
    m = seeded(TripletAttention(8)).double().eval()
    x = away_from_zero(2, 8, 5, 7)
    ratio = m(x) / x
    assert (ratio > 0).all() and (ratio < 1).all()


def _rotate_and_gate(gate, xr: torch.Tensor) -> torch.Tensor:
    """The paper's formulation of one branch on an already rotated tensor: Z-pool over dim 1, gate, multiply."""
    return xr * gate(xr.amax(dim=1), xr.mean(dim=1))[:, None]


@pytest.mark.parametrize("no_spatial", [False, True])
def test_equals_the_rotate_pool_gate_rotate_back_formulation(no_spatial):
    m = seeded(TripletAttention(8, no_spatial=no_spatial)).double().eval()
    x = away_from_zero(2, 8, 5, 7)
    branches = [
        _rotate_and_gate(m.cw, x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3),   # [B, H, C, W]: pool H
        _rotate_and_gate(m.hc, x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1),   # [B, W, H, C]: pool W
    ]
    if not no_spatial:
        branches.append(_rotate_and_gate(m.hw, x))                            # pool C
    torch.testing.assert_close(m(x), sum(branches) / len(branches))


def test_each_gate_ignores_the_order_along_its_pooled_axis():
    """Z-pool (max, mean) is symmetric: the (C, W) gate ignores row order, (H, C) column order, (H, W) channel order."""
    m = seeded(TripletAttention(8)).double().eval()
    x = away_from_zero(2, 8, 5, 7)
    g_cw, g_hc, g_hw = m.gates(x)
    assert g_cw.shape == (2, 8, 1, 7) and g_hc.shape == (2, 8, 5, 1) and g_hw.shape == (2, 1, 5, 7)
    gen = torch.Generator().manual_seed(6)
    torch.testing.assert_close(m.gates(x[:, :, torch.randperm(5, generator=gen)])[0], g_cw)
    torch.testing.assert_close(m.gates(x[..., torch.randperm(7, generator=gen)])[1], g_hc)
    torch.testing.assert_close(m.gates(x[:, torch.randperm(8, generator=gen)])[2], g_hw)


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="TripletAttention: kernel_size=6 must be odd"):
        TripletAttention(16, kernel_size=6)
