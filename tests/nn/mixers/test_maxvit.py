"""MaxViT block and grid attention vs direct block/grid partitions (MaxViT's reshape recipes)."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params
from visattn.nn.mixers.maxvit import MaxViTBlockAttention, MaxViTGridAttention


def _partition_attention(m, x: torch.Tensor, windows: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Softmax attention inside each window. ``windows [nW, B, n]`` flat token ids, ``coords [n, 2]``
    the window-local (block or grid) coordinates that index the relative bias."""
    B, H, W, C = x.shape
    nh, hd = m.num_heads, C // m.num_heads
    q, k, v = m.qkv(x).reshape(B, H * W, 3, nh, hd).unbind(2)
    out = torch.empty_like(q)
    rel = coords[None, :, :] - coords[:, None, :] + m.size - 1  # key minus query, [n, n, 2]
    bias = m.rpb[:, rel[..., 0], rel[..., 1]]  # [nh, n, n]
    for ids in windows:
        qq, kk, vv = q[:, ids], k[:, ids], v[:, ids]
        logits = torch.einsum("bind,bjnd->bnij", qq, kk) * m.scale + bias
        out[:, ids] = torch.einsum("bnij,bjnd->bind", logits.softmax(-1), vv)
    return m.proj(out.reshape(B, H, W, C))


def block_direct(m: MaxViTBlockAttention, x: torch.Tensor) -> torch.Tensor:
    """MaxViT block partition: [B, H/P, P, W/P, P, C] -> windows of P x P neighbours."""
    _, H, W, _ = x.shape
    P = m.size
    ids = torch.arange(H * W).reshape(H // P, P, W // P, P).permute(0, 2, 1, 3).reshape(-1, P * P)
    coords = torch.stack(torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij"), -1).reshape(-1, 2)
    return _partition_attention(m, x, ids, coords)


def grid_direct(m: MaxViTGridAttention, x: torch.Tensor) -> torch.Tensor:
    """MaxViT grid partition: [B, G, H/G, G, W/G, C] -> windows of G x G tokens spaced H/G apart."""
    _, H, W, _ = x.shape
    G = m.size
    ids = torch.arange(H * W).reshape(G, H // G, G, W // G).permute(1, 3, 0, 2).reshape(-1, G * G)
    coords = torch.stack(torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij"), -1).reshape(-1, 2)
    return _partition_attention(m, x, ids, coords)


@pytest.mark.parametrize("H,W", [(8, 8), (12, 8)])
def test_block_matches_partition(H, W):
    torch.manual_seed(0)
    m = MaxViTBlockAttention(16, 2, window_size=4).double().eval()
    x = torch.randn(2, H, W, 16, dtype=torch.double)
    torch.testing.assert_close(m(x), block_direct(m, x))


@pytest.mark.parametrize("H,W", [(8, 8), (12, 16), (4, 8)])
def test_grid_matches_partition(H, W):
    torch.manual_seed(0)
    m = MaxViTGridAttention(16, 2, grid_size=4).double().eval()
    x = torch.randn(2, H, W, 16, dtype=torch.double)
    torch.testing.assert_close(m(x), grid_direct(m, x))


def test_grid_is_global_block_is_local():
    """Grid attention mixes tokens across the whole map, block attention only inside a window:
    the output at (0, 0) depends on input (H/2, W/2) for grid (same grid window) and not for block."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 8, 16, dtype=torch.double, requires_grad=True)
    grid = MaxViTGridAttention(16, 2, grid_size=2).double()
    block = MaxViTBlockAttention(16, 2, window_size=2).double()
    for m, expect in ((grid, True), (block, False)):
        (g,) = torch.autograd.grad(m(x)[0, 0, 0].sum(), x)
        assert bool(g[0, 4, 4].abs().sum() > 0) == expect
        assert bool(g[0, 1, 1].abs().sum() > 0) == (not expect)


@pytest.mark.parametrize("cls", [MaxViTBlockAttention, MaxViTGridAttention])
@pytest.mark.parametrize("H,W", [(8, 8), (9, 7), (5, 3)])
def test_generic_properties(cls, H, W):
    torch.manual_seed(0)
    check_all(cls(32, 4, 4 if cls is MaxViTBlockAttention else 3), torch.randn(2, H, W, 32))


def test_param_count_closed_form():
    """qkv + proj 4C^2 + 4C, relative bias (2P-1)^2 per head (MaxViT's table)."""
    C, h = 96, 3
    for m in (MaxViTBlockAttention(C, h, window_size=7), MaxViTGridAttention(C, h, grid_size=7)):
        assert count_params(m) == 4 * C * C + 4 * C + 13 * 13 * h
