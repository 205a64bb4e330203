"""BiFormer bi-level routing attention vs a per-region brute-force loop, and its limit cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from module_checks import check_all, count_params, receptive_field
from visattn.nn.mixers.biformer import BiLevelRoutingAttention


def bra_loop(m: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """For every region: mean q/k, rank all regions by affinity, keep the top-k, attend to their tokens."""
    B, H, W, C = x.shape
    S, nh, d = m.n_win, m.num_heads, m.head_dim
    rh, rw = H // S, W // S
    q, k, v = m.qkv(x).chunk(3, -1)
    region_tokens = lambda t, r: t[:, (r // S) * rh:(r // S + 1) * rh, (r % S) * rw:(r % S + 1) * rw].reshape(B, -1, C)  # noqa: E731
    out = torch.empty(B, H, W, C, dtype=x.dtype)
    q_mean = torch.stack([region_tokens(q, r).mean(1) for r in range(S * S)], 1)
    k_mean = torch.stack([region_tokens(k, r).mean(1) for r in range(S * S)], 1)
    for b in range(B):
        for r in range(S * S):
            scores = [float(q_mean[b, r] @ k_mean[b, j]) for j in range(S * S)]
            chosen = sorted(range(S * S), key=lambda j: -scores[j])[:m.topk]
            kk = torch.cat([region_tokens(k, j)[b] for j in chosen]).reshape(-1, nh, d)
            vv = torch.cat([region_tokens(v, j)[b] for j in chosen]).reshape(-1, nh, d)
            qq = region_tokens(q, r)[b].reshape(-1, nh, d)
            p = (torch.einsum("ind,jnd->nij", qq, kk) * m.scale).softmax(-1)
            o = torch.einsum("nij,jnd->ind", p, vv).reshape(rh, rw, C)
            out[b, (r // S) * rh:(r // S + 1) * rh, (r % S) * rw:(r % S + 1) * rw] = o
    lce = F.conv2d(v.permute(0, 3, 1, 2), m.lce.weight, m.lce.bias, padding=m.lce.padding, groups=C)
    return m.proj(out + lce.permute(0, 2, 3, 1))


@pytest.mark.parametrize("H,W,topk", [(8, 8, 2), (6, 12, 3)])
def test_matches_region_loop(H, W, topk):
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(16, 2, n_win=2 if H == 8 else 3, topk=topk).double().eval()
    x = torch.randn(2, H, W, 16, dtype=torch.double)
    with torch.no_grad():
        torch.testing.assert_close(m(x), bra_loop(m, x))


def test_all_regions_routed_is_full_attention_plus_lce():
    """topk = S^2: every token sees every token: plain global attention plus the LCE term."""
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(16, 2, n_win=2, topk=4).double().eval()
    x = torch.randn(2, 6, 4, 16, dtype=torch.double)
    q, k, v = m.qkv(x).reshape(2, 24, 3, 2, 8).unbind(2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=m.scale)
    lce = m.lce(v.reshape(2, 6, 4, 16).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), m.proj(o.transpose(1, 2).reshape(2, 6, 4, 16) + lce))


def test_only_routed_regions_are_seen():
    """With topk = 1 and no LCE, a query's output depends only on its region's routed region."""
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(8, 1, n_win=2, topk=1).double()
    with torch.no_grad():
        m.lce.weight.zero_()
    x = torch.randn(1, 4, 4, 8, dtype=torch.double, requires_grad=True)
    q, k, _ = m.qkv(x).chunk(3, -1)
    to_r = lambda t: t.reshape(1, 2, 2, 2, 2, 8).transpose(2, 3).reshape(1, 4, 4, 8)  # noqa: E731
    target = int(m.route(to_r(q), to_r(k))[0, 0, 0])
    seen = receptive_field(m, x, 0, 0)
    expect = torch.zeros(4, 4, dtype=torch.bool)
    expect[(target // 2) * 2:(target // 2 + 1) * 2, (target % 2) * 2:(target % 2 + 1) * 2] = True
    expect[0, 0] = True  # the query itself (through q)
    assert torch.equal(seen, expect)


@pytest.mark.parametrize("H,W", [(8, 8), (4, 12)])
def test_generic_properties(H, W):
    torch.manual_seed(0)
    check_all(BiLevelRoutingAttention(32, 4, n_win=4, topk=4), torch.randn(2, H, W, 32))


@pytest.mark.parametrize("H,W,n_win", [(11, 6, 5), (5, 3, 4), (1, 1, 7), (9, 12, 4)])
def test_any_size_pads_like_biformer(H, W, n_win):
    """A map n_win does not divide is zero-padded at the bottom/right, attended whole and cropped,
    as BiFormer's code does (auto_pad): the region loop on the padded map, cut back to H x W."""
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(16, 2, n_win=n_win, topk=3).double().eval()
    x = torch.randn(2, H, W, 16, dtype=torch.double)
    padded = F.pad(x, (0, 0, 0, (-W) % n_win, 0, (-H) % n_win))
    with torch.no_grad():
        torch.testing.assert_close(m(x), bra_loop(m, padded)[:, :H, :W])
    check_all(m, x)


def test_topk_out_of_range_raises():
    with pytest.raises(ValueError, match="topk=50"):
        BiLevelRoutingAttention(16, 2, n_win=7, topk=50)


def test_param_count_closed_form():
    """qkv 3C^2 + 3C (with bias, as BiFormer's code), LCE depthwise 5x5: 25C + C, proj C^2 + C."""
    C = 96
    assert count_params(BiLevelRoutingAttention(C, 3)) == 3 * C * C + 3 * C + 26 * C + C * C + C
