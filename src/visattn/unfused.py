"""Unfused neighborhood attention: the logits (:func:`na_qk`) and the weighted sum (:func:`na_av`).

``na_qk`` gives every query's neighbourhood logits ``scale * q.k (+ rpb)`` in slot order, ``na_av`` applies
(edited) weights to the values: ``na_av(softmax(na_qk(q, k, ...)), v, ...)`` is
:func:`visattn.neighborhood_attention`. Use the pair to change the weights between the two steps
(attention dropout, pruning, inspection) or to run code written for NATTEN's unfused operators
(:mod:`visattn.compat.natten`). The fused operator is faster and stores no ``[tokens, K]`` matrix.

Layout is visattn's, heads-last: ``query [B, *S, H, D]``, logits/weights ``[B, *S, H, K (+ N)]`` with
``K = prod(kernel_size)`` (after the variable-resolution rule of :func:`visattn.spec.fit_axis`), slots
in the order of :func:`visattn.spec.neighbor_table`, extra tokens (``additional_keys``) last. A slot
without a key (causal windows near the start) has logit ``-inf``, and its weight is ignored by ``na_av``.

Two implementations with one result, chosen by ``backend``:

* ``"torch"`` (default): the torch backend's tile plan (:mod:`visattn.backends.torch_tiled`). Each tile
  of queries meets its haloed key region in one batched GEMM; ``na_qk`` gathers the scores into slot
  order, ``na_av`` scatters the weights into the region and multiplies. Memory ``O(tokens * region)``.
* ``"reference"``: explicit neighbour lists (:func:`visattn.spec.neighbor_table`) and a gather, the
  readable definition (memory ``O(tokens * K * D)``).

Both are plain differentiable PyTorch: gradients (relative-positional-bias table included), double
backward and ``torch.func`` transforms come from autograd, on any device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import torch

from .backends.base import lse_dtype
from .backends.torch_tiled import TilePlan, get_plan
from .spec import BoolOrTuple, IntOrTuple, NASpec, make_spec, neighbor_table

__all__ = ["na_av", "na_qk"]

#: Most index rows (batch x heads) kept as a contiguous copy by :meth:`_Tables.repeated`.
_MAX_REPEAT = 64

#: Backends that implement the unfused operators.
UNFUSED_BACKENDS = ("torch", "reference")


def _backend(fn: str, backend: Optional[str]) -> str:
    if backend is None:
        return "torch"
    if backend not in UNFUSED_BACKENDS:
        raise ValueError(f"{fn}: backend={backend!r} has no unfused operator; choose one of {UNFUSED_BACKENDS} "
                         f"(or None for 'torch'). The fused backends serve visattn.neighborhood_attention.")
    return backend


def _rank(fn: str, name: str, t: torch.Tensor) -> int:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    r = t.dim() - 3
    if r not in (1, 2, 3):
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}; expected [B, *spatial, heads, dim] with 1-3 "
                         f"spatial axes (4-6 dims).")
    return r


def _check_pair(fn: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """``b`` (keys or values) against ``a`` (queries or weights): same batch and number of spatial
    axes (the grids may differ: cross-grid attention), dtype and device; its heads divide ``a``'s."""
    if b.dim() != a.dim() or b.shape[0] != a.shape[0]:
        raise ValueError(f"{fn}: {b_name} has shape {tuple(b.shape)} but {a_name} has {tuple(a.shape)}; they must "
                         f"share the batch and the number of spatial axes (heads-last layout [B, *spatial, heads, "
                         f"dim]).")
    if a.shape[-2] % b.shape[-2]:
        raise ValueError(f"{fn}: {a_name} has {a.shape[-2]} heads, {b_name} {b.shape[-2]}; the {b_name} heads must "
                         f"divide the {a_name} heads.")
    if b.device != a.device:
        raise ValueError(f"{fn}: {b_name} is on {b.device} but {a_name} is on {a.device}; move them to one device.")
    if not a.is_floating_point() or b.dtype != a.dtype:
        raise TypeError(f"{fn}: {a_name}.dtype={a.dtype}, {b_name}.dtype={b.dtype}; use one floating-point dtype.")


def _check_rpb(fn: str, rpb: Optional[torch.Tensor], spec: NASpec, heads: int, like: torch.Tensor) -> None:
    if rpb is None:
        return
    want = (heads, *(2 * k - 1 for k in spec.requested_kernel_size))
    if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != want:
        got = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
        raise ValueError(f"{fn}: rpb has shape {got}; expected [heads, 2*k-1 per axis] = {want} for "
                         f"kernel_size={spec.requested_kernel_size}.")
    if rpb.device != like.device or not rpb.is_floating_point():
        raise ValueError(f"{fn}: rpb is a {rpb.dtype} tensor on {rpb.device}; it must be floating-point on "
                         f"{like.device} (rpb.to(query)).")


