"""Neighborhood attention token mixers (channels-last), NATTEN-compatible constructors."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...functional import na_av, neighborhood_attention
from ...spec import BoolOrTuple, IntOrTuple, _as_tuple
from ..registry import register_attn

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttentionNd(nn.Module):
    rank: int = 0

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        dilation: IntOrTuple = 1,
        is_causal: BoolOrTuple = False,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        rel_pos_bias: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if embed_dim % num_heads:
            raise ValueError(f"{name}: embed_dim={embed_dim} is not divisible by num_heads={num_heads}.")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kernel_size = _as_tuple(name, "kernel_size", kernel_size, self.rank, int)
        self.stride = _as_tuple(name, "stride", stride, self.rank, int)
        self.dilation = _as_tuple(name, "dilation", dilation, self.rank, int)
        self.is_causal = _as_tuple(name, "is_causal", is_causal, self.rank, bool)
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def _na_args(self) -> dict:
        return dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation, is_causal=self.is_causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, *S, C]`` -> ``[B, *S, C]``."""
        if x.dim() != self.rank + 2 or x.shape[-1] != self.embed_dim:
            axes = ", ".join(f"S{i}" for i in range(self.rank))
            raise ValueError(f"{type(self).__name__}: expected a channels-last input [B, {axes}, {self.embed_dim}], "
                             f"got {tuple(x.shape)}. Permute channels-first tensors with x.movedim(1, -1).")
        q, k, v = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim).unbind(-3)
        if self.attn_drop > 0 and self.training:
            # Dropout acts on the probabilities, so take them explicitly (slower, memory O(tokens*K)).
            _, attn = neighborhood_attention(q, k, v, **self._na_args(), scale=self.scale, rpb=self.rpb,
                                             return_attn=True, backend=self.backend)
            attn = nn.functional.dropout(attn, self.attn_drop, training=True)
            out = na_av(attn, v, **self._na_args())
        else:
            out = neighborhood_attention(q, k, v, **self._na_args(), scale=self.scale, rpb=self.rpb,
                                         backend=self.backend)
        return self.proj_drop(self.proj(out.reshape(x.shape)))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}")


@register_attn("na1d", layout="channels_last", paper="Neighborhood Attention Transformer (2023)", complexity="O(N k)")
class NeighborhoodAttention1D(_NeighborhoodAttentionNd):
    """1-D neighborhood attention layer: ``[B, L, C] -> [B, L, C]``."""

    rank = 1


@register_attn("na2d", layout="channels_last", paper="Neighborhood Attention Transformer (2023)", complexity="O(N k^2)")
class NeighborhoodAttention2D(_NeighborhoodAttentionNd):
    """2-D neighborhood attention layer (NAT/DiNAT): ``[B, H, W, C] -> [B, H, W, C]``."""

    rank = 2


@register_attn("na3d", layout="channels_last", paper="Neighborhood Attention Transformer (2023)", complexity="O(N k^3)")
class NeighborhoodAttention3D(_NeighborhoodAttentionNd):
    """3-D neighborhood attention layer (video/volumes): ``[B, T, H, W, C] -> [B, T, H, W, C]``."""

    rank = 3
