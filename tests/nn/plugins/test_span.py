"""SPAN's parameter-free attention (Wan et al. 2024): no parameters, an odd gate in (-1/2, 1/2)."""

from __future__ import annotations

import pytest
import torch

from module_checks import count_params
from plugin_helpers import single_thread  # noqa: F401
from visattn.nn.plugins.span import SPANAttention


def test_has_no_parameters_and_no_buffers():
    m = SPANAttention(64)
    assert count_params(m) == 0 and len(list(m.buffers())) == 0


def test_gate_is_the_symmetric_activation_in_open_half_interval():
    h = torch.linspace(-8, 8, 161, dtype=torch.float64).view(1, 1, 7, 23)
    h = h[:, :, :, :].expand(1, 3, 7, 23).contiguous()
    m = SPANAttention(3)
    gate = m(h)[h != 0] / h[h != 0]
    assert (gate > -0.5).all() and (gate < 0.5).all()
    # sigma_a is odd, so h * sigma_a(h) is even in h and never negative.
    torch.testing.assert_close(m(-h), m(h))
    assert (m(h) >= 0).all()


def test_residual_form_of_the_spab_block():
    """O_i = (O_{i-1} + H_i) * sigma_a(H_i): zero wherever the conv output H_i is zero, whatever the residual."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64)
    h[:, :, 2, 3] = 0.0
    identity = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64)
    y = SPANAttention(4)(h, identity)
    torch.testing.assert_close(y, (h + identity) * (torch.sigmoid(h) - 0.5))
    assert (y[:, :, 2, 3] == 0).all()


def test_mismatched_residual_is_refused():
    with pytest.raises(ValueError, match=r"SPANAttention: identity has shape \(2, 4, 5, 6\)"):
        SPANAttention(4)(torch.randn(2, 4, 5, 7), torch.randn(2, 4, 5, 6))
