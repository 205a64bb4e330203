"""``torch.library`` custom ops, so that ``torch.compile(fullgraph=True)`` sees one opaque node.

Two ops, both with fake (meta) implementations that only compute output shapes, so they trace with
symbolic (dynamic) spatial sizes without guarding on them:

* ``visattn::na_forward(q, k, v, rpb?, attn_bias?, key_padding_mask?, kernel_size, stride,
  dilation, is_causal, scale, backend, return_attn) -> (out, lse, attn)``: the neighbourhood part of
  :func:`visattn.neighborhood_attention` (extra KV tokens are merged outside, in traceable PyTorch);
  ``backend=""`` chooses automatically *at run time*, from the real shapes;
* ``visattn::na_backward(...)``: its gradients. It works for every backend by **recomputing** the
  backend's forward under ``torch.enable_grad()`` and calling ``torch.autograd.grad`` on it: the
  backward costs one extra forward and needs no per-backend backward op, at the price of keeping the
  inputs (not the activations) alive between forward and backward.

Eager calls do not go through these ops (``functional`` branches on
``torch.compiler.is_compiling()``), so they pay no dispatcher overhead. The ops carry the *requested*
per-axis ints; the variable-resolution rule (:func:`visattn.spec.fit_axis`) is applied inside, from
the real shapes, which is why a new resolution needs no new graph.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch

from .backends.base import lse_dtype

__all__ = ["na_forward", "na_backward"]

_EMPTY = (0,)  # placeholder for an absent optional output (custom ops cannot return None)


def _call_eager(query, key, value, rpb, attn_bias, key_padding_mask, kernel_size, stride, dilation,
                is_causal, scale, backend, return_attn):
    from .functional import _na_eager  # lazy: functional imports this module

    spec = (tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal))
    return _na_eager(query, key, value, spec, scale, backend or None, rpb, attn_bias, key_padding_mask, return_attn,
                     "visattn::na_forward")


@torch.library.custom_op("visattn::na_forward", mutates_args=())
def na_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    rpb: Optional[torch.Tensor], attn_bias: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
    kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int], is_causal: Sequence[bool],
    scale: float, backend: str, return_attn: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbourhood attention: ``out [B, *S, H, D_v]``, ``lse [B, *S, H]``, ``attn [B, *S, H, K]``
    (``attn`` is an empty tensor unless ``return_attn``)."""
    out, lse, attn = _call_eager(query, key, value, rpb, attn_bias, key_padding_mask, kernel_size, stride,
                                 dilation, is_causal, scale, backend, return_attn)
    # Contiguous so that the real strides match the fake ones the compiler planned with.
    attn = attn.contiguous() if attn is not None else query.new_empty(_EMPTY)
    return out.contiguous(), lse.contiguous(), attn


@na_forward.register_fake
def _na_forward_fake(query, key, value, rpb, attn_bias, key_padding_mask, kernel_size, stride, dilation,
                     is_causal, scale, backend, return_attn):
    lead = query.shape[:-1]
    out = query.new_empty((*lead, value.shape[-1]))
    lse = query.new_empty(lead, dtype=lse_dtype(query.dtype))
    if return_attn:
        # fit_axis: the effective kernel is min(kernel, length); sym_min adds no guard on the size.
        window = math.prod(torch.sym_min(k, L) for k, L in zip(kernel_size, query.shape[1:-2]))
        attn = query.new_empty((*lead, window))
    else:
        attn = query.new_empty(_EMPTY)
    return out, lse, attn


