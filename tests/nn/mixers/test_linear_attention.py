"""Agent, FLatten and InLine attention: linear-time implementations vs their explicit N x N
attention matrices, and the properties each paper is about."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from module_checks import check_all, count_params
from visattn.nn.mixers.linear_attention import (AgentAttention, FocusedLinearAttention, InLineAttention,
                                         focusing_function, inline_attention, kernel_linear_attention)


def _qkv(m, x):
    B, H, W, C = x.shape
    q, k, v = m.qkv(x).reshape(B, H * W, 3, m.num_heads, C // m.num_heads).permute(2, 0, 3, 1, 4)
    return q, k, v  # [B, h, N, d]


def _merge(o, x):
    B, H, W, C = x.shape
    return o.transpose(1, 2).reshape(B, H, W, C)


# ---------------------------------------------------------------- Agent attention

def agent_matrix(m: AgentAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The effective N x N map softmax(Q A^T + B2) softmax(A K^T + B1), and V."""
    B, H, W, C = x.shape
    q, k, v = _qkv(m, x)
    p = m.pool_size
    # Agents by explicit average pooling over each adaptive bin (H, W divisible by p here).
    qmap = q.transpose(1, 2).reshape(B, H, W, C)
    bins = qmap.reshape(B, p, H // p, p, W // p, C).mean((2, 4)).reshape(B, p * p, m.num_heads, -1).transpose(1, 2)
    b1, b2 = m.agent_biases(H, W)
    s = m.scale
    agg = (bins @ k.transpose(-1, -2) * s + b1).softmax(-1)  # [B, h, n, N]
    bcast = (q @ bins.transpose(-1, -2) * s + b2).softmax(-1)  # [B, h, N, n]
    return bcast @ agg, v


def test_agent_is_a_row_stochastic_attention_over_tokens():
    """Agent attention = one N x N attention matrix (product of two softmaxes, rows sum to 1)."""
    torch.manual_seed(0)
    m = AgentAttention(16, 2, agent_num=4).double()
    x = torch.randn(2, 6, 4, 16, dtype=torch.double)
    M, v = agent_matrix(m, x)
    torch.testing.assert_close(M.sum(-1), torch.ones(M.shape[:-1], dtype=torch.double))
    dwc = m.dwc(_merge(v, x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), m.proj(_merge(M @ v, x) + dwc))


def test_agent_with_one_agent_per_token_and_no_bias_reduces_to_two_softmax_hops():
    """n = N agents pooled from 1x1 bins are the queries themselves: O = softmax(QQ^T) softmax(QK^T) V."""
    torch.manual_seed(0)
    m = AgentAttention(8, 1, agent_num=16).double()
    with torch.no_grad():
        m.an_bias.zero_()
        m.na_bias.zero_()
        m.dwc.weight.zero_()
        m.dwc.bias.zero_()
    x = torch.randn(1, 4, 4, 8, dtype=torch.double)
    q, k, v = _qkv(m, x)
    s = m.scale
    o = (q @ q.transpose(-1, -2) * s).softmax(-1) @ ((q @ k.transpose(-1, -2) * s).softmax(-1) @ v)
    torch.testing.assert_close(m(x), m.proj(_merge(o, x)))


# ---------------------------------------------------------------- FLatten

def test_focusing_function_keeps_norm_and_sharpens_direction():
    """f_p keeps ||x|| and moves non-negative x towards its largest component (the paper's "focus")."""
    torch.manual_seed(0)
    x = torch.rand(64, 8, dtype=torch.double) + 1e-3
    fx = focusing_function(x, 3.0)
    torch.testing.assert_close(fx.norm(dim=-1), x.norm(dim=-1))
    e = F.one_hot(x.argmax(-1), 8).double()
    assert (F.cosine_similarity(fx, e) > F.cosine_similarity(x, e)).all()


def test_flatten_matches_quadratic_form():
    """O(N) path equals the explicit normalised N x N kernel attention plus the shared DWC on V."""
    torch.manual_seed(0)
    m = FocusedLinearAttention(16, 2).double()
    x = torch.randn(2, 5, 6, 16, dtype=torch.double)
    B, H, W, C = x.shape
    q, k, v = m.qkv(x).chunk(3, -1)
    fq, fk = m.feature_map(q), m.feature_map(k)
    fq, fk, vh = (t.reshape(B, H * W, 2, 8).transpose(1, 2) for t in (fq, fk, v))
    S = fq @ fk.transpose(-1, -2)
    o = (S @ vh) / (S.sum(-1, keepdim=True) + 1e-6)  # the official code's eps, kept by the module
    local = torch.stack([m.dwc(vh[:, h].transpose(1, 2).reshape(B, 8, H, W)) for h in range(2)], 1)
    local = local.reshape(B, 2, 8, H * W).transpose(-1, -2)
    torch.testing.assert_close(m(x), m.proj(_merge(o + local, x)))


# ---------------------------------------------------------------- InLine

def test_inline_matches_explicit_weights_that_sum_to_one():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, dtype=torch.double) for _ in range(3))
    s, N = 8 ** -0.5, 20
    dots = q @ k.transpose(-1, -2)
    w = (s / N) * (dots - dots.mean(-1, keepdim=True)) + 1.0 / N
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 20, dtype=torch.double))
    torch.testing.assert_close(inline_attention(q, k, v, s), w @ v)


