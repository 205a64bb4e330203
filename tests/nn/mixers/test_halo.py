"""HaloNet attention vs direct block-and-halo implementations: GNA borders (regions moved inward)
everywhere, and HaloNet's zero-padded unfold on interior blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from module_checks import check_all, count_params, receptive_field
from visattn.nn.mixers.halo import HaloAttention


def _block_attention(m: HaloAttention, q, k, v, r0, c0, kr, kc):
    """Attention of the query block at (r0, c0) to the k x k key region whose top-left is (kr, kc)
    (coordinates in the tensors given). Relative logits use key minus query coordinates."""
    b, kk = m.block_size, m.kernel_size
    qq = q[:, r0:r0 + b, c0:c0 + b]
    keys, vals = k[:, kr:kr + kk, kc:kc + kk], v[:, kr:kr + kk, kc:kc + kk]
    dy = (torch.arange(kr, kr + kk)[None, :] - torch.arange(r0, r0 + b)[:, None]) + kk - 1  # [b, k]
    dx = (torch.arange(kc, kc + kk)[None, :] - torch.arange(c0, c0 + b)[:, None]) + kk - 1
    content = torch.einsum("bijnd,bklnd->bijnkl", qq, keys)
    rel = (torch.einsum("bijnd,ikd->bijnk", qq, m.rel_row[dy])[..., :, None]
           + torch.einsum("bijnd,jld->bijnl", qq, m.rel_col[dx])[..., None, :])
    logits = m.scale * (content + rel)
    p = logits.flatten(-2).softmax(-1).reshape(logits.shape)
    return torch.einsum("bijnkl,bklnd->bijnd", p, vals)


def halo_direct(m: HaloAttention, x: torch.Tensor, border: str) -> torch.Tensor:
    """``border="shift"``: regions clamped inside the image (GNA); ``"zero"``: HaloNet's zero padding
    (pad k/v by h with zeros, region of block i starts at i*b in padded coordinates)."""
    B, H, W, C = x.shape
    b, h, nh = m.block_size, m.halo_size, m.num_heads
    q, k, v = m.qkv(x).reshape(B, H, W, 3, nh, C // nh).unbind(3)
    if border == "zero":
        k = F.pad(k, (0, 0, 0, 0, h, h, h, h))
        v = F.pad(v, (0, 0, 0, 0, h, h, h, h))
        q = F.pad(q, (0, 0, 0, 0, h, h, h, h))  # same frame so relative offsets line up
    out = torch.empty(B, H, W, nh, C // nh, dtype=x.dtype)
    for r0 in range(0, H, b):
        for c0 in range(0, W, b):
            if border == "zero":
                o = _block_attention(m, q, k, v, r0 + h, c0 + h, r0, c0)
            else:
                kr = min(max(r0 - h, 0), H - m.kernel_size)
                kc = min(max(c0 - h, 0), W - m.kernel_size)
                o = _block_attention(m, q, k, v, r0, c0, kr, kc)
            out[:, r0:r0 + b, c0:c0 + b] = o
    return m.proj(out.flatten(-2))


@pytest.mark.parametrize("H,W", [(12, 12), (16, 8)])
def test_matches_direct_with_gna_borders(H, W):
    torch.manual_seed(0)
    m = HaloAttention(16, 2, block_size=4, halo_size=1).double().eval()
    x = torch.randn(2, H, W, 16, dtype=torch.double)
    torch.testing.assert_close(m(x), halo_direct(m, x, "shift"))


def test_interior_blocks_match_halonet_zero_padding():
    """Away from the border GNA's region is HaloNet's haloed region exactly."""
    torch.manual_seed(0)
    m = HaloAttention(16, 2, block_size=4, halo_size=1).double().eval()
    x = torch.randn(2, 16, 12, 16, dtype=torch.double)
    ours, halonet = m(x), halo_direct(m, x, "zero")
    interior = (slice(None), slice(4, 12), slice(4, 8))  # blocks whose halo stays inside the image
    torch.testing.assert_close(ours[interior], halonet[interior])
    # ... and at the border the two differ (zero keys/values dilute HaloNet's attention there).
    assert not torch.allclose(ours[:, :4], halonet[:, :4])


def test_receptive_field_is_block_plus_halo():
    """A query in block (1, 1) depends on exactly the (b+2h)^2 region around its block."""
    torch.manual_seed(0)
    m = HaloAttention(8, 1, block_size=2, halo_size=1).double()
    x = torch.randn(1, 8, 8, 8, dtype=torch.double, requires_grad=True)
    seen = receptive_field(m, x, 2, 3)
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[1:5, 1:5] = True
    assert torch.equal(seen, expect)


@pytest.mark.parametrize("H,W", [(12, 12), (13, 9), (3, 5)])
def test_generic_properties(H, W):
    torch.manual_seed(0)
    check_all(HaloAttention(32, 4, block_size=4, halo_size=1), torch.randn(2, H, W, 32))


def test_param_count_closed_form():
    """qkv 3C^2 (no bias, HaloNet's 1x1 convs), proj C^2 + C, relative embeddings 2 (2k-1) C/heads."""
    C, h, b, halo = 96, 3, 8, 3
    k = b + 2 * halo
    assert count_params(HaloAttention(C, h, b, halo)) == 3 * C * C + C * C + C + 2 * (2 * k - 1) * (C // h)


def test_gradcheck_through_relative_logits():
    """float64 gradcheck w.r.t. the input and the relative embeddings (content-dependent attn_bias)."""
    torch.manual_seed(0)
    m = HaloAttention(4, 2, block_size=2, halo_size=1).double()
    x = torch.randn(1, 4, 5, 4, dtype=torch.double, requires_grad=True)

    rel = m.rel_row.detach().clone().requires_grad_(True)
    f = lambda inp, r: torch.func.functional_call(m, {"rel_row": r}, (inp,))  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, rel), fast_mode=True)


