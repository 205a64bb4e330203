"""The halo plan of one sharded axis: which keys each shard's queries need, and from which rank.

Pure geometry (no communication), derived from the window rules of :mod:`visattn.spec`.

An axis of global length ``L`` is split into contiguous shards, one per rank in group order; rank
``r`` holds the queries, keys and values at global coordinates ``[start_r, stop_r)``. Its queries'
windows (the *global* ones: they shift at the global borders only, and their dilation and stride
groups are counted from global coordinate 0) touch a set of key coordinates, :attr:`AxisShard.needed`,
which may reach several ranks away when shards are narrower than the halo, and is one-sided on a
causal axis.

Each rank then runs the ordinary single-process operator on a *slab* ``[slab_start, slab_stop)``: its
queries zero-padded to the slab, against a key slab holding its own keys and the needed keys it
received (every other slab position is zero and is never attended). The slab is chosen so that the
local call reproduces the global windows of the rank's queries exactly:

* it starts at a multiple of ``dilation * stride`` (the effective values), so dilation groups and
  stride groups keep their global alignment;
* it is long enough that the variable-resolution rule (:func:`~visattn.spec.fit_axis`, which the
  local call applies to the slab's length) leaves the global effective kernel, stride and dilation
  unchanged;
* every query's window, computed by :func:`~visattn.spec.axis_windows` on the slab and shifted by the
  slab start, equals its global window (same keys, same neighbourhood slots, same relative
  positions). This is checked, not assumed: the slab grows until it holds, which it does at the
  latest when it is the whole axis. (A causal axis with stride > 1 needs a few padding keys past the
  last query, so that the stride group's leader is placed as in the global call.)

The local call receives ``kernel_size`` as requested (so the relative positional bias keeps its
``2k - 1`` table), ``stride`` as requested, and the *effective* global dilation.

**A periodic axis** (stride 1, not causal: the only periodic windows) wraps: query ``x`` attends keys
``(x + d*j) mod L``, ``j`` in ``[-(k//2), k-1-k//2]``. Its slab is taken in *unwrapped* coordinates,
``[start - d*(k//2), stop + d*(k-1-k//2))`` (longer if the local call needs ``k*d`` positions), where
slab position ``u`` holds global key ``u mod L``: the circular padding that periodic NA equals, built
from the neighbours' keys. Every window then lies inside the slab and never shifts, so the local call
is ordinary (non-periodic) NA with the effective dilation; the same global key may sit at two slab
positions (a ring shorter than the slab), and its gradients from both are summed on the way back.
:attr:`AxisShard.slab_keys` says which global key each slab position holds, for both kinds of axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..spec import AxisWindows, axis_windows, fit_axis

__all__ = ["AxisPlan", "AxisShard", "plan_axis", "split_sizes"]


def split_sizes(length: int, parts: int, rule: str = "tensor_split") -> tuple[int, ...]:
    """Shard lengths of an axis of ``length`` split into ``parts`` contiguous pieces.

    ``"tensor_split"``: as :func:`torch.tensor_split` (the first ``length % parts`` shards one longer);
    ``"chunk"``: as :func:`torch.chunk` and ``DTensor``'s ``Shard`` (``ceil(length / parts)`` each, the
    last ones shorter or empty).
    """
    if rule == "tensor_split":
        q, r = divmod(length, parts)
        return tuple(q + (i < r) for i in range(parts))
    if rule == "chunk":
        c = -(-length // parts)
        return tuple(max(0, min(c, length - i * c)) for i in range(parts))
    raise ValueError(f"split_sizes: rule={rule!r} must be 'tensor_split' or 'chunk'.")


@dataclass(frozen=True, eq=False)
class AxisShard:
    """One rank's part of a sharded axis, in global coordinates.

    Queries (and own keys) ``[start, stop)``; the local call's grid ``[slab_start, slab_stop)`` (on a
    periodic axis in unwrapped coordinates, which may lie outside ``[0, L)``); ``needed``: sorted
    global key coordinates its queries' windows touch (``[n]`` int64); ``slab_keys``: the global key
    held at each slab position (``[slab_length]`` int64), ``-1`` where no query reads one (zeros there).
    """

    start: int
    stop: int
    slab_start: int
    slab_stop: int
    needed: torch.Tensor
    slab_keys: torch.Tensor

    @property
    def slab_length(self) -> int:
        return self.slab_stop - self.slab_start

    @property
    def pad_before(self) -> int:
        """Slab positions before the rank's own queries."""
        return self.start - self.slab_start

    @property
    def pad_after(self) -> int:
        """Slab positions after the rank's own queries."""
        return self.slab_stop - self.stop


