"""Compile ``na_cpu.c`` for this CPU on first use, cache it on disk, and load it with :mod:`ctypes`.

Why at first use, on the user's machine, with the system C compiler (``$CC``, else ``cc``):

* no PyTorch or Python headers, so no C++ ABI coupling (NATTEN's install pain) and one build serves
  every torch version;
* nothing to compile at ``pip install`` (wheels stay pure Python);
* ``-march=native`` uses this CPU's vector units; the shared library is cached on disk
  (``$VISATTN_CACHE_DIR``, else ``~/.cache/visattn``), keyed by the source, the flags, the compiler's
  version and the CPU model, so the compile is paid once per machine.

Nothing here runs on import or when a backend is probed: :func:`library` builds (or loads) the kernel
the first time a call is actually served by the ``cpu`` backend. The kernel is built as two libraries
from the one source (``-DNA_PART=1``: the forward, ``-DNA_PART=2``: the backward) by two compiler
processes at once: that first call waits only for the forward's (about 0.85 s of the 1.5 s the whole
file takes at ``-O3``), while the backward's finishes on another core, in a thread of its own that
:func:`run` waits for when a backward comes. Other C sources of the package (the
selective scan) are built the same way, same flags, cache and OpenMP runtime, by :func:`compile_source`
and loaded once per process by a :class:`Kernel`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

SOURCE = Path(__file__).with_name("na_cpu.c")
_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-fno-trapping-math",
          "-Werror=implicit-function-declaration", "-ffp-contract=fast", "-Wno-psabi"]
#: Environment variable that builds the kernel with every index checked (aborts on a violation).
BOUNDS_CHECK_ENV = "VISATTN_CPU_BOUNDS_CHECK"
#: Environment variable with extra compiler flags, appended after ``-march=native`` (part of the cache
#: key). E.g. ``-mno-avx512bf16`` or ``-march=x86-64-v3`` builds what a CPU without the bf16 dot
#: product (or without AVX-512) gets: the tests use it to prove the portable fallbacks.
EXTRA_FLAGS_ENV = "VISATTN_CPU_CFLAGS"


class Args(ctypes.Structure):
    """Mirror of ``na_args`` in ``na_cpu.c`` (same order, same types)."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("q", "k", "v", "rpb", "ab", "kpm", "pos", "lo", "hi", "rof", "qlo",
                                                  "qhi", "sof", "kpos", "ksrc")]
                + [(n, ctypes.c_int64) for n in ("lmax", "B", "L0", "L1", "L2", "M0", "M1", "M2", "N0", "N1", "N2",
                                                 "kb0", "kb1", "kb2", "H", "Hk", "D", "Dv", "R0", "R1", "R2", "K0",
                                                 "K1", "K2", "ab_sb", "ab_st", "ab_sh")]
                + [("scale", ctypes.c_float), ("dt", ctypes.c_int32)]
                + [(n, ctypes.c_void_p) for n in ("attn", "dattn", "dab", "out", "lse", "dout", "dlse", "dq", "dk", "dv",
                                                  "dq_out", "dkf", "dvf", "drpb", "nlse_t", "delta_t", "kt", "vt", "qt",
                                                  "dot", "kp", "vp", "qp", "dop")]
                + [(n, ctypes.c_int64) for n in ("l2p", "split", "chunk")]
                + [("nthreads", ctypes.c_int32)])

    #: element types (``dt``)
    F32, BF16 = 0, 1


