"""Dispatch: build the problem of a validated call, select its backend, and run it on the right path.

Three paths, one semantics (every path ends in the same backend code):

* **through the custom op** (:mod:`visattn.ops`): under ``torch.compile``/``torch.export`` (one
  opaque node, backend chosen at run time from the real sizes), under any ``TorchDispatchMode``
  (``FlopCounterMode`` then counts the operator's exact FLOPs), and in eager when a backend with a
  native backward has to record a gradient: the op's one autograd registration calls that backward
  on the saved output and LSE, eager or compiled, with no recomputation;
* **the backend directly, without autograd**: eager calls that need no gradient (inference);
* **the backend's differentiable forward**: eager calls that need a gradient from a backend without a
  native backward (``torch``, ``reference``), and differentiation by ``torch.func`` transforms
  (``grad``, ``jvp``, ``jacrev``, ...) or forward-mode AD, which custom ops do not support: there the
  portable ``torch`` backend serves the call and the derivatives go through its PyTorch ops (memory
  linear in tokens, as its forward).

``torch.func.vmap`` alone goes through the custom op (it has vmap rules: the fused kernels run on the
vmapped batch); double backward (``create_graph=True``) differentiates the ``torch`` backend's forward
(see :mod:`visattn.ops`).

Exports also pick a traceable backend: the ONNX exporter the ``reference`` one (its indices derive
from symbolic sizes), the TorchScript tracer the ``torch`` one.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .backends import Extras, Problem, run_forward, select_backend
from .spec import NASpec

__all__ = ["Requested", "attention"]

#: Per-axis ``(kernel_size, stride, dilation, is_causal, periodic)`` as the caller passed them, normalized.
Requested = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...], tuple[bool, ...]]


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _transforms() -> set[str]:
    """Names of the active ``torch.func`` transforms (``"Vmap"``, ``"Grad"``, ``"Jvp"``, ...)."""
    if not torch._C._are_functorch_transforms_active():
        return set()
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return {i.key().name for i in retrieve_all_functorch_interpreters()}


def _functorch_autodiff(transforms: set[str], *tensors: Optional[torch.Tensor]) -> bool:
    """Differentiation that custom ops do not support: ``torch.func.grad``/``vjp``/``jacrev`` (custom
    ops' autograd is not a functorch transform) and forward mode (``torch.func.jvp``,
    ``torch.autograd.forward_ad`` dual tensors)."""
    if transforms & {"Grad", "Jvp"}:
        return True
    if torch.autograd.forward_ad._current_level >= 0:
        from torch.autograd.forward_ad import unpack_dual

        return any(t is not None and unpack_dual(t).tangent is not None for t in tensors)
    return False


def _through_custom_op() -> bool:
    """Under ``torch.compile``/``torch.export`` (except the ONNX exporter, which needs plain ops) or
    an active ``TorchDispatchMode``."""
    if torch.compiler.is_compiling():
        return not torch.onnx.is_in_onnx_export()
    return torch._C._len_torch_dispatch_stack() > 0


def _export_backend(backend: Optional[str]) -> Optional[str]:
    if backend is not None:
        return backend
    if torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export():
        # torch.onnx.export(dynamo=True) traces with torch.export: the gather-based reference derives
        # its indices from the (possibly symbolic) sizes with tensor ops, so the ONNX graph keeps
        # dynamic spatial axes. (The tiled backend builds its plan with Python ints.)
        return "reference"
    if torch.jit.is_tracing():
        # The TorchScript ONNX exporter records the ops it sees: the pure-PyTorch tiled backend
        # traces (its index tensors become constants, fixing the spatial size).
        return "torch"
    return None


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: NASpec, requested: Requested,
              scale: float, backend: Optional[str], extras: Extras, return_attn: bool, fn: str
              ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Run the neighbourhood part of a validated call: ``(out [B, *S, H, D_v], lse [B, *S, H],
    attn [B, *S, H, K] or None)``.

    ``spec`` is the call's spec for the query and key grids; ``requested`` the per-axis
    ``(kernel_size, stride, dilation, is_causal, periodic)`` as the caller asked, which the custom op
    carries (it applies the variable-resolution rule itself, from the real sizes).
    """
    tensors = (query, key, value, extras.rpb, extras.attn_bias)
    op_args = (extras.rpb, extras.attn_bias, extras.key_padding_mask, *(list(r) for r in requested[:4]), float(scale))
    periodic = list(requested[4]) if any(requested[4]) else None
    if _through_custom_op():
        out, lse, attn = torch.ops.visattn.na_forward(query, key, value, *op_args, backend or "", return_attn,
                                                      periodic)
        return out, lse, (attn if return_attn else None)
    transforms = _transforms()
    functorch_autodiff = _functorch_autodiff(transforms, *tensors)
    if functorch_autodiff:
        backend = backend or "torch"
    backend = _export_backend(backend)
    p = Problem.of(query, key, value, spec, scale, extras, return_attn)
    impl = select_backend(p, backend, fn)
    if functorch_autodiff and impl.native_backward:
        raise ValueError(f"{fn}: backend={impl.name!r} cannot be differentiated by torch.func transforms (grad, "
                         f"jvp, jacrev, ...) or forward-mode AD; pass backend=None or backend='torch', whose "
                         f"differentiable forward serves them.")
    if impl.native_backward and (transforms or _needs_grad(*tensors)):
        out, lse, attn = ops.na_forward(query, key, value, *op_args, impl.name, return_attn, periodic)
        return out, lse, (attn if return_attn else None)
    if impl.native_backward:
        with torch.no_grad():  # nothing to record: run the kernels as they are
            res = run_forward(impl, query, key, value, p, extras)
    else:
        res = run_forward(impl, query, key, value, p, extras)
    return res.out, res.lse, res.attn

