"""HorNet gnConv vs the paper's recursion, its interaction order and its receptive field."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from module_checks import check_all, count_params, receptive_field
from visattn.nn.mixers.hornet import GnConv


def gnconv_direct(m: GnConv, x: torch.Tensor) -> torch.Tensor:
    """p_0, q_0..q_{n-1} = phi_in(x); p_{k+1} = f_k(q_k) * g_k(p_k); y = phi_out(p_n)."""
    dims, n = m.dims, m.order
    h = m.proj_in(x)
    p, qs = h[..., :dims[0]], h[..., dims[0]:]
    f = F.conv2d(qs.permute(0, 3, 1, 2), m.dwconv.weight, m.dwconv.bias, padding=m.dwconv.padding,
                 groups=qs.shape[-1]).permute(0, 2, 3, 1) * m.scale
    start = 0
    for k in range(n):
        fk = f[..., start:start + dims[k]]
        start += dims[k]
        p = (p if k == 0 else m.pws[k - 1](p)) * fk
    return m.proj_out(p)


@pytest.mark.parametrize("order", [1, 3, 5])
def test_matches_recursion(order):
    torch.manual_seed(0)
    m = GnConv(32, order=order).double()
    x = torch.randn(2, 9, 7, 32, dtype=torch.double)
    torch.testing.assert_close(m(x), gnconv_direct(m, x))


@pytest.mark.parametrize("order", [2, 4])
def test_output_is_a_degree_order_plus_one_polynomial(order):
    """With all biases zero, gnConv(t x) = t^(n+1) gnConv(x): the paper's n-th order interaction."""
    torch.manual_seed(0)
    m = GnConv(16, order=order).double()
    with torch.no_grad():
        for mod in m.modules():
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
    x = torch.randn(1, 6, 6, 16, dtype=torch.double)
    torch.testing.assert_close(m(2 * x), 2 ** (order + 1) * m(x))


def test_receptive_field_is_one_kernel():
    torch.manual_seed(0)
    m = GnConv(16, order=3, kernel_size=5).double()
    x = torch.randn(1, 9, 9, 16, dtype=torch.double, requires_grad=True)
    seen = receptive_field(m, x, 4, 4)
    expect = torch.zeros(9, 9, dtype=torch.bool)
    expect[2:7, 2:7] = True
    assert torch.equal(seen, expect)


@pytest.mark.parametrize("H,W", [(7, 7), (3, 10)])
def test_generic_properties(H, W):
    torch.manual_seed(0)
    check_all(GnConv(32, order=3), torch.randn(2, H, W, 32))


def test_param_count_closed_form():
    """phi_in 2C^2 + 2C; DWConv (k^2 + 1) sum C_k; g_k: C_k C_{k+1} + C_{k+1}; phi_out C^2 + C."""
    C, n, k = 96, 5, 7
    dims = [C // 2 ** i for i in range(n)][::-1]
    expect = (2 * C * C + 2 * C) + (k * k + 1) * sum(dims) + sum(dims[i] * dims[i + 1] + dims[i + 1]
                                                                   for i in range(n - 1)) + C * C + C
    assert count_params(GnConv(C, order=n, kernel_size=k)) == expect


def test_dim_must_fit_the_order():
    with pytest.raises(ValueError, match="2\\^\\(order-1\\) = 16"):
        GnConv(40, order=5)