def cache_dir() -> Path:
    env = os.environ.get("VISATTN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "visattn"


def compiler() -> Optional[str]:
    """Path of the C compiler the kernel would be built with, or ``None``."""
    return shutil.which(os.environ.get("CC") or "cc")


def _cpu_model() -> str:
    """What ``-march=native`` depends on: a cached build must never run on another CPU model."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def torch_openmp() -> Optional[Path]:
    """The GNU OpenMP runtime PyTorch loaded (Linux wheels bundle ``torch/lib/libgomp*.so*``), or None."""
    if not sys.platform.startswith("linux"):
        return None
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return found[0] if found else None


def _flags() -> list[str]:
    arch = "-march=native" if platform.machine().lower() in ("x86_64", "amd64", "i686") else "-mcpu=native"
    extra = os.environ.get(EXTRA_FLAGS_ENV, "").split()
    return [*_FLAGS, arch, *extra] + (["-DNA_BOUNDS_CHECK"] if os.environ.get(BOUNDS_CHECK_ENV) == "1" else [])


def _texts(source: Path) -> list[str]:
    """The text of ``source`` and of the package headers it includes (``#include "..."``, recursively):
    what the build's cache key must cover."""
    text = source.read_text()
    found = [text]
    for name in re.findall(r'^\s*#\s*include\s*"([^"]+)"', text, re.M):
        found += _texts((source.parent / name).resolve())
    return found


#: The two libraries the neighborhood-attention kernel is built as: name suffix -> preprocessor switch.
FORWARD_PART, BACKWARD_PART = ("fwd", ["-DNA_PART=1"]), ("bwd", ["-DNA_PART=2"])


def compile_source(cc: str, source: Path, part: str = "", defines: Sequence[str] = ()) -> Path:
    """Compile the self-contained C file ``source`` for this CPU (or find it in the cache); returns the
    shared library's path, ``<cache>/<source stem>-<key>.so``, or ``<cache>/<source stem>-<key>-<part>.so``
    for a part of it built with the extra compiler arguments ``defines`` (the key does not cover them:
    one key names all the parts of a source).

    With PyTorch's own libgomp found, the kernel is compiled with ``-fopenmp`` and linked against
    that very file (its soname matches the copy torch already loaded, so the loader reuses it): the
    kernel then runs on torch's thread pool (a second pool would share the cores with torch's
    still-spinning workers). Otherwise it starts its own pthreads.
    """
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = _flags()
    gomp = torch_openmp()
    key = hashlib.sha256("\0".join([*_texts(source), " ".join(flags), version, _cpu_model(), sys.platform,
                                    str(gomp)]).encode()).hexdigest()[:20]
    suffix = ".dll" if sys.platform == "win32" else ".so"
    target = cache_dir() / f"{source.stem}-{key}{'-' + part if part else ''}{suffix}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile next to the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=target.parent)
    os.close(fd)
    obj = tmp + ".o"
    try:
        if gomp is not None:  # compile with OpenMP, link torch's runtime by path (not the system -lgomp)
            steps = [[cc, *flags, *defines, "-fopenmp", "-c", str(source), "-o", obj],
                     [cc, *flags, obj, str(gomp), f"-Wl,-rpath,{gomp.parent}", "-o", tmp, "-lm"]]
        else:
            steps = [[cc, *flags, *defines, str(source), "-o", tmp, "-lm"]]
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


class Background:
    """A library compiled (or found in the cache) and loaded on a thread of its own: ``load`` returns
    ``(library, None)`` or ``(None, why not)``, as :func:`load` does.

    The thread is not a daemon: a process that ends while the compiler is still running waits for it,
    so that what it compiled lands in the cache instead of being thrown away and paid again by the
    next process. If the thread ended without a result (it raised, or this is a child forked while it
    ran, where the thread does not exist), :meth:`result` runs ``load`` itself.
    """

    def __init__(self, load: Callable[[], tuple[Optional[ctypes.CDLL], Optional[str]]]) -> None:
        self._load = load
        self._result: Optional[tuple[Optional[ctypes.CDLL], Optional[str]]] = None
        self._thread = threading.Thread(target=self._run, name="visattn-cc")
        self._thread.start()

    def _run(self) -> None:
        self._result = self._load()

    def result(self) -> tuple[Optional[ctypes.CDLL], Optional[str]]:
        """``(library, None)`` or ``(None, why not)``, once the thread is done (waits for it)."""
        self._thread.join()
        if self._result is None:
            self._result = self._load()
        return self._result


#: The forward library (``na_forward``, ``na_run_many``, ``na_features``), or why it could not be built.
_LIB: Optional[ctypes.CDLL] = None
_LIB_ERROR: Optional[str] = None
#: The backward library (``na_backward``), built alongside the forward's by :func:`library`.
_BACKWARD: Optional[Background] = None
_LOCK = threading.Lock()
#: What serves CPU calls when the kernel cannot be built (the end of the reason given).
_FALLBACK = "CPU calls use the torch backend"


def status() -> Optional[str]:
    """Why the kernel cannot be used, without building anything: no compiler, or an earlier build
    that failed in this process; ``None`` if it is loaded or looks buildable."""
    if _LIB is not None:
        return None
    if _LIB_ERROR is not None:
        return _LIB_ERROR
    return no_compiler(_FALLBACK)


def no_compiler(fallback: str) -> Optional[str]:
    """The reason to report when no C compiler exists (``fallback``: what serves the calls instead),
    or ``None`` when there is one."""
    if compiler() is None:
        return f"no C compiler found (tried $CC or `cc`; install gcc or clang, or set CC); {fallback}"
    return None


def load(source: Path, declare: Callable[[ctypes.CDLL], None], fallback: str, part: str = "",
         defines: Sequence[str] = ()) -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """Compile (or find in the cache) and load ``source`` (or a ``part`` of it, see
    :func:`compile_source`); ``declare`` sets the ctypes signatures of its entry points. Returns
    ``(library, None)`` or ``(None, why not)``."""
    cc = compiler()
    if cc is None:
        return None, no_compiler(fallback)
    try:
        lib = ctypes.CDLL(str(compile_source(cc, source, part, defines)))
        declare(lib)
        return lib, None
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"building the C kernel failed: {e}"


def _declare_forward(lib: ctypes.CDLL) -> None:
    lib.na_forward.argtypes = [ctypes.POINTER(Args)]
    lib.na_forward.restype = ctypes.c_int
    lib.na_run_many.argtypes = [ctypes.POINTER(ctypes.POINTER(Args)), ctypes.c_int, ctypes.c_int]
    lib.na_run_many.restype = ctypes.c_int
    lib.na_features.argtypes = []
    lib.na_features.restype = ctypes.c_int


def _declare_backward(lib: ctypes.CDLL) -> None:
    lib.na_backward.argtypes = [ctypes.POINTER(Args)]
    lib.na_backward.restype = ctypes.c_int


def library() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """The loaded forward library, or ``(None, why not)``; built once per process (thread-safe).

    The backward library's build starts first, on a :class:`Background` thread, so that both
    compilers run at once; only the forward's is waited for here."""
    global _LIB, _LIB_ERROR, _BACKWARD
    with _LOCK:
        if _LIB is None and _LIB_ERROR is None:
            _BACKWARD = Background(lambda: load(SOURCE, _declare_backward, _FALLBACK, *BACKWARD_PART))
            _LIB, _LIB_ERROR = load(SOURCE, _declare_forward, _FALLBACK, *FORWARD_PART)
    return _LIB, _LIB_ERROR


def backward_library() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """The loaded backward library, or ``(None, why not)``: waits for the build :func:`library`
    started (that call must have come first)."""
    with _LOCK:
        pending = _BACKWARD
    assert pending is not None, "cpu backend: the backward library before library()"
    return pending.result()


def forget() -> None:
    """Drop the loaded libraries and any recorded failure (tests: rebuild under a changed environment);
    waits for a backward build still running."""
    global _LIB, _LIB_ERROR, _BACKWARD
    with _LOCK:
        if _BACKWARD is not None:
            _BACKWARD.result()
        _LIB, _LIB_ERROR, _BACKWARD = None, None, None


class Kernel:
    """Another C source of the package, compiled by :func:`compile_source` and loaded on first use,
    once per process (thread-safe), like the neighborhood-attention kernel above.

    ``declare`` sets the ctypes signatures of the loaded library; ``fallback`` says what serves the
    calls when the kernel cannot be built (it ends the reason :meth:`status` gives).
    """

    def __init__(self, source: Path, declare: Callable[[ctypes.CDLL], None], fallback: str) -> None:
        self.source, self.declare, self.fallback = source, declare, fallback
        self.lib: Optional[ctypes.CDLL] = None
        self.error: Optional[str] = None
        self._lock = threading.Lock()

    def status(self) -> Optional[str]:
        """Why the kernel cannot be used, without building anything (see :func:`status`)."""
        if self.lib is not None:
            return None
        return self.error if self.error is not None else no_compiler(self.fallback)

    def library(self) -> tuple[Optional[ctypes.CDLL], Optional[str]]:
        """The loaded library, or ``(None, why not)``; built once per process."""
        with self._lock:
            if self.lib is None and self.error is None:
                self.lib, self.error = load(self.source, self.declare, self.fallback)
        return self.lib, self.error

    def forget(self) -> None:
        """Drop the loaded library and any recorded failure (tests: rebuild under a changed environment)."""
        with self._lock:
            self.lib, self.error = None, None


FORWARD, BACKWARD = 0, 1


def run(args: Args, pass_: int) -> None:
    """Run a kernel pass: ``FORWARD`` (out, LSE, weights) or ``BACKWARD`` (all gradients; the fused
    backward when ``args.chunk > 0``, else the two-pass one). The forward library must be loaded; the
    first backward of a process waits for the backward library's build if it is still running."""
    assert _LIB is not None, "cpu backend: run() before the kernel was loaded"
    if pass_ == FORWARD:
        code = _LIB.na_forward(ctypes.byref(args))
    else:
        lib, error = backward_library()
        if lib is None:  # the forward's build succeeded: a failure here is unexpected, never silent
            raise RuntimeError(f"cpu backend: the backward kernel could not be built: {error}")
        code = lib.na_backward(ctypes.byref(args))
    if code == 1:
        raise MemoryError("cpu backend: the kernel could not allocate its per-thread scratch memory")
    assert code == 0, f"cpu backend: {'na_forward' if pass_ == FORWARD else 'na_backward'} returned {code}"


def run_many(problems: list[Args], pass_: int = FORWARD) -> None:
    """Run the ``FORWARD`` pass of several problems in one parallel region (one ``na_run_many`` call):
    each ``Args`` is complete, as :func:`run` takes it (its own pointers, grid, tables and window
    arguments); ``nthreads`` is taken from the first. The library must be loaded."""
    lib = _LIB
    assert lib is not None, "cpu backend: run_many() before the kernel was loaded"
    array = (ctypes.POINTER(Args) * len(problems))(*(ctypes.pointer(a) for a in problems))
    code = lib.na_run_many(array, len(problems), pass_)
    if code == 1:
        raise MemoryError("cpu backend: the kernel could not allocate its per-thread scratch memory")
    assert code == 0, f"cpu backend: na_run_many(pass={pass_}, n={len(problems)}) returned {code}"


def features() -> dict[str, bool]:
    """What the loaded build computes with: ``bf16_dot`` (AVX512-BF16 ``vdpbf16ps``; otherwise bf16
    pairs are widened to float32 and multiplied the same way) and ``avx512``."""
    lib = _LIB
    assert lib is not None, "cpu backend: features() before the kernel was loaded"
    bits = lib.na_features()
    return {"bf16_dot": bool(bits & 1), "avx512": bool(bits & 2)}
