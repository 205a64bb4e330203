"""Geometry of the C kernels: per-axis window tables in group-major order and the colour chunks of
the fused backward, all derived from :func:`visattn.spec.axis_windows`.

Along an axis with dilation ``d`` the group-major indices ``i`` enumerate dilation group 0, then
group 1, ...; ``pos[i]`` is the coordinate index ``i`` stands for. A query's keys are then one
contiguous run ``[lo[i], hi[i]]`` of indices on every axis, so the kernels never see dilation.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ...spec import NASpec, axis_windows, plain_tensors

__all__ = ["axis_tables", "colour_chunks", "tables"]


@lru_cache(maxsize=256)
@plain_tensors()
def axis_tables(length: int, kernel: int, stride: int, dilation: int, causal: bool,
                requested: int) -> tuple[torch.Tensor, ...]:
    """Per-axis tables in group-major order, int64 ``[L]`` each: ``(pos, lo, hi, rof, qlo, qhi, sof)``.

    ``pos[i]``: the coordinate of index ``i``; ``lo[i]..hi[i]``: its keys' indices; ``rof[i]``: the
    offset that turns a key index into the query's relative-position (bias table) index;
    ``qlo[j]..qhi[j]``: the indices of the queries that see key ``j``; ``sof[i]``: the offset that
    turns a key index into the query's neighbourhood slot along this axis (``key - sof[i]`` in
    ``0..kernel-1``; the slot order of ``attn_bias`` and of the returned weights).
    """
    w = axis_windows(length, kernel, stride, dilation, causal)
    sizes = torch.bincount(w.group, minlength=dilation)
    first = torch.cumsum(sizes, 0) - sizes  # first index of each group
    offset = first[w.group]
    pos = torch.argsort(w.group * length + w.pos, stable=True)  # index -> coordinate
    lo = (offset + w.lo)[pos]
    hi = (offset + w.hi)[pos]
    rof = (offset + w.pos - (requested - 1))[pos]
    sof = (offset + w.base)[pos]
    # Windows move monotonically with the query, so lo/hi are non-decreasing and the queries
    # seeing key j are one run: those with hi >= j and lo <= j.
    keys = torch.arange(length)
    qlo = torch.searchsorted(hi, keys, side="left")
    qhi = torch.searchsorted(lo, keys, side="right") - 1
    return pos, lo, hi, rof, qlo, qhi, sof


@lru_cache(maxsize=64)
@plain_tensors()
def tables(spec: NASpec) -> list[torch.Tensor]:
    """Rank-3 padded tables ``[pos, lo, hi, rof, qlo, qhi, sof]``, each int64 ``[3, Lmax]`` (the leading
    virtual axes of a rank-1 or rank-2 problem have length 1: all zeros)."""
    axes = [axis_tables(L, k, s, d, c, rk) for (L, k, s, d, c), rk in zip(spec.axes(), spec.requested_kernel_size)]
    pad = 3 - len(axes)
    lmax = max(spec.spatial)
    stacked = []
    for field in range(7):
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
    shape = (1,) * (3 - spec.rank) + spec.spatial
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
