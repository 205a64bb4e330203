"""CSWin attention vs a direct stripe partition (reshape into stripes, softmax, LePE conv)."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params, receptive_field
from visattn.nn.mixers.cswin import CSWinAttention


def _stripes(q, k, v, scale, sw, axis):
    """Softmax attention inside stripes of ``sw`` rows (axis=1) or columns (axis=2). ``[B, H, W, h, d]``."""
    if axis == 2:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    B, H, W, h, d = q.shape
    q, k, v = (t.reshape(B, H // sw, sw * W, h, d) for t in (q, k, v))
    logits = torch.einsum("bsinh,bsjnh->bsnij", q, k) * scale
    o = torch.einsum("bsnij,bsjnh->bsinh", logits.softmax(-1), v).reshape(B, H, W, h, d)
    return o.transpose(1, 2) if axis == 2 else o


def cswin_direct(m: CSWinAttention, x: torch.Tensor) -> torch.Tensor:
    B, H, W, C = x.shape
    nh = m.heads_h
    q, k, v = m.qkv(x).reshape(B, H, W, 3, m.num_heads, C // m.num_heads).unbind(3)
    oh = _stripes(q[..., :nh, :], k[..., :nh, :], v[..., :nh, :], m.scale, m.split_size, 1)
    ov = _stripes(q[..., nh:, :], k[..., nh:, :], v[..., nh:, :], m.scale, m.split_size, 2)
    lepe = torch.nn.functional.conv2d(v.reshape(B, H, W, C).permute(0, 3, 1, 2), m.lepe.weight, m.lepe.bias,
                                      padding=1, groups=C).permute(0, 2, 3, 1)
    return m.proj(torch.cat([oh, ov], -2).reshape(B, H, W, C) + lepe)


@pytest.mark.parametrize("H,W,heads", [(8, 8, 4), (6, 10, 2), (4, 6, 3)])
def test_matches_stripe_partition(H, W, heads):
    torch.manual_seed(0)
    m = CSWinAttention(24, heads, split_size=2).double().eval()
    x = torch.randn(2, H, W, 24, dtype=torch.double)
    torch.testing.assert_close(m(x), cswin_direct(m, x))


def test_cross_shaped_receptive_field():
    """Without LePE's conv term, a pixel sees exactly the union of its horizontal and vertical stripe."""
    torch.manual_seed(0)
    m = CSWinAttention(8, 2, split_size=2).double()
    with torch.no_grad():
        m.lepe.weight.zero_()
    x = torch.randn(1, 8, 8, 8, dtype=torch.double, requires_grad=True)
    seen = receptive_field(m, x, 3, 5)
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[2:4, :] = True  # rows of its horizontal stripe
    expect[:, 4:6] = True  # columns of its vertical stripe
    assert torch.equal(seen, expect)


@pytest.mark.parametrize("H,W", [(9, 9), (10, 7)])
def test_generic_properties(H, W):
    torch.manual_seed(0)
    check_all(CSWinAttention(32, 4, split_size=3), torch.randn(2, H, W, 32))


def test_param_count_closed_form():
    """qkv 3C^2 + 3C, proj C^2 + C, LePE depthwise 3x3: 9C + C."""
    C = 96
    assert count_params(CSWinAttention(C, 4)) == 4 * C * C + 4 * C + 10 * C


def test_needs_two_heads():
    with pytest.raises(ValueError, match="num_heads=1"):
        CSWinAttention(16, 1)
