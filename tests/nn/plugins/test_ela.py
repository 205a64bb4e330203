"""ELA (Xu & Wan 2024): the four size variants, a factorized row x column gate, one conv for both directions."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params
from plugin_helpers import assert_rank_one, away_from_zero, seeded, single_thread  # noqa: F401
from visattn.nn.plugins.ela import ELA

# variant -> (kernel size, conv groups at C=64, GroupNorm groups, parameters as a multiple of C)
VARIANTS = {"T": (5, 64, 32, 7), "B": (7, 64, 16, 9), "S": (5, 8, 16, 42), "L": (7, 8, 16, 58)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_hyperparameters_and_param_count(variant):
    k, conv_groups, gn_groups, per_channel = VARIANTS[variant]
    m = ELA(64, variant=variant)
    assert m.conv.kernel_size == (k,) and m.conv.groups == conv_groups and m.norm.num_groups == gn_groups
    # conv: C * (C / groups) * k weights, no bias; GroupNorm: 2 * C.
    assert count_params(m) == 64 * (64 // conv_groups) * k + 2 * 64 == per_channel * 64


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generic_properties_per_variant(variant):
    torch.manual_seed(0)
    check_all(ELA(64, variant=variant), torch.randn(2, 64, 7, 10))


def test_gate_factorizes_into_row_and_column_gates_in_0_1():
    m = seeded(ELA(32, variant="S")).double()
    x = away_from_zero(2, 32, 5, 7)
    ratio = m(x) / x
    assert (ratio > 0).all() and (ratio < 1).all()
    assert_rank_one(ratio)
    row, col = m.gates(x)
    torch.testing.assert_close(ratio, row[..., :, None] * col[..., None, :])


def test_one_conv_and_norm_serve_both_directions():
    """Because rows and columns share the conv and GroupNorm, transposing H and W commutes with ELA."""
    m = seeded(ELA(32, variant="B")).double()
    x = away_from_zero(2, 32, 5, 8)
    torch.testing.assert_close(m(x.transpose(2, 3)), m(x).transpose(2, 3))


def test_overrides_and_clear_errors():
    m = ELA(64, variant="T", kernel_size=3, num_groups=8)
    assert m.conv.kernel_size == (3,) and m.norm.num_groups == 8
    with pytest.raises(ValueError, match=r"ELA: channels=48 must be divisible by num_groups \(GroupNorm\)=32"):
        ELA(48, variant="T")
    with pytest.raises(ValueError, match="ELA: variant='XL' is not one of"):
        ELA(64, variant="XL")
    with pytest.raises(ValueError, match="ELA: kernel_size=4 must be odd"):
        ELA(64, kernel_size=4)
