"""ECA (Wang et al. 2020): the adaptive kernel-size rule, k parameters, and a *local* channel interaction."""

from __future__ import annotations

import pytest
import torch

from module_checks import count_params
from plugin_helpers import away_from_zero, seeded, single_thread  # noqa: F401
from visattn import create_attn
from visattn.nn.plugins.eca import ECA, eca_kernel_size

# k = |log2(C)/2 + 1/2|_odd, worked by hand: t = 2.5, 3, 3.5, 4 (tie -> 5), 4.5, 5, 5.5, 6 (tie -> 7).
KERNEL_RULE = {16: 3, 32: 3, 64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}


@pytest.mark.parametrize("channels, k", sorted(KERNEL_RULE.items()))
def test_adaptive_kernel_size_and_k_parameters(channels, k):
    assert eca_kernel_size(channels) == k
    m = ECA(channels)
    assert m.kernel_size == k and count_params(m) == k


def test_kernel_rule_hyperparameters():
    # gamma=1, b=1: t = log2(C) + 1 -> C=64: 7; C=128: 8 -> 9.
    assert eca_kernel_size(64, gamma=1, b=1) == 7
    assert eca_kernel_size(128, gamma=1, b=1) == 9


def test_explicit_kernel_size_overrides_the_rule_and_must_be_odd():
    assert count_params(ECA(64, kernel_size=7)) == 7
    with pytest.raises(ValueError, match="ECA: kernel_size=4 must be odd"):
        ECA(64, kernel_size=4)


@pytest.mark.parametrize("k", [3, 5])
def test_interaction_is_local_over_k_neighbouring_channels(k):
    """Changing channel i only changes the gates of channels within k // 2 of i."""
    m = seeded(ECA(32, kernel_size=k)).double()
    x = away_from_zero(1, 32, 4, 5)
    i = 13
    x2 = x.clone()
    x2[:, i] += 3.0
    changed = (m.gate(x2) - m.gate(x)).abs()[0] > 1e-12
    expected = torch.zeros(32, dtype=torch.bool)
    expected[i - k // 2: i + k // 2 + 1] = True
    assert torch.equal(changed, expected)


def test_one_kernel_is_shared_by_all_channels():
    """Shifting the channel axis shifts the gates (away from the zero-padded ends)."""
    m = seeded(ECA(32)).double()
    x = away_from_zero(2, 32, 3, 3)
    g, g_shift = m.gate(x), m.gate(torch.roll(x, 1, dims=1))
    torch.testing.assert_close(g_shift[:, 2:-1], g[:, 1:-2])


def test_output_is_x_scaled_per_channel_by_a_gate_in_0_1():
    m = seeded(create_attn("eca", 64)).double()
    x = away_from_zero(2, 64, 5, 3)
    ratio = m(x) / x
    torch.testing.assert_close(ratio, m.gate(x)[:, :, None, None].expand_as(ratio))
    assert (ratio > 0).all() and (ratio < 1).all()
