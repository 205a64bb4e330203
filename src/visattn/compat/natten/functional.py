"""``natten.functional``: every operator of NATTEN 0.14-0.21, computed by visattn.

Layouts, as NATTEN had them:

* unfused operators (0.14-0.17: ``natten{1,2,3}dqkrpb``, ``natten*dqk``, ``natten*dav``, ``na*d_qk``,
  ``na*d_av``): heads-first. ``query``/``key``/``value`` ``[B, heads, *S, D]``, weights
  ``[B, heads, *S, prod(kernel_size) (+ N)]``, relative positional bias ``rpb [heads, 2k-1, ...]``,
  extra tokens ``[B, heads, N, D]`` whose weights come after the neighbourhood's. ``qk`` does not
  scale (callers scale the query first). Inputs smaller than ``kernel_size * dilation`` are refused,
  as NATTEN did (its modules up to 0.15 zero-padded before calling them).
* fused operators (0.17 and 0.20+: ``na1d``/``na2d``/``na3d``, ``attention``): heads-last
  ``[B, *S, heads, D]``, extra tokens ``[B, N, heads, D]``.

Where a signature changed between releases, :mod:`._versions` decides how a call is read.
Neighbourhood slots are row-major over the kernel; on a causal axis NATTEN's unfused operators put
a query's keys first (slot ``j`` holds the ``j``-th key from the window's start) and the empty slots
last, which differs from visattn's order near the start of the axis: the weights are reordered
between the two (:func:`_causal_order`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ...functional import merge_attentions as _merge, neighborhood_attention
from ...spec import NASpec, _as_tuple, make_spec
from ...unfused import na_av as _na_av, na_qk as _na_qk
from . import _versions
from ._versions import Era

__all__ = [
    "attention", "merge_attentions", "na1d", "na1d_av", "na1d_qk", "na1d_qk_with_bias", "na2d", "na2d_av", "na2d_qk",
    "na2d_qk_with_bias", "na3d", "na3d_av", "na3d_qk", "na3d_qk_with_bias", "natten1dav", "natten1dqk",
    "natten1dqkrpb", "natten2dav", "natten2dqk", "natten2dqkrpb", "natten3dav", "natten3dqk", "natten3dqkrpb",
    "neighborhood_attention_generic",
]

#: NATTEN's kernel backends: accepted and ignored (visattn chooses its own backend).
NATTEN_BACKENDS = frozenset({"cutlass-fna", "hopper-fna", "blackwell-fna", "flex-fna", "cutlass-fmha",
                             "hopper-fmha", "blackwell-fmha", "flex-fmha", "fna", "fmha", "flex"})
_TILE_KWARGS = ("q_tile_shape", "kv_tile_shape", "backward_q_tile_shape", "backward_kv_tile_shape",
                "backward_kv_splits", "backward_use_pt_reduction", "run_persistent_kernel", "kernel_schedule",
                "torch_compile")


# ------------------------------------------------------------------------------------------------
# Checks shared by the legacy (heads-first) operators

def _layout_hint(rank: int) -> str:
    axes = ", ".join(f"S{i}" for i in range(rank))
    order = ", ".join(str(i) for i in (0, rank + 1, *range(1, rank + 1), rank + 2))
    return (f"NATTEN's unfused operators take heads-first tensors [B, heads, {axes}, dim]; a heads-last "
            f"[B, {axes}, heads, dim] tensor must be permuted first: t.permute({order})")


def _check_heads_first(fn: str, name: str, t: Any, rank: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dim() != rank + 3:
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)} ({t.dim()} dims); expected {rank + 3} dims. "
                         f"{_layout_hint(rank)}.")


def _legacy_spec(fn: str, t: Tensor, kernel_size, dilation, is_causal, rank: int) -> NASpec:
    """The spec of a heads-first call, refusing what NATTEN refused: a window (``kernel_size *
    dilation``) longer than its axis (the weights' last dim would not be ``prod(kernel_size)``)."""
    spatial = tuple(t.shape[2:2 + rank])
    ks = _as_tuple(fn, "kernel_size", kernel_size, rank, int)
    dl = _as_tuple(fn, "dilation", dilation, rank, int)
    for axis, (L, k, d) in enumerate(zip(spatial, ks, dl)):
        if k * d > L:
            # A heads-last tensor read heads-first has its heads on the last "spatial" axis, and a
            # spatial axis where the heads belong.
            looks_heads_last = axis == rank - 1 and t.shape[1] >= k * d
            hint = f" If the tensor is heads-last, that axis holds the heads: {_layout_hint(rank)}." \
                if looks_heads_last else ""
            raise ValueError(f"{fn}: kernel_size={ks} with dilation={dl} needs {k * d} positions on spatial axis "
                             f"{axis}, which has {L} (tensor shape {tuple(t.shape)}, layout [B, heads, *spatial, "
                             f"dim]). Use kernel_size * dilation <= {L} there, or zero-pad the input as NATTEN's "
                             f"modules did.{hint}")
    return make_spec(fn, spatial, ks, 1, dl, is_causal)


def _check_rpb(fn: str, rpb: Optional[Tensor], spec: NASpec, heads: int, name: str = "rpb") -> None:
    if rpb is None:
        return
    want = (heads, *(2 * k - 1 for k in spec.kernel_size))
    if not isinstance(rpb, Tensor) or tuple(rpb.shape) != want:
        got = tuple(rpb.shape) if isinstance(rpb, Tensor) else type(rpb).__name__
        raise ValueError(f"{fn}: {name} has shape {got}; expected [heads, 2*kernel_size-1 per axis] = {want} for "
                         f"heads={heads} (dim 1 of the heads-first query) and kernel_size={spec.kernel_size}.")


def _extra_heads_first(fn: str, name: str, extra: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """NATTEN's unfused extra tokens ``[B, heads, N, D]`` as visattn's ``[B, N, heads, D]``."""
    if extra is None:
        return None
    if not isinstance(extra, Tensor) or extra.dim() != 4 or extra.shape[0] != like.shape[0] or \
            extra.shape[1] != like.shape[1] or extra.shape[3] != like.shape[-1]:
        got = tuple(extra.shape) if isinstance(extra, Tensor) else type(extra).__name__
        raise ValueError(f"{fn}: {name} has shape {got}; expected heads-first [B, heads, N, dim] = "
                         f"[{like.shape[0]}, {like.shape[1]}, N, {like.shape[-1]}].")
    return extra.transpose(1, 2)


@lru_cache(maxsize=64)
def _causal_order(spec: NASpec) -> Optional[tuple[Tensor, Tensor]]:
    """``(to_natten, to_visattn)``, both ``[N, K]``: ``natten[..., j] = visattn[..., to_natten[n, j]]``
    and back. ``None`` without a causal axis (the orders agree).

    Along a causal axis visattn's slot ``j`` holds group position ``base + j`` (``base`` may be
    negative: the leading slots are empty); NATTEN's holds ``max(base, 0) + j`` (the trailing slots are
    empty). So NATTEN slot ``j`` is visattn slot ``(j + shift) mod k`` with ``shift = lo - base``.
    """
    if not any(spec.is_causal):
        return None
    to_natten = to_visattn = torch.zeros((1, 1), dtype=torch.int64)
    for w in spec.windows():
        j = torch.arange(w.kernel)[None, :]
        shift = (w.lo - w.base)[:, None]
        fwd, back = (j + shift) % w.kernel, (j - shift) % w.kernel  # [L, k]
        L, k = fwd.shape
        to_natten = (to_natten[:, None, :, None] * k + fwd[None, :, None, :]).reshape(-1, to_natten.shape[1] * k)
        to_visattn = (to_visattn[:, None, :, None] * k + back[None, :, None, :]).reshape(-1, to_visattn.shape[1] * k)
    return to_natten, to_visattn


def _reorder(weights: Tensor, index: Tensor, spec: NASpec) -> Tensor:
    """Permute the neighbourhood part (first ``K`` entries) of heads-first ``weights [B, H, *S, K + N]``."""
    K = spec.window_size
    na, extra = weights[..., :K], weights[..., K:]
    idx = index.to(weights.device).reshape(*spec.spatial, K).expand(*weights.shape[:2], *spec.spatial, K)
    na = torch.gather(na, -1, idx)
    return torch.cat([na, extra], dim=-1) if extra.shape[-1] else na


def _per_sample(fn: str, op, first: Tensor, *others: Any, **kwargs) -> Tensor:
    """Nested-tensor inputs (0.15-0.17's ``natten.nested``): run ``op`` on every component and nest the
    results. Components are ``[heads, *S, D]`` (the nesting is the batch). No autograd, as in NATTEN."""
    tensors = [first, *(t for t in others if isinstance(t, Tensor))]
    if any(t.requires_grad for t in tensors):
        raise ValueError(f"{fn}: autograd is not supported for nested tensors (as in NATTEN); detach the inputs or "
                         f"use regular tensors.")
    parts = []
    for items in zip(*(t.unbind() if isinstance(t, Tensor) and t.is_nested else [t] * first.size(0)
                       for t in (first, *others))):
        args = [a.unsqueeze(0) if isinstance(a, Tensor) else a for a in items]
        parts.append(op(*args, **kwargs).squeeze(0))
    return torch.nested.nested_tensor(parts)


# ------------------------------------------------------------------------------------------------
# The two unfused operators every legacy name ends in

def _qk(fn: str, rank: int, query: Tensor, key: Tensor, kernel_size, dilation=1, is_causal=False,
        rpb: Optional[Tensor] = None, additional_keys: Optional[Tensor] = None) -> Tensor:
    """Heads-first logits ``[B, H, *S, K + N]`` (unscaled; ``+ rpb``), in NATTEN's slot order."""
    if isinstance(query, Tensor) and query.is_nested:
        return _per_sample(fn, lambda q, k, ak: _qk(fn, rank, q, k, kernel_size, dilation, is_causal, rpb, ak),
                           query, key, additional_keys)
    _check_heads_first(fn, "query", query, rank)
    _check_heads_first(fn, "key", key, rank)
    if key.shape != query.shape:
        raise ValueError(f"{fn}: key has shape {tuple(key.shape)} but query has {tuple(query.shape)}; NATTEN's "
                         f"unfused operators take equal shapes [B, heads, *spatial, dim].")
    spec = _legacy_spec(fn, query, kernel_size, dilation, is_causal, rank)
    _check_rpb(fn, rpb, spec, query.shape[1])
    extra = _extra_heads_first(fn, "additional_keys", additional_keys, query)
    logits = _na_qk(query.movedim(1, -2), key.movedim(1, -2), spec.kernel_size, 1, spec.dilation, spec.is_causal,
                    rpb=None if rpb is None else rpb.to(key.dtype), additional_keys=extra).movedim(-2, 1)
    order = _causal_order(spec)
    return logits if order is None else _reorder(logits, order[0], spec)


def _av(fn: str, rank: int, attn: Tensor, value: Tensor, kernel_size, dilation=1, is_causal=False,
        additional_values: Optional[Tensor] = None) -> Tensor:
    """Heads-first ``out [B, H, *S, D]`` from weights in NATTEN's slot order."""
    if isinstance(attn, Tensor) and attn.is_nested:
        return _per_sample(fn, lambda a, v, av: _av(fn, rank, a, v, kernel_size, dilation, is_causal, av),
                           attn, value, additional_values)
    _check_heads_first(fn, "attn", attn, rank)
    _check_heads_first(fn, "value", value, rank)
    if attn.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"{fn}: attn has shape {tuple(attn.shape)} and value {tuple(value.shape)}; both are "
                         f"heads-first and must agree on [B, heads, *spatial]. {_layout_hint(rank)}.")
    spec = _legacy_spec(fn, value, kernel_size, dilation, is_causal, rank)
    extra = _extra_heads_first(fn, "additional_values", additional_values, value)
    n = 0 if extra is None else extra.shape[1]
    if attn.shape[-1] != spec.window_size + n:
        what = f"prod(kernel_size) + {n} additional values = {spec.window_size + n}" if n else \
            f"prod(kernel_size) = {spec.window_size}"
        more = "" if n or attn.shape[-1] < spec.window_size else \
            " (pass additional_values for the extra weights)"
        raise ValueError(f"{fn}: attn has {attn.shape[-1]} weights per query (shape {tuple(attn.shape)}); expected "
                         f"{what} for kernel_size={spec.kernel_size}{more}.")
    attn = attn.to(value.dtype)  # as NATTEN
    order = _causal_order(spec)
    if order is not None:
        attn = _reorder(attn, order[1], spec)
    out = _na_av(attn.movedim(1, -2), value.movedim(1, -2), spec.kernel_size, 1, spec.dilation, spec.is_causal,
                 additional_values=extra)
    return out.movedim(-2, 1)


# ------------------------------------------------------------------------------------------------
# Eras of the APIs whose signature changed (see _versions)

def _tensor_or_none(name: str, value: Any) -> Optional[Tensor]:
    if value is not None and not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(value).__name__}")
    return value


