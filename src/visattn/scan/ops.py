"""The selective scan's autograd and compiler boundary: two ``torch.library`` custom ops, one autograd
registration, fake implementations (``torch.compile(fullgraph=True)`` traces the scan as one node) and
FLOP formulas.

* ``visattn::selective_scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus, path, chunk,
  save_states) -> (out, last_state, states)``: ``out`` and ``last_state`` as
  :func:`visattn.selective_scan` returns them; ``states``, the state before every chunk of ``chunk``
  tokens (empty unless ``save_states``), is what the backward needs to recompute the rest.
* ``visattn::selective_scan_bwd(dout, dlast?, u, ..., states, ...) -> (du, ddelta, dA, dB, dC, dD, dz,
  ddelta_bias)``: the gradients, by the explicit backward of the path (absent ones are empty tensors).

Paths (``path``; ``""`` chooses at run time, so a compiled graph probes nothing while tracing):
``cpu`` (the C kernel, :mod:`.cpu`; float32, and half inputs computed in float32) and ``torch`` (the
chunked PyTorch scan, :mod:`.chunked`; any device, float64 too). Both do the whole computation (bias,
softplus, ``D`` skip, ``z`` gate), take the same layouts and the same ``chunk``, so a call the kernel
cannot serve falls back without changing its saved states.

Layouts: every ``[batch, dim, L]`` output is a transposed view of ``[batch, L, dim]`` memory (the
channels-last sequence the mixers produce and consume, so they never copy), ``last_state``
``[batch, dim, N]`` one of ``[batch, N, dim]``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import chunked, cpu
from .checks import compute_dtype, grouped

__all__ = ["CHUNK", "differentiable_forward", "select_path", "selective_scan_bwd", "selective_scan_fwd",
           "scan_flops", "why_not"]

PATHS = ("reference", "torch", "cpu")
#: Tokens per chunk: the backward's unit of recomputation (states saved at chunk starts).
CHUNK = 64
_EMPTY = (0,)


def why_not(path: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``path`` cannot serve a scan on ``device`` computed in ``dtype`` (``None``: it can). Builds nothing."""
    if path not in PATHS:
        return f"no selective-scan path of that name (known: {', '.join(PATHS)})"
    if path != "cpu":
        return None
    if device.type != "cpu":
        return f"tensors are on {device}, the C kernel runs on CPU tensors only"
    if dtype != torch.float32:
        return f"it computes in float32, this call in {dtype} (float64 goes to the torch path)"
    return cpu.why_not()


def select_path(fn: str, requested: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The path that serves a call: ``requested`` if it can (else ``ValueError`` saying why), or ``cpu``
    when usable (its first use builds it), else ``torch``."""
    if requested is not None:
        reason = why_not(requested, device, dtype) or (cpu.load() if requested == "cpu" else None)
        if reason:
            raise ValueError(f"{fn}: backend={requested!r} cannot serve this call: {reason}. Use backend=None "
                             f"to choose automatically.")
        return requested
    return "cpu" if why_not("cpu", device, dtype) is None and cpu.load() is None else "torch"


def _swapped(t: torch.Tensor) -> torch.Tensor:
    """A 3-D tensor whose memory is laid out with dims 1 and 2 swapped (the layouts of the module docstring)."""
    return t if t.transpose(1, 2).is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)


def _impl(path: str, u: torch.Tensor, dtype: torch.dtype):
    """The module running a scan on ``path`` (``""``: chosen by :func:`select_path`, which loads the kernel
    or falls back): :mod:`.cpu` or :mod:`.chunked` (also for an empty sequence)."""
    path = select_path("selective_scan", path or None, u.device, dtype)
    return cpu if path == "cpu" and u.shape[2] else chunked


def _rows(u, delta, A, B, C, D, z, delta_bias) -> tuple[Optional[torch.Tensor], ...]:
    """The inputs in the compute dtype, ``[batch, dim, L]`` ones as ``[batch, L, dim]`` views and ``B, C``
    as ``[batch, groups, N, L]``: the paths' common interface (:mod:`.chunked`)."""
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    rows = lambda t: t.to(dtype).transpose(1, 2) if t is not None else None  # noqa: E731
    return rows(u), rows(delta), cast(A), grouped(B.to(dtype)), grouped(C.to(dtype)), cast(D), rows(z), cast(delta_bias)


def differentiable_forward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, path: str, chunk: int,
                           save_states: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(out, last_state, states)``. On the ``torch`` path every operation is recorded by autograd
    (double backward differentiates it)."""
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    out, last, states = _impl(path, u, dtype).forward(*_rows(u, delta, A, B, C, D, z, delta_bias), softplus, chunk,
                                                      save_states)
    return out.transpose(1, 2).to(u.dtype), last.transpose(1, 2), states


@torch.library.custom_op("visattn::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                       delta_softplus: bool, path: str, chunk: int, save_states: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selective scan (module docstring): ``out [batch, dim, L]``, ``last_state [batch, dim, N]``,
    ``states [batch, ceil(L / chunk), N, dim]`` (or empty)."""
    out, last, states = differentiable_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, path, chunk,
                                               save_states)
    return _swapped(out), _swapped(last), states.contiguous() if states is not None else last.new_empty(_EMPTY)


