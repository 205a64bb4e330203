"""Criss-cross attention (CCNet): the module's einsums vs a brute-force per-pixel loop, and the
relation to GNA (row NA + column NA without self, merged by LSE) on every backend."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params, receptive_field
from visattn import merge_attentions, neighborhood_attention
from visattn.nn.mixers.criss_cross import CrissCrossAttention


def cca_on_na_operator(m: CrissCrossAttention, x: torch.Tensor, backend: str) -> torch.Tensor:
    """The relation to GNA: row = NA(kernel=(1, W)), column = NA(kernel=(H, 1)) with the self slot
    masked through ``attn_bias`` (the column window is the whole column, so slot j is row j); the two
    disjoint key sets merged exactly by their log-sum-exps."""
    B, H, W, _ = x.shape
    nh = m.num_heads
    q, k, v = (f(x).unflatten(-1, (nh, -1)) for f in (m.query, m.key, m.value))
    na = dict(scale=1.0, return_lse=True, backend=backend)
    out_row, lse_row = neighborhood_attention(q, k, v, kernel_size=(1, W), **na)
    self_slot = torch.eye(H, dtype=torch.bool)[:, None, None, :].expand(H, W, nh, H)
    bias = torch.zeros(B, H, W, nh, H, dtype=x.dtype).masked_fill(self_slot, float("-inf"))
    out_col, lse_col = neighborhood_attention(q, k, v, kernel_size=(H, 1), attn_bias=bias, **na)
    out, _ = merge_attentions([out_row, out_col], [lse_row, lse_col])
    return out.flatten(-2)


def cca_loop(m: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """Brute force: for every pixel, gather its H + W - 1 criss-cross keys and run a softmax."""
    B, H, W, C = x.shape
    nh = m.num_heads
    q, k, v = (f(x).unflatten(-1, (nh, -1)) for f in (m.query, m.key, m.value))
    out = torch.empty(B, H, W, nh, C // nh, dtype=x.dtype)
    for i in range(H):
        for j in range(W):
            keys = [(i, c) for c in range(W)] + [(r, j) for r in range(H) if r != i]
            assert len(keys) == H + W - 1
            kk = torch.stack([k[:, r, c] for r, c in keys], 1)  # [B, K, nh, d]
            vv = torch.stack([v[:, r, c] for r, c in keys], 1)
            p = torch.einsum("bnd,bknd->bnk", q[:, i, j], kk).softmax(-1)
            out[:, i, j] = torch.einsum("bnk,bknd->bnd", p, vv)
    return out.flatten(-2)


@pytest.mark.parametrize("H,W,heads", [(5, 7, 1), (6, 4, 2)])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_matches_brute_force_and_gna_construction(H, W, heads, backend):
    torch.manual_seed(0)
    m = CrissCrossAttention(32, num_heads=heads).double()
    x = torch.randn(2, H, W, 32, dtype=torch.double)
    ours = m.attend(x)
    torch.testing.assert_close(ours, cca_loop(m, x))
    torch.testing.assert_close(ours, cca_on_na_operator(m, x, backend))


def test_recurrence_is_weight_shared_repetition_and_reaches_everything():
    """RCCA (R=2) equals two R=1 passes with the same weights; one pass reaches only the pixel's
    row and column, two passes reach every pixel (the paper's motivation for R=2)."""
    torch.manual_seed(0)
    one = CrissCrossAttention(16, recurrence=1).double()
    two = CrissCrossAttention(16, recurrence=2).double()
    with torch.no_grad():
        one.gamma.fill_(0.7)
    two.load_state_dict(one.state_dict())
    x = torch.randn(1, 5, 6, 16, dtype=torch.double, requires_grad=True)
    torch.testing.assert_close(two(x), one(one(x)))
    for m, full in ((one, False), (two, True)):
        seen = receptive_field(m, x, 1, 2)
        cross = torch.zeros(5, 6, dtype=torch.bool)
        cross[1, :] = True
        cross[:, 2] = True
        assert torch.equal(seen, torch.ones_like(seen) if full else cross)


def test_identity_at_init():
    """gamma = 0 at init (CCNet): the module starts as the identity."""
    x = torch.randn(2, 5, 6, 16)
    torch.testing.assert_close(CrissCrossAttention(16)(x), x)


@pytest.mark.parametrize("H,W", [(7, 7), (1, 9), (8, 3)])
def test_generic_properties(H, W):
    torch.manual_seed(0)
    m = CrissCrossAttention(32, num_heads=2)
    with torch.no_grad():  # gamma = 0 at init blocks every gradient but gamma's: open it for the check
        m.gamma.fill_(0.5)
    check_all(m, torch.randn(2, H, W, 32))


def test_param_count_closed_form():
    """q, k: C x C/8 + C/8 each; v: C x C + C; gamma: 1."""
    C = 96
    assert count_params(CrissCrossAttention(C)) == 2 * (C * C // 8 + C // 8) + C * C + C + 1
