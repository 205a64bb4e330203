"""DaViT channel group attention: attention among channels within each group, linear in tokens."""

from __future__ import annotations

import torch
from torch import nn

from .base import check_heads, check_input
from ..registry import register_attn

__all__ = ["ChannelGroupAttention"]


@register_attn("davit_channel", layout="channels_last", paper="DaViT: Dual Attention Vision Transformers (2022)",
               complexity="O(N C^2 / groups)", backends="pure torch", bench_kwargs=dict(num_heads=3))
class ChannelGroupAttention(nn.Module):
    """DaViT channel group attention: channels are split into ``num_heads`` groups; inside a group
    every channel attends to every channel, with all tokens as the feature axis.
    ``x [B, H, W, C] -> [B, H, W, C]``.

    Ding et al., "DaViT: Dual Attention Vision Transformers" (2022). For group ``i`` with
    ``Q_i, K_i, V_i [N, C_g]``: ``A_i = softmax(Q_i^T K_i / sqrt(C_g))`` (``C_g x C_g``) and
    ``out_i = (A_i V_i^T)^T``; cost ``O(N C_g^2)`` per group, linear in tokens, global receptive field.

    Reading: we follow the paper's equation (attention from ``Q^T K`` applied to ``V``); the official
    code applies ``softmax(K^T V)`` to ``Q``, which is the same model with the three projections
    relabelled. Groups are the heads (``num_heads``), as in the paper. No attention dropout (DaViT
    has none on the tiny ``C_g x C_g`` maps).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = check_heads("ChannelGroupAttention", dim, num_heads)
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W = check_input(self, x, self.dim)
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim).unbind(2)  # [B, N, g, Cg]
        attn = (torch.einsum("bngc,bngd->bgcd", q, k) * self.scale).softmax(-1)  # [B, g, Cg, Cg]
        o = torch.einsum("bgcd,bngd->bngc", attn, v)
        return self.proj_drop(self.proj(o.reshape(B, H, W, self.dim)))
