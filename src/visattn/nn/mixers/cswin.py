"""CSWin cross-shaped window attention with locally-enhanced positional encoding, on the GNA operator."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import QKVMixer, check_input, na_attend
from ..registry import register_attn

__all__ = ["CSWinAttention"]


@register_attn("cswin", layout="channels_last",
               paper="CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows (2022)",
               complexity="O(N sw (H + W))", backends="visattn NA op", bench_kwargs=dict(num_heads=4))
class CSWinAttention(QKVMixer):
    """CSWin attention: half the heads attend within horizontal stripes (``sw`` rows x full width),
    the other half within vertical stripes (full height x ``sw`` columns), plus LePE.
    ``x [B, H, W, C] -> [B, H, W, C]``.

    Dong et al., "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped
    Windows" (2022). ``out = proj(concat(stripe_attn_h, stripe_attn_v) + DWConv3x3(V))`` (LePE:
    a depthwise 3x3 conv on V added to the attention output).

    On GNA: a horizontal stripe is blocked NA with ``kernel = stride = (sw, W)``, a vertical stripe
    ``(H, sw)``; each runs on its heads' q/k/v, so both inherit every backend.

    Deliberate differences / readings: the first ``ceil(heads/2)`` heads take horizontal stripes
    (an even split when ``num_heads`` is even, as in the paper; CSWin's code puts vertical first,
    which is a relabelling). LePE runs on the whole V map (the paper's ``DWConv(V)``); the official
    code applies it inside each stripe with zero padding at stripe edges. When ``sw`` does not
    divide a side, the last stripe follows GNA (moves inward) instead of padding.
    """

    def __init__(self, dim: int, num_heads: int, split_size: int = 7, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: Optional[str] = None) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        if num_heads < 2:
            raise ValueError(f"CSWinAttention: num_heads={num_heads}; the heads are split between horizontal and "
                             f"vertical stripes, so at least 2 are needed.")
        self.split_size, self.backend = split_size, backend
        self.heads_h = num_heads - num_heads // 2
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W = check_input(self, x, self.dim)
        q, k, v = self._qkv(x)
        sw, nh = self.split_size, self.heads_h
        common = dict(scale=self.scale, attn_drop=self.attn_drop, training=self.training, backend=self.backend)
        rows = dict(kernel_size=(sw, W), stride=(sw, W))
        cols = dict(kernel_size=(H, sw), stride=(H, sw))
        o = torch.cat([na_attend(q[..., :nh, :], k[..., :nh, :], v[..., :nh, :], na_args=rows, **common),
                       na_attend(q[..., nh:, :], k[..., nh:, :], v[..., nh:, :], na_args=cols, **common)], dim=-2)
        lepe = self.lepe(v.flatten(-2).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(o.flatten(-2) + lepe))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, split_size={self.split_size}"
