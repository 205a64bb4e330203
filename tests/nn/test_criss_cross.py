"""Criss-cross attention (CCNet): the GNA construction (row NA + column NA without self, merged by
LSE) vs CCNet's einsum formulation and a brute-force per-pixel loop."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params
from visattn.nn.criss_cross import CrissCrossAttention


def cca_einsum(m: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """CCNet's formulation: column energies with -inf on the diagonal, row energies, one softmax
    over the H + W concatenation."""
    B, H, W, _ = x.shape
    nh = m.num_heads
    q, k, v = (f(x).unflatten(-1, (nh, -1)) for f in (m.query, m.key, m.value))
    e_col = torch.einsum("bijnd,bkjnd->bijnk", q, k)
    e_col = e_col.masked_fill(torch.eye(H, dtype=torch.bool)[None, :, None, None, :], float("-inf"))
    e_row = torch.einsum("bijnd,bilnd->bijnl", q, k)
    p = torch.cat([e_col, e_row], -1).softmax(-1)
    out = torch.einsum("bijnk,bkjnd->bijnd", p[..., :H], v) + torch.einsum("bijnl,bilnd->bijnd", p[..., H:], v)
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
def test_gna_construction_matches_ccnet_and_brute_force(H, W, heads):
    torch.manual_seed(0)
    m = CrissCrossAttention(32, num_heads=heads).double()
    x = torch.randn(2, H, W, 32, dtype=torch.double)
    ours = m.attend(x)
    torch.testing.assert_close(ours, cca_einsum(m, x))
    torch.testing.assert_close(ours, cca_loop(m, x))


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
        (g,) = torch.autograd.grad(m(x)[0, 1, 2].sum(), x)
        seen = g[0].abs().sum(-1) > 0
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
