"""The fused C ``cpu_c`` backend beyond the shared parity sweep (which runs it automatically):
both backward paths (fused, two-pass) over the sweep, the race-freedom of the fused path's chunks,
a bounds-checked build over the sweep, vector-width edge cases, thread-count independence,
concurrent callers, and how the package behaves without a compiler or with a broken one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from brute import assert_concurrent_calls_identical
from cases import CASES
from test_parity import run_parity

from visattn import na1d, na2d, na3d
from visattn.backends import Problem, cpu_c, select_backend, why_not
from visattn.backends.cpu_common import colour_chunks
from visattn.spec import make_spec, neighbor_table

pytestmark = pytest.mark.skipif(why_not("cpu_c") is not None, reason=f"cpu_c unusable here: {why_not('cpu_c')}")

HERE = os.path.dirname(__file__)


def _subprocess(script: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env,
                "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=full_env, capture_output=True,
                          text=True, timeout=600)


def _grads(fn, q, k, v, backend, rpb=None, **kw):
    ts = [t.clone().requires_grad_() for t in (q, k, v)] + ([rpb.clone().requires_grad_()] if rpb is not None else [])
    extra = {"rpb": ts[3]} if rpb is not None else {}
    out, lse = fn(*ts[:3], backend=backend, return_lse=True, **kw, **extra)
    g = torch.Generator().manual_seed(3)
    loss = (out * torch.randn(out.shape, generator=g)).sum() + (lse * torch.randn(lse.shape, generator=g)).sum()
    return [out, lse, *torch.autograd.grad(loss, ts)]


BACKWARD_PATHS = {"fused": 0, "two-pass": 10 ** 9}  # _FUSED_MIN_UNITS forcing each path


@pytest.fixture(params=list(BACKWARD_PATHS))
def backward_path(request, monkeypatch) -> str:
    """Run the test once with each backward path forced, whatever the geometry would choose."""
    monkeypatch.setattr(cpu_c, "_FUSED_MIN_UNITS", BACKWARD_PATHS[request.param])
    return request.param


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_backward_path_matches_the_oracle(case, backward_path) -> None:
    """The shared sweep picks a path per geometry (small cases take the two-pass one): here every
    case runs through both, in float32, forward and backward."""
    run_parity("cpu_c", case, torch.float32)


def test_the_default_problem_takes_the_fused_backward() -> None:
    spec = make_spec("na2d", (56, 56), 7)
    assert cpu_c._fused_plan(spec, batch=1, heads_kv=4) is not None
    assert cpu_c._fused_plan(make_spec("na2d", (9, 9), 7), batch=1, heads_kv=2) is None  # one chunk, 2 units


def _axis_sees(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> torch.Tensor:
    """[query, key] bool along one axis, from the spec's explicit neighbourhoods (not the kernel's tables)."""
    index, valid, _ = neighbor_table(make_spec("axis", (length,), kernel, stride, dilation, causal))
    sees = torch.zeros(length, length, dtype=torch.bool)
    rows = torch.arange(length)[:, None].expand_as(index)
    sees[rows[valid], index[valid]] = True
    return sees


def test_fused_backward_chunks_of_one_colour_never_share_a_query() -> None:
    """The fused backward's race-freedom: run c and run c + 2 of the split axis (indices in
    dilation-group-major order, pairs on the last axis) are seen by disjoint sets of queries, so the
    units of one colour write disjoint dQ rows. Checked against the explicit neighbourhoods over
    random geometries (kernel, stride, dilation, causal per axis; ranks 1-3)."""
    g = torch.Generator().manual_seed(0)
    rint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    for _ in range(300):
        rank = rint(1, 3)
        axes = []
        for _ in range(rank):
            dil = rint(1, 3)
            length = rint(dil, 30)
            kernel = rint(1, length // dil)
            axes.append((length, kernel, rint(1, kernel), dil, bool(rint(0, 1))))
        spec = make_spec("t", *zip(*axes))
        axis, chunk, count = colour_chunks(spec)
        shape = (1,) * (3 - rank) + spec.spatial
        if shape[axis] == 1:
            assert count == 1
            continue
        length, kernel, stride, dil, causal = axes[axis - (3 - rank)]
        order = sorted(range(length), key=lambda c: (c % dil, c // dil))  # group-major index -> coordinate
        per_unit = 2 if axis == 2 else 1
        sees = _axis_sees(length, kernel, stride, dil, causal)
        runs = [order[i * chunk * per_unit:(i + 1) * chunk * per_unit] for i in range(count)]
        assert sum(map(len, runs)) == length
        seen_by = [sees[:, run].any(1) for run in runs]  # queries seeing each run
        for c in range(count - 2):
            assert not (seen_by[c] & seen_by[c + 2]).any(), (axes, axis, chunk, c)


def test_bounds_checked_build_runs_the_sweep(tmp_path) -> None:
    """The kernel built with every index checked (an out-of-bounds index aborts the process) runs the
    whole parity sweep in float32 through both backward paths, plus bias-table cases, in a subprocess."""
    res = _subprocess("""
        import torch
        from cases import CASES
        from test_parity import run_parity
        from visattn import na2d, na3d
        from visattn.backends import cpu_c
        for min_units in (0, 10 ** 9):  # fused backward, then two-pass
            cpu_c._FUSED_MIN_UNITS = min_units
            for case in CASES:
                try:
                    run_parity("cpu_c", case, torch.float32)
                except BaseException as e:
                    if type(e).__name__ != "Skipped":
                        raise
            for fn, shape, kw, table in [
                    (na2d, (1, 9, 10, 2, 16), dict(kernel_size=(5, 4), dilation=(1, 2), stride=(2, 1)), (2, 9, 7)),
                    (na3d, (1, 5, 6, 7, 2, 8), dict(kernel_size=3, is_causal=(True, False, True)), (2, 5, 5, 5))]:
                q = torch.randn(shape, requires_grad=True)
                rpb = torch.randn(table, requires_grad=True)
                out = fn(q, q, q, **kw, rpb=rpb, backend="cpu_c")
                out.sum().backward()
        print("ok")
    """, VISATTN_CPU_C_BOUNDS_CHECK="1", VISATTN_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    assert any(p.name.startswith("na_cpu-") for p in tmp_path.iterdir())


def test_pthreads_build_without_openmp(tmp_path) -> None:
    """Where torch's libgomp is not found (macOS, Windows), the kernel is built without OpenMP and
    starts its own threads: it still matches the reference, through both backward paths, on 3 threads."""
    res = _subprocess("""
        import torch
        from visattn import na2d
        from visattn.backends import cpu_c
        cpu_c._torch_openmp = lambda: None
        torch.set_num_threads(3)
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 12, 11, 4, 16) for _ in range(3))
        rpb = torch.randn(4, 9, 9)
        for min_units in (0, 10 ** 9):  # fused backward, then two-pass
            cpu_c._FUSED_MIN_UNITS = min_units
            grads = []
            for backend in ("cpu_c", "reference"):
                ts = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
                out = na2d(*ts[:3], kernel_size=5, dilation=(2, 1), rpb=ts[3], backend=backend)
                grads.append([out, *torch.autograd.grad((out * out).sum(), ts)])
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, atol=3e-5, rtol=3e-5)
        lib = cpu_c._library()[0]
        print("ok", lib._name)
    """, VISATTN_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    built = list(tmp_path.glob("na_cpu-*"))
    assert len(built) == 1
    if shutil.which("nm"):  # binutils present: the build really is the pthreads one
        symbols = subprocess.run(["nm", "-D", str(built[0])], capture_output=True, text=True).stdout
        assert "GOMP_parallel" not in symbols and "pthread_create" in symbols


def test_bounds_check_catches_a_bad_table(tmp_path) -> None:
    """The checked build really checks: a corrupted window table aborts with the failed condition
    instead of reading outside the tensor."""
    res = _subprocess("""
        import torch
        from visattn.backends import cpu_c
        from visattn.backends.cpu_common import tables
        from visattn.spec import make_spec
        spec = make_spec("na2d", (6, 6), 3)
        tables(spec)[2][2, 1] = 40  # hi of the second query on the last axis: far past the axis
        q = torch.randn(1, 1, 6, 6, 1, 8)
        out, lse = torch.empty_like(q), torch.empty(q.shape[:-1])
        args, keep = cpu_c._args(q, q, q, None, spec, 1.0, out=out, lse=lse)
        cpu_c._run(args, 0)
        print("not caught")
    """, VISATTN_CPU_C_BOUNDS_CHECK="1", VISATTN_CACHE_DIR=str(tmp_path))
    assert res.returncode != 0 and "bounds check failed" in res.stderr, (res.stdout, res.stderr[-2000:])


@pytest.mark.parametrize("dims", [(8, 8), (16, 40), (24, 72), (64, 32)], ids=lambda d: f"D{d[0]}-Dv{d[1]}")
def test_head_dims_hit_every_value_block(dims) -> None:
    """Value rows are updated 8, 16, 24 or 32 features per pass: every remainder is exercised, with
    an odd last axis (the second query of the last pair is a discarded duplicate)."""
    D, Dv = dims
    torch.manual_seed(0)
    q, k = torch.randn(2, 7, 9, 2, D), torch.randn(2, 7, 9, 2, D)
    v = torch.randn(2, 7, 9, 2, Dv)
    got = _grads(na2d, q, k, v, "cpu_c", kernel_size=(3, 5))
    ref = _grads(na2d, q, k, v, "reference", kernel_size=(3, 5))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("fn,shape,kw", [
    (na1d, (1, 1, 2, 8), dict(kernel_size=1)),                       # one token
    (na1d, (2, 70, 2, 16), dict(kernel_size=63, is_causal=True)),     # long causal window
    (na2d, (1, 5, 1, 2, 8), dict(kernel_size=(3, 1))),               # last axis of length 1
    (na3d, (1, 3, 4, 5, 4, 8), dict(kernel_size=(3, 3, 5), stride=(1, 2, 3), dilation=(1, 2, 1))),
], ids=["single-token", "1d-causal-63", "last-axis-1", "3d-stride-dilation"])
def test_edge_geometries_match_reference(fn, shape, kw, backward_path) -> None:
    torch.manual_seed(1)
    q, k, v = (torch.randn(shape) for _ in range(3))
    rpb = torch.randn(shape[-2], *[2 * x - 1 for x in make_spec("t", shape[1:-2], kw["kernel_size"]).kernel_size])
    got = _grads(fn, q, k, v, "cpu_c", rpb=rpb, **kw)
    ref = _grads(fn, q, k, v, "reference", rpb=rpb, **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=3e-5)


def test_results_do_not_depend_on_thread_count(backward_path) -> None:
    """Work is split by rows, never by reductions, and the fused backward's dQ rows sum their terms
    in chunk order: out, LSE, dQ, dK and dV are bitwise the same for 1 and 3 threads (the bias-table
    gradient sums per-thread slices, so it is only close)."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 11, 13, 3, 16) for _ in range(3))
    rpb = torch.randn(3, 9, 9)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(_grads(na2d, q, k, v, "cpu_c", rpb=rpb, kernel_size=5, dilation=(2, 1)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results[0][:5], results[1][:5]):
        assert torch.equal(a, b)
    torch.testing.assert_close(results[0][5], results[1][5], atol=1e-5, rtol=1e-5)


def test_float64_default_dtype_does_not_leak_into_the_kernel(backward_path) -> None:
    """The kernel's own buffers (bias-gradient slices, the backward's -lse/delta copies) are float32
    whatever torch's default dtype is."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 9, 10, 2, 8) for _ in range(3))
    rpb = torch.randn(2, 5, 5)
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        got = _grads(na2d, q, k, v, "cpu_c", rpb=rpb, kernel_size=3)
        ref = _grads(na2d, q, k, v, "reference", rpb=rpb, kernel_size=3)
    finally:
        torch.set_default_dtype(before)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=3e-5)


def test_concurrent_callers_get_identical_results() -> None:
    """The kernel keeps no global state (scratch is per call and thread), so Python threads may
    call it at once."""
    assert_concurrent_calls_identical("cpu_c", torch.randn(1, 12, 10, 2, 16))


def _problem(**kw) -> Problem:
    base = dict(spec=make_spec("na2d", (14, 14), 7), batch=1, heads=2, heads_kv=2, dim=32, dim_v=32,
                dtype=torch.float32, device=torch.device("cpu"), scale=0.2)
    return Problem(**{**base, **kw})


def test_selection_and_refusals() -> None:
    assert select_backend(_problem()).name == "cpu_c"
    assert select_backend(_problem(dtype=torch.bfloat16)).name == "cpu_c"  # computed in float32
    for p, words in [(_problem(dtype=torch.float64), "float64 uses `cpu`"),
                     (_problem(dim=12), "multiples of 8"),
                     (_problem(has_attn_bias=True), "attn_bias")]:
        reason = why_not("cpu_c", p)
        assert reason is not None and words in reason
        assert select_backend(p).name != "cpu_c"
    big = _problem(spec=make_spec("na2d", (40, 40), 25))  # 625-key windows: dense GEMMs win
    assert select_backend(big).name == "torch" and select_backend(big, "cpu_c").name == "cpu_c"


def test_half_inputs_are_computed_in_float32() -> None:
    q = torch.randn(1, 9, 9, 2, 16)
    out = na2d(q.bfloat16(), q.bfloat16(), q.bfloat16(), 3, backend="cpu_c")
    ref = na2d(q.bfloat16().float(), q.bfloat16().float(), q.bfloat16().float(), 3, backend="reference")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


def _fresh_library(monkeypatch) -> None:
    """Forget the loaded library so the next call rebuilds (or fails) under the patched environment."""
    monkeypatch.setattr(cpu_c, "_LIB", None)
    monkeypatch.setattr(cpu_c, "_LIB_ERROR", None)


def test_without_a_compiler_the_package_falls_back(monkeypatch) -> None:
    _fresh_library(monkeypatch)
    monkeypatch.setattr(cpu_c, "_compiler", lambda: None)
    reason = why_not("cpu_c")
    assert reason is not None and "no C compiler found" in reason and "set CC" in reason
    assert select_backend(_problem()).name in ("cpu", "torch")
    q = torch.randn(1, 8, 8, 2, 16)
    torch.testing.assert_close(na2d(q, q, q, 3), na2d(q, q, q, 3, backend="reference"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend='cpu_c' cannot serve this call: no C compiler"):
        na2d(q, q, q, 3, backend="cpu_c")


def test_a_failing_compiler_is_reported_with_its_output(monkeypatch, tmp_path) -> None:
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fakecc 1.0; exit 0; fi\n"
                    "echo 'fakecc: error: no vectors today' >&2\nexit 1\n")
    fake.chmod(0o755)
    _fresh_library(monkeypatch)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("VISATTN_CACHE_DIR", str(tmp_path / "cache"))
    reason = why_not("cpu_c")
    assert reason is not None and "building the C kernel failed" in reason and "no vectors today" in reason
    assert not list((tmp_path / "cache").glob("na_cpu-*"))  # nothing half-written left in the cache


def test_build_is_cached_on_disk(monkeypatch, tmp_path) -> None:
    """A second process (here: a forgotten library) finds the shared library in the cache instead
    of compiling again."""
    monkeypatch.setenv("VISATTN_CACHE_DIR", str(tmp_path))
    _fresh_library(monkeypatch)
    assert why_not("cpu_c") is None
    built = list(tmp_path.glob("na_cpu-*"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    _fresh_library(monkeypatch)
    monkeypatch.setattr(cpu_c.subprocess, "run", _no_compile(cpu_c.subprocess.run))
    assert why_not("cpu_c") is None and built[0].stat().st_mtime_ns == stamp


def _no_compile(run):
    def guarded(cmd, *a, **kw):
        assert "--version" in cmd, f"compiled again: {cmd}"
        return run(cmd, *a, **kw)
    return guarded
