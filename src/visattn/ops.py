"""The autograd and compiler boundary: two ``torch.library`` custom ops and the one autograd registration.

* ``visattn::na_forward(q, k, v, rpb?, attn_bias?, key_padding_mask?, kernel_size, stride, dilation,
  is_causal, scale, backend, return_attn) -> (out, lse, attn)``: the neighbourhood part of
  :func:`visattn.neighborhood_attention` (extra KV tokens are merged outside, in traceable PyTorch).
* ``visattn::na_backward(grad_out, grad_lse?, grad_attn?, q, k, v, out, lse, attn?, rpb?, attn_bias?,
  key_padding_mask?, ...) -> (dq, dk, dv, drpb, dattn_bias)``: its gradients. A backend with a native
  backward (:attr:`Backend.native_backward`) computes them from the saved output and LSE (and the
  returned weights, when their gradient is asked for); for the others the op recomputes their
  differentiable forward and differentiates it.

Both ops carry the *requested* per-axis ints and ``backend=""`` for automatic selection: the
variable-resolution rule (:func:`visattn.spec.fit_axis`) and the choice of backend happen inside,
from the real shapes, so ``torch.compile`` traces them with symbolic sizes and a new resolution needs
no new graph. Selection depends only on the problem, so the backward op finds the forward's backend.

:mod:`visattn.dispatch` decides when a call goes through these ops: always under ``torch.compile``
and dispatch modes, and in eager whenever a backend with a native backward must record a gradient.
The flop formulas (``FlopCounterMode`` then counts the operator's useful work) are registered here.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Sequence

import torch

from .backends import Extras, Problem, Result, run_backward, run_forward, select_backend
from .backends.base import lse_dtype
from .spec import BoolOrTuple, IntOrTuple, make_spec, na_flops

__all__ = ["na_backward", "na_backward_op_flops", "na_forward", "na_forward_op_flops",
           "na_op_flop_formula", "register_na_flop_formula"]

_EMPTY = (0,)  # placeholder for an absent optional output (custom ops cannot return None)


def _setup(query, key, value, rpb, attn_bias, key_padding_mask, kernel_size, stride, dilation, is_causal,
           scale, backend, return_attn, periodic, fn):
    spec = make_spec(fn, tuple(query.shape[1:-2]), tuple(kernel_size), tuple(stride), tuple(dilation),
                     tuple(is_causal), key_spatial=tuple(key.shape[1:-2]), periodic=tuple(periodic) if periodic else False)
    extras = Extras(rpb, attn_bias, key_padding_mask)
    p = Problem.of(query, key, value, spec, float(scale), extras, return_attn)
    return select_backend(p, backend or None, fn), p, extras


def _forward_impl(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: Optional[torch.Tensor],
                 attn_bias: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                 kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
                 is_causal: Sequence[bool], scale: float, backend: str, return_attn: bool,
                 periodic: Optional[Sequence[bool]] = None) -> Result:
    """The body of ``visattn::na_forward``: select the backend from the real shapes and run it."""
    impl, p, extras = _setup(query, key, value, rpb, attn_bias, key_padding_mask, kernel_size, stride, dilation,
                             is_causal, scale, backend, return_attn, periodic, "visattn::na_forward")
    return run_forward(impl, query, key, value, p, extras)


@torch.library.custom_op("visattn::na_forward", mutates_args=())
def na_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    rpb: Optional[torch.Tensor], attn_bias: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
    kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int], is_causal: Sequence[bool],
    scale: float, backend: str, return_attn: bool, periodic: Optional[Sequence[bool]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbourhood attention: ``out [B, *S, H, D_v]``, ``lse [B, *S, H]``, ``attn [B, *S, H, K]``
    (``attn`` is an empty tensor unless ``return_attn``). ``periodic``: ``None`` for none."""
    res = _forward_impl(query, key, value, rpb, attn_bias, key_padding_mask, kernel_size, stride, dilation,
                       is_causal, scale, backend, return_attn, periodic)
    # Contiguous so that the real strides match the fake ones the compiler planned with.
    attn = res.attn.contiguous() if res.attn is not None else query.new_empty(_EMPTY)
    return res.out.contiguous(), res.lse.contiguous(), attn


