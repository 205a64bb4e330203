"""MHS-VM's multi-head scan against a direct implementation (per-head route indices as its route
generator builds them, four scans per head, its gated fusion unit), heads on distinct patterns, and
the scan-route attention formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scan_direct import receptive, route_scan
from visattn.nn.mixers.mhs_vm import MultiHeadScan, scan_route_attention


def _positions(H: int, W: int):
    """MHS-VM's scan patterns as (row, col) sequences, written like its scanutils."""
    snake_h = [(i, j if i % 2 == 0 else W - 1 - j) for i in range(H) for j in range(W)]
    snake_v = [(i if j % 2 == 0 else H - 1 - i, j) for j in range(W) for i in range(H)]
    diag = []
    for k in range(H + W - 1):
        cells = [(i, k - i) for i in range(H) if 0 <= k - i < W]
        diag += cells[::-1] if (k + 1) % 2 == 1 else cells
    spiral, (t, b, l, r) = [], (0, H - 1, 0, W - 1)
    while t < b and l < r:
        spiral += [(t, j) for j in range(l, r)] + [(i, r) for i in range(t, b)]
        spiral += [(b, j) for j in range(r, l, -1)] + [(i, l) for i in range(b, t, -1)]
        t, b, l, r = t + 1, b - 1, l + 1, r - 1
    flat = lambda ps: torch.tensor([i * W + j for i, j in ps])  # noqa: E731
    return [(flat(snake_h), flat(snake_v)), (flat(diag), flat([(i, W - 1 - j) for i, j in diag])),
            (flat(spiral), flat([(H - 1 - i, j) for i, j in spiral])),
            (torch.arange(H * W), torch.arange(H * W).view(H, W).t().flatten())]


def mhs_direct(m: MultiHeadScan, x: torch.Tensor) -> torch.Tensor:
    B, H, W, C = x.shape
    xi, z = m.in_proj(x).chunk(2, dim=-1)
    xc = F.silu(m.conv2d(xi.permute(0, 3, 1, 2))).flatten(2)  # [B, C, L]
    heads = torch.einsum("bdl,cd->bcl", xc, m.x_ssproj.weight).split(m.head_dim, dim=1)
    out = []
    for h, (xh, (p0, p1)) in enumerate(zip(heads, _positions(H, W))):
        ys = []
        for r, p in enumerate((p0, p0, p1, p1)):
            seq = xh[..., p].flip(-1) if r % 2 else xh[..., p]
            y = route_scan(m.ssm, 4 * h + r, seq)
            y = y.flip(-1) if r % 2 else y
            ys.append(torch.empty_like(y).index_copy_(-1, p, y))  # back to raster order
        ys = torch.stack(ys, 1)  # [B, 4, C_h, L]: the GFU of its code
        cv = ys.std(1) / ((ys - ys.min(1, keepdim=True).values).mean(1) + 1e-5)
        out.append(ys.sum(1) * F.relu(cv - m.threshold))
    y = m.y_proj(m.cat_norm(torch.cat(out, 1).transpose(1, 2))).view(B, H, W, C)
    return m.out_norm(y) * F.silu(z)


@pytest.mark.parametrize("heads", [4, 3])
def test_matches_the_direct_multi_head_scan(heads):
    torch.manual_seed(0)
    m = MultiHeadScan(4 * heads, num_heads=heads, d_state=4, threshold=0.1).double()
    x = torch.randn(2, 6, 8, 4 * heads, dtype=torch.double)
    torch.testing.assert_close(m(x), mhs_direct(m, x))


def test_scan_route_attention_is_the_gated_fusion_unit():
    ys = torch.tensor([[1.0, 2.0, 3.0, 6.0]]).t()[None]  # one token, four routes, one channel
    std = torch.tensor([1.0, 2.0, 3.0, 6.0]).std()
    cv = std / (torch.tensor([0.0, 1.0, 2.0, 5.0]).mean() + 1e-5)
    torch.testing.assert_close(scan_route_attention(ys, 0.5), (12.0 * (cv - 0.5)).reshape(1, 1))


def test_every_output_sees_the_whole_map():
    torch.manual_seed(0)
    m = MultiHeadScan(8, num_heads=4, d_state=2).double()
    x = torch.randn(1, 5, 6, 8, dtype=torch.double)
    assert receptive(m, x, 2, 3) == {(i, j) for i in range(5) for j in range(6)}


def test_head_count_is_bounded_by_the_patterns():
    with pytest.raises(ValueError, match="MHS-VM has 4 scan patterns"):
        MultiHeadScan(20, num_heads=5)
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        MultiHeadScan(16, num_heads=3)
