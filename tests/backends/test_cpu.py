"""The fused numba ``cpu`` backend beyond the shared parity sweep (which runs it automatically):
relative positional bias and its gradient, gradcheck in float64, half inputs, bounds-checked
kernels, dispatch (auto-selection, refusals, numba missing) and thread control."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from brute import assert_concurrent_calls_identical
from cases import Case
from oracle import GRAD_TOL, TOL, oracle
from visattn import NeighborhoodAttention2D, neighborhood_attention
from visattn.backends import Problem, select_backend, why_not
from visattn.backends.cpu_numba import CpuBackend
from visattn.spec import make_spec

pytest.importorskip("numba", reason="the cpu backend needs numba (pip install 'visattn[cpu]')")

# (case, whether to add a bias) chosen to hit every table path: dilation (group-major order),
# stride, causal, variable resolution (requested kernel > axis), GQA, rank 1-3.
BIAS_CASES = [
    Case((15,), (5,), (2,), (2,), (False,)),
    Case((9, 11), (3, 5), (1, 2), (2, 1), (True, False)),
    Case((5, 12), (7, 3), (1, 1), (1, 3)),  # requested 7 > 5: window is the whole axis
    Case((4, 6, 5), (3, 3, 3), (1, 2, 1), (1, 1, 2), (False, True, False), heads=4, heads_kv=2),
]


def _with_bias(case: Case, dtype: torch.dtype, backend: str, seed: int = 3):
    torch.manual_seed(seed)
    q, k, v, _, _ = case.make(dtype)
    rk = case.kernel_size
    rpb = (torch.randn(case.heads, *(2 * x - 1 for x in rk), dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    out, lse = neighborhood_attention(q, k, v, **case.kwargs(), rpb=rpb, backend=backend, return_lse=True)
    g = torch.Generator().manual_seed(7)
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    d_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    loss = (out.double() * d_out).sum() + (lse.double() * d_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v, rpb))
    return out, lse, grads


def _assert_matches_reference(case: Case, dtype: torch.dtype) -> None:
    """Output, LSE and the gradients of q, k, v and the bias against the float64 reference."""
    out, lse, grads = _with_bias(case, dtype, "cpu")
    r_out, r_lse, r_grads = _with_bias(case, torch.float64, "reference")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), r_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), r_lse, atol=atol, rtol=rtol)
    gatol, grtol = GRAD_TOL[dtype]
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), grads, r_grads):
        torch.testing.assert_close(a.double(), b, atol=gatol, rtol=grtol, msg=lambda m: f"{name}: {m}")


# The shared sweep uses tiny head dims; these cover the vector paths of real ones: eight-key groups
# (D <= 32), four-key groups (D > 32), vector remainders (D, Dv not multiples of 16), and windows
# whose flattened key list leaves 8/4/1 remainders (15, 11 and 45 keys).
WIDE_CASES = [
    Case((6, 9), (3, 5), (1, 1), (1, 2), batch=1, heads=2, dim=40, dim_v=33),
    Case((13,), (11,), (1,), (1,), (True,), batch=1, heads=2, heads_kv=1, dim=32),
    Case((4, 5, 6), (1, 3, 5), (1, 1, 2), (1, 1, 1), (False, False, True), batch=1, heads=1, dim=64, dim_v=24),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", WIDE_CASES, ids=str)
def test_real_head_dims_forward_and_gradients_match_reference(case: Case, dtype: torch.dtype) -> None:
    _assert_matches_reference(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", BIAS_CASES, ids=str)
def test_rpb_forward_and_gradients_match_reference(case: Case, dtype: torch.dtype) -> None:
    _assert_matches_reference(case, dtype)


@pytest.mark.parametrize("case", [
    Case((7,), (3,), (1,), (2,), (True,), batch=1, heads=2, heads_kv=1, dim=3, dim_v=2),
    Case((5, 4), (3, 2), (2, 1), (1, 2), (False, True), batch=1, heads=1, dim=3),
    Case((3, 4, 3), (2, 3, 2), batch=1, heads=1, dim=2),
], ids=str)
def test_gradcheck_float64(case: Case) -> None:
    q, k, v, _, _ = case.make(torch.float64)
    rpb = (0.3 * torch.randn(case.heads, *(2 * x - 1 for x in case.kernel_size), dtype=torch.float64)).requires_grad_()

    def f(q, k, v, rpb):
        out, lse = neighborhood_attention(q, k, v, **case.kwargs(), rpb=rpb, backend="cpu", return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v, rpb), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_half_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    case = Case((9, 8), (3, 5), (1, 2), (2, 1), (False, True))
    q, k, v, _, _ = case.make(dtype)
    out, lse = neighborhood_attention(q, k, v, **case.kwargs(), backend="cpu", return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = oracle(q, k, v, **case.kwargs())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=rtol)
    out.float().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()


def test_module_with_rel_pos_bias_matches_torch_backend() -> None:
    torch.manual_seed(0)
    mods = {}
    for be in ("cpu", "torch"):
        torch.manual_seed(0)
        mods[be] = NeighborhoodAttention2D(16, 2, kernel_size=5, dilation=2, rel_pos_bias=True, backend=be).double()
    x = torch.randn(2, 11, 12, 16, dtype=torch.float64)
    outs = {be: m(x) for be, m in mods.items()}
    torch.testing.assert_close(outs["cpu"], outs["torch"], atol=1e-10, rtol=1e-8)
    for be in outs:
        outs[be].square().sum().backward()
    torch.testing.assert_close(mods["cpu"].rpb.grad, mods["torch"].rpb.grad, atol=1e-9, rtol=1e-7)


def test_selected_automatically_for_cpu_tensors_and_refusals_route_elsewhere() -> None:
    case = Case((8, 8), (3, 3))
    q, k, v, _, _ = case.make(torch.float32, requires_grad=False)
    # float64: float32 goes to the C kernels when a compiler exists (tests/backends/test_cpu_c.py)
    p = Problem(spec=make_spec("t", (8, 8), 3), batch=2, heads=2, heads_kv=2, dim=8, dim_v=8,
                dtype=torch.float64, device=torch.device("cpu"), scale=0.3)
    assert select_backend(p).name == "cpu"
    # Very large windows are dense-GEMM territory: the torch backend is chosen, cpu stays forceable.
    big = Problem(**{**p.__dict__, "spec": make_spec("t", (40, 40), 31)})
    assert select_backend(big).name == "torch" and select_backend(big, "cpu").name == "cpu"
    bias = torch.randn(2, 8, 8, 2, 9)
    with pytest.raises(ValueError, match="attn_bias"):
        neighborhood_attention(q, k, v, 3, attn_bias=bias, backend="cpu")
    # Automatic dispatch serves the same call with another backend, correctly.
    got = neighborhood_attention(q, k, v, 3, attn_bias=bias)
    want = neighborhood_attention(q, k, v, 3, attn_bias=bias, backend="reference")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-4)
    assert "CPU tensors only" in CpuBackend().refuse(Problem(**{**p.__dict__, "device": torch.device("meta")}))


def test_missing_numba_makes_backend_unavailable_and_torch_serves_cpu(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    reason = why_not("cpu")
    assert reason is not None and "pip install 'visattn[cpu]'" in reason
    case = Case((6, 7), (3, 3))
    q, k, v, _, _ = case.make(torch.float32, requires_grad=False)
    out = neighborhood_attention(q, k, v, 3)  # must still work, on the portable backend
    torch.testing.assert_close(out.double(), oracle(q, k, v, **case.kwargs())[0], atol=2e-5, rtol=2e-4)


def test_numba_threads_follow_torch() -> None:
    import numba

    q = torch.randn(1, 6, 6, 1, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        neighborhood_attention(q, q, q, 3, backend="cpu")
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    neighborhood_attention(q, q, q, 3, backend="cpu")
    assert numba.get_num_threads() == min(before, numba.config.NUMBA_NUM_THREADS)


def test_small_sweep_with_bounds_checking(tmp_path, request) -> None:
    """Kernels compiled with NUMBA_BOUNDSCHECK=1 in a subprocess: any out-of-bounds read raises.

    The bounds-checked build is cached under pytest's cache dir, so only the first run compiles.
    It runs on numba's "omp" pool: the "workqueue" pool the backend uses by default drops
    exceptions raised inside parallel loops, which would hide the IndexError.
    """
    cache = request.config.cache.mkdir("numba-boundscheck") if request.config.cache else tmp_path
    script = textwrap.dedent("""
        import torch
        from cases import CASES
        from test_parity import run_parity
        for case in CASES[::3] + CASES[-1:]:
            run_parity("cpu", case, torch.float64)
        print("ok")
    """)
    here = os.path.dirname(__file__)
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(cache), "NUMBA_THREADING_LAYER": "omp",
           "PYTHONPATH": os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_concurrent_callers_get_identical_results() -> None:
    """Python threads may call the op at once (e.g. a server); launches are serialized, results
    stay deterministic."""
    assert_concurrent_calls_identical("cpu", torch.randn(1, 10, 9, 2, 8, dtype=torch.float64))
