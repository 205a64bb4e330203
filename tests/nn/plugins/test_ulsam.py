"""ULSAM (Saini et al. 2020): 2C parameters, one softmax map per subspace, F^ = A*F + F."""

from __future__ import annotations

import pytest
import torch

from module_checks import count_params
from plugin_helpers import away_from_zero, seeded, single_thread  # noqa: F401
from visattn.nn.plugins.ulsam import ULSAM, _max_pool_3x3_s1


@pytest.mark.parametrize("channels, g", [(64, 4), (32, 1), (48, 16), (96, 32)])
def test_param_count_is_depthwise_plus_pointwise_per_subspace(channels, g):
    m = channels // g
    # Per subspace: m depthwise 1x1 weights + m pointwise (m -> 1) weights.
    assert count_params(ULSAM(channels, g)) == g * (m + m) == 2 * channels


def test_one_attention_map_per_subspace_summing_to_one():
    mod = seeded(ULSAM(16, num_subspaces=4)).double()
    x = away_from_zero(2, 16, 5, 7)
    a = mod.attention_maps(x)
    assert a.shape == (2, 4, 5, 7) and (a > 0).all()
    torch.testing.assert_close(a.sum(dim=(2, 3)), torch.ones(2, 4, dtype=torch.float64))
    # Output = A_n * F_n + F_n: y / x - 1 is the subspace's map, identical for its 4 channels.
    gain = mod(x) / x - 1
    torch.testing.assert_close(gain, a.repeat_interleave(4, dim=1))


def test_subspaces_do_not_interact():
    mod = seeded(ULSAM(16, num_subspaces=4)).double()
    x = away_from_zero(1, 16, 5, 7)
    x2 = x.clone()
    x2[:, :4] *= -2.0  # change subspace 0 only
    y, y2 = mod(x), mod(x2)
    torch.testing.assert_close(y2[:, 4:], y[:, 4:])
    assert not torch.allclose(y2[:, :4], y[:, :4])


def test_channels_must_split_into_subspaces():
    with pytest.raises(ValueError, match="ULSAM: channels=30 must be divisible by num_subspaces=4"):
        ULSAM(30, num_subspaces=4)


@pytest.mark.parametrize("hw", [(1, 1), (2, 5), (9, 13)])
def test_separable_max_pool_equals_max_pool2d_values_and_gradients(hw):
    x = away_from_zero(2, 3, *hw).requires_grad_(True)
    ref = torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1)
    got = _max_pool_3x3_s1(x)
    assert torch.equal(got, ref)
    w = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1))
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    torch.testing.assert_close(g_got, g_ref)


def test_equals_per_subspace_dw_maxpool_pw_softmax():
    """The paper's equation, subspace by subspace, with real conv layers: A_n = softmax(PW(maxpool(DW(F_n))))."""
    F = torch.nn.functional
    mod = seeded(ULSAM(12, num_subspaces=3)).double()
    x = away_from_zero(2, 12, 5, 7)
    outs = []
    for n, f in enumerate(x.split(4, dim=1)):
        dw = F.conv2d(f, mod.dw_weight[4 * n: 4 * n + 4].view(4, 1, 1, 1), groups=4)
        logits = F.conv2d(F.max_pool2d(dw, 3, stride=1, padding=1), mod.pw_weight[n].view(1, 4, 1, 1))
        a = torch.softmax(logits.flatten(1), dim=-1).view_as(logits)
        outs.append(a * f + f)
    torch.testing.assert_close(mod(x), torch.cat(outs, dim=1))
