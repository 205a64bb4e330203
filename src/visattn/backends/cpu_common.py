"""Geometry shared by the fused CPU backends (``cpu`` in numba, ``cpu_c`` in C): per-axis window
tables in group-major order and the rank-3 views the kernels take.

Along an axis with dilation ``d`` the group-major indices ``i`` enumerate dilation group 0, then
group 1, ...; ``pos[i]`` is the coordinate index ``i`` stands for. A query's keys are then one
contiguous run ``[lo[i], hi[i]]`` of indices on every axis, so the kernels never see dilation.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np
import torch

from ..spec import NASpec, axis_windows
from .base import Extras, Problem, lse_dtype, refuse_unfused_features


@lru_cache(maxsize=256)
def axis_tables(length: int, kernel: int, stride: int, dilation: int, causal: bool, requested: int):
    """Per-axis tables in group-major order (see :mod:`cpu_kernels`), int64 ``[L]`` each:
    ``(pos, lo, hi, rof, qlo, qhi)``."""
    w = axis_windows(length, kernel, stride, dilation, causal)
    group, gpos, lo, hi = (t.numpy() for t in (w.group, w.pos, w.lo, w.hi))
    sizes = np.bincount(group, minlength=dilation)
    offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])[group]  # first index of each coord's group
    pos = np.argsort(group * length + gpos, kind="stable")  # index -> coordinate
    lo_i = (offset + lo)[pos]
    hi_i = (offset + hi)[pos]
    rof = (offset + gpos - (requested - 1))[pos]
    # Windows move monotonically with the query, so lo_i/hi_i are non-decreasing and the queries
    # seeing key j are one run: those with hi_i >= j and lo_i <= j.
    keys = np.arange(length)
    qlo = np.searchsorted(hi_i, keys, side="left")
    qhi = np.searchsorted(lo_i, keys, side="right") - 1
    return pos, lo_i, hi_i, rof, qlo, qhi


@lru_cache(maxsize=64)
def tables(spec: NASpec) -> list[np.ndarray]:
    """Rank-3 padded tables ``[pos, lo, hi, rof, qlo, qhi]``, each int64 ``[3, Lmax]``."""
    axes = [axis_tables(L, k, s, d, c, rk) for (L, k, s, d, c), rk in zip(spec.axes(), spec.requested_kernel_size)]
    pad = 3 - len(axes)
    lmax = max(spec.spatial)
    stacked = []
    for field in range(6):
        t = np.zeros((3, lmax), dtype=np.int64)
        for a, ax in enumerate(axes):
            t[pad + a, : len(ax[field])] = ax[field]
        stacked.append(t)
    return stacked


@lru_cache(maxsize=64)
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
            first = np.arange(0, length, 2)
            lo, hi = qlo[2][first], qhi[2][np.minimum(first + 1, length - 1)]
        else:
            lo, hi = qlo[a][:length], qhi[a][:length]
        n = len(lo)
        for chunk in range(1, n + 1):
            starts = np.arange(0, n, chunk)
            # the last query seeing run i (ending at starts[i + 1] - 1) precedes the first seeing run i + 2
            if np.all(hi[starts[1:-1] - 1] < lo[starts[2:]]):
                break
        count = -(-n // chunk)
        if count > best[2]:
            best = (a, chunk, count)
    return best


def rows(t: torch.Tensor) -> np.ndarray:
    """``[..., X]`` contiguous tensor as a 2-D numpy array of rows (shares memory)."""
    return t.reshape(-1, t.shape[-1]).numpy()


def rank3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, extras: Extras):
    """Views as rank 3 (leading axes of length 1) in the compute dtype (float32 for half inputs):
    ``q [B, L0, L1, L2, H, D]``, ``k/v [B, L0, L1, L2, Hk, D(v)]`` and ``rpb [H, R0, R1, R2]`` (``None``
    without a bias table)."""
    r, cdt = p.spec.rank, lse_dtype(q.dtype)
    shape3 = (1,) * (3 - r) + p.spec.spatial
    q3, k3, v3 = (t.to(cdt).reshape(p.batch, *shape3, *t.shape[-2:]) for t in (q, k, v))
    rpb: Optional[torch.Tensor] = None
    if extras.rpb is not None:
        rpb = extras.rpb.to(cdt).reshape(p.heads, *((1,) * (3 - r)), *extras.rpb.shape[1:])
    return q3, k3, v3, rpb


def refuse_cpu(p: Problem, dtypes: tuple, dtype_rule: str) -> Optional[str]:
    """The fused CPU backends' shared refusal: CPU tensors, one of ``dtypes`` (``dtype_rule`` says
    which and why), no per-pair features."""
    if p.device.type != "cpu":
        return f"tensors are on {p.device}, this backend runs on CPU tensors only"
    if p.dtype not in dtypes:
        return f"dtype {p.dtype} is not supported ({dtype_rule})"
    return refuse_unfused_features(p)
