"""Geometry of the C kernels: per-axis window tables in group-major order and the colour chunks of
the fused backward, all derived from :func:`visattn.spec.axis_windows`.

Along an axis with dilation ``d`` the group-major indices ``i`` enumerate dilation group 0, then
group 1, ...; ``pos[i]`` is the coordinate index ``i`` stands for. A query's keys are then one
contiguous run ``[lo[i], hi[i]]`` of indices on every axis, so the kernels never see dilation.

Queries and keys are indexed separately: query indices run over the query grid (``spec.spatial``),
key indices over the kernel's key grid (:func:`key_grid`), which is the query grid for a plain
problem, the key grid of a cross-grid one, and, on a periodic axis, the virtual grid of
:func:`visattn.spec.axis_windows` (the axis padded circularly), so that a periodic problem runs as a
cross-grid one; ``ksrc`` maps a key index to the real key it stands for, which the kernels read in
place (no gathered copy of k and v).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ...spec import NASpec, axis_windows, plain_tensors

__all__ = ["axis_tables", "colour_chunks", "key_grid", "periodic_offsets", "tables"]


def key_grid(spec: NASpec) -> tuple[int, ...]:
    """The key grid the kernels walk: ``spec.key_spatial``, except that a periodic axis becomes the
    virtual grid of :func:`~visattn.spec.axis_windows` (the axis padded circularly)."""
    return tuple(w.key_length for w in spec.windows())


def periodic_offsets(spec: NASpec) -> tuple[int, ...]:
    """Per axis, the virtual key-grid coordinate of real key 0 (``AxisWindows.key_offset``: virtual
    coordinate ``v`` stands for real key ``(v - offset) mod L`` on a periodic axis), 0 elsewhere."""
    return tuple(w.key_offset for w in spec.windows())


@lru_cache(maxsize=256)
@plain_tensors()
def axis_tables(length: int, kernel: int, stride: int, dilation: int, causal: bool, requested: int,
                key_length: int | None = None, periodic: bool = False) -> tuple[torch.Tensor, ...]:
    """Per-axis tables in group-major order: ``(pos, lo, hi, rof, qlo, qhi, sof, kpos, ksrc)``, int64.

    Indexed by query index ``i`` (``[L]``, ``L = length``): ``pos[i]``, its coordinate;
    ``lo[i]..hi[i]``, its keys' indices; ``rof[i]``, the offset that turns a key index into the query's
    relative-position (bias table) index; ``sof[i]``, the offset that turns a key index into the query's
    neighbourhood slot along this axis (``key - sof[i]`` in ``0..kernel-1``; the slot order of
    ``attn_bias`` and of the returned weights). Indexed by key index ``j`` (``[Lk]``, ``Lk`` the key
    grid's length: ``key_length``, or the virtual length of a periodic axis): ``qlo[j]..qhi[j]``, the
    indices of the queries that see key ``j`` (``qlo > qhi`` when none does: cross-grid keys between
    windows); ``kpos[j]``, the key's coordinate on the key grid; ``ksrc[j]``, the coordinate of the
    real key it stands for (``kpos`` but on a periodic axis).
    """
    w = axis_windows(length, kernel, stride, dilation, causal, key_length, periodic)
    nk = w.key_length
    # Key indices: the key grid's coordinates in group-major order (group y % d, then y // d).
    kcoord = torch.arange(nk)
    sizes = torch.bincount(kcoord % dilation, minlength=dilation)
    first = torch.cumsum(sizes, 0) - sizes  # first key index of each group
    kpos = torch.argsort((kcoord % dilation) * nk + kcoord // dilation, stable=True)  # key index -> coordinate
    offset = first[w.group]  # a query's keys are in its centre's group
    # Queries in group-major order of their centres: by group, then by coordinate (centres grow with
    # the coordinate, several queries may share one when the keys are coarser).
    pos = torch.argsort(w.group * length + torch.arange(length), stable=True)  # index -> coordinate
    lo = (offset + w.lo)[pos]
    hi = (offset + w.hi)[pos]
    rof = (offset + w.pos - (requested - 1))[pos]
    sof = (offset + w.base)[pos]
    # Windows move monotonically with the query within a group, and groups hold disjoint, increasing
    # key runs, so lo/hi are non-decreasing and the queries seeing key j are one run: those with
    # hi >= j and lo <= j.
    keys = torch.arange(nk)
    qlo = torch.searchsorted(hi, keys, side="left")
    qhi = torch.searchsorted(lo, keys, side="right") - 1
    return pos, lo, hi, rof, qlo, qhi, sof, kpos, w.key_coord(kpos)


@lru_cache(maxsize=64)
@plain_tensors()
def tables(spec: NASpec) -> list[torch.Tensor]:
    """Rank-3 padded tables ``[pos, lo, hi, rof, qlo, qhi, sof, kpos, ksrc]``, each int64 ``[3, Lmax]``
    (``Lmax``: the longest axis of the query grid and the kernels' key grid; the leading virtual axes
    of a rank-1 or rank-2 problem have length 1: all zeros)."""
    axes = [axis_tables(L, k, s, d, c, rk, Lk, p) for (L, k, s, d, c), rk, Lk, p in
            zip(spec.axes(), spec.requested_kernel_size, spec.key_spatial, spec.periodic)]
    pad = 3 - len(axes)
    lmax = max(max(spec.spatial), max(key_grid(spec)))
    stacked = []
    for field in range(9):
        t = torch.zeros((3, lmax), dtype=torch.int64)
        for a, ax in enumerate(axes):
            t[pad + a, : len(ax[field])] = ax[field]
        stacked.append(t)
    return stacked


@lru_cache(maxsize=64)
@plain_tensors()
def colour_chunks(spec: NASpec) -> tuple[int, int, int]:
    """How to split the keys so that a key-centric backward can also scatter dQ without races.

    Returns ``(axis, chunk, count)``: the rank-3 axis cut into ``count`` runs of ``chunk`` indices
    (pairs of indices on axis 2, the kernels' unit there), the shortest run for which the queries
    seeing run ``c`` and those seeing run ``c + 2`` are disjoint (queries seeing a key are the run
    ``qlo..qhi``, monotone in the key). Runs of one parity then write disjoint dQ rows: all even
    runs go in parallel, then all odd ones. The axis giving the most runs wins.
    """
    qlo, qhi = tables(spec)[4:6]
    shape = (1,) * (3 - spec.rank) + key_grid(spec)  # the key pass walks the key grid
    best = (0, shape[0], 1)
    for a, length in enumerate(shape):
        if a == 2:  # units are the kernels' key pairs (2i, 2i + 1)
            first = torch.arange(0, length, 2)
            lo, hi = qlo[2][first], qhi[2][torch.clamp(first + 1, max=length - 1)]
        else:
            lo, hi = qlo[a][:length], qhi[a][:length]
        n = len(lo)
        for chunk in range(1, n + 1):
            starts = torch.arange(0, n, chunk)
            # the last query seeing run i (ending at starts[i + 1] - 1) precedes the first seeing run i + 2
            if bool(torch.all(hi[starts[1:-1] - 1] < lo[starts[2:]])):
                break
        count = -(-n // chunk)
        if count > best[2]:
            best = (a, chunk, count)
    return best
