"""Building the C kernels: probing never compiles, the first served call does (once, cached on disk),
a bounds-checked build over the sweeps, builds without the CPU's bf16 dot product or without AVX-512
(the portable fallbacks, forced by compiler flags) over the bf16 sweeps, the pthreads build where
torch's OpenMP runtime is not found, and how the package behaves without a compiler or with a broken
one."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from visattn import na2d
from visattn.backends import Problem, select_backend, why_not
from visattn.backends.cpu import build
from visattn.spec import make_spec

pytestmark = pytest.mark.skipif(build.compiler() is None, reason="no C compiler on this machine")

TESTS = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _subprocess(script: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=full_env, capture_output=True,
                          text=True, timeout=600)


def test_probing_compiles_nothing_and_the_first_served_call_builds(tmp_path) -> None:
    """``import visattn``, ``visattn info``, ``why_not``, selection for a CUDA-like problem and a
    forward on the torch backend leave the cache empty; the first call the cpu backend serves builds."""
    res = _subprocess("""
        import os, sys, torch
        import visattn
        from visattn.backends import Problem, select_backend, why_not
        from visattn.cli.main import main
        from visattn.spec import make_spec
        cache = os.environ["VISATTN_CACHE_DIR"]
        main(["info"])
        assert why_not("cpu") is None
        p = Problem(spec=make_spec("t", (8, 8), 3), batch=1, heads=1, heads_kv=1, dim=8, dim_v=8,
                    dtype=torch.float32, device=torch.device("meta"), scale=1.0)
        assert select_backend(p).name != "cpu"
        q = torch.randn(1, 8, 8, 1, 8)
        visattn.na2d(q, q, q, 3, backend="torch")
        visattn.na2d(q.double(), q.double(), q.double(), 3)  # float64: served by torch
        assert not os.listdir(cache), os.listdir(cache)
        visattn.na2d(q, q, q, 3)
        assert any(f.startswith("na_cpu-") for f in os.listdir(cache))
        print("ok")
    """, VISATTN_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# Both sweeps (CASES, FEATURE_CASES) through both backward paths in the given dtypes, in a subprocess.
_SWEEPS = """
        import torch
        from cases import CASES, FEATURE_CASES
        from parity import run_feature_parity, run_parity
        from visattn.backends.cpu import backend as cpu
        def sweeps(*dtypes):
            for dtype in dtypes:
                for min_units in (0, 10 ** 9):  # fused backward, then two-pass
                    cpu._FUSED_MIN_UNITS = min_units
                    for case in CASES:
                        try:
                            run_parity("cpu", case, dtype)
                        except BaseException as e:
                            if type(e).__name__ != "Skipped":
                                raise
                    for case in FEATURE_CASES:
                        run_feature_parity("cpu", case, dtype)
            cpu._FUSED_MIN_UNITS = 8