def _check_extra(fn: str, name: str, extra: Optional[torch.Tensor], like: torch.Tensor, heads: int, dim: int) -> int:
    """Number of extra tokens in ``extra [B, N, heads, dim]`` (0 without)."""
    if extra is None:
        return 0
    if not isinstance(extra, torch.Tensor) or extra.dim() != 4 or extra.shape[0] != like.shape[0] or \
            extra.shape[2] != heads or extra.shape[3] != dim:
        got = tuple(extra.shape) if isinstance(extra, torch.Tensor) else type(extra).__name__
        raise ValueError(f"{fn}: {name} has shape {got}; expected [B, N, heads, dim] = [{like.shape[0]}, N, {heads}, "
                         f"{dim}].")
    if extra.dtype != like.dtype or extra.device != like.device:
        raise TypeError(f"{fn}: {name} is {extra.dtype} on {extra.device}; use {like.dtype} on {like.device}.")
    return extra.shape[1]


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``t [..., h, d]`` with each head repeated to ``heads`` (query head ``i`` uses head ``i // (heads/h)``)."""
    return t if t.shape[-2] == heads else t.repeat_interleave(heads // t.shape[-2], dim=-2)


# ------------------------------------------------------------------------------------------------
# The tiled implementation

@dataclass(frozen=True)
class _Tables:
    """Flat index tables of one call geometry on one device (see :func:`_tables`).

    ``qtok [NT*TQ]`` / ``ktok [NT*RK]``: the token of every tile query / key slot; ``row [N]``: the tile
    row that computes token ``n``; ``pair [N*K]``: where query ``n``'s slot ``j`` lives among the tiles'
    ``[NT*TQ*RK]`` scores (``row[n] * RK + place in the region``), distinct for the slots that hold a
    key; ``rel [N*K]``: the slot's index into a flattened bias table; ``ok [N, K]``: whether the slot
    holds a key (``None`` when all do: no causal axis).
    """

    plan: TilePlan
    qtok: torch.Tensor
    ktok: torch.Tensor
    row: torch.Tensor
    pair: torch.Tensor
    rel: torch.Tensor
    ok: Optional[torch.Tensor]
    _repeated: dict = field(default_factory=dict, compare=False)

    @property
    def sizes(self) -> tuple[int, int, int]:
        """``(NT, TQ, RK)``: tiles, query slots and key slots per tile."""
        return tuple(self.plan.mask_bias.shape)

    def repeated(self, name: str, rows: int) -> torch.Tensor:
        """``pair`` or ``rel`` as a contiguous ``[rows, N*K]`` index (one per batch-head or head):
        ``gather``/``scatter_add`` and their gradients run several times faster with it than with a
        broadcast (stride-0) index or ``index_select``/``index_add``. Kept per row count, up to
        :data:`_MAX_REPEAT` rows; a broadcast index beyond (no memory per batch element)."""
        index = getattr(self, name)
        if rows > _MAX_REPEAT:
            return index.expand(rows, -1)
        got = self._repeated.get((name, rows))
        if got is None:
            got = self._repeated[(name, rows)] = index.expand(rows, -1).contiguous()
        return got


@lru_cache(maxsize=64)
def _tables(spec: NASpec, device: torch.device, dtype: torch.dtype) -> _Tables:
    """Index tables for the tiled operators: the torch backend's tile plan re-indexed so that every
    step is one ``index_select``/``gather``/``scatter_add`` over tensors flattened to at most three
    dimensions (multi-dimensional advanced indexing is several times slower on CPU)."""
    plan = get_plan(spec, device, dtype)
    NT, TQ, RK = plan.mask_bias.shape
    tiles = tuple(ax.q_coord.shape[0] for ax in plan.axes)
    slots = tuple(ax.q_coord.shape[1] for ax in plan.axes)
    row = torch.arange(NT * TQ, device=device).reshape(*tiles, *slots)[plan.out_index].reshape(-1)
    region = plan.feature("region").reshape(NT * TQ, -1)[row]  # [N, K]: place of each slot's key in its region
    pair = (row[:, None] * RK + region).reshape(-1)
    _, valid, rel = (t.to(device) for t in neighbor_table(spec))
    ok = valid if any(spec.is_causal) else None
    return _Tables(plan, plan.feature("qtok").reshape(-1), plan.feature("ktok").reshape(-1), row, pair,
                   rel.reshape(-1), ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Heads-last ``[B, *S, H, X]`` as heads-first token rows ``[B*H, N, X]`` (a view when the data is
    heads-first already, as NATTEN's layout is; else one transposing copy)."""
    return t.movedim(-2, 1).reshape(t.shape[0] * t.shape[-2], -1, t.shape[-1])


def _grid(t: torch.Tensor, batch: int, spec: NASpec) -> torch.Tensor:
    """Heads-first rows ``[B*H, N, X]`` back as heads-last ``[B, *S, H, X]`` (a view)."""
    return t.reshape(batch, -1, *spec.spatial, t.shape[-1]).movedim(1, -2)


def _qk_tiled(q: torch.Tensor, k: torch.Tensor, spec: NASpec, scale: float, rpb: Optional[torch.Tensor]
              ) -> torch.Tensor:
    tab = _tables(spec, q.device, q.dtype)
    NT, TQ, RK = tab.sizes
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    qt = _rows(q).index_select(1, tab.qtok).reshape(B * H, NT, TQ, D)
    kt = _rows(k).index_select(1, tab.ktok).reshape(B * H, NT, RK, D)
    scores = torch.matmul(qt, kt.transpose(-1, -2))  # [B*H, NT, TQ, RK]
    logits = torch.gather(scores.reshape(B * H, -1), 1, tab.repeated("pair", B * H))
    if scale != 1.0:
        logits = logits * scale
    logits = logits.reshape(B, H, spec.num_tokens, -1)
    if rpb is not None:
        bias = torch.gather(rpb.to(logits.dtype).reshape(H, -1), 1, tab.repeated("rel", H))
        logits = logits + bias.reshape(H, spec.num_tokens, -1)
    if tab.ok is not None:
        logits = logits.masked_fill(~tab.ok, float("-inf"))
    return _grid(logits, B, spec)


def _av_tiled(w: torch.Tensor, v: torch.Tensor, spec: NASpec) -> torch.Tensor:
    tab = _tables(spec, w.device, w.dtype)
    NT, TQ, RK = tab.sizes
    B, H, Dv = v.shape[0], v.shape[-2], v.shape[-1]
    wr = _rows(w)  # [B*H, N, K]
    if tab.ok is not None:
        # A slot without a key shares its place with a real slot of its row (both point at a clamped
        # region key): its weight must add nothing there.
        wr = wr * tab.ok
    # The adjoint of na_qk's gather: every slot's weight lands on its key's place in its tile row.
    dense = wr.new_zeros(B * H, NT * TQ * RK).scatter_add(1, tab.repeated("pair", B * H), wr.reshape(B * H, -1))
    vt = _rows(v).index_select(1, tab.ktok).reshape(B * H, NT, RK, Dv)
    out = torch.matmul(dense.reshape(B * H, NT, TQ, RK), vt).reshape(B * H, NT * TQ, Dv)
    return _grid(out.index_select(1, tab.row), B, spec)


# ------------------------------------------------------------------------------------------------
# The reference implementation

def _qk_gather(q: torch.Tensor, k: torch.Tensor, spec: NASpec, scale: float, rpb: Optional[torch.Tensor]
               ) -> torch.Tensor:
    index, valid, rel = (t.to(q.device) for t in neighbor_table(spec))
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    kn = k.reshape(B, -1, H, D)[:, index]  # [B, N, K, H, D]
    logits = torch.einsum("bnhd,bnkhd->bnhk", q.reshape(B, -1, H, D), kn) * scale
    if rpb is not None:
        logits = logits + rpb.to(logits.dtype).reshape(H, -1)[:, rel].permute(1, 0, 2)
    logits = logits.masked_fill(~valid[None, :, None, :], float("-inf"))
    return logits.reshape(*q.shape[:-1], index.shape[1])


def _av_gather(w: torch.Tensor, v: torch.Tensor, spec: NASpec) -> torch.Tensor:
    index, valid, _ = (t.to(v.device) for t in neighbor_table(spec))
    B, H, Dv = v.shape[0], v.shape[-2], v.shape[-1]
    vn = v.reshape(B, -1, H, Dv)[:, index]  # [B, N, K, H, Dv]
    wf = w.reshape(B, -1, H, index.shape[1]) * valid[None, :, None, :]
    return torch.einsum("bnhk,bnkhd->bnhd", wf, vn).reshape(B, *spec.spatial, H, Dv)


# ------------------------------------------------------------------------------------------------
# Public operators

def na_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
          dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, *, scale: float = 1.0,
          rpb: Optional[torch.Tensor] = None, additional_keys: Optional[torch.Tensor] = None,
          backend: Optional[str] = None, periodic: BoolOrTuple = False) -> torch.Tensor:
    """Neighbourhood logits ``scale * query . key (+ rpb)`` of every query, in slot order.

    Shapes: ``query [B, *S, H, D]``, ``key [B, *S_k, H_kv, D]`` (``H_kv`` divides ``H``; ``S_k`` is
    the key grid, ``S`` unless cross-grid; ``periodic`` axes wrap, see
    :func:`visattn.neighborhood_attention`), ``rpb
    [H, 2k0-1, ...]`` (indexed as in :func:`visattn.neighborhood_attention`), ``additional_keys
    [B, N, H_kv, D]`` (their logits are appended after the neighbourhood's). Returns
    ``[B, *S, H, K + N]`` in the query's dtype, ``-inf`` in slots without a key. Half inputs are
    multiplied in float32. ``scale`` multiplies the dot products only (not the bias), so the default
    1.0 gives raw products, as NATTEN's unfused ``qk`` did.

    Raises ``TypeError``/``ValueError`` naming the argument and the fix on inconsistent input.
    """
    fn = "na_qk"
    impl = _backend(fn, backend)
    rank = _rank(fn, "query", query)
    _check_pair(fn, "query", query, "key", key)
    spec = make_spec(fn, tuple(query.shape[1:rank + 1]), kernel_size, stride, dilation, is_causal,
                     key_spatial=tuple(key.shape[1:rank + 1]), periodic=periodic)
    H = query.shape[-2]
    _check_rpb(fn, rpb, spec, H, query)
    _check_extra(fn, "additional_keys", additional_keys, query, key.shape[-2], query.shape[-1])
    cdt = lse_dtype(query.dtype)
    q, k = query.to(cdt), _repeat_heads(key, H).to(cdt)
    logits = (_qk_tiled if impl == "torch" else _qk_gather)(q, k, spec, float(scale), rpb)
    if additional_keys is not None:
        extra = torch.einsum("b...hd,bnhd->b...hn", q, _repeat_heads(additional_keys, H).to(cdt)) * scale
        logits = torch.cat([logits, extra], dim=-1)
    return logits.to(query.dtype)


def na_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
          dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, *,
          additional_values: Optional[torch.Tensor] = None, backend: Optional[str] = None,
          periodic: BoolOrTuple = False) -> torch.Tensor:
    """Apply neighbourhood weights to values: ``out[q] = sum_j attn[q, j] * value[neighbour_j(q)]``.

    Shapes: ``attn [B, *S, H, K + N]`` in slot order (as :func:`na_qk` and ``return_attn=True`` give
    them), ``value [B, *S_k, H_kv, D_v]`` (``H_kv`` divides ``H``; ``S_k`` the key grid, ``S`` unless
    cross-grid; ``periodic`` as in :func:`na_qk`), ``additional_values [B, N, H_kv, D_v]``
    for the last ``N`` weights. Returns ``[B, *S, H, D_v]``. Weights of slots without a key are
    ignored. Used after editing weights (attention dropout, pruning).

    Raises ``TypeError``/``ValueError`` naming the argument and the fix on inconsistent input.
    """
    fn = "na_av"
    impl = _backend(fn, backend)
    rank = _rank(fn, "value", value)
    grid = tuple(attn.shape[1:rank + 1]) if isinstance(attn, torch.Tensor) and attn.dim() == value.dim() else \
        tuple(value.shape[1:rank + 1])
    spec = make_spec(fn, grid, kernel_size, stride, dilation, is_causal, key_spatial=tuple(value.shape[1:rank + 1]),
                     periodic=periodic)
    B, Hkv, Dv = value.shape[0], value.shape[-2], value.shape[-1]
    H = attn.shape[-2] if isinstance(attn, torch.Tensor) and attn.dim() == value.dim() else Hkv
    n = _check_extra(fn, "additional_values", additional_values, value, Hkv, Dv)
    want = (B, *spec.spatial, H, spec.window_size + n)
    if not isinstance(attn, torch.Tensor) or tuple(attn.shape) != want:
        got = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        extra = f" + {n} additional values" if n else ""
        raise ValueError(f"{fn}: attn has shape {got}; expected [B, *spatial, heads, prod(kernel_size){extra}] = "
                         f"{want}.")
    _check_pair(fn, "attn", attn, "value", value)
    cdt = lse_dtype(attn.dtype)
    w, v = attn.to(cdt), _repeat_heads(value, H).to(cdt)
    w_na, w_x = w.split([spec.window_size, n], dim=-1)
    out = (_av_tiled if impl == "torch" else _av_gather)(w_na, v, spec)
    if additional_values is not None:
        out = out + torch.einsum("b...hn,bnhd->b...hd", w_x, _repeat_heads(additional_values, H).to(cdt))
    return out.to(value.dtype)