def _int(name: str, value: Any) -> Any:
    if isinstance(value, Tensor) or value is None:
        raise TypeError(f"{name} must be an int or tuple of ints, got {type(value).__name__}")
    return value


def _axes(rank: int, kernel_size, dilation=1, is_causal=False, stride=1) -> dict:
    fn = "natten"
    return dict(kernel_size=_as_tuple(fn, "kernel_size", _int("kernel_size", kernel_size), rank, int),
                stride=_as_tuple(fn, "stride", _int("stride", stride), rank, int),
                dilation=_as_tuple(fn, "dilation", _int("dilation", dilation), rank, int),
                is_causal=_as_tuple(fn, "is_causal", is_causal, rank, bool))


def _depth_axes(kernel_size_d: int, kernel_size: int, dilation_d: int, dilation: int) -> dict:
    """0.15's separate depth arguments of the 3-D operators as per-axis tuples."""
    return _axes(3, (_int("kernel_size_d", kernel_size_d), *(_int("kernel_size", kernel_size),) * 2),
                 (_int("dilation_d", dilation_d), *(_int("dilation", dilation),) * 2))


# natten{1,2}dqkrpb / natten{1,2}dav: 0.14.1-0.14.4 had no kernel_size argument (the kernel is the bias
# table's, or the weights'); from 0.14.5 (qk) / 0.14.6 (av) it is passed. Told apart by arity.