"""


def test_bounds_checked_build_runs_the_sweep(tmp_path) -> None:
    """The kernel built with every index checked (an out-of-bounds index aborts the process) runs the
    whole parity sweep and the per-pair feature sweep (attn_bias, key padding mask, weights and their
    gradients) in float32 and bfloat16 (whose kernels read the layout copies) through both backward
    paths, plus bias-table cases, in a subprocess."""
    res = _subprocess(_SWEEPS + """
        from visattn import na2d, na3d
        sweeps(torch.float32, torch.bfloat16)
        for min_units in (0, 10 ** 9):
            cpu._FUSED_MIN_UNITS = min_units
            for fn, shape, kw, table in [
                    (na2d, (1, 9, 10, 2, 16), dict(kernel_size=(5, 4), dilation=(1, 2), stride=(2, 1)), (2, 9, 7)),
                    (na3d, (1, 5, 6, 7, 2, 8), dict(kernel_size=3, is_causal=(True, False, True)), (2, 5, 5, 5))]:
                q = torch.randn(shape, requires_grad=True)
                rpb = torch.randn(table, requires_grad=True)
                out = fn(q, q, q, **kw, rpb=rpb, backend="cpu")
                out.sum().backward()
        print("ok")
    """, **{build.BOUNDS_CHECK_ENV: "1", "VISATTN_CACHE_DIR": str(tmp_path)})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    assert any(p.name.startswith("na_cpu-") for p in tmp_path.iterdir())


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def test_native_build_uses_the_cpus_bf16_dot_product() -> None:
    """Where the CPU has AVX512-BF16 (and AVX-512 VL), the -march=native build uses vdpbf16ps; a build
    that silently fell back would be correct but slow."""
    flags = _cpu_flags()
    if not {"avx512_bf16", "avx512vl"} <= flags:
        pytest.skip("this CPU has no AVX512-BF16: the portable bf16 path is the native one here")
    assert build.library()[0] is not None
    assert build.features() == {"bf16_dot": True, "avx512": True}


X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(not X86, reason="the simulated CPUs are x86 ones (compiler flags of x86 targets)")
@pytest.mark.parametrize("flags,features", [("-mno-avx512bf16", None), ("-march=x86-64-v3", {"bf16_dot": False, "avx512": False})],
                         ids=["no-avx512bf16", "x86-64-v3"])
def test_fallback_builds_run_the_bf16_sweeps(tmp_path, flags, features) -> None:
    """A CPU without the bf16 dot product (AVX512-BF16 turned off), or without AVX-512 at all (x86-64-v3:
    AVX2, 16 registers, no masked stores or vscalefps), simulated by compiler flags: the fallbacks
    (bf16 pairs widened to float32, portable exp and masked loads) pass both sweeps in bfloat16 and
    float32 through both backward paths."""
    res = _subprocess(_SWEEPS + f"""
        from visattn.backends.cpu import build
        assert build.library()[0] is not None, build.library()[1]
        print("features", build.features())
        assert not build.features()["bf16_dot"]
        expected = {features!r}
        assert expected is None or build.features() == expected, build.features()
        sweeps(torch.bfloat16, torch.float32)
        print("ok")
    """, **{build.EXTRA_FLAGS_ENV: flags, "VISATTN_CACHE_DIR": str(tmp_path)})
    assert res.returncode == 0 and "ok" in res.stdout, (res.stdout[-1000:], res.stderr[-3000:])


def test_pthreads_build_without_openmp(tmp_path) -> None:
    """Where torch's libgomp is not found (macOS, Windows), the kernel is built without OpenMP and
    starts its own threads: it still matches the reference, through both backward paths, on 3 threads."""
    res = _subprocess("""
        import torch
        from visattn import na2d
        from visattn.backends.cpu import backend as cpu, build
        build.torch_openmp = lambda: None
        torch.set_num_threads(3)
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 12, 11, 4, 16) for _ in range(3))
        rpb = torch.randn(4, 9, 9)
        for min_units in (0, 10 ** 9):  # fused backward, then two-pass
            cpu._FUSED_MIN_UNITS = min_units
            grads = []
            for backend in ("cpu", "reference"):
                ts = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
                out = na2d(*ts[:3], kernel_size=5, dilation=(2, 1), rpb=ts[3], backend=backend)
                grads.append([out, *torch.autograd.grad((out * out).sum(), ts)])
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, atol=3e-5, rtol=3e-5)
        print("ok", build.library()[0]._name)
    """, VISATTN_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    built = sorted(tmp_path.glob("na_cpu-*"))
    assert [p.name.rsplit("-", 1)[1] for p in built] == ["bwd.so", "fwd.so"]
    if shutil.which("nm"):  # binutils present: the build really is the pthreads one
        for lib in built:
            symbols = subprocess.run(["nm", "-D", str(lib)], capture_output=True, text=True).stdout
            assert "GOMP_parallel" not in symbols and "pthread_create" in symbols


def test_bounds_check_catches_a_bad_table(tmp_path) -> None:
    """The checked build really checks: a corrupted window table aborts with the failed condition
    instead of reading outside the tensor."""
    res = _subprocess("""
        import torch
        from visattn.backends.cpu import backend as cpu, build
        from visattn.backends.cpu.geometry import tables
        from visattn.spec import make_spec
        spec = make_spec("na2d", (6, 6), 3)
        tables(spec)[2][2, 1] = 40  # hi of the second query on the last axis: far past the axis
        q = torch.randn(1, 1, 6, 6, 1, 8)
        out, lse = torch.empty_like(q), torch.empty(q.shape[:-1])
        assert build.library()[0] is not None
        build.run(cpu._args(q, q, q, None, spec, 1.0, out=out, lse=lse), 0)
        print("not caught")
    """, **{build.BOUNDS_CHECK_ENV: "1", "VISATTN_CACHE_DIR": str(tmp_path)})
    assert res.returncode != 0 and "bounds check failed" in res.stderr, (res.stdout, res.stderr[-2000:])


def _problem() -> Problem:
    return Problem(spec=make_spec("na2d", (14, 14), 7), batch=1, heads=2, heads_kv=2, dim=32, dim_v=32,
                   dtype=torch.float32, device=torch.device("cpu"), scale=0.2)


@pytest.fixture
def fresh_library(monkeypatch):
    """Forget the loaded library so the next call rebuilds (or fails) under the patched environment;
    the library of the rest of the session is restored afterwards."""
    monkeypatch.setattr(build, "_LIB", None)
    monkeypatch.setattr(build, "_LIB_ERROR", None)
    monkeypatch.setattr(build, "_BACKWARD", None)
    yield
    if build._BACKWARD is not None:  # the test's backward build ends under the test's environment
        build._BACKWARD.result()


def test_without_a_compiler_the_package_falls_back(monkeypatch, fresh_library) -> None:
    monkeypatch.setattr(build, "compiler", lambda: None)
    reason = why_not("cpu")
    assert reason is not None and "no C compiler found" in reason and "set CC" in reason
    assert select_backend(_problem()).name == "torch"
    q = torch.randn(1, 8, 8, 2, 16)
    torch.testing.assert_close(na2d(q, q, q, 3), na2d(q, q, q, 3, backend="reference"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend='cpu' cannot serve this call: no C compiler"):
        na2d(q, q, q, 3, backend="cpu")


def test_a_failing_compiler_is_reported_with_its_output(monkeypatch, tmp_path, fresh_library) -> None:
    """The failure surfaces on the first call the backend would serve: that call is routed to the
    torch backend (and is correct), and from then on ``why_not`` reports the compiler's output."""
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fakecc 1.0; exit 0; fi\n"
                    "echo 'fakecc: error: no vectors today' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("VISATTN_CACHE_DIR", str(tmp_path / "cache"))
    assert why_not("cpu") is None  # a compiler exists; nothing was tried yet
    q = torch.randn(1, 8, 8, 2, 16)
    torch.testing.assert_close(na2d(q, q, q, 3), na2d(q, q, q, 3, backend="reference"), atol=1e-5, rtol=1e-5)
    reason = why_not("cpu")
    assert reason is not None and "building the C kernel failed" in reason and "no vectors today" in reason
    assert select_backend(_problem()).name == "torch"
    assert not list((tmp_path / "cache").glob("na_cpu-*"))  # nothing half-written left in the cache


