"""Coordinate attention (Hou et al. 2021): the max(8, C/r) bottleneck and a row x column gate per channel."""

from __future__ import annotations

import pytest
import torch

from module_checks import count_params
from plugin_helpers import assert_rank_one, away_from_zero, seeded, single_thread  # noqa: F401
from visattn.nn.plugins.coord import CoordinateAttention


BOTTLENECKS = [(64, 32, 8), (128, 32, 8), (512, 32, 16), (1024, 32, 32), (256, 16, 16)]


@pytest.mark.parametrize("channels, reduction, hidden", BOTTLENECKS)
def test_bottleneck_rule_and_param_count(channels, reduction, hidden):
    m = CoordinateAttention(channels, reduction)
    assert m.hidden == hidden == max(8, channels // reduction)
    # conv C->m (no bias) + BN(m) + two convs m->C with bias.
    assert count_params(m) == channels * hidden + 2 * hidden + 2 * (hidden * channels + channels)


def test_gate_is_a_row_gate_times_a_column_gate_in_0_1():
    m = seeded(CoordinateAttention(16)).double().eval()
    x = away_from_zero(2, 16, 5, 7)
    ratio = m(x) / x
    assert (ratio > 0).all() and (ratio < 1).all()
    assert_rank_one(ratio)
    g_h, g_w = m.gates(x)
    torch.testing.assert_close(ratio, g_h[..., :, None] * g_w[..., None, :])


def test_direction_aware_flips_commute():
    """Rows are gated by their own row descriptor: flipping H flips the output, with nothing else changing."""
    m = seeded(CoordinateAttention(16)).double().eval()
    x = away_from_zero(2, 16, 5, 7)
    torch.testing.assert_close(m(x.flip(2)), m(x).flip(2))
    torch.testing.assert_close(m(x.flip(3)), m(x).flip(3))


def test_row_gates_depend_on_each_row():
    """Unlike SE, changing one row changes the gate of that row more than of any other."""
    m = seeded(CoordinateAttention(16)).double().eval()
    x = away_from_zero(1, 16, 6, 7)
    x2 = x.clone()
    x2[:, :, 2] += 2.0
    g_h, _ = m.gates(x)
    g_h2, _ = m.gates(x2)
    change = (g_h2 - g_h).abs().sum(dim=1)[0]
    assert change.argmax().item() == 2