def _qkrpb_eras(rank: int) -> list[Era]:
    def old(query, key, rpb, dilation): ...

    def new(query, key, rpb, kernel_size, dilation): ...

    def canon_old(a):
        if not isinstance(a["rpb"], Tensor):
            raise TypeError("rpb must be a tensor (the kernel size is read from its shape)")
        kernel = tuple((s + 1) // 2 for s in a["rpb"].shape[1:])
        return dict(_axes(rank, kernel, a["dilation"]), rpb=a["rpb"])

    def canon_new(a):
        return dict(_axes(rank, a["kernel_size"], a["dilation"]), rpb=_tensor_or_none("rpb", a["rpb"]))

    return [Era("0.14.1", "0.14.4", old, canon_old), Era("0.14.5", "0.17.4", new, canon_new)]


def _av_eras(rank: int) -> list[Era]:
    def old(attn, value, dilation): ...

    def new(attn, value, kernel_size, dilation): ...

    def canon_old(a):
        K = a["attn"].shape[-1] if isinstance(a["attn"], Tensor) else 0
        k = round(K ** (1 / rank))
        if k ** rank != K:
            raise TypeError(f"attn's last dim {K} is not a kernel_size ** {rank}")
        return _axes(rank, k, a["dilation"])

    return [Era("0.14.1", "0.14.5", old, canon_old),
            Era("0.14.6", "0.17.4", new, lambda a: _axes(rank, a["kernel_size"], a["dilation"]))]


def _natten_qk(rank: int, name: str):
    eras = _qkrpb_eras(rank)

    def op(query: Tensor, key: Tensor, rpb: Optional[Tensor], *args, **kwargs) -> Tensor:
        _, c = _versions.resolve(name, eras, (query, key, rpb, *args), kwargs)
        return _qk(name, rank, query, key, c["kernel_size"], c["dilation"], rpb=c["rpb"])

    op.__name__ = op.__qualname__ = name
    op.__doc__ = (f"NATTEN 0.14-0.17.4's {rank}-D ``{name}(query, key, rpb, kernel_size, dilation)`` (0.14.1-0.14.4: "
                  f"``(query, key, rpb, dilation)``, kernel from ``rpb``'s shape).\n\nHeads-first ``query/key "
                  f"[B, heads, *S, D]``, ``rpb [heads, 2k-1 per axis]`` or ``None``; returns unscaled logits "
                  f"``[B, heads, *S, k**{rank}]`` plus the bias. Raises ``ValueError`` on a wrong layout or shape.")
    return op


def _natten_dav(rank: int, name: str):
    eras = _av_eras(rank)

    def op(attn: Tensor, value: Tensor, *args, **kwargs) -> Tensor:
        _, c = _versions.resolve(name, eras, (attn, value, *args), kwargs)
        return _av(name, rank, attn, value, c["kernel_size"], c["dilation"])

    op.__name__ = op.__qualname__ = name
    op.__doc__ = (f"NATTEN 0.14-0.17.4's {rank}-D ``{name}(attn, value, kernel_size, dilation)`` (0.14.1-0.14.5: "
                  f"``(attn, value, dilation)``, kernel from ``attn``'s last dim).\n\nHeads-first ``attn [B, heads, "
                  f"*S, k**{rank}]``, ``value [B, heads, *S, D]``; returns ``[B, heads, *S, D]``. Raises "
                  f"``ValueError`` on a wrong layout or shape.")
    return op


natten1dqkrpb = _natten_qk(1, "natten1dqkrpb")
natten2dqkrpb = _natten_qk(2, "natten2dqkrpb")
natten1dav = _natten_dav(1, "natten1dav")
natten2dav = _natten_dav(2, "natten2dav")


def natten1dqk(query: Tensor, key: Tensor, kernel_size: int, dilation: int) -> Tensor:
    """NATTEN 0.14.6-0.17.4: 1-D logits without bias; heads-first ``[B, heads, L, D]`` -> ``[B, heads, L, k]``."""
    return _qk("natten1dqk", 1, query, key, kernel_size, dilation)


def natten2dqk(query: Tensor, key: Tensor, kernel_size: int, dilation: int) -> Tensor:
    """NATTEN 0.14.6-0.17.4: 2-D logits without bias; ``[B, heads, H, W, D]`` -> ``[B, heads, H, W, k*k]``."""
    return _qk("natten2dqk", 2, query, key, kernel_size, dilation)


def natten3dqkrpb(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size_d: int, kernel_size: int,
                  dilation_d: int, dilation: int) -> Tensor:
    """NATTEN 0.15-0.17.4: 3-D logits + bias ``rpb [heads, 2kd-1, 2k-1, 2k-1]``; heads-first
    ``[B, heads, D, H, W, dim]`` -> ``[B, heads, D, H, W, kd*k*k]``."""
    c = _depth_axes(kernel_size_d, kernel_size, dilation_d, dilation)
    return _qk("natten3dqkrpb", 3, query, key, c["kernel_size"], c["dilation"], rpb=rpb)


def natten3dqk(query: Tensor, key: Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
               dilation: int) -> Tensor:
    """NATTEN 0.15-0.17.4: 3-D logits without bias (:func:`natten3dqkrpb` with ``rpb=None``)."""
    return natten3dqkrpb(query, key, None, kernel_size_d, kernel_size, dilation_d, dilation)


def natten3dav(attn: Tensor, value: Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
               dilation: int) -> Tensor:
    """NATTEN 0.15-0.17.4: 3-D weighted sum; ``attn [B, heads, D, H, W, kd*k*k]`` -> ``[B, heads, D, H, W, dim]``."""
    c = _depth_axes(kernel_size_d, kernel_size, dilation_d, dilation)
    return _av("natten3dav", 3, attn, value, c["kernel_size"], c["dilation"])


# na{1,2,3}d_qk / na{1,2,3}d_av: 0.15 and 0.17 agree for ranks 1 and 2 (0.17 added defaults,
# is_causal and rpb); the 3-D ones took separate depth arguments in 0.15.

def na1d_qk(query: Tensor, key: Tensor, kernel_size, dilation=1, additional_keys: Optional[Tensor] = None,
            is_causal=False, rpb: Optional[Tensor] = None) -> Tensor:
    """NATTEN 0.15-0.17: 1-D logits; heads-first ``[B, heads, L, D]`` -> ``[B, heads, L, k (+ N)]``,
    ``additional_keys [B, heads, N, D]``, ``rpb [heads, 2k-1]``. Unscaled."""
    return _qk("na1d_qk", 1, query, key, kernel_size, dilation, is_causal, rpb, additional_keys)


def na2d_qk(query: Tensor, key: Tensor, kernel_size, dilation=1, additional_keys: Optional[Tensor] = None,
            is_causal=False, rpb: Optional[Tensor] = None) -> Tensor:
    """NATTEN 0.15-0.17: 2-D logits; heads-first ``[B, heads, H, W, D]`` -> ``[B, heads, H, W, k0*k1 (+ N)]``."""
    return _qk("na2d_qk", 2, query, key, kernel_size, dilation, is_causal, rpb, additional_keys)


def na1d_av(attn: Tensor, value: Tensor, kernel_size, dilation=1, additional_values: Optional[Tensor] = None,
            is_causal=False) -> Tensor:
    """NATTEN 0.15-0.17: 1-D weighted sum; ``attn [B, heads, L, k (+ N)]`` -> ``[B, heads, L, D]``."""
    return _av("na1d_av", 1, attn, value, kernel_size, dilation, is_causal, additional_values)


def na2d_av(attn: Tensor, value: Tensor, kernel_size, dilation=1, additional_values: Optional[Tensor] = None,
            is_causal=False) -> Tensor:
    """NATTEN 0.15-0.17: 2-D weighted sum; ``attn [B, heads, H, W, k0*k1 (+ N)]`` -> ``[B, heads, H, W, D]``."""
    return _av("na2d_av", 2, attn, value, kernel_size, dilation, is_causal, additional_values)


def na1d_qk_with_bias(query: Tensor, key: Tensor, bias: Optional[Tensor], kernel_size: int, dilation: int,
                      additional_keys: Optional[Tensor] = None) -> Tensor:
    """NATTEN 0.15: :func:`na1d_qk` with the bias table as third argument."""
    return _qk("na1d_qk_with_bias", 1, query, key, kernel_size, dilation, False, bias, additional_keys)


def na2d_qk_with_bias(query: Tensor, key: Tensor, bias: Optional[Tensor], kernel_size: int, dilation: int,
                      additional_keys: Optional[Tensor] = None) -> Tensor:
    """NATTEN 0.15: :func:`na2d_qk` with the bias table as third argument."""
    return _qk("na2d_qk_with_bias", 2, query, key, kernel_size, dilation, False, bias, additional_keys)


def na3d_qk_with_bias(query: Tensor, key: Tensor, bias: Optional[Tensor], kernel_size_d: int, kernel_size: int,
                      dilation_d: int, dilation: int, additional_keys: Optional[Tensor] = None) -> Tensor:
    """NATTEN 0.15: 3-D logits + bias, separate depth arguments."""
    c = _depth_axes(kernel_size_d, kernel_size, dilation_d, dilation)
    return _qk("na3d_qk_with_bias", 3, query, key, c["kernel_size"], c["dilation"], False, bias, additional_keys)


def _na3d_qk_eras() -> list[Era]:
    def v015(query, key, kernel_size_d, kernel_size, dilation_d, dilation, additional_keys=None): ...

    def v017(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None): ...

    return [Era("0.15.0", "0.15.1", v015, lambda a: dict(
                _depth_axes(a["kernel_size_d"], a["kernel_size"], a["dilation_d"], a["dilation"]), rpb=None,
                extra=_tensor_or_none("additional_keys", a["additional_keys"]))),
            Era("0.17.0", "0.17.5", v017, lambda a: dict(
                _axes(3, a["kernel_size"], a["dilation"], a["is_causal"]), rpb=_tensor_or_none("rpb", a["rpb"]),
                extra=_tensor_or_none("additional_keys", a["additional_keys"])))]


def _na3d_av_eras() -> list[Era]:
    def v015(attn, value, kernel_size_d, kernel_size, dilation_d, dilation, additional_values=None): ...

    def v017(attn, value, kernel_size, dilation, additional_values=None, is_causal=False): ...

    return [Era("0.15.0", "0.15.1", v015, lambda a: dict(
                _depth_axes(a["kernel_size_d"], a["kernel_size"], a["dilation_d"], a["dilation"]),
                extra=_tensor_or_none("additional_values", a["additional_values"]))),
            Era("0.17.0", "0.17.5", v017, lambda a: dict(
                _axes(3, a["kernel_size"], a["dilation"], a["is_causal"]),
                extra=_tensor_or_none("additional_values", a["additional_values"])))]


_NA3D_QK, _NA3D_AV = _na3d_qk_eras(), _na3d_av_eras()


def na3d_qk(query: Tensor, key: Tensor, *args, **kwargs) -> Tensor:
    """3-D logits. NATTEN 0.17: ``(query, key, kernel_size, dilation=1, additional_keys=None,
    is_causal=False, rpb=None)``; 0.15: ``(query, key, kernel_size_d, kernel_size, dilation_d, dilation,
    additional_keys=None)``. Heads-first ``[B, heads, D, H, W, dim]`` -> ``[B, heads, D, H, W, K (+ N)]``."""
    _, c = _versions.resolve("na3d_qk", _NA3D_QK, (query, key, *args), kwargs)
    return _qk("na3d_qk", 3, query, key, c["kernel_size"], c["dilation"], c["is_causal"], c["rpb"], c["extra"])


def na3d_av(attn: Tensor, value: Tensor, *args, **kwargs) -> Tensor:
    """3-D weighted sum. NATTEN 0.17: ``(attn, value, kernel_size, dilation, additional_values=None,
    is_causal=False)``; 0.15: ``(attn, value, kernel_size_d, kernel_size, dilation_d, dilation,
    additional_values=None)``. Returns heads-first ``[B, heads, D, H, W, dim]``."""
    _, c = _versions.resolve("na3d_av", _NA3D_AV, (attn, value, *args), kwargs)
    return _av("na3d_av", 3, attn, value, c["kernel_size"], c["dilation"], c["is_causal"], c["extra"])


# ------------------------------------------------------------------------------------------------
# Fused operators: 0.17 (kernel_size, dilation, is_causal, rpb, scale, ...) and 0.20+ (kernel_size,
# stride, dilation, is_causal, scale, ...), heads-last.

def _backend(fn: str, backend: Optional[str]) -> Optional[str]:
    if backend is None or backend in NATTEN_BACKENDS:
        return None
    from ...backends import list_backends

    if backend in list_backends():
        return backend
    raise ValueError(f"{fn}: backend={backend!r} is neither a NATTEN backend ({', '.join(sorted(NATTEN_BACKENDS))}; "
                     f"accepted and ignored) nor a visattn one ({', '.join(list_backends())}).")


def _fused_eras(rank: int) -> dict[str, Era]:
    """``{"0.17": ..., "0.20": ..., "flex": ...}``: the fused operator's readings (``flex``: 0.17.5's
    ``natten.flex.flex_na*d``, the 0.17 signature without ``rpb``/``scale``)."""
    def v017(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None, additional_keys=None,
             additional_values=None, xformers_kwargs=None): ...

    def flex(query, key, value, kernel_size, dilation=1, is_causal=False, additional_keys=None, additional_values=None,
             xformers_kwargs=None): ...

    def v020(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
             additional_values=None, attention_kwargs=None, backend=None, q_tile_shape=None, kv_tile_shape=None,
             backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
             backward_use_pt_reduction=False, run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
             return_lse=False): ...

    def union(query, key, value, kernel_size, *, stride=1, dilation=1, is_causal=False, rpb=None, scale=None,
              additional_keys=None, additional_values=None, backend=None, return_lse=False, xformers_kwargs=None,
              attention_kwargs=None, **tiles): ...

    def common(a, scale):
        return dict(_axes(rank, a["kernel_size"], a["dilation"], a["is_causal"], a.get("stride", 1)),
                    scale=scale, rpb=_tensor_or_none("rpb", a.get("rpb")),
                    additional_keys=_tensor_or_none("additional_keys", a["additional_keys"]),
                    additional_values=_tensor_or_none("additional_values", a["additional_values"]),
                    backend=a.get("backend"), return_lse=a.get("return_lse", False))

    # 0.17 read scale with `scale or head_dim ** -0.5`: a zero scale meant the default.
    return {"0.17": Era("0.17.0", "0.17.5", v017, lambda a: common(a, a["scale"] or None)),
            "flex": Era("0.17.5", "0.17.5", flex, lambda a: common(a, None)),
            "0.20": Era("0.20.0", "0.21.7", v020, lambda a: common(a, a["scale"])),
            # Everything after kernel_size by keyword: any release's keywords together (rpb with backend, ...).
            "keywords": Era("0.17.0", "0.21.7", union, lambda a: common(_tiles_only(a), a["scale"]))}


def _tiles_only(arguments: dict) -> dict:
    """``arguments`` if its catch-all ``tiles`` holds only NATTEN's tile/schedule keywords, else ``TypeError``."""
    unknown = sorted(set(arguments["tiles"]) - set(_TILE_KWARGS))
    if unknown:
        raise TypeError(f"got unexpected keyword argument(s) {unknown}")
    return arguments


def fused_op(rank: int, name: str, eras: Sequence[str] = ("0.17", "0.20", "keywords")):
    """The fused ``name`` (``na{rank}d``, or a variant read only by some ``eras`` of :func:`_fused_eras`)."""
    readings = [_fused_eras(rank)[e] for e in eras]

    def op(query: Tensor, key: Tensor, value: Tensor, *args, **kwargs) -> Union[Tensor, tuple[Tensor, Tensor]]:
        _, c = _versions.resolve(name, readings, (query, key, value, *args), kwargs)
        return neighborhood_attention(query, key, value, c["kernel_size"], c["stride"], c["dilation"], c["is_causal"],
                                      c["scale"], c["additional_keys"], c["additional_values"],
                                      backend=_backend(name, c["backend"]), return_lse=c["return_lse"], rpb=c["rpb"],
                                      _fn=name, _rank=rank)

    op.__name__ = op.__qualname__ = name
    axes = ", ".join(f"S{i}" for i in range(rank))
    sigs = {"0.20": f"NATTEN 0.20+: ``{name}(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, "
                    f"scale=None, additional_keys=None, additional_values=None, ..., return_lse=False)``",
            "0.17": f"NATTEN 0.17: ``{name}(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, "
                    f"scale=None, additional_keys=None, additional_values=None, xformers_kwargs=None)``",
            "flex": f"NATTEN 0.17.5: ``{name}(query, key, value, kernel_size, dilation=1, is_causal=False, "
                    f"additional_keys=None, additional_values=None, xformers_kwargs=None)``"}
    op.__doc__ = (f"Fused {rank}-D neighborhood attention, heads-last ``[B, {axes}, heads, D]``.\n\n"
                  + "; ".join(sigs[e] for e in eras if e in sigs) + ". Passed by keyword, the releases' arguments mix "
                  f"(``rpb`` with ``stride``, ...). NATTEN backend and tile arguments are accepted and ignored. Runs "
                  f":func:`visattn.neighborhood_attention` (the fused CPU kernels where the call allows).")
    return op


na1d = fused_op(1, "na1d")
na2d = fused_op(2, "na2d")
na3d = fused_op(3, "na3d")


def neighborhood_attention_generic(query: Tensor, key: Tensor, value: Tensor, kernel_size, stride=1, dilation=1,
                                   is_causal=False, scale: Optional[float] = None,
                                   additional_keys: Optional[Tensor] = None,
                                   additional_values: Optional[Tensor] = None, attention_kwargs: Optional[dict] = None,
                                   backend: Optional[str] = None, return_lse: bool = False,
                                   **tile_kwargs) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """NATTEN 0.20+: rank-generic fused neighborhood attention (heads-last ``[B, *S, heads, D]``)."""
    unknown = set(tile_kwargs) - set(_TILE_KWARGS)
    if unknown:
        raise TypeError(f"neighborhood_attention_generic: unexpected keyword argument(s) {sorted(unknown)}.")
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                                  additional_values, backend=_backend("neighborhood_attention_generic", backend),
                                  return_lse=return_lse, _fn="neighborhood_attention_generic")


