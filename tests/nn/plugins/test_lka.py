"""LKA (VAN, Guo et al. 2022): 5x5 dw + 7x7 dw (dilation 3) + 1x1, C^2 + 77C parameters, a 23x23 field."""

from __future__ import annotations

import pytest
import torch

from module_checks import count_params
from plugin_helpers import away_from_zero, seeded, single_thread  # noqa: F401
from visattn.nn.plugins.lka import LargeKernelAttention


@pytest.mark.parametrize("channels", [16, 64, 256])
def test_param_count(channels):
    c = channels
    m = LargeKernelAttention(c)
    assert m.conv0.kernel_size == (5, 5) and m.conv_spatial.kernel_size == (7, 7) and m.conv_spatial.dilation == (3, 3)
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
    # The reference: the three convs exactly as the paper writes them, dilated conv and all.
    torch.testing.assert_close(m(x) / x, m.conv1(m.conv_spatial(m.conv0(x))))


@pytest.mark.parametrize("kernel_size, dilation", [(21, 3), (13, 2), (7, 1), (28, 4)])
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (13, 20), (24, 24)])
def test_subgrid_path_equals_the_dilated_conv(kernel_size, dilation, hw):
    """The CPU path (channels-last, dilated conv on d*d sub-grids) is the same arithmetic as nn.Conv2d."""
    m = seeded(LargeKernelAttention(6, kernel_size, dilation)).double()
    x = away_from_zero(2, 6, *hw)
    fast = m.attention(x)
    plain = m.conv1(m.conv_spatial(m.conv0(x)))
    torch.testing.assert_close(fast, plain, atol=1e-12, rtol=1e-12)
    w = torch.randn(fast.shape, dtype=fast.dtype, generator=torch.Generator().manual_seed(1))
    g_fast = torch.autograd.grad((fast * w).sum(), list(m.parameters()))
    g_plain = torch.autograd.grad((plain * w).sum(), list(m.parameters()))
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_output_keeps_the_callers_memory_format():
    m = LargeKernelAttention(8)
    x = torch.randn(2, 8, 9, 11)
    assert m(x).is_contiguous()
    y_cl = m(x.contiguous(memory_format=torch.channels_last))
    assert y_cl.is_contiguous(memory_format=torch.channels_last)


def test_loads_a_van_lka_state_dict():
    """VAN names its LKA convs conv0 / conv_spatial / conv1; the same names load here without remapping."""
    van_keys = {f"{n}.{p}" for n in ("conv0", "conv_spatial", "conv1") for p in ("weight", "bias")}
    assert set(LargeKernelAttention(8).state_dict()) == van_keys


def test_even_dilated_kernel_is_refused():
    with pytest.raises(ValueError, match=r"kernel_size=12 with dilation=3 gives an even dilated kernel"):
        LargeKernelAttention(8, kernel_size=12, dilation=3)
