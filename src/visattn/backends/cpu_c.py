"""The ``cpu_c`` backend: fused C kernels (``csrc/na_cpu.c``) for the forward and backward on CPU.

Why C, next to the numba ``cpu`` backend: the kernel blocks two queries x eight keys with sixteen
vector accumulators in registers and one transpose-and-add reduction, which needs explicit vector
types; numba's auto-vectorizer gave neither (see docs/cpu.md for the measurements). The source is
compiled **at first use on the user's machine** with the system C compiler (``$CC``, else ``cc``),
for that CPU (``-march=native``), and loaded with :mod:`ctypes`:

* no PyTorch or Python headers, so no C++ ABI coupling (NATTEN's install pain) and one build serves
  every torch version;
* nothing to compile at ``pip install`` (wheels stay pure Python);
* the shared library is cached on disk (``$VISATTN_CACHE_DIR``, else ``~/.cache/visattn``), keyed
  by the source, the flags, the compiler's version and the CPU model, so the ~1 s compile is paid
  once per machine.

Without a C compiler this backend reports itself unavailable (``visattn info`` says why) and CPU
calls go to the numba ``cpu`` backend, then to the portable ``torch`` one. It serves float32 (half
inputs computed in float32; float64 stays with ``cpu``) with head dims that are multiples of 8.
Threads follow ``torch.get_num_threads()``, on torch's own OpenMP pool where it can be found (see
:func:`_build`); ctypes releases the GIL during the call.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from ..spec import NASpec
from .base import Backend, Extras, Problem, Result
from .cpu_common import colour_chunks, rank3, refuse_cpu, tables

_SOURCE = Path(__file__).with_name("csrc") / "na_cpu.c"
_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-fno-trapping-math",
          "-Werror=implicit-function-declaration",
          "-ffp-contract=fast"]
#: The kernel's vector width: head dims must be multiples of it.
_VEC = 8
#: As in the numba backend: above this many keys per query the torch backend's GEMMs win.
_MAX_WINDOW = 512
_MAX_THREADS = 256  # MAX_THREADS in na_cpu.c
#: Fewest parallel units per colour for the fused backward (see :func:`_fused_plan`).
_FUSED_MIN_UNITS = 8


class _Args(ctypes.Structure):
    """Mirror of ``na_args`` in ``na_cpu.c`` (same order, same types)."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("q", "k", "v", "rpb", "pos", "lo", "hi", "rof", "qlo", "qhi")]
                + [(n, ctypes.c_int64) for n in ("lmax", "B", "L0", "L1", "L2", "H", "Hk", "D", "Dv", "R0", "R1", "R2")]
                + [("scale", ctypes.c_float)]
                + [(n, ctypes.c_void_p) for n in ("out", "lse", "dout", "dlse", "dq", "dk", "dv", "drpb", "nlse_t",
                                                  "delta_t")]
                + [(n, ctypes.c_int64) for n in ("split", "chunk")]
                + [("nthreads", ctypes.c_int)])