# ------------------------------------------------------------------------------------------------
# attention and merge_attentions (0.20+)

def _attention_eras() -> list[Era]:
    def v020(query, key, value, scale=None, backend=None, q_tile_size=None, kv_tile_size=None,
             backward_q_tile_size=None, backward_kv_tile_size=None, backward_kv_splits=None,
             backward_use_pt_reduction=False, run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
             return_lse=False): ...

    def v021(query, key, value, is_causal=False, scale=None, seqlens_Q=None, seqlens_KV=None, cumulative_seqlen_Q=None,
             cumulative_seqlen_KV=None, max_seqlen_Q=None, max_seqlen_KV=None, backend=None, q_tile_size=None,
             kv_tile_size=None, backward_q_tile_size=None, backward_kv_tile_size=None, backward_kv_splits=None,
             backward_use_pt_reduction=False, run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
             return_lse=False): ...

    def canon(a):
        if isinstance(a.get("is_causal", False), Tensor) or isinstance(a["scale"], bool):
            raise TypeError("is_causal must be a bool and scale a number")
        return dict(is_causal=bool(a.get("is_causal", False)), scale=a["scale"], backend=a["backend"],
                    return_lse=a["return_lse"], **{k: a.get(k) for k in _VARLEN})

    return [Era("0.20.0", "0.21.1", v020, canon), Era("0.21.5", "0.21.7", v021, canon)]