@dataclass(frozen=True, eq=False)
class AxisPlan:
    """The halo plan of one axis for every rank of its group.

    ``kernel``, ``stride``, ``dilation``: the per-axis arguments of the local call (see the module
    docstring; the local call is never periodic, ``periodic`` says whether the global axis is);
    ``shards[r]``: rank ``r``'s :class:`AxisShard`; ``recv[r][p]``: the global key coordinates rank
    ``r`` receives from rank ``p`` (its needed keys that ``p`` holds; empty for ``p == r``).
    """

    length: int
    kernel: int
    stride: int
    dilation: int
    causal: bool
    periodic: bool
    shards: tuple[AxisShard, ...]
    recv: tuple[tuple[torch.Tensor, ...], ...]

    @property
    def world(self) -> int:
        return len(self.shards)

    def recv_index(self, rank: int, peer: int) -> torch.Tensor:
        """Global key coordinates ``rank`` receives from ``peer``."""
        return self.recv[rank][peer]

    def send_index(self, rank: int, peer: int) -> torch.Tensor:
        """Global key coordinates ``rank`` sends to ``peer``: what ``peer`` receives from ``rank``."""
        return self.recv_index(peer, rank)

    def received(self, rank: int) -> int:
        """Key coordinates ``rank`` receives, over all peers (its halo, along this axis)."""
        return sum(int(self.recv_index(rank, p).numel()) for p in range(self.world))

    def sent(self, rank: int) -> int:
        """Key coordinates ``rank`` sends, over all peers."""
        return sum(int(self.send_index(rank, p).numel()) for p in range(self.world))


