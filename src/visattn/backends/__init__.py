"""Backend registry: the one place backends are listed, and automatic selection.

A backend is one module in this folder exposing a :class:`~visattn.backends.base.Backend` subclass.
Modules are imported lazily so that an optional dependency (numba, triton) missing on this machine
only makes its backend unavailable, never the package.
"""

from __future__ import annotations

import importlib
from typing import Optional

from .base import Backend, Extras, Problem, Result

__all__ = ["Backend", "Extras", "Problem", "Result", "get_backend", "list_backends", "register_backend", "select_backend"]

# name -> "module:Class". Order is only the display order; selection uses Backend.priority.
_BUILTIN = {
    "reference": "reference:ReferenceBackend",
    "torch": "torch_tiled:TorchTiledBackend",
    "cpu": "cpu_numba:CpuBackend",
    "cpu_c": "cpu_c:CpuCBackend",
    "triton": "triton_na:TritonBackend",
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
    """Why backend ``name`` cannot run here (or cannot serve ``p``); ``None`` if it can."""
    backend = _load(name)
    if backend is None:
        return _IMPORT_ERRORS.get(name, "no backend of that name")
    reason = backend.unavailable()
    if reason is None and p is not None:
        reason = backend.refuse(p)
    return reason


def select_backend(p: Problem, name: Optional[str] = None, fn: str = "neighborhood_attention") -> Backend:
    """The backend to run ``p``: ``name`` if given (else raise saying why it cannot), otherwise the
    highest-priority backend that accepts ``p``."""
    if name is not None:
        backend = get_backend(name)
        reason = why_not(name, p)
        if reason is not None:
            raise ValueError(f"{fn}: backend={name!r} cannot serve this call: {reason}. "
                             f"Pass backend=None to choose automatically.")
        return backend
    best, reasons = None, []
    for candidate in list_backends():
        reason = why_not(candidate, p)
        if reason is not None:
            reasons.append(f"{candidate}: {reason}")
            continue
        backend = _INSTANCES[candidate]
        if best is None or backend.priority(p) > best.priority(p):
            best = backend
    if best is None:
        raise ValueError(f"{fn}: no backend can serve this call ({'; '.join(reasons)}).")
    return best
