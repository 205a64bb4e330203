"""VOLO outlook attention: attention weights predicted from the centre token, aggregated by fold."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import check_heads, check_input
from ..registry import register_attn

__all__ = ["OutlookAttention"]


@register_attn("volo", layout="channels_last", paper="VOLO: Vision Outlooker for Visual Recognition (2022)",
               complexity="O(N K^4)", backends="pure torch", bench_kwargs=dict(num_heads=3))
class OutlookAttention(nn.Module):
    """Outlook attention: at each (strided) location a linear layer reads the centre token and
    outputs a ``K^2 x K^2`` attention map per head over its ``K x K`` window; the window's values
    are re-weighted and summed back onto their positions (fold). ``x [B, H, W, C] -> [B, H, W, C]``.

    Yuan et al., "VOLO: Vision Outlooker for Visual Recognition" (2022). ``A = softmax(W_A x_c /
    sqrt(d))`` reshaped ``[heads, K^2, K^2]``; ``Y_window = A V_window``; overlapping windows add.
    No query-key dot products: cost ``O(N K^4)`` for the maps plus ``O(N K^4 d)`` to apply them.

    Readings: ``stride`` defaults to 1 (the paper's equations, every location); VOLO's models use
    stride 2, where the maps are predicted from 2x2-average-pooled tokens (``ceil_mode``). Windows
    reaching past the border see zero values (``padding = K // 2``, as in VOLO).
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, stride: int = 1, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"OutlookAttention: kernel_size={kernel_size} must be odd (windows centred on a token).")
        self.dim, self.num_heads, self.kernel_size, self.stride = dim, num_heads, kernel_size, stride
        self.head_dim = check_heads("OutlookAttention", dim, num_heads)
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, kernel_size ** 4 * num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W = check_input(self, x, self.dim)
        K, s, nh, d = self.kernel_size, self.stride, self.num_heads, self.head_dim
        h, w = math.ceil(H / s), math.ceil(W / s)
        pad = K // 2
        v = F.unfold(self.v(x).permute(0, 3, 1, 2), K, padding=pad, stride=s)  # [B, C*K^2, h*w]
        v = v.reshape(B, nh, d, K * K, h * w).permute(0, 1, 4, 3, 2)  # [B, nh, hw, K^2, d]
        centre = x if s == 1 else F.avg_pool2d(x.permute(0, 3, 1, 2), s, s, ceil_mode=True).permute(0, 2, 3, 1)
        attn = self.attn(centre).reshape(B, h * w, nh, K * K, K * K).transpose(1, 2)
        attn = self.attn_drop((attn * self.scale).softmax(-1))
        y = torch.matmul(attn, v).permute(0, 1, 4, 3, 2).reshape(B, self.dim * K * K, h * w)
        y = F.fold(y, (H, W), K, padding=pad, stride=s)  # overlapping windows add up
        return self.proj_drop(self.proj(y.permute(0, 2, 3, 1)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, stride={self.stride}"
