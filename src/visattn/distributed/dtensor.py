"""``torch.distributed.tensor.DTensor`` inputs: PyTorch's own description of a sharded tensor.

A DTensor on a ``DeviceMesh`` says, per mesh dimension, how the global tensor is laid out: ``Shard(d)``
splits tensor dim ``d`` over that mesh dimension's ranks (``torch.chunk`` lengths), ``Replicate()``
copies it. Sharding spatial dims ``1..r`` of ``[B, *S, H, D]`` is context parallelism, one mesh
dimension per sharded axis (a 2-D mesh shards two axes: a process grid); ``Shard(0)`` (batch) and
``Replicate()`` need no communication. The sharded call runs on the local tensors with the mesh
dimensions' process groups, and the results are wrapped back with the same mesh and placements.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import torch

from ..backends import Extras
from ..functional import Output

__all__ = ["dtensor_attention", "is_dtensor", "local_layout", "map_local"]


def is_dtensor(t: object) -> bool:
    """``t`` is a DTensor (without importing DTensor when nothing has loaded it: then nothing is one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_layout(fn: str, t, spatial_rank: int) -> tuple[tuple[int, ...], tuple, "object", tuple]:
    """``(axes, groups, mesh, placements)`` of a DTensor sharded on spatial dims of ``[B, *S, ...]``.

    Raises ``ValueError`` for placements that are not ``Shard`` of the batch or spatial dims or
    ``Replicate``, and for a spatial axis split over two mesh dimensions.
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = t.device_mesh, tuple(t.placements)
    axes, groups = [], []
    for i, p in enumerate(placements):
        if isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0):
            continue
        if not isinstance(p, Shard) or not 1 <= p.dim <= spatial_rank:
            raise ValueError(f"{fn}: mesh dimension {i} has placement {p}; sharded neighborhood attention takes "
                             f"Shard(d) of a spatial dim (1..{spatial_rank}), Shard(0) (batch) or Replicate(). "
                             f"Redistribute, e.g. t.redistribute(mesh, [Shard(1)]).")
        if p.dim - 1 in axes:
            raise ValueError(f"{fn}: spatial dim {p.dim} is sharded over two mesh dimensions {placements}; shard each "
                             f"spatial axis over at most one mesh dimension.")
        axes.append(p.dim - 1)
        groups.append(mesh.get_group(i))
    return tuple(axes), tuple(groups), mesh, placements


def _wrap(local: torch.Tensor, mesh, placements: tuple, shape: tuple) -> "object":
    from torch.distributed.tensor import DTensor

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def map_local(fn: str, x, spatial_rank: int, body: Callable[[torch.Tensor, tuple, tuple], torch.Tensor]) -> "object":
    """Run ``body(local, axes, groups)`` on a DTensor's local shard; wrap its result like ``x``.

    ``body`` must return a tensor with ``x``'s dims except possibly the last (its global shape is
    ``x``'s with the last dim of the result).
    """
    axes, groups, mesh, placements = local_layout(fn, x, spatial_rank)
    out = body(x.to_local(), axes, groups)
    return _wrap(out, mesh, placements, tuple(x.shape[:-1]) + (out.shape[-1],))


def _local(fn: str, name: str, t, mesh, placements: Optional[tuple]) -> Optional[torch.Tensor]:
    """A plain tensor for an argument: itself, or a DTensor's local shard when laid out as required."""
    if t is None or not is_dtensor(t):
        return t
    if t.device_mesh != mesh or (placements is not None and tuple(t.placements) != placements):
        want = "the query's placements " + str(placements) if placements is not None else "Replicate() everywhere"
        raise ValueError(f"{fn}: {name} is a DTensor with placements {tuple(t.placements)} on {t.device_mesh}; "
                         f"expected {want} on the query's mesh.")
    return t.to_local()


def dtensor_attention(fn: str, query, key, value, requested: tuple, scale: Optional[float], additional_keys,
                      additional_values, extras: Extras, *, backend: Optional[str], return_lse: bool,
                      return_attn: bool, spatial_rank: Optional[int]) -> Output:
    """The sharded call on DTensor ``query``/``key``/``value`` (same mesh and placements); DTensor results."""
    from torch.distributed.tensor import Replicate

    from .functional import sharded_attention

    if not all(is_dtensor(t) for t in (query, key, value)):
        raise TypeError(f"{fn}: query, key and value must all be DTensors or all plain tensors; got "
                        f"{', '.join(type(t).__name__ for t in (query, key, value))}.")
    r = query.dim() - 3
    axes, groups, mesh, placements = local_layout(fn, query, r)
    for name, t in (("key", key), ("value", value)):
        if t.device_mesh != mesh or tuple(t.placements) != placements:
            raise ValueError(f"{fn}: {name} has placements {tuple(t.placements)} on {t.device_mesh} but query has "
                             f"{placements} on {mesh}; lay them out alike.")
    replicated = (Replicate(),) * mesh.ndim
    result = sharded_attention(
        fn, query.to_local(), key.to_local(), value.to_local(), requested, scale,
        _local(fn, "additional_keys", additional_keys, mesh, replicated),
        _local(fn, "additional_values", additional_values, mesh, replicated),
        Extras(rpb=_local(fn, "rpb", extras.rpb, mesh, replicated),
               attn_bias=_local(fn, "attn_bias", extras.attn_bias, mesh, placements),
               key_padding_mask=_local(fn, "key_padding_mask", extras.key_padding_mask, mesh, placements)),
        axes=axes, groups=groups, split="chunk", backend=backend, return_lse=return_lse, return_attn=return_attn,
        spatial_rank=spatial_rank)
    outs = result if isinstance(result, tuple) else (result,)
    wrapped = tuple(_wrap(t, mesh, placements, tuple(query.shape[:-2]) + tuple(t.shape[r + 1:])) for t in outs)
    return wrapped if isinstance(result, tuple) else wrapped[0]