_VARLEN = ("seqlens_Q", "seqlens_KV", "cumulative_seqlen_Q", "cumulative_seqlen_KV", "max_seqlen_Q", "max_seqlen_KV")
_ATTENTION = _attention_eras()


def _segments(fn: str, c: dict, total_q: int, total_kv: int) -> Optional[list[tuple[slice, slice]]]:
    """Varlen segments ``[(query rows, key rows)]`` from sequence lengths or their cumulative sums."""
    if c["seqlens_Q"] is not None or c["seqlens_KV"] is not None:
        if c["seqlens_Q"] is None or c["seqlens_KV"] is None:
            raise ValueError(f"{fn}: pass both seqlens_Q and seqlens_KV, or neither.")
        cq = [0, *torch.cumsum(c["seqlens_Q"].flatten().cpu(), 0).tolist()]
        ck = [0, *torch.cumsum(c["seqlens_KV"].flatten().cpu(), 0).tolist()]
    elif c["cumulative_seqlen_Q"] is not None or c["cumulative_seqlen_KV"] is not None:
        if c["cumulative_seqlen_Q"] is None or c["cumulative_seqlen_KV"] is None:
            raise ValueError(f"{fn}: pass both cumulative_seqlen_Q and cumulative_seqlen_KV, or neither.")
        cq, ck = c["cumulative_seqlen_Q"].flatten().tolist(), c["cumulative_seqlen_KV"].flatten().tolist()
    else:
        return None
    if len(cq) != len(ck) or cq[-1] != total_q or ck[-1] != total_kv:
        raise ValueError(f"{fn}: the sequence lengths cover {cq[-1]} query and {ck[-1]} key tokens in {len(cq) - 1} / "
                         f"{len(ck) - 1} sequences, but the packed tensors hold {total_q} and {total_kv}.")
    return [(slice(a, b), slice(x, y)) for a, b, x, y in zip(cq, cq[1:], ck, ck[1:])]


