"""MaxViT multi-axis attention: block attention and grid attention, both on the GNA operator.

Block attention is blocked NA (``kernel = stride = P``); grid attention is the same on dilation
groups: tokens ``r, r + d, r + 2d, ...`` with ``d = L / G`` form one grid window, i.e. kernel ``G``
with dilation ``d`` (the window covers the whole group, so stride is immaterial).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import QKVMixer, check_input, na_attend
from ..registry import register_attn

__all__ = ["MaxViTBlockAttention", "MaxViTGridAttention"]

_PAPER = "MaxViT: Multi-Axis Vision Transformer (2022)"


class _MaxViTAttention(QKVMixer):
    def __init__(self, dim: int, num_heads: int, size: int = 7, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: Optional[str] = None) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.size, self.backend = size, backend
        # MaxViT's relative attention bias: one (2P-1)^2 (or (2G-1)^2) table per head.
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * size - 1, 2 * size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W = check_input(self, x, self.dim)
        q, k, v = self._qkv(x)
        o = na_attend(q, k, v, na_args=self._na_args(H, W), scale=self.scale, rpb=self.rpb,
                      attn_drop=self.attn_drop, training=self.training, backend=self.backend)
        return self._out(o)


@register_attn("maxvit_block", layout="channels_last", paper=_PAPER, complexity="O(N P^2)",
               backends="visattn NA op", bench_kwargs=dict(num_heads=3))
class MaxViTBlockAttention(_MaxViTAttention):
    """MaxViT block attention: self-attention inside non-overlapping ``P x P`` windows, with
    relative attention bias. ``x [B, H, W, C] -> [B, H, W, C]``.

    Tu et al., "MaxViT: Multi-Axis Vision Transformer" (2022). Equals GNA with
    ``kernel_size = stride = P`` and ``rpb``. ``window_size`` is ``P``.

    Deliberate difference: where ``P`` does not divide a side, MaxViT pads; we follow GNA (the last
    window moves inward, no padded tokens).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, **kwargs) -> None:
        super().__init__(dim, num_heads, window_size, **kwargs)

    def _na_args(self, H: int, W: int) -> dict:
        return dict(kernel_size=self.size, stride=self.size)


@register_attn("maxvit_grid", layout="channels_last", paper=_PAPER, complexity="O(N G^2)",
               backends="visattn NA op", bench_kwargs=dict(num_heads=3))
class MaxViTGridAttention(_MaxViTAttention):
    """MaxViT grid attention: a fixed ``G x G`` grid of tokens spread over the whole map (dilated,
    global) attend to each other, with relative attention bias. ``x [B, H, W, C] -> [B, H, W, C]``.

    Tu et al. (2022). The grid partition puts token ``(i, j)`` in the window of tokens
    ``(i mod d_h + d_h * a, j mod d_w + d_w * b)`` with ``d = L / G``: GNA with kernel ``G`` and
    dilation ``d`` per axis; the bias is indexed by grid (not pixel) offsets, as in MaxViT.

    Deliberate difference: when ``G`` does not divide a side, MaxViT pads; we use dilation
    ``L // G`` and GNA's rules (groups of more than ``G`` tokens are cut into stride-``G`` windows
    that move inward at the end). A side shorter than ``G`` is attended whole.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: int = 7, **kwargs) -> None:
        super().__init__(dim, num_heads, grid_size, **kwargs)

    def _na_args(self, H: int, W: int) -> dict:
        G = self.size
        return dict(kernel_size=G, stride=G, dilation=(max(1, H // G), max(1, W // G)))
