"""BiFormer bi-level routing attention (region-level top-k routing, then token attention)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import check_heads, check_input, dense_softmax_attention
from ..registry import register_attn

__all__ = ["BiLevelRoutingAttention"]


@register_attn("biformer", layout="channels_last",
               paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (2023)",
               complexity="O(N k N/S^2 + S^4)", backends="pure torch", bench_kwargs=dict(num_heads=3))
class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention (BRA): each of the ``S x S`` regions routes to its ``topk`` most
    related regions, then its tokens attend to the tokens of those regions; plus a local context
    enhancement (LCE) depthwise conv on V. ``x [B, H, W, C] -> [B, H, W, C]``.

    Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention" (2023).
    Region queries/keys are the means of q/k over each region; the region affinity
    ``A_r = Q_r K_r^T`` picks ``I_r = topk(A_r)`` per region (shared by all heads, no gradient
    through the choice); ``O = Attention(Q, gather(K, I_r), gather(V, I_r)) + DWConv5x5(V)``.

    Any input size: where ``n_win`` does not divide a side, the map is zero-padded at the bottom and
    right to the next multiple, as BiFormer's code does (``auto_pad``): the padded tokens go through
    ``qkv``, the region means, the routing, the attention and the LCE like real ones, and their
    outputs are cropped. A map smaller than ``n_win`` pads up to ``n_win`` (regions of one token).

    ``qkv`` has a bias, as in BiFormer's code. Reading: the token-attention scale is
    ``head_dim ** -0.5`` (BiFormer's code uses ``dim ** -0.5``; :class:`~visattn.models.BiFormer`
    passes ``qk_scale`` to reproduce it). Cost per query is ``topk * H * W / S^2`` keys plus the
    ``S^4`` routing matrix.
    """

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, topk: int = 4, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, side_dwconv: int = 5, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        if not 1 <= topk <= n_win * n_win:
            raise ValueError(f"BiLevelRoutingAttention: topk={topk} must be in [1, n_win^2 = {n_win * n_win}].")
        self.head_dim = check_heads("BiLevelRoutingAttention", dim, num_heads)
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lce = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def route(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Region routing: ``q, k [B, S^2, n, C]`` -> top-k region indices ``[B, S^2, topk]``."""
        affinity = q.mean(2) @ k.mean(2).transpose(-1, -2)  # [B, S^2, S^2]
        return affinity.topk(self.topk, dim=-1).indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H_in, W_in = check_input(self, x, self.dim)
        S, C = self.n_win, self.dim
        if H_in % S or W_in % S:  # zero tokens at the bottom/right, up to multiples of S
            x = F.pad(x, (0, 0, 0, (-W_in) % S, 0, (-H_in) % S))
        H, W = x.shape[1:3]
        rh, rw = H // S, W // S
        n, R = rh * rw, S * S
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        to_regions = lambda t: t.reshape(B, S, rh, S, rw, C).transpose(2, 3).reshape(B, R, n, C)  # noqa: E731
        qr, kr, vr = to_regions(q), to_regions(k), to_regions(v)
        idx = self.route(qr.detach(), kr.detach())[..., None, None].expand(B, R, self.topk, n, C)
        gather = lambda t: torch.gather(t[:, None].expand(B, R, R, n, C), 2, idx)  # noqa: E731
        kg, vg = gather(kr).reshape(B, R, -1, C), gather(vr).reshape(B, R, -1, C)
        heads = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(2, 3)  # noqa: E731
        o = dense_softmax_attention(heads(qr), heads(kg), heads(vg), self.scale,
                                    attn_drop=self.attn_drop, training=self.training)  # [B, R, h, n, d]
        o = o.transpose(2, 3).reshape(B, S, S, rh, rw, C).transpose(2, 3).reshape(B, H, W, C)
        o = o + self.lce(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(o[:, :H_in, :W_in]))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}"