def test_build_is_cached_on_disk(monkeypatch, tmp_path, fresh_library) -> None:
    """A second process (here: a forgotten library) finds the shared library in the cache instead
    of compiling again."""
    monkeypatch.setenv("VISATTN_CACHE_DIR", str(tmp_path))
    assert build.library()[1] is None and build.backward_library()[1] is None
    built = sorted(tmp_path.glob("na_cpu-*"))
    assert len(built) == 2 and built[0].name[:-len("bwd.so")] == built[1].name[:-len("fwd.so")]  # one key
    stamps = [p.stat().st_mtime_ns for p in built]
    build.forget()
    monkeypatch.setattr(build.subprocess, "run", _no_compile(build.subprocess.run))
    assert build.library()[1] is None and build.backward_library()[1] is None
    assert [p.stat().st_mtime_ns for p in built] == stamps


def _no_compile(run):
    def guarded(cmd, *a, **kw):
        assert "--version" in cmd, f"compiled again: {cmd}"
        return run(cmd, *a, **kw)
    return guarded


def test_a_background_build_without_a_result_is_run_in_the_caller() -> None:
    """A child forked while the backward's build ran has the object but not the thread (and a thread
    that raised has no result): ``result()`` then loads in the calling thread instead of failing."""
    calls = []

    def load():
        calls.append(threading.current_thread().name)
        return None, f"attempt {len(calls)}"

    pending = build.Background(load)
    assert pending.result() == (None, "attempt 1") and calls == ["visattn-cc"]
    pending._result = None  # what a forked child (or a raising thread) is left with
    assert pending.result() == (None, "attempt 2") and calls[1] == threading.current_thread().name
