"""Linear-cost attention mixers from one line of work: Agent attention, focused linear attention
(FLatten) and injective linear attention (InLine). Each is ``O(N)`` in tokens and global."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import QKVMixer, check_input, dense_softmax_attention
from ..registry import register_attn

__all__ = ["AgentAttention", "FocusedLinearAttention", "InLineAttention", "focusing_function",
           "inline_attention", "kernel_linear_attention"]


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B, heads, N, C/heads]``."""
    B, H, W, C = t.shape
    return t.reshape(B, H * W, num_heads, C // num_heads).transpose(1, 2)


def _merge(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``[B, heads, N, d]`` -> ``[B, H, W, heads * d]``."""
    return t.transpose(1, 2).reshape(t.shape[0], H, W, -1)


def _depthwise(conv: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
    """Apply a channels-first conv to a channels-last ``[B, H, W, C]`` tensor."""
    return conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


@register_attn("agent", layout="channels_last",
               paper="Agent Attention: On the Integration of Softmax and Linear Attention (2024)",
               complexity="O(N n)", backends="pure torch", bench_kwargs=dict(num_heads=3))
class AgentAttention(QKVMixer):
    """Agent attention: ``n`` agent tokens (pooled queries) first gather from all keys/values, then
    every query reads from the agents; plus a depthwise conv on V. ``x [B, H, W, C] -> [B, H, W, C]``.

    Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention" (2024).
    ``A = pool(Q)`` (``n = agent_num`` tokens, adaptive average pooling to ``sqrt(n) x sqrt(n)``);
    ``V_A = softmax(A K^T / sqrt(d) + B_1) V`` (agent aggregation);
    ``O = softmax(Q A^T / sqrt(d) + B_2) V_A + DWC(V)`` (agent broadcast), cost ``O(N n d)``.

    Difference: the agent biases ``B_1, B_2`` keep the paper's block component (a learned
    ``[heads, n, 7, 7]`` map bilinearly resized to the input) and drop the row/column components,
    whose sizes the official code ties to one training resolution; so any resolution works.
    """

    def __init__(self, dim: int, num_heads: int, agent_num: int = 49, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 bias_size: int = 7, dwc_kernel: int = 3) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.pool_size = math.isqrt(agent_num)
        if self.pool_size ** 2 != agent_num:
            raise ValueError(f"AgentAttention: agent_num={agent_num} must be a perfect square (agents are pooled "
                             f"on a sqrt(n) x sqrt(n) grid), e.g. 49.")
        self.agent_num = agent_num
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, bias_size, bias_size))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, bias_size, bias_size))
        nn.init.trunc_normal_(self.an_bias, std=0.02)
        nn.init.trunc_normal_(self.na_bias, std=0.02)
        self.dwc = nn.Conv2d(dim, dim, dwc_kernel, padding=dwc_kernel // 2, groups=dim)

    def agent_biases(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``B_1 [heads, n, N]`` (agent -> token) and ``B_2 [heads, N, n]`` (token -> agent)."""
        resize = lambda b: F.interpolate(b, size=(H, W), mode="bilinear", align_corners=False).flatten(2)  # noqa: E731
        return resize(self.an_bias), resize(self.na_bias).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W = check_input(self, x, self.dim)
        q, k, v = (t.flatten(-2) for t in self._qkv(x))  # [B, H, W, C]
        agents = F.adaptive_avg_pool2d(q.permute(0, 3, 1, 2), self.pool_size).permute(0, 2, 3, 1)
        qh, kh, vh, ah = (_heads(t, self.num_heads) for t in (q, k, v, agents))
        b1, b2 = self.agent_biases(H, W)
        common = dict(attn_drop=self.attn_drop, training=self.training)
        agent_v = dense_softmax_attention(ah, kh, vh, self.scale, b1, **common)  # [B, h, n, d]
        o = dense_softmax_attention(qh, ah, agent_v, self.scale, b2, **common)  # [B, h, N, d]
        return self.proj_drop(self.proj(_merge(o, H, W) + _depthwise(self.dwc, v)))


def focusing_function(x: torch.Tensor, p: float) -> torch.Tensor:
    """FLatten's ``f_p(x) = ||x|| / ||x^p|| * x^p`` (element-wise power, norms over the last axis):
    keeps the norm, pulls the direction towards the dominant features (for ``x >= 0``)."""
    xp = x ** p
    return xp * (x.norm(dim=-1, keepdim=True) / xp.norm(dim=-1, keepdim=True))


def kernel_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                            eps: float = 1e-6) -> torch.Tensor:
    """``out_i = sum_j (phi_q_i . phi_k_j) v_j / sum_j (phi_q_i . phi_k_j)`` in ``O(N d^2)``:
    ``phi_q, phi_k [..., N, d]``, ``v [..., N, d_v]``. ``eps`` guards an all-zero denominator
    (FLatten's value)."""
    kv = torch.matmul(phi_k.transpose(-1, -2), v)  # [..., d, d_v]
    z = 1.0 / (torch.matmul(phi_q, phi_k.sum(-2, keepdim=True).transpose(-1, -2)) + eps)  # [..., N, 1]
    return torch.matmul(phi_q, kv) * z


@register_attn("flatten", layout="channels_last",
               paper="FLatten Transformer: Vision Transformer using Focused Linear Attention (2023)",
               complexity="O(N d^2)", backends="pure torch", bench_kwargs=dict(num_heads=3))
