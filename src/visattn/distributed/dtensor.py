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

__all__ = ["is_dtensor", "local_arg", "local_layout", "map_local", "wrap"]


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


def wrap(local: torch.Tensor, mesh, placements: tuple, shape: tuple) -> "object":
    """A DTensor of global ``shape`` from this rank's ``local`` shard (no communication)."""
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
    return wrap(out, mesh, placements, tuple(x.shape[:-1]) + (out.shape[-1],))


def local_arg(fn: str, name: str, t, mesh, placements: tuple) -> Optional[torch.Tensor]:
    """A plain tensor for an argument: itself, or a DTensor's local shard when laid out as ``placements``."""
    if t is None or not is_dtensor(t):
        return t
    if t.device_mesh != mesh or tuple(t.placements) != tuple(placements):
        raise ValueError(f"{fn}: {name} is a DTensor with placements {tuple(t.placements)} on {t.device_mesh}; "
                         f"expected {tuple(placements)} on the query's mesh {mesh}.")
    return t.to_local()
