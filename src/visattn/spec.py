"""The window rules of generalized neighborhood attention, in one place.

Every backend derives its neighbourhoods from this module (or is tested against the oracle that
does). The rules follow NATTEN 0.21 exactly (the README's "Semantics" section states them too).

Along one axis of length ``L`` with kernel ``k``, stride ``s``, dilation ``d`` and causal flag ``c``,
a query at coordinate ``x`` belongs to dilation group ``g = x % d`` at group position ``p = x // d``;
the group has ``n = ceil((L - g) / d)`` members and keys come only from the same group, at coordinate
``g + d * t`` for a group position ``t``.

* non-causal: the stride-group leader ``min((p // s) * s + s // 2, n - 1)``, clamped to
  ``[k // 2, n - 1 - (k - 1 - k // 2)]``, is the window centre; keys ``t`` in
  ``[centre - k // 2, centre + k - 1 - k // 2]``: always exactly ``k`` keys (windows shift at
  borders, they are never padded);
* causal: leader ``min((p // s) * s + s - 1, n - 1)``; keys ``t`` with ``t <= p`` and
  ``leader - t < k``.

The neighbourhood *slot* of key ``t`` is ``t - base`` where ``base`` is the window's first
position (``centre - k // 2``, or ``leader - k + 1`` when causal, which may be negative); slots
run ``0..k-1`` per axis, and a multi-axis neighbourhood is the row-major product of the axes' slots.

Variable resolution: NATTEN refuses ``k * d > L``. We define it instead (see :func:`fit_axis`).

Beyond NATTEN, two generalizations of an axis (both reduce to the rules above on a *key grid*):

* **cross-grid**: keys on a grid of length ``Lk`` other than the query's ``Lq``. Query ``x`` is centred
  at key coordinate ``c = min(floor((x + 0.5) * Lk / Lq), Lk - 1)`` and sees exactly what a query at
  ``c`` sees on the key grid (every rule above, stride and causal included, with ``p`` the group
  position of ``c``; the relative position of a key is taken from ``c``). ``Lk == Lq`` gives ``c = x``.
* **periodic**: the axis wraps around. Query ``x`` sees the keys ``(x + d * j) mod L`` for ``j`` in
  ``[-(k // 2), k - 1 - k // 2]``: the window never shifts, it wraps (bias index ``j + k - 1``). Done
  as a window on a *virtual* key grid, the axis padded circularly by ``d * (k // 2)`` before and
  ``d * (k - 1 - k // 2)`` after, where ``x`` sits at ``c = x + d * (k // 2)``; ``key_source`` maps a
  virtual key coordinate to the real one. ``k * d > L`` follows :func:`fit_axis`, so no key is ever
  counted twice. Stride and causal are refused on a periodic axis (a wrapped axis has no start for
  a causal order, and stride groups would straddle the seam), as are periodic cross-grid axes.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Union

import torch

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]

__all__ = [
    "AxisWindows",
    "key_center",
    "plain_tensors",
    "NASpec",
    "axis_windows",
    "fit_axis",
    "make_spec",
    "neighbor_table",
    "na_flops",
]


def _as_tuple(fn: str, name: str, value, rank: int, kind: type) -> tuple:
    """Normalize an int/bool or a per-axis sequence to a ``rank``-tuple, with a helpful error."""
    if isinstance(value, (list, tuple)):
        values = tuple(value)
        if len(values) != rank:
            raise ValueError(
                f"{fn}: {name}={value!r} has {len(values)} entries but the input has {rank} spatial "
                f"axes; pass one value or a tuple of {rank}."
            )
    else:
        values = (value,) * rank
    out = []
    for v in values:
        if kind is bool:
            if not isinstance(v, (bool, int)) or isinstance(v, float):
                raise TypeError(f"{fn}: {name}={value!r} must be a bool or a tuple of {rank} bools.")
            out.append(bool(v))
        else:
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
                    v = int(v)
                else:
                    raise TypeError(
                        f"{fn}: {name}={value!r} must be a positive int or a tuple of {rank} positive "
                        f"ints, got {type(v).__name__}."
                    )
            if v < 1:
                raise ValueError(f"{fn}: {name}={value!r} must be >= 1 on every axis.")
            out.append(int(v))
    return tuple(out)


@dataclass(frozen=True)
class NASpec:
    """Per-axis arguments of one neighborhood-attention call, after normalization.

    ``spatial`` is the query grid, ``key_spatial`` the key grid (the same unless cross-grid);
    ``kernel_size`` etc. are the *effective* values (after :func:`fit_axis` on the key grid);
    ``requested_kernel_size`` keeps what the caller asked for, which fixes the size of a relative
    positional bias table (``2 * requested - 1`` per axis). ``periodic`` marks wrapping axes.
    """

    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    requested_kernel_size: tuple[int, ...]
    key_spatial: tuple[int, ...] = ()
    periodic: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if not self.key_spatial:
            object.__setattr__(self, "key_spatial", self.spatial)
        if not self.periodic:
            object.__setattr__(self, "periodic", (False,) * len(self.spatial))

    @property
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def num_tokens(self) -> int:
        """Query tokens (``prod(spatial)``)."""
        return math.prod(self.spatial)

    @property
    def num_keys(self) -> int:
        """Key tokens (``prod(key_spatial)``)."""
        return math.prod(self.key_spatial)

    @property
    def cross_grid(self) -> bool:
        """Keys live on another grid than the queries on some axis."""
        return self.key_spatial != self.spatial

    @property
    def plain(self) -> bool:
        """Same-grid, non-periodic: the case every backend serves (NATTEN's domain and its extension)."""
        return not self.cross_grid and not any(self.periodic)

    def windows(self) -> list["AxisWindows"]:
        """:func:`axis_windows` of every axis."""
        return [axis_windows(L, k, s, d, c, Lk, p) for (L, k, s, d, c), Lk, p in
                zip(self.axes(), self.key_spatial, self.periodic)]

    @property
    def window_size(self) -> int:
        """Number of neighbourhood slots per query (``prod(kernel_size)``)."""
        return math.prod(self.kernel_size)

    def axes(self):
        """Yield ``(L, k, s, d, causal)`` per axis (``L``: the query length)."""
        return zip(self.spatial, self.kernel_size, self.stride, self.dilation, self.is_causal)


def fit_axis(length: int, kernel: int, stride: int, dilation: int) -> tuple[int, int, int]:
    """Variable-resolution rule: the ``(kernel, stride, dilation)`` actually used on a short axis.

    * ``kernel * dilation <= length``: unchanged (NATTEN's domain, identical results);
    * ``kernel <= length < kernel * dilation``: dilation drops to ``length // kernel``, the largest
      that fits, so the window keeps ``kernel`` keys and spreads as far as the axis allows;
    * ``length < kernel``: the window is the whole axis (``kernel = length``, dilation 1), i.e. full
      attention along that axis.

    Stride is capped at the new kernel. A DiNAT layer trained at 224 thus runs at any resolution.
    """
    if kernel > length:
        kernel, dilation = length, 1
    elif kernel * dilation > length:
        dilation = length // kernel
    return kernel, min(stride, kernel), dilation


def make_spec(
    fn: str,
    spatial: Sequence[int],
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    key_spatial: Optional[Sequence[int]] = None,
    periodic: BoolOrTuple = False,
) -> NASpec:
    """Validate and normalize per-axis arguments for queries on grid ``spatial`` and keys on grid
    ``key_spatial`` (default: the same grid).

    Raises ``TypeError``/``ValueError`` naming ``fn``, the argument, its value and the fix.
    """
    rank = len(spatial)
    ks = _as_tuple(fn, "kernel_size", kernel_size, rank, int)
    st = _as_tuple(fn, "stride", stride, rank, int)
    dl = _as_tuple(fn, "dilation", dilation, rank, int)
    ca = _as_tuple(fn, "is_causal", is_causal, rank, bool)
    pe = _as_tuple(fn, "periodic", periodic, rank, bool)
    key_spatial = tuple(spatial) if key_spatial is None else tuple(key_spatial)
    for axis, (k, s) in enumerate(zip(ks, st)):
        if s > k:
            raise ValueError(
                f"{fn}: stride={st} exceeds kernel_size={ks} on axis {axis} ({s} > {k}); queries "
                f"between windows would see no keys. Use stride <= kernel_size (stride == kernel_size "
                f"is blocked/window attention)."
            )
    for axis, (p, s, c, L, Lk) in enumerate(zip(pe, st, ca, spatial, key_spatial)):
        if not p:
            continue
        if s > 1:
            raise ValueError(f"{fn}: axis {axis} is periodic but stride={st} is {s} there; stride groups would "
                             f"straddle the seam of a wrapping axis. Use stride 1 on periodic axes.")
        if c:
            raise ValueError(f"{fn}: axis {axis} is both periodic and causal (is_causal={ca}); a wrapping axis "
                             f"has no first position to be causal from. Drop one of the two on that axis.")
        if L != Lk:
            raise ValueError(f"{fn}: axis {axis} is periodic but the keys' length there ({Lk}) differs from the "
                             f"queries' ({L}); periodic axes need keys and queries on the same grid.")
    # The window lives on the key grid: fit it there.
    eff = [fit_axis(Lk, k, s, d) if Lk > 0 else (k, s, d) for Lk, k, s, d in zip(key_spatial, ks, st, dl)]
    keep = lambda sizes: tuple(L if isinstance(L, torch.SymInt) else int(L) for L in sizes)  # noqa: E731 (dynamic)
    return NASpec(
        spatial=keep(spatial),
        kernel_size=tuple(e[0] for e in eff),
        stride=tuple(e[1] for e in eff),
        dilation=tuple(e[2] for e in eff),
        is_causal=ca,
        requested_kernel_size=ks,
        key_spatial=keep(key_spatial),
        periodic=pe,
    )


def key_center(x: torch.Tensor, q_length: int, k_length: int) -> torch.Tensor:
    """Key-grid coordinate a query at ``x`` is centred at: ``min(floor((x + 0.5) * Lk / Lq), Lk - 1)``
    (integer arithmetic; ``x`` itself when the lengths agree)."""
    if q_length == k_length:
        return x
    return torch.clamp(((2 * x + 1) * k_length) // (2 * q_length), max=k_length - 1)


@dataclass(frozen=True)
class AxisWindows:
    """Neighbourhoods of all ``L`` query coordinates along one axis; each field is ``[L]`` int64.

    Query ``x`` sees keys at (virtual) key-grid coordinates ``group[x] + d * t`` for group positions
    ``t`` in ``[lo[x], hi[x]]``; key ``t`` fills slot ``t - base[x]`` of the ``k`` slots; ``pos[x]``
    is the group position of the query's centre on the key grid (relative positions are
    ``t - pos[x]``). The key grid has ``key_length`` coordinates; ``key_source`` (``[key_length]``,
    ``None`` for the identity) maps them to real key coordinates (a periodic axis's virtual grid
    repeats the axis around its seam); ``key_offset`` is the key-grid coordinate of the axis's position
    0 (``d * (k // 2)`` on a periodic axis, whose virtual coordinate ``v`` is the unwrapped position
    ``v - key_offset``; 0 elsewhere).
    """

    length: int
    kernel: int
    dilation: int
    group: torch.Tensor
    pos: torch.Tensor
    base: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    key_length: int = 0
    key_source: Optional[torch.Tensor] = None
    key_offset: int = 0

    def group_size(self) -> torch.Tensor:
        """``[L]``: number of key-grid coordinates in each query's dilation group."""
        return (self.key_length - self.group + self.dilation - 1) // self.dilation

    def key_coord(self, virtual: torch.Tensor) -> torch.Tensor:
        """Real key coordinates of virtual key-grid coordinates."""
        return virtual if self.key_source is None else self.key_source[virtual]


@contextlib.contextmanager
def plain_tensors():
    """Build tensors that depend on the spec alone (window tables, tile plans), to be cached and
    reused by any later call: outside ``torch.func`` transforms (a tensor made under ``grad`` or
    ``vmap`` is a wrapper that dies with the transform) and outside the TorchScript tracer (ONNX
    export must hold them as constants, not record the Python that made them)."""
    tracing = torch._C._get_tracing_state()
    if tracing is not None:
        torch._C._set_tracing_state(None)
    try:
        with torch._C._DisableFuncTorch():
            yield
    finally:
        if tracing is not None:
            torch._C._set_tracing_state(tracing)


def _cached(fn):
    """``lru_cache`` of a table builder whose tensors are built as :func:`plain_tensors`."""
    @lru_cache(maxsize=256)
    def cached(*args):
        with plain_tensors():
            return fn(*args)

    cached.__wrapped__ = fn
    return cached


def _static(*values) -> bool:
    """Plain ints (cacheable), as opposed to symbolic sizes seen while exporting with dynamic shapes."""
    return not any(isinstance(v, torch.SymInt) for v in values)


def axis_windows(length: int, kernel: int, stride: int, dilation: int, causal: bool,
                 key_length: Optional[int] = None, periodic: bool = False) -> AxisWindows:
    """Apply the window rules (module docstring) to every query coordinate of one axis (CPU tensors).

    ``key_length`` (default ``length``): the key grid's length (cross-grid); ``periodic``: the axis
    wraps (then ``key_length == length``). Arguments are the effective ones (after :func:`fit_axis`).
    Cached for int sizes; a symbolic size (``torch.export`` with dynamic shapes) is computed with
    traced tensor ops instead, so the exported graph derives the windows from its input's shape.
    """
    args = (length, kernel, stride, dilation, causal, length if key_length is None else key_length, periodic)
    return _axis_windows_cached(*args) if _static(*args) else _axis_windows(*args)


def _axis_windows(length: int, kernel: int, stride: int, dilation: int, causal: bool, key_length: int,
                  periodic: bool) -> AxisWindows:
    x = torch.arange(length, dtype=torch.int64)
    source, before = None, 0
    if periodic:
        before = dilation * (kernel // 2)
        virtual = key_length + dilation * (kernel - 1)
        c = x + before
        source = (torch.arange(virtual) - before) % key_length
        key_length = virtual
    else:
        c = key_center(x, length, key_length)
    g = c % dilation
    p = c // dilation
    n = (key_length - g + dilation - 1) // dilation
    if causal:
        leader = torch.minimum((p // stride) * stride + stride - 1, n - 1)
        base = leader - kernel + 1
        lo = base.clamp(min=0)
        hi = p
    else:
        left = kernel // 2
        right = kernel - 1 - left
        leader = torch.minimum((p // stride) * stride + stride // 2, n - 1)
        centre = torch.maximum(torch.minimum(leader, n - 1 - right), torch.full_like(leader, left))
        base = centre - left
        lo = base
        hi = centre + right
    return AxisWindows(length, kernel, dilation, g, p, base, lo, hi, key_length, source, before)


_axis_windows_cached = _cached(_axis_windows)


def spec_windows(spec: NASpec) -> list[AxisWindows]:
    """:func:`axis_windows` for every axis of ``spec``."""
    return spec.windows()


def neighbor_table(spec: NASpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit neighbourhoods of every query, flattened row-major over the spatial axes.

    Returns ``(index, valid, rel)``: ``index [N, K]`` flat key token (on the key grid) of each slot
    (0 where the slot is empty), ``valid [N, K]`` bool, and ``rel [N, K]`` the flat index into a
    relative-position table of shape ``(2*rk-1, ...)`` (``rk`` = requested kernel) of key minus
    query-centre group positions. ``N = prod(spatial)``, ``K = prod(kernel_size)``. Cached, except
    for symbolic sizes (see :func:`axis_windows`).
    """
    static = _static(*spec.spatial, *spec.key_spatial, *spec.kernel_size)
    return _neighbor_table_cached(spec) if static else _neighbor_table(spec)


def _neighbor_table(spec: NASpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    index = torch.zeros((1, 1), dtype=torch.int64)
    valid = torch.ones((1, 1), dtype=torch.bool)
    rel = torch.zeros((1, 1), dtype=torch.int64)
    for w, rk, Lk in zip(spec.windows(), spec.requested_kernel_size, spec.key_spatial):
        t = w.base[:, None] + torch.arange(w.kernel)[None, :]  # [L, k] group positions
        ok = (t >= w.lo[:, None]) & (t <= w.hi[:, None])
        coord = w.key_coord(torch.where(ok, w.group[:, None] + w.dilation * t, 0))
        r = torch.where(ok, t - w.pos[:, None] + rk - 1, 0)
        k = coord.shape[1]
        # Row-major product: previous axes are the slow dimension of both N and K.
        index = (index[:, None, :, None] * Lk + coord[None, :, None, :]).reshape(-1, index.shape[1] * k)
        rel = (rel[:, None, :, None] * (2 * rk - 1) + r[None, :, None, :]).reshape(-1, rel.shape[1] * k)
        valid = (valid[:, None, :, None] & ok[None, :, None, :]).reshape(-1, valid.shape[1] * k)
    return index, valid, rel


_neighbor_table_cached = _cached(_neighbor_table)


def na_flops(spec: NASpec, batch: int, heads: int, dim: int, dim_v: int | None = None) -> int:
    """Forward FLOPs of the useful work: ``2 * tokens * K * H * (D + D_v)`` (QK^T and PV).

    Counts every slot, ``K = prod(kernel_size)``, as NATTEN and the papers do (causal windows near
    the start have fewer real keys). Backward is conventionally counted as 2x this.
    """
    dim_v = dim if dim_v is None else dim_v
    return 2 * batch * spec.num_tokens * spec.window_size * heads * (dim + dim_v)
