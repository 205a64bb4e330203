"""Public functional API: ``na1d``, ``na2d``, ``na3d`` and rank-generic ``neighborhood_attention``.

Argument names and order follow NATTEN 0.21 (``query, key, value, kernel_size, stride, dilation,
is_causal, scale, additional_keys, additional_values, ..., backend, ..., return_lse``), so code written
for NATTEN runs unchanged. Validation happens once here; backends receive a checked
:class:`~visattn.backends.base.Problem`.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch

from . import dispatch
from .backends import Extras
from .backends.base import lse_dtype, safe_logsumexp
from .spec import BoolOrTuple, IntOrTuple, NASpec, _as_tuple, make_spec
from .unfused import na_av, na_qk

__all__ = ["na1d", "na2d", "na3d", "na_av", "na_qk", "neighborhood_attention", "merge_attentions"]

# NATTEN's performance knobs: accepted so NATTEN call sites run unchanged, and ignored (our backends
# choose their own tiles). Anything else is an error rather than silently dropped.
_NATTEN_TUNING_KWARGS = frozenset({
    "attention_kwargs", "q_tile_shape", "kv_tile_shape", "backward_q_tile_shape", "backward_kv_tile_shape",
    "backward_kv_splits", "backward_use_pt_reduction", "run_persistent_kernel", "kernel_schedule",
    "torch_compile",
})

Output = Union[torch.Tensor, tuple[torch.Tensor, ...]]


def _check_tensors(fn: str, rank: Optional[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    r = q.dim() - 3
    if rank is not None and r != rank:
        raise ValueError(
            f"{fn}: query has shape {tuple(q.shape)} ({q.dim()} dims) but {fn} expects "
            f"[B, {', '.join('S%d' % i for i in range(rank))}, heads, head_dim] ({rank + 3} dims). "
            f"The layout is heads-last; use na{max(r, 1)}d for {max(r, 1)} spatial axes."
        )
    if r not in (1, 2, 3):
        raise ValueError(f"{fn}: query has {q.dim()} dims; expected [B, *spatial, heads, head_dim] with 1-3 "
                         f"spatial axes (4-6 dims).")
    for name, t in (("key", k), ("value", v)):
        if t.dim() != q.dim():
            raise ValueError(f"{fn}: {name} has {t.dim()} dims but query has {q.dim()}; all must be "
                             f"[B, *spatial, heads, head_dim].")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{fn}: {name} has batch {t.shape[0]} but query has {q.shape[0]}; they must match.")
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name}.dtype={t.dtype} but query.dtype={q.dtype}; cast them to one dtype.")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but query is on {q.device}; move them to one device.")
    if k.shape[1: r + 1] != v.shape[1: r + 1]:
        # keys may live on another grid than the queries (cross-grid attention), but keys and values on one
        other = "" if k.shape[1: r + 1] == q.shape[1: r + 1] else \
            f"key batch/spatial shape {tuple(k.shape[: r + 1])} differs from query's {tuple(q.shape[: r + 1])} and "
        raise ValueError(f"{fn}: {other}value's spatial shape {tuple(v.shape[1: r + 1])} differs from key's "
                         f"{tuple(k.shape[1: r + 1])}; keys and values must share one grid (which may differ from "
                         f"the queries' for cross-grid attention).")
    if not q.is_floating_point():
        raise TypeError(f"{fn}: query.dtype={q.dtype}; attention needs a floating-point dtype.")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{fn}: key head_dim={k.shape[-1]} differs from query head_dim={q.shape[-1]}.")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"{fn}: value has {v.shape[-2]} heads but key has {k.shape[-2]}; they must match.")
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"{fn}: query has {q.shape[-2]} heads, key/value {k.shape[-2]}; for GQA/MQA the kv "
                         f"heads must divide the query heads.")
    return r


def _check_extras(fn: str, q: torch.Tensor, spec: NASpec, heads: int, extras: Extras) -> None:
    B, S = q.shape[0], spec.spatial
    for name in ("rpb", "attn_bias", "key_padding_mask"):
        t = getattr(extras, name)
        if t is None:
            continue
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but the query is on {q.device}; move it with "
                             f"{name}.to(q.device).")
        if name != "key_padding_mask" and not t.is_floating_point():
            raise ValueError(f"{fn}: {name} has dtype {t.dtype}; it is added to the attention logits, so it "
                             f"must be a floating-point tensor (e.g. {name}.float()).")
    if extras.rpb is not None:
        want = (heads, *(2 * k - 1 for k in spec.requested_kernel_size))
        if tuple(extras.rpb.shape) != want:
            raise ValueError(f"{fn}: rpb has shape {tuple(extras.rpb.shape)}; expected [heads, 2*k-1 per axis] "
                             f"= {want} for kernel_size={spec.requested_kernel_size}.")
    if extras.attn_bias is not None:
        want = (B, *S, heads, spec.window_size)
        if tuple(extras.attn_bias.shape) != want:
            raise ValueError(f"{fn}: attn_bias has shape {tuple(extras.attn_bias.shape)}; expected "
                             f"[B, *spatial, heads, prod(kernel_size)] = {want} (kernel_size as used: "
                             f"{spec.kernel_size}).")
    m = extras.key_padding_mask
    if m is not None:
        Sk = spec.key_spatial
        if m.dtype != torch.bool or tuple(m.shape) != (B, *Sk):
            raise ValueError(f"{fn}: key_padding_mask must be a bool tensor of shape [B, *spatial] of the keys = "
                             f"{(B, *Sk)} (True = ignore that key), got {m.dtype} {tuple(m.shape)}.")


def _check_scale(fn: str, scale, head_dim: int) -> float:
    """``scale`` as a finite Python float (``None``: ``head_dim ** -0.5``)."""
    if scale is None:
        return head_dim ** -0.5
    if torch.compiler.is_compiling():  # may be symbolic (dynamic shapes); the same call is checked in eager
        return scale
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not (scale.is_floating_point() or scale.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{fn}: scale is a {scale.dtype} tensor of shape {tuple(scale.shape)}; pass a Python "
                            f"number (e.g. scale=0.125).")
        if scale.requires_grad:
            raise TypeError(f"{fn}: scale is a tensor that requires grad, but the scale is a constant of the "
                            f"operator and would get no gradient; multiply the query by it instead.")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: scale={scale!r} ({type(scale).__name__}) must be a real number, e.g. "
                        f"scale={head_dim ** -0.5:.4g} (the default, head_dim ** -0.5), or None.")
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale={scale!r} must be finite; pass None for head_dim ** -0.5.")
    return scale


def _check_additional(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ak: Optional[torch.Tensor],
                      av: Optional[torch.Tensor]) -> None:
    """Extra KV tokens: both or neither, ``[B, N, H_kv, D]`` / ``[B, N, H_kv, D_v]``, q's dtype and device."""
    if ak is None and av is None:
        return
    if ak is None or av is None:
        raise ValueError(f"{fn}: pass both additional_keys and additional_values, or neither.")
    for name, t in (("additional_keys", ak), ("additional_values", av)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor [B, N, H_kv, D], got {type(t).__name__}.")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{fn}: {name} is {t.dtype} on {t.device} but the query is {q.dtype} on {q.device}; "
                            f"use {name}.to(query).")
    B, Hkv, D, Dv = q.shape[0], k.shape[-2], q.shape[-1], v.shape[-1]
    if ak.dim() != 4 or ak.shape[0] != B or ak.shape[2] != Hkv or ak.shape[3] != D or \
            av.dim() != 4 or av.shape[:3] != ak.shape[:3] or av.shape[3] != Dv:
        raise ValueError(f"{fn}: additional_keys/values must be [B, N, H_kv, D] / [B, N, H_kv, D_v] = "
                         f"[{B}, N, {Hkv}, {D}] / [{B}, N, {Hkv}, {Dv}], got {tuple(ak.shape)} / {tuple(av.shape)}.")


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query against the same ``N`` extra tokens. ``q [B, *S, H, D]``, ``k/v [B, N, H_kv, D]``.

    Returns ``out [B, *S, H, D_v]`` and ``lse [B, *S, H]``.
    """
    B, H, G = q.shape[0], q.shape[-2], q.shape[-2] // k.shape[-2]
    cdt = lse_dtype(q.dtype)
    qf = q.reshape(B, -1, H, q.shape[-1]).to(cdt)
    kf = k.to(cdt).repeat_interleave(G, dim=2)
    vf = v.to(cdt).repeat_interleave(G, dim=2)
    logits = torch.einsum("bqhd,bnhd->bqhn", qf, kf) * scale
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("bqhn,bnhd->bqhd", torch.exp(logits - lse.unsqueeze(-1)), vf)
    return out.reshape(*q.shape[:-1], v.shape[-1]).to(q.dtype), lse.reshape(q.shape[:-1])


def merge_attentions(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets into attention over their union.

    ``outputs[i] [..., H, D_v]`` and ``lses[i] [..., H]`` from the same queries; returns the merged
    ``(out, lse)``. Exact: ``out = sum_i exp(lse_i - lse) * out_i`` with ``lse = logsumexp_i lse_i``.
    Differentiable; a part with ``lse = -inf`` (no keys) contributes nothing.
    """
    if len(outputs) != len(lses) or not outputs:
        raise ValueError(f"merge_attentions: got {len(outputs)} outputs and {len(lses)} lses; pass equally many, >= 1.")
    lse_all = torch.stack([l.float() if l.dtype in (torch.float16, torch.bfloat16) else l for l in lses])
    lse = safe_logsumexp(lse_all, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(lse_all - safe)  # exp(-inf) = 0 for empty parts
    out = sum(w.unsqueeze(-1) * o.to(w.dtype) for w, o in zip(weights, outputs))
    return out.to(outputs[0].dtype), lse


def neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: Optional[float] = None,
    additional_keys: Optional[torch.Tensor] = None,
    additional_values: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
    return_lse: bool = False,
    rpb: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    return_attn: bool = False,
    periodic: BoolOrTuple = False,
    _fn: str = "neighborhood_attention",
    _rank: Optional[int] = None,
    **natten_kwargs,
) -> Output:
    """Generalized neighborhood attention over 1-3 spatial axes (heads-last layout).

    Shapes: ``query [B, *S, H, D]``, ``key [B, *S_k, H_kv, D]``, ``value [B, *S_k, H_kv, D_v]`` with
    ``H_kv`` dividing ``H`` (GQA/MQA). Per-axis ``kernel_size``, ``stride``, ``dilation``,
    ``is_causal`` (an int/bool or a tuple). ``scale`` defaults to ``D ** -0.5``.

    * Cross-grid: ``S_k`` may differ from ``S`` (same rank): query ``x`` is centred at key coordinate
      ``min(floor((x + 0.5) * Lk / Lq), Lk - 1)`` per axis and sees what a query there sees on the key
      grid (:mod:`visattn.spec`). ``S_k == S`` is plain neighborhood attention.
    * ``periodic`` (bool or per axis): the axis wraps; query ``x`` sees ``(x + d*j) mod L`` for ``j`` in
      ``[-(k//2), k-1-k//2]`` (no shifted windows at the seam). Not with stride or causal on that axis.

    * ``additional_keys/values [B, N, H_kv, D(_v)]``: extra global tokens every query also attends
      to, in one softmax with its neighbourhood.
    * ``rpb [H, 2k0-1, ...]``: relative positional bias (NAT/DiNAT), indexed by key minus query
      position within the dilation group.
    * ``attn_bias [B, *S, H, K]``: additive logits per neighbourhood slot; ``key_padding_mask
      [B, *S_k]`` bool, True = ignore that key. A query left with no key outputs zeros and LSE -inf.
    * ``backend``: ``None`` picks the fastest that supports the call; a name forces it.

    Returns ``out [B, *S, H, D_v]``; with ``return_lse`` also ``lse [B, *S, H]``; with
    ``return_attn`` also the probabilities ``[B, *S, H, K (+ N)]`` in neighbourhood-slot order
    (row-major over axes, see :mod:`visattn.spec`), extra tokens last. Order: ``(out, lse, attn)``.

    Raises ``TypeError``/``ValueError`` naming the argument and the fix on any inconsistent input.
    """
    fn = _fn
    unknown = set(natten_kwargs) - _NATTEN_TUNING_KWARGS
    if unknown:
        raise TypeError(f"{fn}: unexpected keyword argument(s) {sorted(unknown)}.")
    rank = _check_tensors(fn, _rank, query, key, value)
    requested = tuple(_as_tuple(fn, n, a, rank, t) for n, a, t in
                      (("kernel_size", kernel_size, int), ("stride", stride, int), ("dilation", dilation, int),
                       ("is_causal", is_causal, bool), ("periodic", periodic, bool)))
    spec = make_spec(fn, tuple(query.shape[1 : rank + 1]), *requested[:4], key_spatial=tuple(key.shape[1: rank + 1]),
                     periodic=requested[4])
    B, H, D, Dv = query.shape[0], query.shape[-2], query.shape[-1], value.shape[-1]
    scale = _check_scale(fn, scale, D)
    for flag, value_ in (("return_lse", return_lse), ("return_attn", return_attn)):
        if not isinstance(value_, bool):
            raise TypeError(f"{fn}: {flag}={value_!r} must be True or False.")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"{fn}: backend={backend!r} must be None (automatic) or a backend name such as 'torch' "
                        f"(`visattn info` lists them).")
    extras = Extras(rpb=rpb, attn_bias=attn_bias, key_padding_mask=key_padding_mask)
    _check_extras(fn, query, spec, H, extras)
    _check_additional(fn, query, key, value, additional_keys, additional_values)
    if any(L == 0 for L in spec.key_spatial) and not any(L == 0 for L in spec.spatial) and B > 0:
        raise ValueError(f"{fn}: key has spatial shape {spec.key_spatial} with an empty axis but the query's "
                         f"{spec.spatial} has none: those queries would have no key to attend to.")
    if any(L == 0 for L in spec.spatial) or B == 0:
        return _empty(query, Dv, spec, return_lse, return_attn, additional_keys)

    out, lse, attn = dispatch.attention(query, key, value, spec, requested, scale, backend, extras, return_attn, fn)
    if additional_keys is not None:
        out_x, lse_x = _dense_attention(query, additional_keys, additional_values, scale)
        out, lse_new = merge_attentions([out, out_x], [lse, lse_x])
        if return_attn:
            safe = torch.where(torch.isfinite(lse_new), lse_new, torch.zeros_like(lse_new))
            cdt = lse_new.dtype
            logits_x = _extra_logits(query, additional_keys, scale).to(cdt)
            attn = torch.cat([attn.to(cdt) * torch.exp(lse.to(cdt) - safe).unsqueeze(-1),
                              torch.exp(logits_x - safe.unsqueeze(-1))], dim=-1).to(query.dtype)
        lse = lse_new
    result = (out,) + ((lse,) if return_lse else ()) + ((attn,) if return_attn else ())
    return result[0] if len(result) == 1 else result


