"""CBAM (Woo et al. 2018): MLP + 7x7 conv parameters, channel gate then a local, channel-symmetric spatial gate."""

from __future__ import annotations

import pytest
import torch

from module_checks import count_params
from plugin_helpers import away_from_zero, seeded, single_thread  # noqa: F401
from visattn.nn.plugins.cbam import CBAM


@pytest.mark.parametrize("channels, reduction", [(64, 16), (256, 16), (32, 8)])
def test_param_count_is_shared_mlp_plus_a_2_to_1_7x7_conv(channels, reduction):
    h = channels // reduction
    assert count_params(CBAM(channels, reduction)) == (2 * channels * h + h + channels) + 2 * 7 * 7


def test_output_is_channel_gate_times_spatial_gate():
    """y / x factorizes into M_c[c] * M_s[h, w], both in (0, 1): channel attention, then spatial."""
    m = seeded(CBAM(16, reduction=4)).double()
    x = away_from_zero(2, 16, 5, 7)
    ratio = m(x) / x
    mc = m.channel_gate(x)
    ms = m.spatial_gate(x * mc[:, :, None, None])
    torch.testing.assert_close(ratio, mc[:, :, None, None] * ms)
    assert (mc > 0).all() and (mc < 1).all() and (ms > 0).all() and (ms < 1).all()


def test_spatial_gate_ignores_channel_order():
    """The spatial gate pools over channels with mean and max, both symmetric in the channels."""
    m = seeded(CBAM(16, reduction=4)).double()
    x = away_from_zero(2, 16, 5, 7)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(m.spatial_gate(x[:, perm]), m.spatial_gate(x))


def test_spatial_gate_receptive_field_is_7x7():
    m = seeded(CBAM(8, reduction=2)).double()
    x = away_from_zero(1, 8, 15, 15).requires_grad_(True)
    m.spatial_gate(x)[0, 0, 7, 7].backward()
    touched = (x.grad.abs().sum(dim=(0, 1)) > 0)
    expected = torch.zeros(15, 15, dtype=torch.bool)
    expected[4:11, 4:11] = True
    assert torch.equal(touched, expected)


def test_even_spatial_kernel_is_refused():
    with pytest.raises(ValueError, match="CBAM: spatial_kernel=6 must be odd"):
        CBAM(16, spatial_kernel=6)