def _dense(fn: str, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float]) -> tuple[Tensor, Tensor]:
    """Self/cross attention of ``q [B, Lq, H, D]`` over all of ``k/v [B, Lk, H_kv, D]`` (``out, lse``):
    neighborhood attention whose window is the whole key axis."""
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"{fn}: is_causal=True needs as many query as key tokens ({q.shape[1]} != {k.shape[1]}).")
    return neighborhood_attention(q, k, v, max(k.shape[1], 1), is_causal=causal, scale=scale, return_lse=True, _fn=fn,
                                  _rank=1)


def attention(query: Tensor, key: Tensor, value: Tensor, *args, **kwargs) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Dot-product attention, heads-last ``[B, L, heads, D]`` (``key/value [B, L_kv, heads_kv, D(_v)]``).

    NATTEN 0.21.5+: ``attention(query, key, value, is_causal=False, scale=None, seqlens_Q=None, ...,
    backend=None, ..., return_lse=False)`` with varlen (sequence-packed, ``B = 1``) arguments; NATTEN
    0.20-0.21.1: ``attention(query, key, value, scale=None, backend=None, ..., return_lse=False)``.
    Returns ``out`` (and ``lse [B, L, heads]`` with ``return_lse``).
    """
    fn = "attention"
    _, c = _versions.resolve(fn, _ATTENTION, (query, key, value, *args), kwargs)
    _backend(fn, c["backend"])
    segments = _segments(fn, c, query.shape[1], key.shape[1])
    if segments is None:
        out, lse = _dense(fn, query, key, value, c["is_causal"], c["scale"])
    else:
        if query.shape[0] != 1:
            raise ValueError(f"{fn}: varlen attention takes sequence-packed tensors with batch 1, got batch "
                             f"{query.shape[0]}.")
        parts = [_dense(fn, query[:, sq], key[:, sk], value[:, sk], c["is_causal"], c["scale"]) for sq, sk in segments]
        out, lse = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
    return (out, lse) if c["return_lse"] else out


def _merge_eras() -> list[Era]:
    def v020(outputs, lse_tensors, torch_compile=True): ...

    def v021(outputs, lse_tensors, torch_compile=True, use_autograd_fix=True): ...

    return [Era("0.20.0", "0.21.1", v020, lambda a: dict(returns_lse=False), soft=frozenset({"returns_lse"})),
            Era("0.21.5", "0.21.7", v021, lambda a: dict(returns_lse=True), soft=frozenset({"returns_lse"}))]


_MERGE = _merge_eras()


def merge_attentions(outputs: Sequence[Tensor], lse_tensors: Sequence[Tensor], *args,
                     **kwargs) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Merge attention outputs over disjoint key sets through their logsumexps (exact).

    ``outputs[i] [B, L, heads, D]``, ``lse_tensors[i] [B, L, heads]`` (any leading shape works here).
    NATTEN 0.21.5+ returns ``(output, lse)``; 0.20-0.21.1 returned the output only (the pinned
    release decides; unpinned, 0.21.5+ with a warning). ``torch_compile``/``use_autograd_fix`` are
    accepted and ignored (the merge is exact and differentiable as it is).
    """
    fn = "merge_attentions"
    _, c = _versions.resolve(fn, _MERGE, (outputs, lse_tensors, *args), kwargs)
    if len(outputs) < 2:
        raise ValueError(f"{fn}: expects at least two outputs, got {len(outputs)} (as NATTEN).")
    out, lse = _merge(list(outputs), list(lse_tensors))
    return (out, lse) if c["returns_lse"] else out
