"""FocalNet focal modulation vs a direct transcription of the paper's equations, and its receptive field."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from module_checks import check_all, count_params, receptive_field
from visattn.nn.mixers.focal import FocalModulation


def focal_direct(m: FocalModulation, x: torch.Tensor) -> torch.Tensor:
    """Eq.: z^0 = ctx; z^l = GELU(DWConv_{k_l}(z^{l-1})); z^{L+1} = GELU(avgpool(z^L));
    y = q * h(sum_l g^l z^l); out = proj(y)."""
    C, L = m.dim, m.focal_level
    f = m.f(x)
    q, z, g = f[..., :C], f[..., C:2 * C].permute(0, 3, 1, 2), f[..., 2 * C:].permute(0, 3, 1, 2)
    agg = torch.zeros_like(z)
    for level, k in enumerate(m.kernel_sizes):
        conv = m.focal_layers[level][0]
        z = F.gelu(F.conv2d(z, conv.weight, None, padding=k // 2, groups=C))
        agg = agg + g[:, level:level + 1] * z
    agg = agg + g[:, L:L + 1] * F.gelu(z.mean((2, 3), keepdim=True))
    modulator = F.conv2d(agg, m.h.weight, m.h.bias).permute(0, 2, 3, 1)
    return m.proj(q * modulator)


@pytest.mark.parametrize("H,W", [(8, 8), (5, 11)])
def test_matches_paper_equations(H, W):
    torch.manual_seed(0)
    m = FocalModulation(16).double()
    x = torch.randn(2, H, W, 16, dtype=torch.double)
    torch.testing.assert_close(m(x), focal_direct(m, x))


def test_receptive_field_without_global_level():
    """Kernels 3 and 5 stack to a 7x7 local context; the global level reaches everything else.
    Closing the global gate leaves exactly the 7x7 window."""
    torch.manual_seed(0)
    m = FocalModulation(8, focal_level=2).double()
    x = torch.randn(1, 11, 11, 8, dtype=torch.double, requires_grad=True)
    assert receptive_field(m, x, 5, 5).all()
    with torch.no_grad():  # the last gate channel of f drives the global level
        m.f.weight[-1].zero_()
        m.f.bias[-1] = 0.0
    seen = receptive_field(m, x, 5, 5)
    expect = torch.zeros(11, 11, dtype=torch.bool)
    expect[2:9, 2:9] = True
    assert torch.equal(seen, expect)


@pytest.mark.parametrize("H,W", [(7, 7), (2, 9)])
def test_generic_properties(H, W):
    torch.manual_seed(0)
    check_all(FocalModulation(32), torch.randn(2, H, W, 32))


def test_param_count_closed_form():
    """f: C(2C+L+1) + (2C+L+1); DWConvs C * sum k_l^2 (no bias); h: C^2 + C; proj: C^2 + C."""
    C, L = 96, 2
    expect = (C + 1) * (2 * C + L + 1) + C * (3 ** 2 + 5 ** 2) + 2 * (C * C + C)
    assert count_params(FocalModulation(C, focal_level=L)) == expect