class FocusedLinearAttention(QKVMixer):
    """Focused linear attention: kernel linear attention with the focused map ``phi_p = f_p(ReLU(.))``
    plus a depthwise conv on V that restores feature diversity. ``x [B, H, W, C] -> [B, H, W, C]``.

    Han et al., "FLatten Transformer: Vision Transformer using Focused Linear Attention" (2023).
    ``phi(x) = f_p(ReLU(x) / softplus(s))`` with ``p = focusing_factor = 3`` and a learned per-channel
    ``s``; ``O = phi(Q) (phi(K)^T V) / (phi(Q) sum_j phi(K_j)) + DWC(V)``, the ``5x5`` depthwise
    conv shared by the heads (as in the official code).

    Readings / differences: ``f_p``'s norms run over all channels before the head split (official
    code); the learned absolute position embedding the official code adds to ``K`` (tied to one
    resolution) is left out, so any resolution works. No ``attn_drop``: the ``N x N`` map is never
    formed.
    """

    def __init__(self, dim: int, num_heads: int, focusing_factor: float = 3.0, kernel_size: int = 5,
                 qkv_bias: bool = False, proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, qkv_bias, None, 0.0, proj_drop)
        self.focusing_factor = focusing_factor
        self.scale_param = nn.Parameter(torch.zeros(dim))
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2, groups=self.head_dim)

    def feature_map(self, t: torch.Tensor) -> torch.Tensor:
        """``phi_p`` on ``[..., C]``."""
        t = (F.relu(t) + 1e-6) / F.softplus(self.scale_param)
        return focusing_function(t, self.focusing_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W = check_input(self, x, self.dim)
        q, k, v = (t.flatten(-2) for t in self._qkv(x))
        qh, kh, vh = (_heads(t, self.num_heads) for t in (self.feature_map(q), self.feature_map(k), v))
        o = _merge(kernel_linear_attention(qh, kh, vh), H, W)
        # The DWC is shared by the heads: fold heads into the batch.
        v_maps = vh.transpose(-1, -2).reshape(B * self.num_heads, self.head_dim, H, W)
        local = self.dwc(v_maps).reshape(B, self.num_heads, self.head_dim, H * W).transpose(-1, -2)
        return self.proj_drop(self.proj(o + _merge(local, H, W)))


def inline_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Injective linear attention in ``O(N d^2)``: weights ``w_ij = (s/N)(q_i.k_j - q_i.k_mean) + 1/N``
    (sum to 1 by subtraction, not division). ``q, k [..., N, d]``, ``v [..., N, d_v]``."""
    N = k.shape[-2]
    kv = torch.matmul(k.transpose(-1, -2), v) * (scale / N)
    k_mean, v_mean = k.mean(-2, keepdim=True), v.mean(-2, keepdim=True)
    return torch.matmul(q, kv) + (1.0 - scale * torch.matmul(q, k_mean.transpose(-1, -2))) * v_mean


@register_attn("inline", layout="channels_last",
               paper="Bridging the Divide: Reconsidering Softmax and Linear Attention (2024)",
               complexity="O(N d^2)", backends="pure torch", bench_kwargs=dict(num_heads=3))
class InLineAttention(QKVMixer):
    """InLine attention: injective linear attention plus a local attention residual over each
    token's 3x3 neighbourhood. ``x [B, H, W, C] -> [B, H, W, C]``.

    Han et al., "Bridging the Divide: Reconsidering Softmax and Linear Attention" (2024).
    ``InL(Q_i)_j = phi(Q_i)^T phi(K_j) - (1/N) sum_s phi(Q_i)^T phi(K_s) + 1/N``: normalised by
    subtraction, so ``Q_i`` and ``2 Q_i`` get different weights (plain linear attention's division
    maps them to the same ones: it is not injective). Local residual: ``sum_{j in 3x3(i)} r_j V_j``
    with ``r`` predicted by a small MLP from the mean token.

    Readings: ``phi`` is the identity with ``phi(q)^T phi(k) = (s / N) q^T k``, ``s = d^-1/2`` (the
    official code's scaling, which keeps the weights O(1/N)); the residual weights are per channel
    (9 per channel, a grouped-by-head two-layer MLP on the token mean) applied as a zero-padded 3x3
    depthwise conv on V, as in the official code. No ``attn_drop``: the ``N x N`` map is never formed.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_scale, 0.0, proj_drop)
        self.residual = nn.Sequential(
            nn.Conv1d(dim, dim, 1, groups=num_heads), nn.GELU(), nn.Conv1d(dim, dim * 9, 1, groups=num_heads))

    def local_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C]`` -> per-sample, per-channel 3x3 weights ``[B, C, 3, 3]``."""
        return self.residual(x.mean((1, 2))[:, :, None]).reshape(x.shape[0], self.dim, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W = check_input(self, x, self.dim)
        q, k, v = (t.flatten(-2) for t in self._qkv(x))
        o = _merge(inline_attention(_heads(q, self.num_heads), _heads(k, self.num_heads),
                                    _heads(v, self.num_heads), self.scale), H, W)
        # Sample-dependent depthwise 3x3: fold the batch into the channels (groups = B * C).
        w = self.local_weights(x).reshape(B * self.dim, 1, 3, 3)
        local = F.conv2d(v.permute(0, 3, 1, 2).reshape(1, B * self.dim, H, W), w, padding=1, groups=B * self.dim)
        return self.proj_drop(self.proj(o + local.reshape(B, self.dim, H, W).permute(0, 2, 3, 1)))
