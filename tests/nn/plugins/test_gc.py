"""Global context block (Cao et al. 2019): one context for every position, 2C^2/r transform weights."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params
from plugin_helpers import away_from_zero, seeded, single_thread  # noqa: F401
from visattn.nn.plugins.gc import GlobalContextBlock


@pytest.mark.parametrize("channels, reduction", [(64, 16), (256, 16), (256, 4)])
def test_param_count(channels, reduction):
    c, h = channels, channels // reduction
    m = GlobalContextBlock(c, reduction)
    transform_weights = sum(p.numel() for n, p in m.transform.named_parameters() if n in ("0.weight", "3.weight"))
    assert transform_weights == 2 * c * c // reduction  # the paper's count
    # + W_k (C), biases (h + C), LayerNorm (2h).
    assert count_params(m) == 2 * c * h + c + (h + c) + 2 * h


def test_added_context_is_the_same_at_every_position():
    m = seeded(GlobalContextBlock(16, reduction=4)).double()
    x = away_from_zero(2, 16, 5, 7)
    delta = m(x) - x
    torch.testing.assert_close(delta, delta[:, :, :1, :1].expand_as(delta))


def test_mul_fusion_scales_each_channel_by_a_gate_in_0_1():
    m = seeded(GlobalContextBlock(16, reduction=4, fusion="mul")).double()
    x = away_from_zero(2, 16, 5, 7)
    ratio = m(x) / x
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio))
    assert (ratio > 0).all() and (ratio < 1).all()
    torch.manual_seed(0)
    check_all(GlobalContextBlock(16, reduction=4, fusion="mul"), torch.randn(2, 16, 5, 9))


def test_context_is_attention_pooling_and_reduces_to_gap_when_uniform():
    m = seeded(GlobalContextBlock(16, reduction=4)).double()
    x = away_from_zero(2, 16, 5, 7)
    perm = torch.randperm(35, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(m.context(x.flatten(2)[..., perm].view_as(x)), m.context(x))
    with torch.no_grad():
        m.key.weight.zero_()
    torch.testing.assert_close(m.context(x), x.mean(dim=(2, 3), keepdim=True))


def test_bad_fusion_is_refused():
    with pytest.raises(ValueError, match="GlobalContextBlock: fusion='concat' is not one of"):
        GlobalContextBlock(16, fusion="concat")