def test_inline_is_injective_where_linear_attention_is_not():
    """Queries q and 2q: normalised linear attention gives identical outputs (non-injective, the
    paper's Proposition), InLine distinguishes them."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 10, 4, dtype=torch.double) for _ in range(3))
    phi_q, phi_k = F.relu(q) + 0.1, F.relu(k) + 0.1
    torch.testing.assert_close(kernel_linear_attention(phi_q, phi_k, v), kernel_linear_attention(2 * phi_q, phi_k, v))
    assert not torch.allclose(inline_attention(q, k, v, 0.5), inline_attention(2 * q, k, v, 0.5))


def test_inline_module_is_global_term_plus_3x3_local_residual():
    torch.manual_seed(0)
    m = InLineAttention(16, 2).double()
    x = torch.randn(2, 5, 6, 16, dtype=torch.double)
    B, H, W, C = x.shape
    q, k, v = _qkv(m, x)
    glob = _merge(inline_attention(q, k, v, m.scale), x)
    r = m.local_weights(x)  # [B, C, 3, 3]
    vmap = F.pad(_merge(v, x), (0, 0, 1, 1, 1, 1))
    local = sum(r[:, None, None, :, a, b] * vmap[:, a:a + H, b:b + W] for a in range(3) for b in range(3))
    torch.testing.assert_close(m(x), m.proj(glob + local))


# ---------------------------------------------------------------- all three

@pytest.mark.parametrize("cls,kw", [(AgentAttention, dict(agent_num=9)), (FocusedLinearAttention, {}),
                                    (InLineAttention, {})])
@pytest.mark.parametrize("H,W", [(6, 6), (5, 3)])
def test_generic_properties(cls, kw, H, W):
    torch.manual_seed(0)
    check_all(cls(32, 4, **kw), torch.randn(2, H, W, 32))


def test_param_counts_closed_form():
    C, h, n = 96, 3, 49
    d = C // h
    # Agent: qkv + proj 4C^2 + 4C, two block biases h n 7^2, DWC 3x3 9C + C.
    assert count_params(AgentAttention(C, h, agent_num=n)) == 4 * C * C + 4 * C + 2 * h * n * 49 + 10 * C
    # FLatten: qkv 3C^2 (no bias), proj C^2 + C, scale C, shared DWC 5x5 on d channels 25 d + d.
    assert count_params(FocusedLinearAttention(C, h)) == 4 * C * C + 2 * C + 26 * d
    # InLine: qkv + proj 4C^2 + 4C, residual MLP C d + C and 9 C d + 9 C (grouped by head).
    assert count_params(InLineAttention(C, h)) == 4 * C * C + 4 * C + C * d + C + 9 * C * d + 9 * C
