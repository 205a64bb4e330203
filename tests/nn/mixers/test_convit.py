"""ConViT GPSA vs the paper's gated formula, and the local initialisation."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params
from visattn.nn.mixers.convit import GatedPositionalSelfAttention


def gpsa_direct(m: GatedPositionalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """A = (1 - sigma(lambda)) softmax(QK^T/sqrt(d)) + sigma(lambda) softmax(v_pos . r), r from loops."""
    B, H, W, C = x.shape
    N, nh, d = H * W, m.num_heads, C // m.num_heads
    pos = [(i, j) for i in range(H) for j in range(W)]
    r = torch.tensor([[[kj - qj, ki - qi, (kj - qj) ** 2 + (ki - qi) ** 2] for ki, kj in pos] for qi, qj in pos],
                     dtype=x.dtype)  # [N, N, 3] = (dx, dy, |d|^2), key minus query
    pos_logits = torch.einsum("qkc,hc->hqk", r, m.pos_proj.weight)
    q, k = m.qk(x).reshape(B, N, 2, nh, d).unbind(2)
    v = m.v(x).reshape(B, N, nh, d)
    content = (torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5).softmax(-1)
    g = torch.sigmoid(m.gating_param)[:, None, None]
    attn = (1 - g) * content + g * pos_logits.softmax(-1)
    return m.proj(torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(B, H, W, C))


@pytest.mark.parametrize("H,W,heads", [(4, 5, 4), (3, 3, 3)])
def test_matches_gated_formula(H, W, heads):
    torch.manual_seed(0)
    m = GatedPositionalSelfAttention(12, heads).double()
    torch.nn.init.normal_(m.pos_proj.weight)
    x = torch.randn(2, H, W, 12, dtype=torch.double)
    torch.testing.assert_close(m(x), gpsa_direct(m, x))


def test_local_init_heads_look_at_their_offsets():
    """9 heads tile the 3x3 offsets around the query; with a strong locality the positional
    attention of each head is (nearly) one-hot on query + Delta_h, and at init the gate is sigma(1)."""
    m = GatedPositionalSelfAttention(18, 9, locality_strength=8.0)
    H = W = 5
    pos = m.positional_attention(H, W).detach()  # [9, 25, 25]
    centre = 2 * W + 2
    offsets = m.head_offsets()
    assert sorted(map(tuple, offsets.tolist())) == [(dx, dy) for dx in (-1.0, 0.0, 1.0) for dy in (-1.0, 0.0, 1.0)]
    for h, (dx, dy) in enumerate(offsets.tolist()):
        target = (2 + int(dy)) * W + (2 + int(dx))
        assert int(pos[h, centre].argmax()) == target
        assert float(pos[h, centre, target]) > 0.99
    torch.testing.assert_close(torch.sigmoid(m.gating_param), torch.full((9,), torch.sigmoid(torch.tensor(1.0)).item()))
    torch.testing.assert_close(m.v.weight, torch.eye(18))


def test_fully_positional_gate_is_a_convolution_like_shift():
    """Gate saturated to the positional branch, strong locality, identity value and projection:
    head h copies its input shifted by Delta_h (a soft convolution, the paper's claim)."""
    m = GatedPositionalSelfAttention(9, 9, locality_strength=50.0).double()
    with torch.no_grad():
        m.gating_param.fill_(50.0)
        m.proj.weight.copy_(torch.eye(9))
        m.proj.bias.zero_()
    x = torch.randn(1, 5, 5, 9, dtype=torch.double)
    y = m(x)
    for h, (dx, dy) in enumerate(m.head_offsets().tolist()):
        torch.testing.assert_close(y[0, 2, 2, h], x[0, 2 + int(dy), 2 + int(dx), h], atol=1e-6, rtol=0)


@pytest.mark.parametrize("H,W", [(5, 5), (3, 7)])
def test_generic_properties(H, W):
    torch.manual_seed(0)
    check_all(GatedPositionalSelfAttention(32, 4, qkv_bias=True), torch.randn(2, H, W, 32))


def test_param_count_closed_form():
    """qk 2C^2, v C^2 (no bias, ConViT's default), proj C^2 + C, v_pos 3 per head, gate 1 per head."""
    C, h = 96, 3
    assert count_params(GatedPositionalSelfAttention(C, h)) == 4 * C * C + C + 3 * h + h
