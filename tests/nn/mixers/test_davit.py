"""DaViT channel group attention vs the paper's per-group matrix formula, and its properties."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params, receptive_field
from visattn.nn.mixers.davit import ChannelGroupAttention


def channel_attention_direct(m: ChannelGroupAttention, x: torch.Tensor) -> torch.Tensor:
    """Per group i: A_i = softmax(Q_i^T K_i / sqrt(C_g)), out_i = (A_i V_i^T)^T, as written in the paper."""
    B, H, W, C = x.shape
    g, cg = m.num_heads, C // m.num_heads
    q, k, v = m.qkv(x.reshape(B, H * W, C)).chunk(3, -1)
    outs = []
    for i in range(g):
        sl = slice(i * cg, (i + 1) * cg)
        Q, K, V = q[..., sl], k[..., sl], v[..., sl]  # [B, N, Cg]
        A = (Q.transpose(1, 2) @ K / cg ** 0.5).softmax(-1)  # [B, Cg, Cg]
        outs.append((A @ V.transpose(1, 2)).transpose(1, 2))
    return m.proj(torch.cat(outs, -1).reshape(B, H, W, C))


@pytest.mark.parametrize("H,W,groups", [(6, 6, 4), (5, 9, 2)])
def test_matches_paper_formula(H, W, groups):
    torch.manual_seed(0)
    m = ChannelGroupAttention(16, groups).double()
    x = torch.randn(2, H, W, 16, dtype=torch.double)
    torch.testing.assert_close(m(x), channel_attention_direct(m, x))


def test_token_permutation_equivariant_and_global():
    """Channel attention has no positional notion: permuting tokens permutes the output; and every
    output token depends on every input token (global receptive field)."""
    torch.manual_seed(0)
    m = ChannelGroupAttention(16, 4).double()
    x = torch.randn(1, 4, 5, 16, dtype=torch.double, requires_grad=True)
    perm = torch.randperm(20)
    y = m(x).reshape(1, 20, 16)
    y_perm = m(x.reshape(1, 20, 16)[:, perm].reshape(1, 4, 5, 16)).reshape(1, 20, 16)
    torch.testing.assert_close(y_perm, y[:, perm])
    assert receptive_field(m, x, 0, 0).all()


@pytest.mark.parametrize("H,W", [(7, 7), (5, 3)])
def test_generic_properties(H, W):
    torch.manual_seed(0)
    check_all(ChannelGroupAttention(32, 4), torch.randn(2, H, W, 32))


def test_param_count_closed_form():
    C = 96
    assert count_params(ChannelGroupAttention(C, 3)) == 4 * C * C + 4 * C
