"""The halo exchange along one sharded axis, as an autograd function.

Forward: every rank sends each peer the keys/values that peer's queries need (one packed message per
peer and direction, point-to-point) and assembles its slab: own keys and received ones where the plan's
``slab_keys`` put them (on a periodic axis a key may sit at two positions), zeros elsewhere.
Backward: the slab's gradient at the received positions goes back to the owners (the same messages,
reversed, each key's gradient summed over its positions), who add it to the gradient of their shard.
Nothing else is communicated.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from .plan import AxisPlan

__all__ = ["halo_exchange", "count_traffic"]

# Bytes sent by this process while a ``count_traffic`` block is open: {"forward": n, "backward": n}.
_traffic: list[dict[str, int]] = []


@contextlib.contextmanager
def count_traffic() -> Iterator[dict[str, int]]:
    """Count the bytes this process sends in halo exchanges inside the block.

    Yields a dict ``{"forward": bytes, "backward": bytes, "messages": n}``, filled as exchanges run
    (the backward counts if it runs inside the block). Payload bytes only: what the transport adds
    (headers, gloo's framing) is not counted.
    """
    stats = {"forward": 0, "backward": 0, "messages": 0}
    _traffic.append(stats)
    try:
        yield stats
    finally:
        _traffic.remove(stats)


def _record(direction: str, sends: Sequence[torch.Tensor]) -> None:
    for stats in _traffic:
        stats[direction] += sum(t.numel() * t.element_size() for t in sends)
        stats["messages"] += len(sends)


def _p2p(group: Optional[dist.ProcessGroup], sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor],
         direction: str) -> None:
    """Post every send and receive (peers by rank in ``group``), then wait for all of them."""
    g = group if group is not None else dist.group.WORLD
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(g, p), group) for p, t in sends.items()]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(g, p), group) for p, t in recvs.items()]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    _record(direction, list(sends.values()))


def _unpack(buffer: torch.Tensor, shapes: Sequence[torch.Size], dim: int, count: int) -> list[torch.Tensor]:
    """Split a buffer packed by :func:`_trade` from tensors of ``shapes`` with ``count`` rows on ``dim``."""
    shapes = [s[:dim] + (count,) + s[dim + 1:] for s in shapes]
    pieces = buffer.split([torch.Size(s).numel() for s in shapes])
    return [p.view(s) for p, s in zip(pieces, shapes)]


def _row_numel(shapes: Sequence[torch.Size], dim: int) -> int:
    """Elements per coordinate of ``dim``, summed over tensors of ``shapes``."""
    return sum(torch.Size(s[:dim] + s[dim + 1:]).numel() for s in shapes)


def _peers(index_of, world: int, rank: int) -> dict[int, torch.Tensor]:
    """``{peer: index_of(peer)}`` for the other ranks with a non-empty index (only they exchange)."""
    return {p: i for p in range(world) if p != rank and (i := index_of(p)).numel()}


def _trade(send: dict[int, list[torch.Tensor]], like: Sequence[torch.Tensor], dim: int, receive: dict[int, int],
           group: Optional[dist.ProcessGroup], direction: str) -> dict[int, list[torch.Tensor]]:
    """Send peer ``p`` the tensors ``send[p]`` (shaped as ``like`` but for their length on ``dim``), packed
    in one message; receive ``receive[p]`` rows of each from peer ``p``. Returns the received pieces, per
    peer and tensor."""
    shapes = [t.shape for t in like]
    sends = {p: torch.cat([t.reshape(-1) for t in ts]) for p, ts in send.items()}
    recvs = {p: like[0].new_empty(_row_numel(shapes, dim) * n) for p, n in receive.items()}
    _p2p(group, sends, recvs, direction)
    return {p: _unpack(recvs[p], shapes, dim, n) for p, n in receive.items()}


@functools.lru_cache(maxsize=1024)
def _slots(plan: AxisPlan, rank: int, peer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The slab positions of ``rank`` holding a key of ``peer`` (``peer == rank``: its own keys), and each
    one's row among those keys (own: the shard's rows; a peer's: the rows of its message). Depends on the
    plan alone, so it is built once per plan, rank, peer and device (plans are cached too)."""
    shard = plan.shards[rank]
    keys = torch.arange(shard.start, shard.stop) if peer == rank else plan.recv_index(rank, peer)
    where = torch.isin(shard.slab_keys, keys).nonzero().squeeze(1)
    return where.to(device), torch.searchsorted(keys, shard.slab_keys[where]).to(device)


def _assemble(tensors: Sequence[torch.Tensor], plan: AxisPlan, rank: int, group: Optional[dist.ProcessGroup],
              dim: int) -> list[torch.Tensor]:
    """Slabs of ``tensors`` (all sharded alike on ``dim``, one dtype): own keys plus the received halo."""
    shard = plan.shards[rank]
    send = _peers(lambda p: plan.send_index(rank, p), plan.world, rank)
    recv = _peers(lambda p: plan.recv_index(rank, p), plan.world, rank)
    device = tensors[0].device
    rows = {p: [t.index_select(dim, (i - shard.start).to(device)) for t in tensors] for p, i in send.items()}
    pieces = _trade(rows, tensors, dim, {p: i.numel() for p, i in recv.items()}, group, "forward")
    own_pos, own_row = _slots(plan, rank, rank, device)
    slabs = []
    for t in tensors:
        slab = t.new_zeros(t.shape[:dim] + (shard.slab_length,) + t.shape[dim + 1:])
        slab.index_copy_(dim, own_pos, t.index_select(dim, own_row))
        slabs.append(slab)
    for p in recv:
        pos, row = _slots(plan, rank, p, device)
        for slab, piece in zip(slabs, pieces[p]):
            slab.index_copy_(dim, pos, piece.index_select(dim, row))
    return slabs


def _return_grads(grads: Sequence[torch.Tensor], plan: AxisPlan, rank: int, group: Optional[dist.ProcessGroup],
                  dim: int) -> list[torch.Tensor]:
    """Gradients of the shards from gradients of the slabs: the halo's part goes back to its owners, each
    key's gradient summed over the slab positions that held it."""
    shard = plan.shards[rank]
    send = _peers(lambda p: plan.recv_index(rank, p), plan.world, rank)  # the forward's messages, reversed
    recv = _peers(lambda p: plan.send_index(rank, p), plan.world, rank)
    device = grads[0].device

    def fold(peer: int, rows: int) -> list[torch.Tensor]:
        """One row per key ``rank`` holds of ``peer``: the sum of the slab gradient over its positions."""
        pos, row = _slots(plan, rank, peer, device)
        out = [g.new_zeros(g.shape[:dim] + (rows,) + g.shape[dim + 1:]) for g in grads]
        for o, g in zip(out, grads):
            o.index_add_(dim, row, g.index_select(dim, pos))
        return out

    pieces = _trade({p: fold(p, i.numel()) for p, i in send.items()}, grads, dim,
                    {p: i.numel() for p, i in recv.items()}, group, "backward")
    out = fold(rank, shard.stop - shard.start)
    for p, i in recv.items():
        for o, piece in zip(out, pieces[p]):
            o.index_add_(dim, (i - shard.start).to(o.device), piece)
    return out


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: AxisPlan, rank: int, group: Optional[dist.ProcessGroup], dim: int,
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.args = (plan, rank, group, dim)
        ctx.shapes = [t.shape for t in tensors]
        return tuple(_assemble(tensors, plan, rank, group, dim))

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        plan, rank, group, dim = ctx.args
        # Only the inputs that need a gradient travel; which ones do is the same on every rank (the
        # call's arguments are checked to agree), so both ends of every message expect the same size.
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[4:]) if need]
        ref = next(g for g in grads if g is not None)
        length = plan.shards[rank].slab_length
        g = [grads[i] if grads[i] is not None else  # a slab that got no gradient
             ref.new_zeros(ctx.shapes[i][:dim] + (length,) + ctx.shapes[i][dim + 1:]) for i in wanted]
        back = _return_grads(g, plan, rank, group, dim) if wanted else []
        result: list[Optional[torch.Tensor]] = [None] * len(ctx.shapes)
        for i, gi in zip(wanted, back):
            result[i] = gi
        return (None, None, None, None, *result)


def halo_exchange(tensors: Sequence[torch.Tensor], plan: AxisPlan, rank: int, group: Optional[dist.ProcessGroup],
                  dim: int) -> list[torch.Tensor]:
    """Slabs of ``tensors`` along tensor dimension ``dim`` for ``rank`` of ``group`` under ``plan``.

    ``tensors``: this rank's shards, of one dtype and device, sharded alike (``plan`` shards on
    ``dim``; their other dims are the same on every rank). Returns one slab per tensor, ``dim`` of
    length ``plan.shards[rank].slab_length``. Differentiable for floating tensors: the backward sends
    the halo's gradient back to its owners. Every rank of ``group`` must call it with the same plan.
    """
    shard = plan.shards[rank]
    if shard.slab_length == shard.stop - shard.start and not plan.received(rank) and not plan.sent(rank):
        return list(tensors)  # nothing to trade, the slab is the shard: one rank, or windows within shards
    if any(t.requires_grad for t in tensors) and torch.is_grad_enabled():
        return list(_HaloExchange.apply(plan, rank, group, dim, *tensors))
    return _assemble(tensors, plan, rank, group, dim)
