"""Split attention (ResNeSt, Zhang et al. 2020): the radix/cardinality closed form and a softmax over splits."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params
from plugin_helpers import away_from_zero, seeded, single_thread  # noqa: F401
from visattn.nn.plugins.split_attn import SplitAttention

CONFIGS = [(64, 2, 1), (64, 2, 2), (32, 1, 1), (128, 4, 2), (96, 2, 4)]


@pytest.mark.parametrize("channels, radix, cardinality", CONFIGS)
def test_param_count(channels, radix, cardinality):
    c, r, k = channels, radix, cardinality
    h = max(c * r // 4, 32)
    h += (-h) % k
    m = SplitAttention(c, radix=r, cardinality=k)
    assert m.hidden == h
    expected = (c * c * 9 // k + 2 * r * c) + (c * h // k + 2 * h) + (r * c * h // k + r * c)
    assert count_params(m) == expected


@pytest.mark.parametrize("channels, radix, cardinality", [(32, 1, 1), (32, 2, 2), (32, 4, 1)])
def test_generic_properties_per_configuration(channels, radix, cardinality):
    torch.manual_seed(0)
    check_all(SplitAttention(channels, radix=radix, cardinality=cardinality), torch.randn(2, channels, 5, 7))


def test_split_weights_are_a_softmax_over_the_radix():
    m = seeded(SplitAttention(24, radix=3, cardinality=2)).double().eval()
    splits = away_from_zero(2, 3, 24, 5, 7)
    a = m.split_weights(splits)
    assert a.shape == (2, 3, 24) and (a > 0).all()
    torch.testing.assert_close(a.sum(dim=1), torch.ones(2, 24, dtype=torch.float64))


def test_radix_one_uses_a_sigmoid_gate():
    m = seeded(SplitAttention(16, radix=1)).double().eval()
    a = m.split_weights(away_from_zero(2, 1, 16, 5, 7))
    assert (a > 0).all() and (a < 1).all() and not torch.allclose(a.sum(dim=1), torch.ones(2, 16, dtype=torch.float64))


def test_output_is_a_convex_combination_of_the_splits():
    m = seeded(SplitAttention(16, radix=2, cardinality=2)).double().eval()
    x = away_from_zero(2, 16, 5, 7)
    splits = m.conv(x).view(2, 2, 16, 5, 7)
    y = m(x)
    assert (y >= splits.amin(dim=1) - 1e-12).all() and (y <= splits.amax(dim=1) + 1e-12).all()


def test_channels_must_split_into_cardinality_times_radix_groups():
    rule = r"SplitAttention: channels=30 must be divisible by cardinality \* radix \(2 \* 2\)=4"
    with pytest.raises(ValueError, match=rule):
        SplitAttention(30, radix=2, cardinality=2)


def test_cardinal_groups_do_not_interact():
    """With K=2, R=2, C=16 the conv groups are 4 input channels each; cardinal group 0 reads input
    channels 0-3 (split 0) and 8-11 (split 1) and owns output channels 0-7. Changing those inputs must
    leave output channels 8-15 (cardinal group 1, including its attention weights) untouched."""
    m = seeded(SplitAttention(16, radix=2, cardinality=2)).double().eval()
    x = away_from_zero(1, 16, 5, 7)
    x2 = x.clone()
    x2[:, 0:4] *= -3.0
    x2[:, 8:12] += 2.0
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y2[:, 8:], y[:, 8:])
    assert not torch.allclose(y2[:, :8], y[:, :8])
