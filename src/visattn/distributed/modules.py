"""The neighborhood-attention layers, sharded: same constructor and weights, sharded activations.

``visattn.distributed.NeighborhoodAttention2D(..., shard_axis=0, group=None)`` is
:class:`visattn.NeighborhoodAttention2D` (same state dict, so a checkpoint loads into either) whose
forward takes this rank's shard ``[B, *S_local, C]`` of the global channels-last input and returns
its shard of the output; a ``DTensor`` input sharded on spatial dims brings its own layout and gets a
DTensor back. The projections act per token, locally; the attention is
:func:`visattn.distributed.neighborhood_attention`. Parameter gradients are this rank's
contributions: reduce them over the group as for any sharded-activation model (DDP, or an
``all_reduce``; see :mod:`visattn.distributed.functional`).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from ..backends import Extras
from ..nn import mixers
from .dtensor import is_dtensor, map_local
from .functional import Groups, _sharding, sharded_attention

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _Sharded:
    """Mixin over a ``mixers.NeighborhoodAttention{1,2,3}D``: ``shard_axis`` and ``group`` keywords."""

    def __init__(self, *args, shard_axis: Union[int, Sequence[int]] = 0, group: Groups = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.attn_drop > 0:
            raise ValueError(f"{type(self).__name__}: attn_drop={self.attn_drop} needs the attention weights of the "
                             f"whole window, which a shard does not hold; use attn_drop=0 (dropout on the output, "
                             f"proj_drop, works).")
        self.shard_axis, self.group = shard_axis, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's shard ``x [B, *S_local, C]`` (or a DTensor) -> its shard of the output."""
        fn = type(self).__name__
        if is_dtensor(x):
            return map_local(fn, x, self.rank, lambda local, axes, groups: self._local(local, axes, groups, "chunk"))
        axes, groups = _sharding(fn, self.shard_axis, self.group)
        return self._local(x, axes, groups, "tensor_split")

    def _local(self, x: torch.Tensor, axes: tuple, groups: tuple, split: str) -> torch.Tensor:
        self._check(x)
        q, k, v = self._qkv(x)
        a = self._na_args()
        requested = (a["kernel_size"], a["stride"], a["dilation"], a["is_causal"], False)
        out = sharded_attention(type(self).__name__, q, k, v, requested, self.scale, None, None, Extras(rpb=self.rpb),
                                axes=axes, groups=groups, split=split, backend=self.backend, return_lse=False,
                                return_attn=False, spatial_rank=self.rank)
        return self._out(out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shard_axis={self.shard_axis}"


class NeighborhoodAttention1D(_Sharded, mixers.NeighborhoodAttention1D):
    """Sharded 1-D neighborhood attention layer: this rank's ``[B, L_local, C]`` -> ``[B, L_local, C]``."""


class NeighborhoodAttention2D(_Sharded, mixers.NeighborhoodAttention2D):
    """Sharded 2-D neighborhood attention layer: this rank's ``[B, H_local, W, C]`` (``shard_axis=0``) -> same."""


class NeighborhoodAttention3D(_Sharded, mixers.NeighborhoodAttention3D):
    """Sharded 3-D neighborhood attention layer: this rank's ``[B, T_local, H, W, C]`` (``shard_axis=0``) -> same."""
