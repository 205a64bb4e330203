"""LKA (VAN, Guo et al. 2022): 5x5 dw + 7x7 dw (dilation 3) + 1x1, C^2 + 77C parameters, a 23x23 field."""

from __future__ import annotations

import pytest
import torch

from module_checks import count_params
from plugin_helpers import away_from_zero, seeded, single_thread  # noqa: F401
from visattn.nn.lka import LargeKernelAttention


@pytest.mark.parametrize("channels", [16, 64, 256])
def test_param_count(channels):
    c = channels
    m = LargeKernelAttention(c)
    assert m.dw.kernel_size == (5, 5) and m.dw_dilated.kernel_size == (7, 7) and m.dw_dilated.dilation == (3, 3)
    assert count_params(m) == (25 * c + c) + (49 * c + c) + (c * c + c) == c * c + 77 * c


@pytest.mark.parametrize("kernel_size, dilation, field", [(21, 3, 23), (15, 3, 17), (13, 2, 15)])
def test_receptive_field_from_the_gradient_of_the_centre_output(kernel_size, dilation, field):
    """The decomposition of a K x K conv covers (2d-1) + (ceil(K/d)-1)*d pixels per axis (>= K)."""
    m = seeded(LargeKernelAttention(4, kernel_size, dilation)).double()
    assert m.receptive_field == field >= kernel_size
    n = field + 8
    x = away_from_zero(1, 4, n, n).requires_grad_(True)
    m(x)[0, :, n // 2, n // 2].sum().backward()
    touched = x.grad.abs().sum(dim=(0, 1)) > 0
    lo = n // 2 - field // 2
    expected = torch.zeros(n, n, dtype=torch.bool)
    expected[lo: lo + field, lo: lo + field] = True
    assert torch.equal(touched, expected)


def test_output_is_attention_times_x():
    m = seeded(LargeKernelAttention(8)).double()
    x = away_from_zero(2, 8, 6, 9)
    torch.testing.assert_close(m(x) / x, m.pw(m.dw_dilated(m.dw(x))))


def test_even_dilated_kernel_is_refused():
    with pytest.raises(ValueError, match=r"kernel_size=12 with dilation=3 gives an even dilated kernel"):
        LargeKernelAttention(8, kernel_size=12, dilation=3)