@contextlib.contextmanager
def _autograd_inside_op():
    """Re-enable autograd inside an op body.

    A custom op without its own autograd formula runs below the autograd dispatch keys (they are
    excluded thread-locally), so ``enable_grad`` alone would record nothing; the recompute needs them.
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


@torch.library.custom_op("visattn::na_backward", mutates_args=())
def na_backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor, grad_attn: torch.Tensor,
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    rpb: Optional[torch.Tensor], attn_bias: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
    kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int], is_causal: Sequence[bool],
    scale: float, backend: str, return_attn: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, drpb, dattn_bias)`` of :func:`na_forward`, by recomputation (module
    docstring); ``drpb``/``dattn_bias`` are empty tensors when ``rpb``/``attn_bias`` are absent."""
    with _autograd_inside_op():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (query, key, value, rpb, attn_bias)]
        out, lse, attn = _call_eager(*leaves[:3], leaves[3], leaves[4], key_padding_mask, kernel_size, stride,
                                     dilation, is_causal, scale, backend, return_attn)
        # LSE is -inf for a query with no key; its gradient there is zero, not NaN.
        grad_lse = torch.where(torch.isfinite(lse), grad_lse, 0.0)
        outputs, grads = [out, lse], [grad_out, grad_lse]
        if return_attn:
            outputs.append(attn)
            grads.append(grad_attn)
        inputs = [t for t in leaves if t is not None]
        got = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    got_iter = iter(got)
    result = []
    for t in leaves:
        if t is None:
            result.append(query.new_empty(_EMPTY))
        else:
            g = next(got_iter)
            result.append(torch.zeros_like(t) if g is None else g.contiguous())
    return tuple(result)


@na_backward.register_fake
def _na_backward_fake(grad_out, grad_lse, grad_attn, query, key, value, rpb, attn_bias, key_padding_mask,
                      kernel_size, stride, dilation, is_causal, scale, backend, return_attn):
    return tuple(torch.empty_like(t) if t is not None else query.new_empty(_EMPTY)
                 for t in (query, key, value, rpb, attn_bias))


_ARGS = ("query", "key", "value", "rpb", "attn_bias", "key_padding_mask", "kernel_size", "stride", "dilation",
         "is_causal", "scale", "backend", "return_attn")


def _setup_context(ctx, inputs, output) -> None:
    tensors, ctx.args = inputs[:6], dict(zip(_ARGS[6:], inputs[6:]))  # tensors only via save_for_backward
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*(t for t in tensors if t is not None))


def _backward(ctx, grad_out, grad_lse, grad_attn):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if present else None for present in ctx.present]
    a = ctx.args
    q = tensors[0]
    # Outputs the loss did not use arrive as None; the op needs tensors.
    grad_out = q.new_zeros((*q.shape[:-1], tensors[2].shape[-1])) if grad_out is None else grad_out
    grad_lse = q.new_zeros(q.shape[:-1], dtype=lse_dtype(q.dtype)) if grad_lse is None else grad_lse
    grad_attn = q.new_zeros(_EMPTY) if grad_attn is None or not a["return_attn"] else grad_attn
    dq, dk, dv, drpb, dbias = torch.ops.visattn.na_backward(
        grad_out, grad_lse, grad_attn, *tensors, a["kernel_size"], a["stride"], a["dilation"], a["is_causal"],
        a["scale"], a["backend"], a["return_attn"])
    return (dq, dk, dv, drpb if tensors[3] is not None else None, dbias if tensors[4] is not None else None,
            None, None, None, None, None, None, None, None)


na_forward.register_autograd(_backward, setup_context=_setup_context)



def _register_flop_formulas() -> None:
    """Exact FLOPs for ``torch.utils.flop_counter`` (so ``FlopCounterMode`` counts the operator's
    useful work, not a backend's internals): forward per :func:`visattn.spec.na_flops`, backward as
    2x forward (the usual convention, although the recomputing backward does one more forward)."""
    from torch.utils.flop_counter import register_flop_formula

    from .flops import na_backward_op_flops, na_forward_op_flops

    register_flop_formula(torch.ops.visattn.na_forward)(na_forward_op_flops)
    register_flop_formula(torch.ops.visattn.na_backward)(na_backward_op_flops)


_register_flop_formulas()