@na_forward.register_fake
def _na_forward_fake(query, key, value, rpb, attn_bias, key_padding_mask, kernel_size, stride, dilation,
                     is_causal, scale, backend, return_attn, periodic=None):
    lead = query.shape[:-1]
    out = query.new_empty((*lead, value.shape[-1]))
    lse = query.new_empty(lead, dtype=lse_dtype(query.dtype))
    if return_attn:
        # fit_axis on the key grid: the effective kernel is min(kernel, length); sym_min adds no guard.
        window = math.prod(torch.sym_min(k, L) for k, L in zip(kernel_size, key.shape[1:-2]))
        attn = query.new_empty((*lead, window))
    else:
        attn = query.new_empty(_EMPTY)
    return out, lse, attn


@contextlib.contextmanager
def _autograd_inside_op():
    """Re-enable autograd inside an op body.

    A custom op runs below the autograd dispatch keys (they are excluded thread-locally), so
    ``enable_grad`` alone would record nothing; differentiating a backend's forward needs them.
    """
    keys = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
            torch._C.DispatchKey.AutogradNestedTensor)
    before = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in keys]
    try:
        for k in keys:
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
        with torch.enable_grad():
            yield
    finally:
        for k, b in zip(keys, before):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, b)


def differentiate_forward(impl, p: Problem, grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
                          grad_attn: Optional[torch.Tensor], query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, extras: Extras, create_graph: bool = False) -> list[Optional[torch.Tensor]]:
    """Gradients ``[dq, dk, dv, drpb, dattn_bias]`` (``None`` for absent inputs) by autograd through
    ``impl``'s differentiable forward, for backends without a native backward and for double
    backward (``create_graph``)."""
    leaves = [t if create_graph else t.detach().requires_grad_()
              for t in (query, key, value)] + [None if t is None else (t if create_graph else t.detach().requires_grad_())
                                               for t in (extras.rpb, extras.attn_bias)]
    res = run_forward(impl, *leaves[:3], p, Extras(leaves[3], leaves[4], extras.key_padding_mask))
    outputs, grads = [res.out], [grad_out]
    if grad_lse is not None:
        # LSE is -inf for a query with no key; its gradient there is zero, not NaN.
        outputs.append(res.lse)
        grads.append(torch.where(torch.isfinite(res.lse), grad_lse, 0.0))
    if grad_attn is not None and res.attn is not None:
        outputs.append(res.attn)
        grads.append(grad_attn)
    inputs = [t for t in leaves if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(outputs, inputs, grads, allow_unused=True, create_graph=create_graph))
    result = []
    for t in leaves:
        g = next(got) if t is not None and t.requires_grad else None
        result.append(torch.zeros_like(t) if g is None and t is not None else g)
    return result


