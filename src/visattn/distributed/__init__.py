"""Context-parallel neighborhood attention over ``torch.distributed``: one volume, many processes.

Each rank holds a slab of the global ``[B, *S, H, D]`` tensors along one spatial axis (or a block of
a process grid); a call exchanges only the key/value halo the rank's windows need with the ranks that
hold it, runs the ordinary single-process operator on its slab, and returns its slice of the exact
single-process result, forward and backward. Not imported by ``import visattn``: import
``visattn.distributed``.

* :func:`neighborhood_attention`, :func:`na1d`, :func:`na2d`, :func:`na3d`: the sharded operator
  (plain local shards with ``shard_axis``/``group``, or ``DTensor`` inputs);
* :class:`NeighborhoodAttention1D` / ``2D`` / ``3D``: the layers, sharded;
* :func:`plan_axis`: the halo plan of one axis (what each rank sends and receives);
* :func:`count_traffic`: count the bytes the exchanges send; :mod:`.cost` predicts them, and what an
  all-gather of K/V or head sharding would send.
"""

from .exchange import count_traffic
from .functional import na1d, na2d, na3d, neighborhood_attention
from .modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from .plan import AxisPlan, AxisShard, plan_axis, split_sizes

__all__ = [
    "AxisPlan",
    "AxisShard",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "count_traffic",
    "na1d",
    "na2d",
    "na3d",
    "neighborhood_attention",
    "plan_axis",
    "split_sizes",
]
