"""VOLO outlook attention vs a brute-force per-window loop (zero-padded windows, outputs summed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from module_checks import check_all, count_params, receptive_field
from visattn.nn.mixers.volo import OutlookAttention


def outlook_loop(m: OutlookAttention, x: torch.Tensor) -> torch.Tensor:
    """For each window centre c (stride s): A_c = softmax(scale * W_A x_c) [heads, K^2, K^2];
    y[pos(m)] += sum_n A_c[m, n] v[pos(n)] over the window's in-image positions."""
    B, H, W, C = x.shape
    K, s, nh, d = m.kernel_size, m.stride, m.num_heads, m.head_dim
    pad = K // 2
    v = m.v(x)
    centre = x if s == 1 else F.avg_pool2d(x.permute(0, 3, 1, 2), s, s, ceil_mode=True).permute(0, 2, 3, 1)
    y = torch.zeros(B, H, W, C, dtype=x.dtype)
    for ci in range(math.ceil(H / s)):
        for cj in range(math.ceil(W / s)):
            A = (m.attn(centre[:, ci, cj]).reshape(B, nh, K * K, K * K) * m.scale).softmax(-1)
            cells = [(ci * s - pad + a, cj * s - pad + b) for a in range(K) for b in range(K)]
            vals = torch.stack([v[:, r, c] if 0 <= r < H and 0 <= c < W else torch.zeros(B, C, dtype=x.dtype)
                                for r, c in cells], 1).reshape(B, K * K, nh, d)
            out = torch.einsum("bhmn,bnhd->bmhd", A, vals).reshape(B, K * K, C)
            for idx, (r, c) in enumerate(cells):
                if 0 <= r < H and 0 <= c < W:
                    y[:, r, c] += out[:, idx]
    return m.proj(y)


@pytest.mark.parametrize("H,W,stride", [(5, 6, 1), (6, 7, 2)])
def test_matches_window_loop(H, W, stride):
    torch.manual_seed(0)
    m = OutlookAttention(8, 2, stride=stride).double()
    x = torch.randn(2, H, W, 8, dtype=torch.double)
    torch.testing.assert_close(m(x), outlook_loop(m, x))


def test_receptive_field_is_two_kernel_radii():
    """Outputs at a pixel come from windows centred within K//2 of it, whose values reach K//2 further:
    a (2K-1) x (2K-1) field for the values, while the weights read only the window centres."""
    torch.manual_seed(0)
    m = OutlookAttention(8, 2).double()
    x = torch.randn(1, 9, 9, 8, dtype=torch.double, requires_grad=True)
    seen = receptive_field(m, x, 4, 4)
    expect = torch.zeros(9, 9, dtype=torch.bool)
    expect[2:7, 2:7] = True
    assert torch.equal(seen, expect)


@pytest.mark.parametrize("H,W,stride", [(7, 7, 1), (5, 8, 2)])
def test_generic_properties(H, W, stride):
    torch.manual_seed(0)
    check_all(OutlookAttention(32, 4, stride=stride), torch.randn(2, H, W, 32))


def test_param_count_closed_form():
    """v: C^2 (no bias), attention predictor C K^4 h + K^4 h, proj C^2 + C."""
    C, h, K = 96, 3, 3
    assert count_params(OutlookAttention(C, h, kernel_size=K)) == C * C + (C + 1) * K ** 4 * h + C * C + C


def test_even_kernel_raises():
    with pytest.raises(ValueError, match="kernel_size=4 must be odd"):
        OutlookAttention(8, 2, kernel_size=4)
