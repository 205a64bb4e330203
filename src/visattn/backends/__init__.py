"""Backend registry: the one place backends are listed, automatic selection, and running one.

A backend is one module (or folder) here exposing a :class:`~visattn.backends.base.Backend`
subclass, registered in one line of ``_BUILTIN``. Modules are imported lazily so that an optional
dependency (triton) missing on this machine only makes its backend unavailable, never the package.
Probing (:func:`why_not`, :func:`select_backend`'s candidates) has no side effects; a backend is made
ready (:meth:`Backend.load`: the C kernels compile) only when it is chosen for a call.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .base import Backend, Extras, Grads, Problem, Result

__all__ = ["Backend", "Extras", "Grads", "Problem", "Result", "get_backend", "list_backends", "register_backend",
           "run_backward", "run_forward", "select_backend", "why_not"]

# name -> "module:Class". Order is only the display order; selection uses Backend.priority.
_BUILTIN = {
    "reference": "reference:ReferenceBackend",
    "torch": "torch_tiled:TorchTiledBackend",
    "cpu": "cpu.backend:CpuBackend",
    "triton": "triton.backend:TritonBackend",
}
_INSTANCES: dict[str, Backend] = {}
_IMPORT_ERRORS: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    """Register an extra backend instance (third-party or experimental) under ``backend.name``."""
    if not backend.name:
        raise ValueError("register_backend: the backend has an empty .name")
    _INSTANCES[backend.name] = backend


def _load(name: str) -> Optional[Backend]:
    if name in _INSTANCES:
        return _INSTANCES[name]
    target = _BUILTIN.get(name)
    if target is None or name in _IMPORT_ERRORS:
        return None
    module, cls = target.split(":")
    try:
        backend = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    except ImportError as e:  # pragma: no cover - only with a broken install
        _IMPORT_ERRORS[name] = f"import failed: {e}"
        return None
    _INSTANCES[name] = backend
    return backend


def list_backends() -> list[str]:
    """Names of all known backends, usable here or not."""
    return list(dict.fromkeys([*_BUILTIN, *_INSTANCES]))


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises ``ValueError`` listing the known names."""
    backend = _load(name)
    if backend is None:
        reason = _IMPORT_ERRORS.get(name, "no backend of that name")
        raise ValueError(f"backend={name!r}: {reason}. Known backends: {', '.join(list_backends())}.")
    return backend


def why_not(name: str, p: Optional[Problem] = None) -> Optional[str]:
    """Why backend ``name`` cannot run here (or cannot serve ``p``); ``None`` if it can. No side effects."""
    backend = _load(name)
    if backend is None:
        return _IMPORT_ERRORS.get(name, "no backend of that name")
    reason = backend.unavailable()
    if reason is None and p is not None:
        reason = backend.refuse(p)
    return reason


def select_backend(p: Problem, name: Optional[str] = None, fn: str = "neighborhood_attention") -> Backend:
    """The backend to run ``p``, made ready (:meth:`Backend.load`).

    ``name`` forces one (raising with the reason if it cannot serve ``p``); otherwise the
    highest-priority backend that accepts ``p`` and loads. The choice depends only on ``p`` and on
    this machine, so a call's backward finds the backend its forward used.
    """
    if name is not None:
        backend = get_backend(name)
        reason = why_not(name, p) or backend.load()
        if reason is not None:
            raise ValueError(f"{fn}: backend={name!r} cannot serve this call: {reason}. "
                             f"Pass backend=None to choose automatically.")
        return backend
    reasons, candidates = [], []
    for candidate in list_backends():
        reason = why_not(candidate, p)
        if reason is None:
            candidates.append(_INSTANCES[candidate])
        else:
            reasons.append(f"{candidate}: {reason}")
    # Stable sort: among equal priorities the display order decides.
    for backend in sorted(candidates, key=lambda b: -b.priority(p)):
        reason = backend.load()
        if reason is None:
            return backend
        reasons.append(f"{backend.name}: {reason}")
    raise ValueError(f"{fn}: no backend can serve this call ({'; '.join(reasons)}).")


def _expand_kv(impl: Backend, p: Problem, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k/v repeated to the query's heads for a backend without native GQA (query head h uses kv head
    h // G); autograd sums the repeated heads' gradients back."""
    if p.heads_kv == p.heads or impl.supports_gqa:
        return k, v
    g = p.heads // p.heads_kv
    return k.repeat_interleave(g, dim=-2), v.repeat_interleave(g, dim=-2)


def run_forward(impl: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem,
                extras: Extras) -> Result:
    """``impl.forward`` on the call's own tensors (GQA expanded where the backend needs it)."""
    k, v = _expand_kv(impl, p, k, v)
    return impl.forward(q, k, v, p, extras)


def run_backward(impl: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, dout: torch.Tensor, dlse: Optional[torch.Tensor], p: Problem,
                 extras: Extras, attn: Optional[torch.Tensor] = None, dattn: Optional[torch.Tensor] = None) -> Grads:
    """``impl.backward`` (native backends only) with the kv-head gradients summed back for GQA;
    ``attn``/``dattn``: the returned weights and their gradient (``None`` when absent or unused)."""
    ke, ve = _expand_kv(impl, p, k, v)
    grads = impl.backward(q, ke, ve, out, lse, dout, dlse, p, extras, attn, dattn)
    if ke is not k:
        g = p.heads // p.heads_kv
        fold = lambda t: t.unflatten(-2, (p.heads_kv, g)).sum(-2)  # noqa: E731
        grads.dk, grads.dv = fold(grads.dk), fold(grads.dv)
    return grads
