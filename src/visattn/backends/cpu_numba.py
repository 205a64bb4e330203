"""The ``cpu`` backend: fused numba kernels for the forward and the backward on CPU tensors.

Why numba: it ships wheels for every platform PyTorch does, needs no compiler at install time, does
not touch PyTorch's C++ ABI, and caches compiled kernels on disk (``cache=True``), so the first-call
compile (20-50 s per dtype on a 2-core machine) is paid once per machine, not once per process
(a warm process loads them in about a second). Without numba the
package still works: this backend reports itself unavailable and the portable ``torch`` backend
serves CPU calls.

The wrapper only views the tensors as rank 3 (leading axes of length 1), casts half inputs to
float32, and derives small per-axis tables (key runs, their inverse, the group-major order that
removes dilation from the loops; :mod:`visattn.backends.cpu_common`, shared with ``cpu_c``); see
:mod:`visattn.backends.cpu_kernels`. No tensor is permuted or padded.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import numpy as np
import torch

from ..spec import NASpec
from .base import Backend, Extras, Problem, Result
from .cpu_common import rank3, refuse_cpu, rows, tables

_MISSING = "numba is not installed (pip install 'visattn[cpu]'); CPU calls use the portable torch backend"

#: Queries (keys in the dK/dV pass) per work item along the last axis: enough items to balance
#: threads even in 1-D, few enough that per-item overhead (scratch allocation) stays negligible.
_QBLOCK = 16

#: Largest neighbourhood (``prod(kernel_size)``) for which this backend is chosen automatically.
_MAX_WINDOW = 512


def _numba_missing() -> Optional[str]:
    try:
        import numba  # noqa: F401
    except ImportError:
        return _MISSING
    return None


def _kernels():
    """The kernel module; numba compiles each kernel on its first call per dtype, or loads it from disk."""
    import numba
    from numba.np.ufunc import parallel

    # numba's "omp" layer loads the system libgomp, a second OpenMP runtime next to PyTorch's, whose
    # idle workers spin after every kernel and steal the cores from the torch ops that follow. The
    # "workqueue" pool sleeps when idle. It must not be entered by two threads at once, hence
    # _LAUNCH, and it drops exceptions raised inside parallel loops (the kernels raise none; the
    # bounds-checked test runs on "omp"). A layer chosen by the user (env var) or already started
    # is left alone.
    if "NUMBA_THREADING_LAYER" not in os.environ and not parallel._is_initialized:
        numba.config.THREADING_LAYER = "workqueue"
    from . import cpu_kernels

    return cpu_kernels


_LAUNCH = threading.Lock()


def _set_threads() -> int:
    """Run numba's pool with torch's thread count, so the op never oversubscribes a torch model."""
    import numba

    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


class _NAFunction(torch.autograd.Function):
    """Fused forward/backward on rank-3 views ``q [B, L0, L1, L2, H, D]``, ``k/v [.., Hk, D(v)]``,
    ``rpb [H, R0, R1, R2]`` (a dummy ``[1, 1, 1, 1]`` when ``has_rpb`` is False)."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, has_rpb: bool, scale: float, spec: NASpec):
        ctx.set_materialize_grads(False)  # an unused LSE then costs no zero-filled gradient
        kern = _kernels()
        pos, lo, hi, rof, _, _ = tables(spec)
        q, k, v, rpb = (t.detach().contiguous() for t in (q, k, v, rpb))
        dt = q.dtype
        npdt = np.float32 if dt == torch.float32 else np.float64
        shape = (*q.shape[:4], q.shape[4], k.shape[4])
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=dt)
        lse = torch.empty(q.shape[:-1], dtype=dt)
        with _LAUNCH:
            _set_threads()
            kern.forward(rows(q), rows(k), rows(v), shape, rpb.numpy(), has_rpb, npdt(scale), npdt(0), pos, lo, hi, rof,
                         _QBLOCK, dt == torch.float32, rows(out), lse.reshape(-1).numpy())
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.meta = (has_rpb, scale, spec, shape)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        kern = _kernels()
        q, k, v, rpb, out, lse = ctx.saved_tensors
        has_rpb, scale, spec, shape = ctx.meta
        pos, lo, hi, rof, qlo, qhi = tables(spec)
        dt = q.dtype
        npdt = np.float32 if dt == torch.float32 else np.float64
        dout = torch.zeros_like(out) if dout is None else dout.to(dt).contiguous()
        has_dlse = dlse is not None
        dlse = dlse.to(dt).contiguous() if has_dlse else lse  # lse: an unused placeholder
        fast = dt == torch.float32
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty_like(lse)
        # Bias gradients accumulate per chunk of work (deterministic, no races), summed here.
        nchunks = 4 * torch.get_num_threads()
        drpb = torch.zeros(nchunks if has_rpb else 1, *rpb.shape, dtype=dt)
        args = (rows(q), rows(k), rows(v), shape, rpb.numpy(), has_rpb, npdt(scale), npdt(0), pos)
        lse_np, delta_np, dout_np = lse.reshape(-1).numpy(), delta.reshape(-1).numpy(), rows(dout)
        with _LAUNCH:
            _set_threads()
            kern.backward_dq(*args, lo, hi, rof, rows(out), lse_np, dlse.reshape(-1).numpy(), has_dlse, dout_np,
                             fast, _QBLOCK, nchunks, delta_np, rows(dq), drpb.numpy())
            kern.backward_dkv(*args, rof, qlo, qhi, lse_np, delta_np, dout_np, fast, _QBLOCK, rows(dk), rows(dv))
        return dq, dk, dv, (drpb.sum(0) if has_rpb else None), None, None, None