def _extra_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled logits of every query against the extra tokens: ``[B, *S, H, N]``."""
    G = q.shape[-2] // k.shape[-2]
    kf = k.to(lse_dtype(q.dtype)).repeat_interleave(G, dim=2)
    return torch.einsum("b...hd,bnhd->b...hn", q.to(kf.dtype), kf) * scale


def _empty(q: torch.Tensor, dim_v: int, spec: NASpec, return_lse: bool, return_attn: bool,
           extra: Optional[torch.Tensor]) -> Output:
    """Zero-size batch or axis: empty outputs of the right shapes (keeps the autograd graph)."""
    out = q.new_zeros(*q.shape[:-1], dim_v) + 0 * q.sum()
    lse = q.new_full(q.shape[:-1], float("-inf"), dtype=lse_dtype(q.dtype))
    n = spec.window_size + (0 if extra is None else extra.shape[1])
    attn = q.new_zeros(*q.shape[:-1], n)
    result = (out,) + ((lse,) if return_lse else ()) + ((attn,) if return_attn else ())
    return result[0] if len(result) == 1 else result


def _ranked(rank: int, generic: Callable[..., Output] = neighborhood_attention, what: str = "neighborhood attention"):
    """``na{rank}d``: ``generic`` (a rank-generic ``neighborhood_attention``) for exactly ``rank`` spatial axes."""
    def fn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple,
           stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
           scale: Optional[float] = None, additional_keys: Optional[torch.Tensor] = None,
           additional_values: Optional[torch.Tensor] = None, **kwargs) -> Output:
        return generic(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                       additional_keys, additional_values, _fn=f"na{rank}d", _rank=rank, **kwargs)

    fn.__name__ = fn.__qualname__ = f"na{rank}d"
    fn.__doc__ = (f"{rank}-D {what}: ``query [B, {', '.join('S%d' % i for i in range(rank))}, H, D]``.\n\n"
                  f"Same arguments and returns as :func:`neighborhood_attention`, with exactly {rank} spatial axes.")
    return fn


na1d = _ranked(1)
na2d = _ranked(2)
na3d = _ranked(3)
