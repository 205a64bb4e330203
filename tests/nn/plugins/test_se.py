"""SE (Hu et al. 2018): closed-form size and the per-channel gating the paper defines."""

from __future__ import annotations

import pytest
import torch

from module_checks import count_params
from plugin_helpers import away_from_zero, seeded, single_thread  # noqa: F401
from visattn import create_attn
from visattn.nn.plugins.se import SqueezeExcite


@pytest.mark.parametrize("channels, reduction", [(64, 16), (256, 16), (32, 4), (48, 16)])
def test_param_count_is_two_fc_layers_with_biases(channels, reduction):
    h = channels // reduction
    assert count_params(SqueezeExcite(channels, reduction)) == 2 * channels * h + h + channels


def test_hidden_width_rounds_down_but_never_to_zero():
    m = SqueezeExcite(8, reduction=16)
    assert m.fc1.out_features == 1 and count_params(m) == 2 * 8 + 1 + 8


def test_output_is_x_scaled_per_channel_by_a_gate_in_0_1():
    m = seeded(create_attn("se", 16)).double()
    x = away_from_zero(2, 16, 5, 7)
    ratio = m(x) / x
    # One factor per (sample, channel), the same at every position, strictly inside (0, 1).
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio))
    assert (ratio > 0).all() and (ratio < 1).all()
    torch.testing.assert_close(ratio[:, :, 0, 0], m.gate(x))


def test_gate_sees_only_channel_means():
    """Squeeze = global average pooling: rearranging pixels changes nothing but the arrangement."""
    m = seeded(create_attn("se", 16)).double()
    x = away_from_zero(2, 16, 5, 7)
    perm = torch.randperm(35, generator=torch.Generator().manual_seed(1))
    x_perm = x.flatten(2)[..., perm].view_as(x)
    torch.testing.assert_close(m(x_perm), m(x).flatten(2)[..., perm].view_as(x))


def test_bad_reduction_is_refused():
    with pytest.raises(ValueError, match="SqueezeExcite: reduction=0"):
        SqueezeExcite(16, reduction=0)
