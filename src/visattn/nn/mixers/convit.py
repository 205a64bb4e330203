"""ConViT gated positional self-attention (GPSA), initialised as a convolution-like local attention."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .base import check_heads, check_input
from ..registry import register_attn

__all__ = ["GatedPositionalSelfAttention", "relative_positions"]


def relative_positions(H: int, W: int, device: Optional[torch.device] = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ConViT's ``r_ij = (dx, dy, dx^2 + dy^2)`` for every query/key pair: ``[N, N, 3]``, key minus
    query, ``N = H * W`` row-major."""
    ys, xs = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    ys, xs = ys.flatten().to(dtype), xs.flatten().to(dtype)
    dy, dx = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1)


@register_attn("convit", layout="channels_last",
               paper="ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases (2021)",
               complexity="O(N^2)", backends="pure torch", bench_kwargs=dict(num_heads=3))
class GatedPositionalSelfAttention(nn.Module):
    """GPSA: each head mixes content attention and a purely positional attention through a learned
    gate. ``x [B, H, W, C] -> [B, H, W, C]``.

    d'Ascoli et al., "ConViT: Improving Vision Transformers with Soft Convolutional Inductive
    Biases" (2021). ``A_h = (1 - sigma(lambda_h)) softmax(Q K^T / sqrt(d)) + sigma(lambda_h)
    softmax(v_pos_h . r_ij)`` with ``r_ij = (dx, dy, |d|^2)`` and ``lambda_h = 1`` at init.

    Local init (the paper's): ``v_pos_h = alpha (2 Delta_x, 2 Delta_y, -1)``, i.e. the positional
    logit is ``-alpha |delta - Delta_h|^2 + const``: head ``h`` looks at offset ``Delta_h`` from the
    query, the heads' offsets tiling a grid around it (a soft ``sqrt(heads) x sqrt(heads)`` conv);
    ``alpha = locality_strength``; the value projection starts as the identity.

    Readings / differences: when ``num_heads`` is not a square, the offsets are the first
    ``num_heads`` cells (column-major, as ConViT's loop) of the smallest square grid holding them
    (ConViT leaves those heads at random init). ``pos_proj`` has no bias: a per-head constant cancels
    in the softmax (ConViT's bias gets no gradient). ConViT renormalises ``A`` by its row sums, a
    no-op for a convex mix of two distributions, so we skip it. Full attention: ``O(N^2)`` memory.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, locality_strength: float = 1.0,
                 use_local_init: bool = True) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = check_heads("GatedPositionalSelfAttention", dim, num_heads)
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.pos_proj = nn.Linear(3, num_heads, bias=False)
        self.gating_param = nn.Parameter(torch.ones(num_heads))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.locality_strength = locality_strength
        if use_local_init:
            self.local_init()

    def head_offsets(self) -> torch.Tensor:
        """``[heads, 2]`` the ``(Delta_x, Delta_y)`` each head attends to at local init."""
        ks = math.ceil(math.sqrt(self.num_heads))
        centre = (ks - 1) / 2
        cells = [(h1, h2) for h2 in range(ks) for h1 in range(ks)][: self.num_heads]  # ConViT: h1 + ks * h2
        return torch.tensor([(h2 - centre, h1 - centre) for h1, h2 in cells], dtype=torch.float32)

    @torch.no_grad()
    def local_init(self) -> None:
        """ConViT's locality initialisation (see the class docstring)."""
        self.v.weight.copy_(torch.eye(self.dim))
        off = self.head_offsets()
        w = torch.stack([2 * off[:, 0], 2 * off[:, 1], -torch.ones(self.num_heads)], dim=-1)
        self.pos_proj.weight.copy_(self.locality_strength * w)

    def positional_attention(self, H: int, W: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """``softmax(v_pos . r_ij)`` per head: ``[heads, N, N]`` (independent of the content)."""
        r = relative_positions(H, W, device, dtype)
        return self.pos_proj(r).permute(2, 0, 1).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W = check_input(self, x, self.dim)
        N, nh, d = H * W, self.num_heads, self.head_dim
        q, k = self.qk(x).reshape(B, N, 2, nh, d).permute(2, 0, 3, 1, 4)
        v = self.v(x).reshape(B, N, nh, d).transpose(1, 2)
        patch = (torch.matmul(q, k.transpose(-1, -2)) * self.scale).softmax(-1)  # [B, h, N, N]
        pos = self.positional_attention(H, W, x.device, x.dtype)[None]
        gate = torch.sigmoid(self.gating_param)[None, :, None, None]
        attn = self.attn_drop((1.0 - gate) * patch + gate * pos)
        o = torch.matmul(attn, v).transpose(1, 2).reshape(B, H, W, self.dim)
        return self.proj_drop(self.proj(o))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, locality_strength={self.locality_strength}"