def _coords(w: AxisWindows, field: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Key-grid coordinates of a group-position ``field`` (``lo``, ``hi``, ``base``, ``pos``) of queries ``x``."""
    return w.group[x] + w.dilation * field[x]


def _reproduces(glob: AxisWindows, effective: tuple[int, int, int], call: tuple[int, int, int], causal: bool,
                start: int, stop: int, slab_start: int, slab_stop: int, shift: int = 0) -> bool:
    """Does the local call on ``[slab_start, slab_stop)`` give queries ``[start, stop)`` their global windows?
    ``shift``: the global key grid's coordinate of axis position 0 (a periodic axis's virtual grid starts
    ``shift`` positions before it; the slab is then in unwrapped coordinates)."""
    length = slab_stop - slab_start
    if fit_axis(length, *call) != effective:
        return False
    loc = axis_windows(length, *effective, causal)
    x = torch.arange(start, stop)
    xl = x - slab_start
    return all(torch.equal(_coords(glob, getattr(glob, f), x) - shift, _coords(loc, getattr(loc, f), xl) + slab_start)
               for f in ("lo", "hi", "base", "pos"))


def _needed(glob: AxisWindows, start: int, stop: int) -> torch.Tensor:
    """Sorted key-grid coordinates the windows of queries ``[start, stop)`` touch (on a periodic axis:
    coordinates of its virtual grid, see :func:`~visattn.spec.axis_windows`)."""
    x = torch.arange(start, stop)
    t = glob.base[x, None] + torch.arange(glob.kernel)[None, :]
    ok = (t >= glob.lo[x, None]) & (t <= glob.hi[x, None])
    return torch.unique((glob.group[x, None] + glob.dilation * t)[ok])


def _empty(start: int) -> AxisShard:
    none = torch.zeros(0, dtype=torch.int64)
    return AxisShard(start, start, start, start, none, none)


def _slab_keys(glob: AxisWindows, shift: int, slab_start: int, slab_stop: int, read: torch.Tensor,
               own: tuple[int, int]) -> torch.Tensor:
    """Global key of each slab position ``u`` that is one of the own queries' positions or a key position
    ``read`` by their windows (the key at key-grid coordinate ``u + shift``), else ``-1``."""
    u = torch.arange(slab_start, slab_stop)
    used = torch.isin(u, read) | ((u >= own[0]) & (u < own[1]))
    return torch.where(used, glob.key_coord((u + shift).clamp(0, glob.key_length - 1)), -1)


def _shard(glob: AxisWindows, length: int, effective: tuple[int, int, int], call: tuple[int, int, int],
           causal: bool, start: int, stop: int) -> AxisShard:
    if stop == start:
        return _empty(start)
    needed = _needed(glob, start, stop)
    kernel, stride, dilation = effective
    if call[0] > length:  # the window is the whole axis: so is every slab
        return AxisShard(start, stop, 0, length, needed, _slab_keys(glob, 0, 0, length, needed, (start, stop)))
    align = dilation * stride
    lo = min(int(needed[0]), start)
    slab_start, slab_stop = lo - lo % align, max(int(needed[-1]) + 1, stop)
    # fit_axis must keep the global dilation: the slab spans at least kernel * dilation positions.
    slab_stop = min(length, max(slab_stop, slab_start + kernel * dilation))
    while slab_stop - slab_start < kernel * dilation:
        slab_start = max(0, slab_start - align)
    while not _reproduces(glob, effective, call, causal, start, stop, slab_start, slab_stop):
        if slab_stop < length:
            slab_stop += 1
        elif slab_start > 0:
            slab_start = max(0, slab_start - align)
        else:  # unreachable: on the whole axis the local call is the global one
            raise AssertionError(f"plan_axis: no slab reproduces the windows of [{start}, {stop}) of {length}")
    return AxisShard(start, stop, slab_start, slab_stop, needed,
                     _slab_keys(glob, 0, slab_start, slab_stop, needed, (start, stop)))


def _periodic_shard(glob: AxisWindows, length: int, effective: tuple[int, int, int], call: tuple[int, int, int],
                    start: int, stop: int) -> AxisShard:
    """The unwrapped slab of queries ``[start, stop)`` of a periodic axis (module docstring), from the
    global windows ``glob`` on the axis's virtual key grid."""
    if stop == start:
        return _empty(start)
    shift = glob.key_offset  # where axis position 0 sits on the virtual grid
    read = _needed(glob, start, stop) - shift  # unwrapped key positions
    slab_start, slab_stop = min(int(read[0]), start), max(int(read[-1]) + 1, stop)
    slab_stop = max(slab_stop, slab_start + effective[0] * effective[2])  # the local call keeps the dilation
    if not _reproduces(glob, effective, call, False, start, stop, slab_start, slab_stop, shift):
        raise AssertionError(f"plan_axis: the periodic slab of [{start}, {stop}) of {length} shifts a window")
    return AxisShard(start, stop, slab_start, slab_stop, torch.unique(glob.key_coord(read + shift)),
                     _slab_keys(glob, shift, slab_start, slab_stop, read, (start, stop)))


@lru_cache(maxsize=256)
def plan_axis(sizes: tuple[int, ...], kernel: int, stride: int, dilation: int, causal: bool,
              periodic: bool = False) -> AxisPlan:
    """Halo plan of an axis split into shards of lengths ``sizes`` (in rank order).

    ``kernel``, ``stride``, ``dilation`` are the values the caller requested (validated:
    ``stride <= kernel``); the global variable-resolution rule is applied here, from the global length
    ``sum(sizes)``. A ``periodic`` axis needs ``stride == 1``, ``causal`` False and a kernel no longer
    than the axis (``ValueError`` otherwise). Cached per geometry.
    """
    length = sum(sizes)
    if periodic and (stride != 1 or causal or kernel > length):
        raise ValueError(f"plan_axis: a sharded periodic axis needs stride 1, no causal mask and kernel_size <= its "
                         f"length; got kernel_size={kernel}, stride={stride}, is_causal={causal}, length={length}.")
    effective = fit_axis(length, kernel, stride, dilation) if length > 0 else (kernel, stride, dilation)
    call = (kernel, stride, effective[2])
    glob = axis_windows(length, *effective, causal, periodic=periodic) if length > 0 else None
    shards, start = [], 0
    for size in sizes:
        shards.append(_periodic_shard(glob, length, effective, call, start, start + size) if periodic else
                      _shard(glob, length, effective, call, causal, start, start + size))
        start += size
    recv = tuple(tuple(r.needed[(r.needed >= p.start) & (r.needed < p.stop)] if r is not p else r.needed[:0]
                       for p in shards) for r in shards)
    return AxisPlan(length, *call, causal, periodic, tuple(shards), recv)
