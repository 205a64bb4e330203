"""``na_varlen``'s single launch on the ``cpu`` backend: inference calls run every sample in one
``na_run_many`` call that writes into the packed output, equal to each sample run alone (float32,
bfloat16, float16; mixed sizes including 1x1 and samples smaller than the window; per-sample kernel
sizes, strides, dilations, causal and periodic axes; a shared bias table; ranks 1-3; GQA; head dims
that are not multiples of 8; LSE). Calls that record gradients, force another backend or contain a
sample the cpu backend would not serve take the per-group path, with correct results and gradients.
The same cases run on the bounds-checked build and on the pthreads one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import visattn.varlen
from oracle import TOL
from visattn import na_varlen, neighborhood_attention
from visattn.backends import why_not
from visattn.backends.cpu import build

pytestmark = pytest.mark.skipif(why_not("cpu") is not None, reason=f"cpu unusable here: {why_not('cpu')}")

# (spatial_sizes, heads (q, kv), dims (qk, v), keyword arguments of na_varlen)
CASES = {
    "2d-mixed": ([(1, 1), (5, 7), (2, 3), (9, 4), (5, 7), (12, 10), (9, 4), (9, 4), (3, 17)], (4, 2), (12, 20),
                 dict(kernel_size=5)),
    "2d-per-sample": ([(6, 6), (1, 1), (11, 9), (4, 13), (11, 9), (7, 7)], (2, 2), (16, 16),
                      dict(kernel_size=[3, 5, (3, 5), 3, (7, 3), 5], dilation=[1, 1, (2, 1), (1, 3), 1, 2],
                           stride=[1, 1, 1, (2, 1), (3, 2), 1], is_causal=[False, True, False, (True, False),
                                                                          False, (False, True)])),
    "2d-periodic": ([(7, 6), (5, 9), (1, 1), (8, 8)], (3, 1), (8, 24),
                    dict(kernel_size=3, periodic=[(True, False), True, False, (False, True)])),
    "2d-rpb": ([(6, 5), (4, 8), (6, 5), (2, 2), (13, 7)], (2, 2), (10, 10), dict(kernel_size=(3, 5), dilation=[1, 1, 1, 1, 2])),
    "1d": ([(13,), (4,), (1,), (13,), (30,)], (4, 4), (8, 8), dict(kernel_size=5, dilation=[2, 1, 1, 2, 3])),
    "3d": ([(3, 4, 5), (2, 6, 3), (1, 1, 1), (3, 4, 5)], (2, 1), (8, 5),
           dict(kernel_size=(2, 3, 3), dilation=(1, 2, 1), is_causal=[False, (True, False, False), False, True])),
}
TOLS = {torch.float32: TOL[torch.float32], torch.bfloat16: TOL[torch.bfloat16], torch.float16: TOL[torch.float16]}


def _inputs(name: str, dtype: torch.dtype, seed: int = 0):
    sizes, (h, hk), (d, dv), kw = CASES[name]
    g = torch.Generator().manual_seed(seed)
    total = sum(torch.Size(s).numel() for s in sizes)
    q, k, v = (torch.randn(total, heads, dim, generator=g).to(dtype) for heads, dim in ((h, d), (hk, d), (hk, dv)))
    rpb = None
    if name.endswith("rpb"):
        ks = kw["kernel_size"]
        rpb = torch.randn(h, *(2 * k_ - 1 for k_ in ks), generator=g)
    return sizes, q, k, v, kw, rpb


def _one_by_one(q, k, v, sizes, kw, rpb):
    """The definition: every sample alone through the portable torch backend, in float64."""
    outs, lses, at = [], [], 0
    for i, size in enumerate(sizes):
        n = torch.Size(size).numel()
        sample = [t[at:at + n].double().reshape(1, *size, *t.shape[1:]) for t in (q, k, v)]
        args = {name: (a[i] if isinstance(a, list) else a) for name, a in kw.items()}
        out, lse = neighborhood_attention(*sample, **args, rpb=None if rpb is None else rpb.double(), backend="torch",
                                          return_lse=True)
        outs.append(out.reshape(n, *out.shape[-2:]))
        lses.append(lse.reshape(n, -1))
        at += n
    return torch.cat(outs), torch.cat(lses)


@pytest.fixture
def launches(monkeypatch):
    """Counts ``na_run_many`` launches and per-group ``neighborhood_attention`` calls of na_varlen."""
    seen = {"launches": 0, "groups": 0}
    run_many, per_group = build.run_many, visattn.varlen.neighborhood_attention

    def counting_run_many(*args, **kwargs):
        seen["launches"] += 1
        return run_many(*args, **kwargs)

    def counting_group(*args, **kwargs):
        seen["groups"] += 1
        return per_group(*args, **kwargs)

    monkeypatch.setattr(build, "run_many", counting_run_many)
    monkeypatch.setattr(visattn.varlen, "neighborhood_attention", counting_group)
    return seen


def check_case(name: str, dtype: torch.dtype) -> None:
    """One case through the single launch (asserted by the caller) against the per-sample oracle."""
    sizes, q, k, v, kw, rpb = _inputs(name, dtype)
    with torch.no_grad():
        out, lse = na_varlen(q, k, v, sizes, **kw, rpb=rpb, return_lse=True)
        only_out = na_varlen(q, k, v, sizes, **kw, rpb=rpb)
    ref_out, ref_lse = _one_by_one(q, k, v, sizes, kw, rpb)
    assert out.dtype == dtype and out.shape == ref_out.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=rtol)
    torch.testing.assert_close(only_out, out, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_single_launch_equals_each_sample_alone(name: str, dtype: torch.dtype, launches) -> None:
    check_case(name, dtype)
    assert launches == {"launches": 2, "groups": 0}


def test_float16_and_forced_cpu_backend(launches) -> None:
    sizes, q, k, v, kw, _ = _inputs("2d-mixed", torch.float16)
    with torch.no_grad():
        out = na_varlen(q, k, v, sizes, **kw, backend="cpu")
    ref, _ = _one_by_one(q, k, v, sizes, kw, None)
    assert out.dtype == torch.float16 and launches == {"launches": 1, "groups": 0}
    torch.testing.assert_close(out.double(), ref, atol=TOLS[torch.float16][0], rtol=TOLS[torch.float16][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_strided_views_of_one_qkv_tensor(dtype: torch.dtype, launches) -> None:
    """q, k, v as views of one packed ``[T, 3, H, D]`` projection (not contiguous): one copy each."""
    sizes = [(7, 9), (1, 1), (16, 5)]
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(sum(h * w for h, w in sizes), 3, 2, 16, generator=g).to(dtype)
    q, k, v = qkv.unbind(1)
    with torch.no_grad():
        out = na_varlen(q, k, v, sizes, 3)
    ref, _ = _one_by_one(q, k, v, sizes, dict(kernel_size=3), None)
    assert launches["launches"] == 1
    torch.testing.assert_close(out.double(), ref, atol=TOLS[dtype][0], rtol=TOLS[dtype][1])


def test_results_do_not_depend_on_thread_count() -> None:
    """Forward items are handed out dynamically, but each writes only its own rows."""
    sizes, q, k, v, kw, _ = _inputs("2d-per-sample", torch.bfloat16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                results.append(na_varlen(q, k, v, sizes, **kw, return_lse=True))
    finally:
        torch.set_num_threads(threads)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def test_gradients_take_the_per_group_path(launches) -> None:
    sizes, q, k, v, kw, rpb = _inputs("2d-rpb", torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
    out, lse = na_varlen(*leaves[:3], sizes, **kw, rpb=leaves[3], return_lse=True)
    assert launches["launches"] == 0 and launches["groups"] == 4  # (6, 5) twice: one group
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, rpb)]
    ref_out, ref_lse = _one_by_one(*ref_leaves[:3], sizes, kw, ref_leaves[3])
    g = torch.Generator().manual_seed(1)
    w, wl = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    got = torch.autograd.grad((out * w).sum() + (lse * wl).sum(), leaves)
    want = torch.autograd.grad((ref_out * w.double()).sum() + (ref_lse * wl.double()).sum(), ref_leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-3)
    # The same call without gradients is one launch and gives the same values.
    with torch.no_grad():
        out2 = na_varlen(q, k, v, sizes, **kw, rpb=rpb)
    assert launches["launches"] == 1
    torch.testing.assert_close(out2, out.detach(), atol=1e-5, rtol=1e-5)


def test_calls_the_cpu_backend_would_not_serve_take_the_per_group_path(launches) -> None:
    sizes, q, k, v, kw, _ = _inputs("2d-mixed", torch.float32)
    with torch.no_grad():
        forced = na_varlen(q, k, v, sizes, **kw, backend="torch")
        assert launches == {"launches": 0, "groups": 6}
        assert na_varlen(q.double(), k.double(), v.double(), sizes, **kw).dtype == torch.float64
        assert launches == {"launches": 0, "groups": 12}
        # A 23x23 window (529 keys) goes to the torch backend's GEMMs: the whole call runs per group.
        big_sizes, big_kw = [(5, 7), (24, 25), (1, 1)], dict(kernel_size=[5, 23, 5])
        g = torch.Generator().manual_seed(2)
        qb, kb, vb = (torch.randn(5 * 7 + 24 * 25 + 1, 2, 8, generator=g) for _ in range(3))
        big = na_varlen(qb, kb, vb, big_sizes, **big_kw)
        assert launches == {"launches": 0, "groups": 15}
    ref, _ = _one_by_one(q, k, v, sizes, kw, None)
    torch.testing.assert_close(forced.double(), ref, atol=1e-5, rtol=1e-5)
    ref_big, _ = _one_by_one(qb, kb, vb, big_sizes, big_kw, None)
    torch.testing.assert_close(big.double(), ref_big, atol=1e-5, rtol=1e-5)


def test_transforms_compile_and_dispatch_modes_take_the_per_group_path(launches) -> None:
    sizes, q, k, v, kw, _ = _inputs("1d", torch.float32)
    batched = torch.func.vmap(lambda a, b, c: na_varlen(a, b, c, sizes, **kw))(q[None], k[None], v[None])
    assert launches["launches"] == 0
    with torch.no_grad():
        want = na_varlen(q, k, v, sizes, **kw)
    assert launches["launches"] == 1
    torch.testing.assert_close(batched[0], want, atol=1e-5, rtol=1e-5)
    out, tangent = torch.func.jvp(lambda a, b, c: na_varlen(a, b, c, sizes, **kw), (q, k, v), (q, k, v))
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False):  # a dispatch mode
        counted = na_varlen(q, k, v, sizes, **kw)
        compiled = torch.compile(lambda a, b, c: na_varlen(a, b, c, sizes, **kw), backend="eager")(q, k, v)
    assert launches["launches"] == 1
    for got in (out, counted, compiled):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_requests_are_refused_by_the_entry_point() -> None:
    build.library()
    lib = build._LIB
    one = (build.Args * 1)()
    array = (type(build.ctypes.pointer(one[0])) * 1)(build.ctypes.pointer(one[0]))
    assert lib.na_run_many(array, 1, 1) == 2  # the backward is not multi-problem
    assert lib.na_run_many(array, 0, 0) == 2
    one[0].dt = 7
    assert lib.na_run_many(array, 1, 0) == 2


@pytest.mark.parametrize("build_kind", ["bounds-checked", "pthreads"])
def test_other_builds_run_the_varlen_cases(tmp_path, build_kind: str) -> None:
    """Every case above, both element types, each call one launch, on the kernel built with every
    index checked (an out-of-bounds index aborts the process), and on the build without OpenMP
    (its own threads and barrier: 3 of them), in a subprocess."""
    here = os.path.dirname(os.path.abspath(__file__))
    tests = os.path.dirname(os.path.dirname(here))
    pthreads = build_kind == "pthreads"
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{here!r}, {tests!r}]
        import torch
        from visattn.backends.cpu import build
        if {pthreads!r}:
            build.torch_openmp = lambda: None
            torch.set_num_threads(3)
        import test_cpu_varlen as t
        run_many, seen = build.run_many, []
        build.run_many = lambda *a, **k: seen.append(1) or run_many(*a, **k)
        for name in t.CASES:
            for dtype in (torch.float32, torch.bfloat16):
                t.check_case(name, dtype)
        assert len(seen) == 4 * len(t.CASES), len(seen)
        print("ok")
    """)
    env = {**os.environ, "VISATTN_CACHE_DIR": str(tmp_path), **({} if pthreads else {build.BOUNDS_CHECK_ENV: "1"})}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    built = sorted(tmp_path.glob("na_cpu-*"))
    # only forwards ran, yet both libraries are cached: the process's exit waited for the backward's build
    assert [p.name.rsplit("-", 1)[1] for p in built] == ["bwd.so", "fwd.so"]
    if pthreads and shutil.which("nm"):  # binutils present: the build really is the pthreads one
        symbols = subprocess.run(["nm", "-D", str(built[1])], capture_output=True, text=True).stdout
        assert "GOMP_parallel" not in symbols and "pthread_create" in symbols
