"""Bytes each rank sends per call: the halo exchange, and the two usual alternatives.

All three for a global ``[B, *S, H, D]`` problem (keys/values with ``H_kv`` heads, values of head dim
``D_v``) split over ``world`` ranks:

* **halo** (this package): forward, each rank sends its peers the keys/values their windows need
  (:class:`~visattn.distributed.plan.AxisPlan`); backward, it sends back the gradient of the halo it
  received. Independent of ``world`` until shards get narrower than the halo.
* **all-gather of K/V**: every rank gathers the whole key/value tensors (a ring all-gather sends
  ``(world - 1)`` shards per rank) and the backward reduce-scatters their gradients (the same bytes).
* **head sharding** (all-to-all, "Ulysses"): each rank trades its spatial shard of q, k, v for all
  tokens of ``H / world`` heads and trades the output back (four all-to-alls, each sending
  ``(world - 1) / world`` of the local tensor); the backward does the same with the output gradient
  and dq, dk, dv. Needs ``world`` to divide the heads.

Payload bytes only (no protocol overhead), for one sharded axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .plan import AxisPlan, plan_axis, split_sizes

__all__ = ["Traffic", "allgather_bytes", "halo_bytes", "halo_plan", "head_sharding_bytes"]


@dataclass(frozen=True)
class Traffic:
    """Bytes one rank sends in one forward and one backward (the busiest rank for uneven plans)."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def _row_bytes(shape: Sequence[int], axis: int, batch: int, heads_kv: int, dim: int, dim_v: int,
               itemsize: int) -> int:
    """Bytes of keys + values per coordinate of the sharded axis."""
    cross = math.prod(s for i, s in enumerate(shape) if i != axis)
    return batch * cross * heads_kv * (dim + dim_v) * itemsize


def halo_plan(shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
              causal: Sequence[bool], axis: int, world: int, periodic: Sequence[bool] | None = None) -> AxisPlan:
    """The :func:`plan_axis` of spatial ``axis`` of ``shape`` split over ``world`` ranks (``tensor_split``)."""
    ring = bool(periodic[axis]) if periodic is not None else False
    return plan_axis(split_sizes(shape[axis], world), kernel[axis], stride[axis], dilation[axis], causal[axis], ring)


def halo_bytes(shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
               causal: Sequence[bool], axis: int, world: int, *, batch: int, heads_kv: int, dim: int, dim_v: int,
               itemsize: int, rank: int | None = None, periodic: Sequence[bool] | None = None) -> Traffic:
    """Halo-exchange bytes of ``rank`` (default: the busiest rank) per forward and backward."""
    plan = halo_plan(shape, kernel, stride, dilation, causal, axis, world, periodic)
    row = _row_bytes(shape, axis, batch, heads_kv, dim, dim_v, itemsize)
    ranks = range(world) if rank is None else [rank]
    return Traffic(max(plan.sent(r) for r in ranks) * row, max(plan.received(r) for r in ranks) * row)


def allgather_bytes(shape: Sequence[int], axis: int, world: int, *, batch: int, heads_kv: int, dim: int, dim_v: int,
                    itemsize: int) -> Traffic:
    """All-gather of K/V forward, reduce-scatter of dK/dV backward (ring; largest shard)."""
    shard = max(split_sizes(shape[axis], world)) * _row_bytes(shape, axis, batch, heads_kv, dim, dim_v, itemsize)
    return Traffic((world - 1) * shard, (world - 1) * shard)


def head_sharding_bytes(shape: Sequence[int], axis: int, world: int, *, batch: int, heads: int, heads_kv: int,
                        dim: int, dim_v: int, itemsize: int) -> Traffic:
    """All-to-all head sharding: q, k, v in and the output back (forward); their gradients (backward)."""
    tokens = max(split_sizes(shape[axis], world)) * math.prod(s for i, s in enumerate(shape) if i != axis)
    local = batch * tokens * itemsize * (heads * dim + heads_kv * (dim + dim_v) + heads * dim_v)
    sent = local * (world - 1) // world
    return Traffic(sent, sent)
