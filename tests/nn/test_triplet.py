"""Triplet attention (Misra et al. 2021): 300 parameters at k=7 whatever C, three rotated gates averaged."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params
from plugin_helpers import away_from_zero, seeded, single_thread  # noqa: F401
from visattn.nn.triplet import TripletAttention


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


def test_each_branch_gates_its_own_plane():
    """The (H, W) branch gate is shared by all channels; the (C, W) one by all rows; the (H, C) one by all columns."""
    m = seeded(TripletAttention(8)).double().eval()
    x = away_from_zero(2, 8, 5, 7)
    g_hw = m.hw(x) / x
    torch.testing.assert_close(g_hw, g_hw[:, :1].expand_as(g_hw))
    xc = x.permute(0, 2, 1, 3)
    g_cw = m.cw(xc) / xc  # [B, H, C, W]: constant along H
    torch.testing.assert_close(g_cw, g_cw[:, :1].expand_as(g_cw))
    xr = x.permute(0, 3, 2, 1)
    g_hc = m.hc(xr) / xr  # [B, W, H, C]: constant along W
    torch.testing.assert_close(g_hc, g_hc[:, :1].expand_as(g_hc))


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="TripletAttention: kernel_size=6 must be odd"):
        TripletAttention(16, kernel_size=6)