@selective_scan_fwd.register_fake
def _selective_scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, path, chunk, save_states):
    batch, dim, length = u.shape
    state, dtype = A.shape[1], compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    return (u.new_empty(batch, length, dim).transpose(1, 2),
            u.new_empty(batch, state, dim, dtype=dtype).transpose(1, 2),
            u.new_empty(batch, -(-length // chunk), state, dim, dtype=dtype) if save_states
            else u.new_empty(_EMPTY, dtype=dtype))


@torch.library.custom_op("visattn::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dout: torch.Tensor, dlast: Optional[torch.Tensor], u: torch.Tensor, delta: torch.Tensor,
                       A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                       z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], states: torch.Tensor,
                       delta_softplus: bool, path: str, chunk: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor, torch.Tensor]:
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` of :func:`selective_scan_fwd`'s ``out``
    (cotangent ``dout``) and ``last_state`` (``dlast``); those of absent inputs are empty tensors.
    ``states`` are the forward's (recomputed here if empty)."""
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if u.shape[2] and states.numel() == 0:
        states = selective_scan_fwd(*inputs, delta_softplus, path, chunk, True)[2]
    dtype = compute_dtype(*inputs)
    dlast = dlast.to(dtype).transpose(1, 2) if dlast is not None else None
    du, ddelta, dA, dB, dC, dD, dz, dbias = _impl(path, u, dtype).backward(
        *_rows(*inputs), delta_softplus, states, dout.to(dtype).transpose(1, 2), dlast, chunk)
    def like(grad, t):  # a gradient in its input's dtype; an empty tensor for an absent input
        return grad.to(t.dtype).contiguous() if t is not None else u.new_empty(_EMPTY)

    def rows(grad, t):  # the same for [batch, dim, L] inputs, in the layout of the module docstring
        return _swapped(grad.transpose(1, 2).to(t.dtype)) if t is not None else u.new_empty(_EMPTY)

    return (rows(du, u), rows(ddelta, delta), like(dA, A), like(dB.reshape(B.shape), B), like(dC.reshape(C.shape), C),
            like(dD, D), rows(dz, z), like(dbias, delta_bias))


@selective_scan_bwd.register_fake
def _selective_scan_bwd_fake(dout, dlast, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus, path, chunk):
    batch, dim, length = u.shape

    def rows(t):
        return t.new_empty(batch, length, dim).transpose(1, 2) if t is not None else u.new_empty(_EMPTY)

    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else u.new_empty(_EMPTY)

    return rows(u), rows(delta), like(A), like(B), like(C), like(D), rows(z), like(delta_bias)


# ------------------------------------------------------------------------------------------------
# The autograd registration

def _setup_context(ctx, inputs, output) -> None:
    *tensors, softplus, path, chunk, _ = inputs
    ctx.save_for_backward(*tensors, output[2])
    ctx.params = (softplus, path, chunk)
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlast, _dstates):
    *inputs, states = ctx.saved_tensors
    softplus, path, chunk = ctx.params
    if dout is None and dlast is None:
        return (None,) * 12
    if dout is None:
        dout = torch.zeros_like(inputs[0])
    if torch.is_grad_enabled():
        # create_graph=True: gradients that are differentiable again, by autograd through the torch path
        out, last, _ = differentiable_forward(*inputs, softplus, "torch", chunk, False)
        outputs, cotangents = [out], [dout]
        if dlast is not None:
            outputs.append(last)
            cotangents.append(dlast)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(outputs, wanted, cotangents, allow_unused=True, create_graph=True))
        grads = [next(got) if t is not None and t.requires_grad else None for t in inputs]
    else:
        # (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias): the inputs' order; absent ones come back empty
        grads = torch.ops.visattn.selective_scan_bwd(dout, dlast, *inputs, states, softplus, path, chunk)
        grads = [g if t is not None else None for g, t in zip(grads, inputs)]
    return (*grads, None, None, None, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# FLOP formulas for torch.utils.flop_counter

def scan_flops(batch: int, dim: int, length: int, state: int, with_D: bool, with_z: bool) -> int:
    """FLOPs of one selective scan as Mamba's authors count them: ``9 * batch * L * dim * N`` (the
    multiplies and adds per token, channel and state of ``exp(dt A)``, ``dt B u``, the update and
    ``<C, h>``), plus ``batch * dim * L`` for the ``D`` skip and again for the ``z`` gate. The vision
    papers' fvcore tables add the same number to their multiply-accumulate counts."""
    return 9 * batch * length * dim * state + (with_D + with_z) * batch * dim * length


def _fwd_flops(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, z_shape, bias_shape, *args,
               out_val: Any = None, **kwargs) -> int:
    return scan_flops(u_shape[0], u_shape[1], u_shape[2], A_shape[1], D_shape is not None, z_shape is not None)


def _bwd_flops(dout_shape, dlast_shape, u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, z_shape,
               bias_shape, states_shape, *args, out_val: Any = None, **kwargs) -> int:
    """Twice the forward's (the convention of the papers and ``visattn bench``)."""
    return 2 * _fwd_flops(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, z_shape, bias_shape)


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.visattn.selective_scan_fwd)(_fwd_flops)
    register_flop_formula(torch.ops.visattn.selective_scan_bwd)(_bwd_flops)


_register_flop_formulas()
