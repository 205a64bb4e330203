"""Neighborhood cross-attention between two maps of different resolutions (channels-last).

A query map ``x [B, *S_q, C]`` attends, through neighborhood attention, to a context map
``context [B, *S_k, C_kv]`` on another grid: query ``x`` is centred at key coordinate
``min(floor((x + 1/2) * S_k / S_q), S_k - 1)`` per axis and sees the ``kernel_size`` window there
(dilation, stride, causal and the relative positional bias follow the key grid; see
:mod:`visattn.spec`). Uses: decoders attending to a coarser feature map, feature upsampling,
optical-flow style matching between two scales. With ``S_k == S_q`` it is plain neighborhood
attention of ``x``'s queries over ``context``'s keys and values.

These modules take two inputs, so they are not in the single-input ``create_attn`` registry.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...spec import BoolOrTuple, IntOrTuple, _as_tuple
from .base import check_heads, na_attend

__all__ = ["NeighborhoodCrossAttention1D", "NeighborhoodCrossAttention2D", "NeighborhoodCrossAttention3D"]


class _NeighborhoodCrossAttentionNd(nn.Module):
    """``q = Linear(C, C)`` of ``x``, ``k, v = Linear(C_kv, 2C)`` of ``context``, neighborhood
    attention across the two grids, ``proj = Linear(C, C)``: ``[B, *S_q, C] -> [B, *S_q, C]``."""

    rank: int = 0

    def __init__(self, dim: int, num_heads: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, kv_dim: Optional[int] = None,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, rel_pos_bias: bool = False, backend: Optional[str] = None) -> None:
        super().__init__()
        name = type(self).__name__
        self.dim, self.num_heads = dim, num_heads
        self.kv_dim = dim if kv_dim is None else kv_dim
        self.head_dim = check_heads(name, dim, num_heads)
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.kernel_size = _as_tuple(name, "kernel_size", kernel_size, self.rank, int)
        self.stride = _as_tuple(name, "stride", stride, self.rank, int)
        self.dilation = _as_tuple(name, "dilation", dilation, self.rank, int)
        self.is_causal = _as_tuple(name, "is_causal", is_causal, self.rank, bool)
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"{name}: attn_drop={attn_drop} must be a probability in [0, 1).")
        self.attn_drop, self.backend = attn_drop, backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(self.kv_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def _check(self, name: str, t: torch.Tensor, channels: int) -> None:
        if t.dim() != self.rank + 2 or t.shape[-1] != channels:
            axes = ", ".join(f"S{i}" for i in range(self.rank))
            raise ValueError(f"{type(self).__name__}: expected {name} channels-last [B, {axes}, {channels}], got "
                             f"{tuple(t.shape)}. Permute channels-first tensors with t.movedim(1, -1).")

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x [B, *S_q, C]`` attends to ``context [B, *S_k, C_kv]``; returns ``[B, *S_q, C]``."""
        self._check("x", x, self.dim)
        self._check("context", context, self.kv_dim)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"{type(self).__name__}: x has batch {x.shape[0]} but context has {context.shape[0]}.")
        heads = (self.num_heads, self.head_dim)
        q = self.q(x).reshape(*x.shape[:-1], *heads)
        k, v = self.kv(context).reshape(*context.shape[:-1], 2, *heads).unbind(-3)
        na_args = dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation,
                       is_causal=self.is_causal)
        out = na_attend(q, k, v, na_args=na_args, scale=self.scale, rpb=self.rpb, attn_drop=self.attn_drop,
                        training=self.training, backend=self.backend)
        return self.proj_drop(self.proj(out.flatten(-2)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, kv_dim={self.kv_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}")


class NeighborhoodCrossAttention1D(_NeighborhoodCrossAttentionNd):
    """1-D neighborhood cross-attention: ``x [B, L_q, C]``, ``context [B, L_k, C_kv]`` -> ``[B, L_q, C]``."""

    rank = 1


class NeighborhoodCrossAttention2D(_NeighborhoodCrossAttentionNd):
    """2-D neighborhood cross-attention: ``x [B, H_q, W_q, C]``, ``context [B, H_k, W_k, C_kv]`` ->
    ``[B, H_q, W_q, C]``."""

    rank = 2


class NeighborhoodCrossAttention3D(_NeighborhoodCrossAttentionNd):
    """3-D neighborhood cross-attention: ``x [B, T_q, H_q, W_q, C]``, ``context [B, T_k, H_k, W_k, C_kv]``
    -> ``[B, T_q, H_q, W_q, C]``."""

    rank = 3