class CpuBackend(Backend):
    name = "cpu"
    supports_gqa = True

    @property
    def description(self) -> str:  # type: ignore[override]
        """What ``visattn info`` prints: the kernels and whether compiled ones are cached here."""
        return f"fused numba CPU kernels, forward (out + LSE) and race-free backward; {cache_info()}"

    def unavailable(self) -> Optional[str]:
        return _numba_missing()

    def refuse(self, p: Problem) -> Optional[str]:
        return refuse_cpu(p, (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                          "float32/float64, half types computed in float32")

    def priority(self, p: Problem) -> float:
        # The kernels cost a fixed time per (query, key) pair; the torch backend's GEMMs get more
        # efficient as windows grow. Measured on one core (fwd+bwd): 225-key windows 16 vs 19 ms,
        # 961-key windows 67 vs 41 ms in torch's favour. Above _MAX_WINDOW the torch backend wins.
        return 10.0 if p.spec.window_size <= _MAX_WINDOW else -1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, extras: Extras) -> Result:
        q3, k3, v3, rpb = rank3(q, k, v, p, extras)
        has_rpb = rpb is not None
        if rpb is None:
            rpb = torch.zeros(1, 1, 1, 1, dtype=q3.dtype)
        out, lse = _NAFunction.apply(q3, k3, v3, rpb, has_rpb, p.scale, p.spec)
        return Result(out.reshape(p.batch, *p.spec.spatial, p.heads, p.dim_v).to(q.dtype),
                      lse.reshape(p.batch, *p.spec.spatial, p.heads))


def cache_info() -> str:
    """Whether compiled kernels are cached on disk (numba's default location: ``__pycache__`` next
    to :mod:`cpu_kernels`, or ``$NUMBA_CACHE_DIR``), for ``visattn info``."""
    here = os.path.dirname(os.path.abspath(__file__))
    cache_dir = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(here, "__pycache__")
    found = []
    for root, _, files in os.walk(cache_dir):
        found += [f for f in files if f.startswith("cpu_kernels.") and f.endswith(".nbc")]
    if found:
        return f"{len(found)} compiled kernel(s) cached in {cache_dir}"
    return f"not compiled yet: the first call per dtype compiles (~20-50 s) and caches in {cache_dir}"
