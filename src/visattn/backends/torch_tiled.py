"""Portable pure-PyTorch backend: query tiles against their haloed key regions, as batched GEMMs.

Each axis is cut into tiles of ``T`` consecutive queries whose window centres lie in one dilation
group of the key grid; the keys any query of a tile can see form one contiguous run of that group
(windows move monotonically with the centre), at most ``R`` long. Cross-grid and periodic axes are
the same walk on the key grid (a periodic axis's virtual grid maps back to its real keys). A tile is then a small dense attention problem ``[T^r queries] x [R^r keys]`` with a
mask, so the whole call is a handful of gathers and two batched matmuls, on any device, with
autograd for the backward. Memory is ``O(tokens * R^r)``: linear in tokens, never quadratic.

The per-axis masks, neighbourhood slots and relative positions all come from
:func:`visattn.spec.axis_windows`; this file only re-indexes them into tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import torch

from ..spec import AxisWindows, NASpec, plain_tensors
from .base import Backend, Extras, Problem, Result, lse_dtype


@dataclass(frozen=True)
class AxisTiles:
    """One axis cut into ``nt`` tiles of ``T`` query slots and ``R`` key slots (CPU int64 tensors).

    ``q_coord [nt, T]`` / ``k_coord [nt, R]``: axis coordinates (padding slots repeat a real one);
    ``inside [nt, T, R]``: key slot is in the query's window; ``slot [nt, T, R]``: its neighbourhood
    slot (0..k-1, garbage where not inside); ``rel [nt, T, R]``: key minus query group position plus
    ``rk - 1`` (an index into a ``2*rk-1`` bias table); ``tile_of / pos_of [L]``: where coordinate
    ``x`` lives among the query slots; ``region_of [nt, T, k]``: the key slot of each neighbourhood
    slot (for returning weights), ``slot_ok [nt, T, k]`` whether that slot holds a key.
    """

    q_coord: torch.Tensor
    k_coord: torch.Tensor
    inside: torch.Tensor
    slot: torch.Tensor
    rel: torch.Tensor
    tile_of: torch.Tensor
    pos_of: torch.Tensor
    region_of: torch.Tensor
    slot_ok: torch.Tensor


def _axis_tiles(w: AxisWindows, tile: int, requested_kernel: int) -> AxisTiles:
    """Cut one axis's queries into tiles: the queries whose centres share a dilation group of the key
    grid, in centre order (windows move monotonically with the centre, so a tile's keys are one
    contiguous run of that group), ``tile`` at a time."""
    d, k = w.dilation, w.kernel
    q_coords, k_start, groups = [], [], []
    tile_of = torch.empty(w.length, dtype=torch.int64)
    pos_of = torch.empty(w.length, dtype=torch.int64)
    group = w.group.tolist()
    for g in range(d):
        # Centres move monotonically with the query, so query order is centre order within a group.
        members = torch.tensor([x for x in range(w.length) if group[x] == g], dtype=torch.int64)
        n = (w.key_length - g + d - 1) // d
        for start in range(0, len(members), tile):
            coords = members[start:start + tile]
            tile_of[coords] = len(q_coords)
            pos_of[coords] = torch.arange(len(coords))
            q_coords.append(torch.cat([coords, coords[-1:].expand(tile - len(coords))]))
            k_start.append(int(w.lo[coords].min()))
            groups.append((g, n))
    q_coord = torch.stack(q_coords)  # [nt, T] query coordinates
    g_t = torch.tensor([g for g, _ in groups])[:, None]
    n_t = torch.tensor([n for _, n in groups])[:, None]
    k0 = torch.tensor(k_start)[:, None]
    span = int((w.hi[q_coord] - k0).max()) + 1
    k_pos = k0 + torch.arange(span)[None, :]  # [nt, R] group positions, may run past the group
    k_coord = w.key_coord(g_t + d * torch.minimum(k_pos, n_t - 1))
    lo, hi, base, pos = (t[q_coord][:, :, None] for t in (w.lo, w.hi, w.base, w.pos))
    kp = k_pos[:, None, :]
    inside = (kp >= lo) & (kp <= hi)
    slot = (kp - base).clamp(0, k - 1)
    rel = (kp - pos + requested_kernel - 1).clamp(0, 2 * requested_kernel - 2)
    j = torch.arange(k)[None, None, :]
    t_of_slot = base + j  # group position held by slot j
    region_of = (t_of_slot - k0[:, :, None]).clamp(0, span - 1)
    slot_ok = (t_of_slot >= lo) & (t_of_slot <= hi)
    return AxisTiles(q_coord, k_coord, inside, slot, rel, tile_of, pos_of, region_of, slot_ok)


def _tile_size(length: int, kernel: int, stride: int, dilation: int, rank: int) -> int:
    """Query tile length along one axis.

    Bigger tiles make larger GEMMs but waste ``((T + k - 1) / T)^rank`` of the work on keys outside
    a query's window; the sizes below were picked by timing on a 2-core CPU (see benchmarks/).
    Tiles are a multiple of the stride so that a stride group never straddles two tiles.
    """
    n = -(-length // dilation)
    target = {1: max(32, kernel), 2: max(8, kernel + 1), 3: max(4, kernel - 1)}[rank]
    # Nearest multiple of the stride: for blocked attention (stride = kernel) a tile is then exactly
    # one window and no work is masked away.
    target = max(1, round(target / stride)) * stride
    return max(1, min(target, n))


def _outer(parts: list[torch.Tensor], op) -> torch.Tensor:
    """Combine per-axis ``[nt_a, A_a, B_a]`` tensors into ``[prod nt, prod A, prod B]`` with ``op``
    (row-major over axes in each of the three groups)."""
    r = len(parts)
    out = None
    for a, t in enumerate(parts):
        shape = [1] * (3 * r)
        shape[a], shape[r + a], shape[2 * r + a] = t.shape
        t = t.reshape(shape)
        out = t if out is None else op(out, t)
    nt = math.prod(p.shape[0] for p in parts)
    A = math.prod(p.shape[1] for p in parts)
    return out.reshape(nt, A, -1)


@dataclass
class TilePlan:
    """All index tensors for one ``(spec, tiles)``; see :class:`AxisTiles` for the per-axis pieces.

    The always-needed tensors are built with the plan; those only some features need (bias
    indices, token maps) are built on first use by :meth:`feature` and kept, so a hot loop with
    RPB or masks pays for them once.
    """

    spec: NASpec
    axes: list[AxisTiles]
    q_index: tuple[torch.Tensor, ...]    # per-axis, broadcastable to [nt..., T...]
    k_index: tuple[torch.Tensor, ...]    # per-axis, broadcastable to [nt..., R...]
    out_index: tuple[torch.Tensor, ...]  # (tile_0.., pos_0..) broadcastable to [L0, L1, ...]
    mask_bias: torch.Tensor              # [NT, TQ, RK] float 0 / -inf
    _features: dict = field(default_factory=dict)

    def to(self, device: torch.device, dtype: torch.dtype) -> "TilePlan":
        mv = lambda ts: tuple(t.to(device) for t in ts)  # noqa: E731
        return TilePlan(self.spec, self.axes, mv(self.q_index), mv(self.k_index), mv(self.out_index),
                        self.mask_bias.to(device, dtype))

    def feature(self, name: str) -> torch.Tensor:
        """A feature index on the plan's device, built once:

        * ``rel [NT, TQ, RK]``: flat index into the RPB table (key minus query group position);
        * ``slot [NT, TQ, RK]``: neighbourhood slot of each key (for ``attn_bias``);
        * ``qtok [NT, TQ]`` / ``ktok [NT, RK]``: flat token of each query / key slot;
        * ``region [NT, TQ, K]`` / ``slot_ok [NT, TQ, K]``: key slot of each neighbourhood slot and
          whether it holds a key (for returning the weights).
        """
        got = self._features.get(name)
        if got is None:
            with plain_tensors():
                got = self._feature(name)
        return got

    def _feature(self, name: str) -> torch.Tensor:
        ax, spec = self.axes, self.spec
        if name == "rel":
            got = _flat([a.rel for a in ax], [2 * k - 1 for k in spec.requested_kernel_size])
        elif name == "slot":
            got = _flat([a.slot for a in ax], list(spec.kernel_size))
        elif name == "qtok":
            got = _flat([a.q_coord[:, :, None] for a in ax], list(spec.spatial)).squeeze(-1)
        elif name == "ktok":
            got = _flat([a.k_coord[:, None, :] for a in ax], list(spec.key_spatial)).squeeze(1)
        elif name == "region":
            got = _flat([a.region_of for a in ax], [a.k_coord.shape[1] for a in ax])
        elif name == "slot_ok":
            got = _outer([a.slot_ok for a in ax], torch.logical_and)
        else:
            raise KeyError(f"TilePlan.feature: unknown feature {name!r}")
        got = self._features[name] = got.to(self.mask_bias.device)
        return got


def _place(t: torch.Tensor, a: int, r: int) -> torch.Tensor:
    """Reshape a 2-D per-axis index ``[nt_a, X_a]`` so it broadcasts into ``[nt..., X...]``."""
    shape = [1] * (2 * r)
    shape[a], shape[r + a] = t.shape
    return t.reshape(shape)


@lru_cache(maxsize=64)
def _plan(spec: NASpec, tiles: tuple[int, ...]) -> TilePlan:
    r = spec.rank
    axes = [_axis_tiles(w, t, rk) for w, t, rk in zip(spec.windows(), tiles, spec.requested_kernel_size)]
    q_index = tuple(_place(ax.q_coord, a, r) for a, ax in enumerate(axes))
    k_index = tuple(_place(ax.k_coord, a, r) for a, ax in enumerate(axes))
    out_index = []
    for name in ("tile_of", "pos_of"):
        for a, ax in enumerate(axes):
            shape = [1] * r
            shape[a] = -1
            out_index.append(getattr(ax, name).reshape(shape))
    inside = _outer([ax.inside for ax in axes], torch.logical_and)
    mask_bias = torch.zeros(inside.shape).masked_fill_(~inside, float("-inf"))
    return TilePlan(spec, axes, q_index, k_index, tuple(out_index), mask_bias)


_DEVICE_PLANS: dict = {}


def get_plan(spec: NASpec, device: torch.device, dtype: torch.dtype) -> TilePlan:
    """The tile plan for ``spec`` with its tensors on ``device`` (cached)."""
    tiles = tuple(_tile_size(L, k, s, d, spec.rank) for L, k, s, d, _ in spec.axes())
    key = (spec, tiles, device, dtype)
    plan = _DEVICE_PLANS.get(key)
    if plan is None:
        if len(_DEVICE_PLANS) > 64:
            _DEVICE_PLANS.clear()
        with plain_tensors():
            plan = _DEVICE_PLANS[key] = _plan(spec, tiles).to(device, dtype)
    return plan


def _flat(parts: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Row-major flat index from per-axis ``[nt_a, A_a, B_a]`` indices with axis sizes ``sizes``."""
    strides = [math.prod(sizes[a + 1:]) for a in range(len(sizes))]
    return _outer([p * s for p, s in zip(parts, strides)], torch.add)


