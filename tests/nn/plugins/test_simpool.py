"""SimPool (Psomas et al. 2023): a pooling plug-in [B, C, H, W] -> [B, C]; attention over positions, power mean."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_batch_independent, check_eval_deterministic, count_params
from plugin_helpers import away_from_zero, seeded, single_thread  # noqa: F401
from visattn import create_attn
from visattn.nn import attn_info
from visattn.nn.plugins.simpool import SimPool


def test_registered_as_a_pooling_plug_in():
    assert attn_info("simpool")["output"] == "pooled"


@pytest.mark.parametrize("channels", [16, 64, 2048])
def test_param_count(channels):
    # W_q, W_k (C x C, no bias) + LayerNorm (2C).
    assert count_params(SimPool(channels)) == 2 * channels * channels + 2 * channels


@pytest.mark.parametrize("gamma", [2.0, 1.25, None])
@pytest.mark.parametrize("hw", [(9, 13), (1, 5)])
def test_shape_dtype_gradients_determinism_and_batch_independence(gamma, hw):
    torch.manual_seed(0)
    m = SimPool(16, gamma=gamma)
    x = torch.randn(3, 16, *hw, requires_grad=True)
    y = m(x)
    assert y.shape == (3, 16) and y.dtype == x.dtype
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    check_eval_deterministic(m, x.detach())
    check_batch_independent(m, x.detach())


def test_attention_sums_to_one_and_pooling_ignores_pixel_order():
    m = seeded(SimPool(16)).double()
    x = away_from_zero(2, 16, 5, 7)
    a = m.attention(x)
    assert a.shape == (2, 5, 7)
    torch.testing.assert_close(a.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))
    perm = torch.randperm(35, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(m(x.flatten(2)[..., perm].view_as(x)), m(x))


def test_uniform_attention_without_gamma_is_the_mean_of_normalized_features():
    """With W_q = 0 the query is blind, the attention uniform, and SimPool reduces to GAP of LN(X)."""
    m = seeded(SimPool(16, gamma=None)).double()
    with torch.no_grad():
        m.wq.weight.zero_()
    x = away_from_zero(2, 16, 5, 7)
    torch.testing.assert_close(m(x), m.norm(x.flatten(2).transpose(1, 2)).mean(dim=1))


def test_power_mean_lies_between_the_smallest_and_largest_value():
    m = seeded(SimPool(16, gamma=2.0)).double()
    x = away_from_zero(2, 16, 5, 7)
    v = m.norm(x.flatten(2).transpose(1, 2))
    v = v - v.amin(dim=(1, 2), keepdim=True) + m.eps
    y = m(x)
    assert (y >= v.amin(dim=1) - 1e-12).all() and (y <= v.amax(dim=1) + 1e-12).all()


def test_bench_builds_it_like_the_other_plug_ins():
    y = create_attn("simpool", 64).eval()(torch.randn(2, 64, 7, 7))
    assert y.shape == (2, 64)


def test_bad_gamma_is_refused():
    with pytest.raises(ValueError, match="SimPool: gamma=0"):
        SimPool(16, gamma=0)
