"""Neighborhood attention token mixers (channels-last), NATTEN-compatible constructors."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...spec import BoolOrTuple, IntOrTuple, _as_tuple
from ..registry import register_attn
from .base import QKVMixer, na_attend

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttentionNd(QKVMixer):
    """``qkv`` -> neighborhood attention of rank :attr:`rank` -> ``proj``: ``[B, *S, C] -> [B, *S, C]``.

    NATTEN's module: same constructor, same attributes (``embed_dim``, ``kernel_size``, ``stride``,
    ``dilation``, ``is_causal``, ``scale``, ...) and the same state-dict keys (``qkv``, ``proj``,
    ``rpb [heads, 2k-1, ...]``), so its checkpoints load unchanged. Subclasses set ``rank``.
    """

    rank: int = 0
    dim_arg = "embed_dim"

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
        periodic: BoolOrTuple = False,
    ) -> None:
        super().__init__(embed_dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        name = type(self).__name__
        self.kernel_size = _as_tuple(name, "kernel_size", kernel_size, self.rank, int)
        self.stride = _as_tuple(name, "stride", stride, self.rank, int)
        self.dilation = _as_tuple(name, "dilation", dilation, self.rank, int)
        self.is_causal = _as_tuple(name, "is_causal", is_causal, self.rank, bool)
        self.periodic = _as_tuple(name, "periodic", periodic, self.rank, bool)
        self.backend = backend
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    @property
    def embed_dim(self) -> int:
        """NATTEN's name for the channel count (:attr:`dim` of the mixer base)."""
        return self.dim

    def _na_args(self) -> dict:
        return dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation, is_causal=self.is_causal,
                    periodic=self.periodic)

    def _check(self, x: torch.Tensor) -> None:
        """Raise unless ``x`` is channels-last ``[B, *S, C]`` of this layer's rank and width."""
        if x.dim() != self.rank + 2 or x.shape[-1] != self.dim:
            axes = ", ".join(f"S{i}" for i in range(self.rank))
            raise ValueError(f"{type(self).__name__}: expected a channels-last input [B, {axes}, {self.dim}], "
                             f"got {tuple(x.shape)}. Permute channels-first tensors with x.movedim(1, -1).")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, *S, C]`` -> ``[B, *S, C]``."""
        self._check(x)
        q, k, v = self._qkv(x)
        out = na_attend(q, k, v, na_args=self._na_args(), scale=self.scale, rpb=self.rpb, attn_drop=self.attn_drop,
                        training=self.training, backend=self.backend)
        return self._out(out)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}" + (f", periodic={self.periodic}" if any(self.periodic) else ""))


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
