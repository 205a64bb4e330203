"""ULSAM (Saini et al. 2020): 2C parameters, one softmax map per subspace, F^ = A*F + F."""

from __future__ import annotations

import pytest
import torch

from module_checks import count_params
from plugin_helpers import away_from_zero, seeded, single_thread  # noqa: F401
from visattn.nn.ulsam import ULSAM


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