class TorchTiledBackend(Backend):
    name = "torch"
    description = "portable PyTorch: query tiles x haloed key regions as batched GEMMs, autograd backward"
    supports_gqa = False

    def priority(self, p: Problem) -> float:
        return 0.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, extras: Extras) -> Result:
        spec, r = p.spec, p.spec.rank
        cdt = lse_dtype(q.dtype)
        plan = get_plan(spec, q.device, cdt)
        B, H = p.batch, p.heads
        # Heads before space so that the gathers produce [B, H, tiles..., slots..., D] directly.
        perm = (0, r + 1, *range(1, r + 1), r + 2)
        qh, kh, vh = (t.permute(perm) for t in (q, k, v))
        lead = (slice(None), slice(None))
        qt = qh[lead + plan.q_index]
        kt = kh[lead + plan.k_index]
        vt = vh[lead + plan.k_index]
        NT, TQ, RK = plan.mask_bias.shape
        qt = qt.reshape(B, H, NT, TQ, p.dim).to(cdt)
        kt = kt.reshape(B, H, NT, RK, p.dim).to(cdt)
        vt = vt.reshape(B, H, NT, RK, p.dim_v).to(cdt)

        scores = torch.matmul(qt, kt.transpose(-1, -2)).mul_(p.scale).add_(plan.mask_bias)
        guard = p.has_key_padding_mask or p.has_attn_bias  # only these can empty a query's window
        if extras.rpb is not None:
            scores = scores + extras.rpb.to(cdt).reshape(H, -1)[:, plan.feature("rel")]
        if extras.attn_bias is not None:
            ab = extras.attn_bias.reshape(B, -1, H, spec.window_size).permute(0, 2, 1, 3).to(cdt)
            scores = scores + ab[:, :, plan.feature("qtok")[:, :, None], plan.feature("slot")]
        if extras.key_padding_mask is not None:
            ignore = extras.key_padding_mask.reshape(B, -1)[:, plan.feature("ktok")]  # [B, NT, RK]
            scores = scores.masked_fill(ignore[:, None, :, None, :], float("-inf"))

        # One exp pass: unnormalized weights e, normalization folded into the (much smaller)
        # output. The max is a constant for autograd (it cancels in the softmax).
        peak = scores.detach().amax(dim=-1, keepdim=True)
        if guard:  # a fully masked row has peak -inf; any finite shift keeps its e = 0
            peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        e = torch.exp(scores - peak)
        total = e.sum(dim=-1, keepdim=True)
        if guard:  # empty rows: lse -inf, output 0, and finite gradients (no log(0) or 1/0 in the graph)
            safe = torch.where(total > 0, total, torch.ones_like(total))  # e is 0 on those rows anyway
            lse = torch.where(total > 0, peak + torch.log(safe), float("-inf")).squeeze(-1)
            norm = 1.0 / safe
        else:
            lse = (peak + torch.log(total)).squeeze(-1)
            norm = 1.0 / total
        out = torch.matmul(e, vt) * norm  # [B, H, NT, TQ, Dv]

        tiles_shape = tuple(ax.q_coord.shape[0] for ax in plan.axes)
        slots_shape = tuple(ax.q_coord.shape[1] for ax in plan.axes)
        out = out.reshape(B, H, *tiles_shape, *slots_shape, p.dim_v)[lead + plan.out_index]
        lse = lse.reshape(B, H, *tiles_shape, *slots_shape)[lead + plan.out_index]
        inv = (0, *range(2, r + 2), 1)
        attn: Optional[torch.Tensor] = None
        if p.return_attn:
            region = plan.feature("region")
            w = torch.gather(e * norm, -1, region.expand(B, H, *region.shape)) * plan.feature("slot_ok")
            w = w.reshape(B, H, *tiles_shape, *slots_shape, spec.window_size)[lead + plan.out_index]
            attn = w.permute(*inv, r + 2).to(q.dtype)
        return Result(out.permute(*inv, r + 2).to(q.dtype), lse.permute(inv), attn)
