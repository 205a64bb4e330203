"""The ``cpu`` backend: fused numba kernels for the forward and the backward on CPU tensors.

Why numba: it ships wheels for every platform PyTorch does, needs no compiler at install time, does
not touch PyTorch's C++ ABI, and caches compiled kernels on disk (``cache=True``), so the first-call
compile (20-50 s per dtype on a 2-core machine) is paid once per machine, not once per process
(a warm process loads them in about a second). Without numba the
package still works: this backend reports itself unavailable and the portable ``torch`` backend
serves CPU calls.

The wrapper only views the tensors as rank 3 (leading axes of length 1), casts half inputs to
float32, and derives small per-axis tables (key runs, their inverse, the group-major order that
removes dilation from the loops) from :func:`visattn.spec.axis_windows`; see
:mod:`visattn.backends.cpu_kernels`. No tensor is permuted or padded.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

from ..spec import NASpec, axis_windows
from .base import Backend, Extras, Problem, Result, lse_dtype, refuse_unfused_features

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


@lru_cache(maxsize=256)
def _axis_tables(length: int, kernel: int, stride: int, dilation: int, causal: bool, requested: int):
    """Per-axis tables in group-major order (see :mod:`cpu_kernels`), int64 ``[L]`` each:
    ``(pos, lo, hi, rof, qlo, qhi)``."""
    w = axis_windows(length, kernel, stride, dilation, causal)
    group, gpos, lo, hi = (t.numpy() for t in (w.group, w.pos, w.lo, w.hi))
    sizes = np.bincount(group, minlength=dilation)
    offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])[group]  # first index of each coord's group
    pos = np.argsort(group * length + gpos, kind="stable")  # index -> coordinate
    lo_i = (offset + lo)[pos]
    hi_i = (offset + hi)[pos]
    rof = (offset + gpos - (requested - 1))[pos]
    # Windows move monotonically with the query, so lo_i/hi_i are non-decreasing and the queries
    # seeing key j are one run: those with hi_i >= j and lo_i <= j.
    keys = np.arange(length)
    qlo = np.searchsorted(hi_i, keys, side="left")
    qhi = np.searchsorted(lo_i, keys, side="right") - 1
    return pos, lo_i, hi_i, rof, qlo, qhi


@lru_cache(maxsize=64)
def _tables(spec: NASpec) -> list[np.ndarray]:
    """Rank-3 padded tables ``[pos, lo, hi, rof, qlo, qhi]``, each int64 ``[3, Lmax]``."""
    axes = [_axis_tables(L, k, s, d, c, rk) for (L, k, s, d, c), rk in zip(spec.axes(), spec.requested_kernel_size)]
    pad = 3 - len(axes)
    lmax = max(spec.spatial)
    stacked = []
    for field in range(6):
        t = np.zeros((3, lmax), dtype=np.int64)
        for a, ax in enumerate(axes):
            t[pad + a, : len(ax[field])] = ax[field]
        stacked.append(t)
    return stacked


def _rows(t: torch.Tensor) -> np.ndarray:
    """``[..., X]`` contiguous tensor as a 2-D numpy array of rows (shares memory)."""
    return t.reshape(-1, t.shape[-1]).numpy()


class _NAFunction(torch.autograd.Function):
    """Fused forward/backward on rank-3 views ``q [B, L0, L1, L2, H, D]``, ``k/v [.., Hk, D(v)]``,
    ``rpb [H, R0, R1, R2]`` (a dummy ``[1, 1, 1, 1]`` when ``has_rpb`` is False)."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, has_rpb: bool, scale: float, spec: NASpec):
        ctx.set_materialize_grads(False)  # an unused LSE then costs no zero-filled gradient
        kern = _kernels()
        pos, lo, hi, rof, _, _ = _tables(spec)
        q, k, v, rpb = (t.detach().contiguous() for t in (q, k, v, rpb))
        dt = q.dtype
        npdt = np.float32 if dt == torch.float32 else np.float64
        shape = (*q.shape[:4], q.shape[4], k.shape[4])
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=dt)
        lse = torch.empty(q.shape[:-1], dtype=dt)
        with _LAUNCH:
            _set_threads()
            kern.forward(_rows(q), _rows(k), _rows(v), shape, rpb.numpy(), has_rpb, npdt(scale), npdt(0), pos, lo, hi, rof,
                         _QBLOCK, dt == torch.float32, _rows(out), lse.reshape(-1).numpy())
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.meta = (has_rpb, scale, spec, shape)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        kern = _kernels()
        q, k, v, rpb, out, lse = ctx.saved_tensors
        has_rpb, scale, spec, shape = ctx.meta
        pos, lo, hi, rof, qlo, qhi = _tables(spec)
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
        args = (_rows(q), _rows(k), _rows(v), shape, rpb.numpy(), has_rpb, npdt(scale), npdt(0), pos)
        lse_np, delta_np, dout_np = lse.reshape(-1).numpy(), delta.reshape(-1).numpy(), _rows(dout)
        with _LAUNCH:
            _set_threads()
            kern.backward_dq(*args, lo, hi, rof, _rows(out), lse_np, dlse.reshape(-1).numpy(), has_dlse, dout_np,
                             fast, _QBLOCK, nchunks, delta_np, _rows(dq), drpb.numpy())
            kern.backward_dkv(*args, rof, qlo, qhi, lse_np, delta_np, dout_np, fast, _QBLOCK, _rows(dk), _rows(dv))
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
        if p.device.type != "cpu":
            return f"tensors are on {p.device}, this backend runs on CPU tensors only"
        if p.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return f"dtype {p.dtype} is not supported (float32/float64, half types computed in float32)"
        return refuse_unfused_features(p)

    def priority(self, p: Problem) -> float:
        # The kernels cost a fixed time per (query, key) pair; the torch backend's GEMMs get more
        # efficient as windows grow. Measured on one core (fwd+bwd): 225-key windows 16 vs 19 ms,
        # 961-key windows 67 vs 41 ms in torch's favour. Above _MAX_WINDOW the torch backend wins.
        return 10.0 if p.spec.window_size <= _MAX_WINDOW else -1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, extras: Extras) -> Result:
        spec = p.spec
        B, H, Hk, r = p.batch, p.heads, p.heads_kv, spec.rank
        cdt = lse_dtype(q.dtype)
        shape3 = (1,) * (3 - r) + spec.spatial
        q3, k3, v3 = (t.to(cdt).reshape(B, *shape3, *t.shape[-2:]) for t in (q, k, v))
        if extras.rpb is not None:
            rpb = extras.rpb.to(cdt).reshape(H, *((1,) * (3 - r)), *extras.rpb.shape[1:])
        else:
            rpb = torch.zeros(1, 1, 1, 1, dtype=cdt)
        out, lse = _NAFunction.apply(q3, k3, v3, rpb, extras.rpb is not None, p.scale, spec)
        return Result(out.reshape(B, *spec.spatial, H, p.dim_v).to(q.dtype), lse.reshape(B, *spec.spatial, H))


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