@torch.library.custom_op("visattn::na_backward", mutates_args=())
def na_backward(
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], grad_attn: Optional[torch.Tensor],
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    attn: Optional[torch.Tensor],
    rpb: Optional[torch.Tensor], attn_bias: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
    kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int], is_causal: Sequence[bool],
    scale: float, backend: str, return_attn: bool, periodic: Optional[Sequence[bool]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, drpb, dattn_bias)`` of :func:`na_forward` (module docstring);
    ``drpb``/``dattn_bias`` are empty tensors when ``rpb``/``attn_bias`` are absent. ``attn``: the
    weights the forward returned, given with ``grad_attn`` (a native backward needs them)."""
    impl, p, extras = _setup(query, key, value, rpb, attn_bias, key_padding_mask, kernel_size, stride, dilation,
                             is_causal, scale, backend, return_attn, periodic, "visattn::na_backward")
    if impl.native_backward:
        if grad_attn is not None and attn is None:
            raise ValueError("visattn::na_backward: grad_attn was given without attn, the weights the forward "
                             "returned; pass both (a native backward needs the weights).")
        g = run_backward(impl, query, key, value, out, lse, grad_out, grad_lse, p, extras, attn, grad_attn)
        grads = [g.dq, g.dk, g.dv, g.drpb, g.dattn_bias]
    else:
        with _autograd_inside_op():
            grads = differentiate_forward(impl, p, grad_out, grad_lse, grad_attn, query, key, value, extras)
    return tuple(query.new_empty(_EMPTY) if g is None else g.contiguous() for g in grads)


@na_backward.register_fake
def _na_backward_fake(grad_out, grad_lse, grad_attn, query, key, value, out, lse, attn, rpb, attn_bias,
                      key_padding_mask, kernel_size, stride, dilation, is_causal, scale, backend, return_attn,
                      periodic=None):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None
                 else query.new_empty(_EMPTY) for t in (query, key, value, rpb, attn_bias))


# ------------------------------------------------------------------------------------------------
# The autograd registration (the only one in the library)

_PARAMS = ("kernel_size", "stride", "dilation", "is_causal", "scale", "backend", "return_attn", "periodic")


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, rpb, attn_bias, key_padding_mask, *params = inputs
    out, lse, attn = output
    return_attn = params[_PARAMS.index("return_attn")]
    ctx.save_for_backward(query, key, value, out, lse, attn if return_attn else None, rpb, attn_bias,
                          key_padding_mask)
    ctx.params = params
    ctx.set_materialize_grads(False)  # an unused LSE or weights output costs no zero-filled gradient


def _backward(ctx, grad_out, grad_lse, grad_attn):
    query, key, value, out, lse, attn, rpb, attn_bias, key_padding_mask = ctx.saved_tensors
    params = dict(zip(_PARAMS, ctx.params))
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if not params["return_attn"]:
        grad_attn = None
    if grad_attn is None:
        attn = None  # only needed with its gradient
    if torch.is_grad_enabled():
        # create_graph=True (double backward, gradient penalties): gradients that are themselves
        # differentiable, by autograd through the portable backend's forward.
        from .backends import get_backend

        spec = make_spec("visattn::na_backward", tuple(query.shape[1:-2]), *(params[n] for n in _PARAMS[:4]),
                         key_spatial=tuple(key.shape[1:-2]),
                         periodic=tuple(params["periodic"]) if params["periodic"] else False)
        extras = Extras(rpb, attn_bias, key_padding_mask)
        p = Problem.of(query, key, value, spec, float(params["scale"]), extras, params["return_attn"])
        grads = differentiate_forward(get_backend("torch"), p, grad_out, grad_lse, grad_attn, query, key, value,
                                      extras, create_graph=True)
    else:
        grads = torch.ops.visattn.na_backward(grad_out, grad_lse, grad_attn, query, key, value, out, lse, attn,
                                              rpb, attn_bias, key_padding_mask, *ctx.params)
    dq, dk, dv, drpb, dbias = grads
    return (dq, dk, dv, drpb if rpb is not None else None, dbias if attn_bias is not None else None,
            None, *(None,) * len(_PARAMS))


na_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# vmap rules (torch.func.vmap, and per-sample gradients with vmap(grad(...)))

def _vmap_rule(op, info, in_dims, args, batched: tuple[int, ...], loop_if: tuple[int, ...]):
    """Run ``op`` under vmap. The arguments at ``batched`` are ``[B, ...]`` tensors: their vmapped dim
    is folded into the batch dim, one call for the whole vmap. The arguments at ``loop_if`` are one
    table for the whole call (a bias table ``rpb``): if present, the op runs once per vmapped sample
    instead (the table may differ per sample, and its gradient must). Outputs: vmapped dim first;
    empty placeholders (absent optional outputs) unbatched."""
    size = info.batch_size
    if any(args[i] is not None for i in loop_if):
        per_sample = []
        for s in range(size):
            per_sample.append(op(*[a.select(in_dims[i], s) if isinstance(a, torch.Tensor) and in_dims[i] is not None
                                   else a for i, a in enumerate(args)]))
        columns = list(zip(*per_sample))
        return (tuple(torch.stack(c) if c[0].numel() else c[0] for c in columns),
                tuple(0 if c[0].numel() else None for c in columns))
    folded = list(args)
    for i in batched:
        a = args[i]
        if a is None:
            continue
        a = a.movedim(in_dims[i], 0) if in_dims[i] is not None else a.expand(size, *a.shape)
        folded[i] = a.reshape(size * a.shape[1], *a.shape[2:])
    result = op(*folded)
    outs = tuple(r.reshape(size, -1, *r.shape[1:]) if r.numel() else r for r in result)
    return outs, tuple(0 if r.numel() else None for r in result)


@na_forward.register_vmap
def _na_forward_vmap(info, in_dims, *args):
    # (q, k, v, rpb, attn_bias, key_padding_mask, ...): all [B, ...] but the bias table
    return _vmap_rule(torch.ops.visattn.na_forward, info, in_dims, args, batched=(0, 1, 2, 4, 5), loop_if=(3,))


@na_backward.register_vmap
def _na_backward_vmap(info, in_dims, *args):
    # (grad_out, grad_lse, grad_attn, q, k, v, out, lse, attn, rpb, attn_bias, key_padding_mask, ...)
    return _vmap_rule(torch.ops.visattn.na_backward, info, in_dims, args,
                      batched=(0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11), loop_if=(9,))


# ------------------------------------------------------------------------------------------------
# FLOP formulas for torch.utils.flop_counter

def na_forward_op_flops(query_shape, key_shape, value_shape, rpb_shape, attn_bias_shape, key_padding_mask_shape,
                        kernel_size, stride, dilation, is_causal, *args, out_val: Any = None, **kwargs) -> int:
    """FLOPs of ``visattn::na_forward``: :func:`visattn.spec.na_flops` (``QK^T`` and ``PV`` over every
    window slot) plus one add per slot for a relative positional bias (as NATTEN's fvcore handle)."""
    rank = len(query_shape) - 3
    spec = make_spec("visattn::na_forward", tuple(query_shape[1:rank + 1]), kernel_size, stride, dilation, is_causal,
                     key_spatial=tuple(key_shape[1:rank + 1]))
    flops = na_flops(spec, query_shape[0], query_shape[-2], query_shape[-1], value_shape[-1])
    if rpb_shape is not None:
        flops += 2 * query_shape[0] * spec.num_tokens * spec.window_size * query_shape[-2]
    return flops


def na_backward_op_flops(grad_out_shape, grad_lse_shape, grad_attn_shape, query_shape, key_shape, value_shape,
                         saved_out_shape, lse_shape, attn_shape, rpb_shape, attn_bias_shape, key_padding_mask_shape,
                         kernel_size, stride, dilation, is_causal, *args, out_val: Any = None, **kwargs) -> int:
    """FLOPs of ``visattn::na_backward``: 2x the forward's (the papers' and ``visattn bench``'s convention)."""
    return 2 * na_forward_op_flops(query_shape, key_shape, value_shape, rpb_shape, attn_bias_shape,
                                   key_padding_mask_shape, kernel_size, stride, dilation, is_causal)


def na_op_flop_formula(query_shape, key_shape, value_shape, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                       dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, *args, out_val: Any = None,
                       **kwargs) -> int:
    """FLOP formula for someone else's custom op with NATTEN's signature
    ``(query, key, value, kernel_size, stride, dilation, is_causal, ..., rpb=...)`` (heads-last
    shapes); register it with :func:`register_na_flop_formula`."""
    rpb = kwargs.get("rpb")
    return na_forward_op_flops(query_shape, key_shape, value_shape, rpb, None, None, kernel_size, stride,
                               dilation, is_causal)


def register_na_flop_formula(op) -> None:
    """Make PyTorch's ``FlopCounterMode`` count ``op`` (a ``torch.ops.<ns>.<name>`` packet whose schema
    starts like NATTEN's ``na*d``) with :func:`na_op_flop_formula`."""
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(op)(na_op_flop_formula)


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.visattn.na_forward)(na_forward_op_flops)
    register_flop_formula(torch.ops.visattn.na_backward)(na_backward_op_flops)


_register_flop_formulas()