def _cache_dir() -> Path:
    env = os.environ.get("VISATTN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "visattn"


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _cpu_model() -> str:
    """What ``-march=native`` depends on: a cached build must never run on another CPU model."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _torch_openmp() -> Optional[Path]:
    """The GNU OpenMP runtime PyTorch loaded (Linux wheels bundle ``torch/lib/libgomp*.so*``), or None."""
    if not sys.platform.startswith("linux"):
        return None
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return found[0] if found else None


def _build(cc: str) -> Path:
    """Compile the kernel for this CPU (or find it in the cache); returns the shared library's path.

    With PyTorch's own libgomp found, the kernel is compiled with ``-fopenmp`` and linked against
    that very file (its soname matches the copy torch already loaded, so the loader reuses it): the
    kernel then runs on torch's thread pool. Otherwise it starts its own pthreads.
    """
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = [*_FLAGS, "-march=native" if platform.machine().lower() in ("x86_64", "amd64", "i686") else "-mcpu=native"]
    if os.environ.get("VISATTN_CPU_C_BOUNDS_CHECK") == "1":  # every index checked; aborts on a violation
        flags.append("-DNA_BOUNDS_CHECK")
    gomp = _torch_openmp()
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), " ".join(flags), version, _cpu_model(), sys.platform,
                                    str(gomp)]).encode()).hexdigest()[:20]
    suffix = ".dll" if sys.platform == "win32" else ".so"
    target = _cache_dir() / f"na_cpu-{key}{suffix}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile next to the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=target.parent)
    os.close(fd)
    obj = tmp + ".o"
    try:
        if gomp is not None:  # compile with OpenMP, link torch's runtime by path (not the system -lgomp)
            steps = [[cc, *flags, "-fopenmp", "-c", str(_SOURCE), "-o", obj],
                     [cc, *flags, obj, str(gomp), f"-Wl,-rpath,{gomp.parent}", "-o", tmp, "-lm"]]
        else:
            steps = [[cc, *flags, str(_SOURCE), "-o", tmp, "-lm"]]
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, obj):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return target


_LIB: Optional[ctypes.CDLL] = None
_LIB_ERROR: Optional[str] = None
_LIB_LOCK = threading.Lock()


def _library() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """The loaded kernel library, or ``(None, why not)``; built once per process (thread-safe)."""
    global _LIB, _LIB_ERROR
    with _LIB_LOCK:
        if _LIB is None and _LIB_ERROR is None:
            cc = _compiler()
            if cc is None:
                _LIB_ERROR = ("no C compiler found (tried $CC or `cc`; install gcc or clang, or set CC); CPU calls "
                              "use the numba `cpu` backend")
            else:
                try:
                    lib = ctypes.CDLL(str(_build(cc)))
                    lib.na_run.argtypes = [ctypes.POINTER(_Args), ctypes.c_int]
                    lib.na_run.restype = ctypes.c_int
                    _LIB = lib
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _LIB_ERROR = f"building the C kernel failed: {e}"
    return _LIB, _LIB_ERROR


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _run(args: _Args, pass_: int) -> None:
    lib, err = _library()
    assert lib is not None, err
    status = lib.na_run(ctypes.byref(args), pass_)
    if status == 1:
        raise MemoryError("cpu_c: the kernel could not allocate its per-thread scratch memory")
    assert status == 0, f"cpu_c: na_run(pass={pass_}) returned {status}"


def _threads() -> int:
    """torch's thread count, within what the kernel supports (one bias-gradient slice each)."""
    return min(max(1, torch.get_num_threads()), _MAX_THREADS)


def _args(q, k, v, rpb, spec: NASpec, scale: float, split: tuple[int, int] = (0, 0),
          **tensors) -> tuple[_Args, list]:
    """The kernel's argument struct for rank-3 tensors (``split``: the fused backward's axis and chunk
    length); also returns what must stay alive during the call."""
    tabs = [torch.from_numpy(t) for t in tables(spec)]  # pos, lo, hi, rof, qlo, qhi: int64 [3, Lmax]
    B, L0, L1, L2, H, D = q.shape
    Hk, Dv = k.shape[4], v.shape[5]
    R = rpb.shape[1:] if rpb is not None else (1, 1, 1)
    a = _Args(*[_ptr(t) for t in (q, k, v, rpb, *tabs)], tabs[0].shape[1], B, L0, L1, L2, H, Hk, D, Dv, *R, scale,
              *[_ptr(tensors.get(n)) for n in ("out", "lse", "dout", "dlse", "dq", "dk", "dv", "drpb", "nlse_t",
                                               "delta_t")],
              *split, _threads())
    return a, tabs


def _fused_plan(spec: NASpec, batch: int, heads_kv: int) -> Optional[tuple[int, int, int]]:
    """``(axis, chunk, count)`` of :func:`colour_chunks` when the fused backward is used, else None.

    The fused pass saves the dQ pass's recomputation of S and dP (5 products instead of 7) but runs
    each colour's ``(batch, chunk, kv head)`` units in parallel: with fewer than ``_FUSED_MIN_UNITS``
    in a colour, threads would idle and the two-pass backward (parallel over every key pair) wins.
    The choice depends on the geometry alone, so results never depend on the thread count.
    """
    axis, chunk, count = colour_chunks(spec)
    smaller = max(1, count // 2)  # the odd chunks, unless there is only one chunk
    return (axis, chunk, count) if batch * heads_kv * smaller >= _FUSED_MIN_UNITS else None


class _NAFunction(torch.autograd.Function):
    """Fused forward/backward on contiguous float32 rank-3 views ``q [B, L0, L1, L2, H, D]``,
    ``k/v [.., Hk, D(v)]``, ``rpb [H, R0, R1, R2]`` or ``None``."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, scale: float, spec: NASpec):
        ctx.set_materialize_grads(False)  # an unused LSE then costs no zero-filled gradient
        q, k, v = (t.detach().contiguous() for t in (q, k, v))
        rpb = rpb.detach().contiguous() if rpb is not None else None
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1])
        args, keep = _args(q, k, v, rpb, spec, scale, out=out, lse=lse)
        _run(args, 0)
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.meta = (scale, spec)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        scale, spec = ctx.meta
        dout = torch.zeros_like(out) if dout is None else dout.float().contiguous()
        dlse = dlse.float().contiguous() if dlse is not None else None
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        # -lse and delta per query, laid out so that a key's queries are consecutive (see qt in
        # na_cpu.c), plus a vector of zeros that padding slots may read.
        side = torch.empty(2, lse.numel() + 8, dtype=torch.float32)  # (not the default dtype: may be float64)
        side[:, -8:] = 0
        # One bias-gradient slice per thread (no races, deterministic for a given thread count).
        drpb = torch.zeros(_threads(), *rpb.shape, dtype=torch.float32) if rpb is not None else None
        plan = _fused_plan(spec, q.shape[0], k.shape[4])
        dq = torch.empty_like(q)  # zeroed in pass 3
        args, keep = _args(q, k, v, rpb, spec, scale, plan[:2] if plan else (0, 0), out=out, lse=lse, dout=dout,
                           dlse=dlse, dq=dq, dk=dk, dv=dv, drpb=drpb, nlse_t=side[0], delta_t=side[1])
        _run(args, 3)  # -lse and delta copies, dq zeroed
        if plan:  # dQ, dK, dV and drpb from the key side: even chunks, then odd ones
            for pass_ in (4, 5)[: 2 if plan[2] > 1 else 1]:
                _run(args, pass_)
        else:
            _run(args, 1)  # dQ, drpb
            _run(args, 2)  # dK, dV
        return dq, dk, dv, (drpb.sum(0) if drpb is not None else None), None, None


class CpuCBackend(Backend):
    name = "cpu_c"
    supports_gqa = True

    @property
    def description(self) -> str:  # type: ignore[override]
        lib, err = _library()
        where = f"compiled for this CPU, cached in {_cache_dir()}" if lib is not None else err
        return f"fused C CPU kernels (2x8 register-blocked), forward and race-free backward; {where}"

    def unavailable(self) -> Optional[str]:
        return _library()[1]

    def refuse(self, p: Problem) -> Optional[str]:
        if p.dim % _VEC or p.dim_v % _VEC:
            return f"head dims ({p.dim}, {p.dim_v}) must be multiples of {_VEC} (the kernel's vector width)"
        return refuse_cpu(p, (torch.float32, torch.float16, torch.bfloat16),
                          "float32; half types computed in float32; float64 uses `cpu`")

    def priority(self, p: Problem) -> float:
        return 20.0 if p.spec.window_size <= _MAX_WINDOW else -1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, extras: Extras) -> Result:
        q3, k3, v3, rpb = rank3(q, k, v, p, extras)
        out, lse = _NAFunction.apply(q3, k3, v3, rpb, p.scale, p.spec)
        return Result(out.reshape(p.batch, *p.spec.spatial, p.heads, p.dim_v).to(q.dtype),
                      lse.reshape(p.batch, *p.spec.spatial, p.heads))