def halonet_loop(m: HaloAttention, x: torch.Tensor) -> torch.Tensor:
    """HaloNet's blocked attention query by query: zero keys/values outside the map, queries every
    ``stride`` pixels of each ``b x b`` block, block-local relative indices (region position minus
    query position within its block, per axis)."""
    B, H, W, C = x.shape
    b, h, s, win, nh = m.block_size, m.halo_size, m.stride, m.kernel_size, m.num_heads
    q, k, v = m.qkv(x).reshape(B, H, W, 3, nh, C // nh).unbind(3)
    Ho, Wo = -(-H // s), -(-W // s)
    out = torch.zeros(B, Ho, Wo, nh, C // nh, dtype=x.dtype)
    for oy in range(Ho):
        for ox in range(Wo):
            y, xx = oy * s, ox * s
            by, bx = y // b * b, xx // b * b  # the query's block
            iy, ix = (y - by) // s, (xx - bx) // s  # its index in the block's query grid
            logits, vals = [], []
            for jy in range(win):
                for jx in range(win):
                    ky, kx = by - h + jy, bx - h + jx
                    inside = 0 <= ky < H and 0 <= kx < W
                    key = k[:, ky, kx] if inside else torch.zeros_like(k[:, 0, 0])
                    rel = m.rel_row[jy - iy + win - 1] + m.rel_col[jx - ix + win - 1]
                    logits.append(m.scale * ((q[:, y, xx] * (key + rel)).sum(-1)))  # [B, heads]
                    vals.append(v[:, ky, kx] if inside else torch.zeros_like(v[:, 0, 0]))
            p = torch.stack(logits, -1).softmax(-1)  # [B, heads, win^2]
            out[:, oy, ox] = torch.einsum("bnk,kbnd->bnd", p, torch.stack(vals))
    return m.proj(out.flatten(-2))


@pytest.mark.parametrize("size, stride", [((8, 12), 1), ((7, 10), 1), ((8, 8), 2), ((9, 6), 2)])
def test_zero_border_is_halonets_blocked_attention(size, stride):
    torch.manual_seed(0)
    m = HaloAttention(8, 2, block_size=4, halo_size=1, border="zero", stride=stride, qkv_bias=True).double().eval()
    x = torch.randn(2, *size, 8, dtype=torch.double)
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(y, halonet_loop(m, x))
    assert y.shape == (2, -(-size[0] // stride), -(-size[1] // stride), 8)


def test_zero_border_options_and_errors():
    m = HaloAttention(16, 2, block_size=4, halo_size=1, border="zero", out_proj=False)
    assert isinstance(m.proj, torch.nn.Identity) and count_params(m) == 3 * 16 * 16 + 2 * 11 * 8
    check_all(m, torch.randn(2, 9, 7, 16))
    with pytest.raises(ValueError, match="stride=2 needs border='zero'"):
        HaloAttention(16, 2, block_size=4, stride=2)
    with pytest.raises(ValueError, match="border='edge'; choose 'gna'"):
        HaloAttention(16, 2, border="edge")
