"""Triton backend: window tables, availability reporting, and kernel parity with the oracle.

The kernels are checked two ways:

* on a CUDA GPU (``@pytest.mark.gpu``): the whole shared sweep in fp32/fp16/bf16, plus the
  relative positional bias;
* without a GPU: a few tiny cases run in Triton's CPU interpreter. Triton decides whether to
  interpret when the kernels are *defined*, so those tests run in a subprocess started with
  ``TRITON_INTERPRET=1`` (``test_interpreter_sweep``); inside it, the ``test_interp_*`` tests run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import visattn
from cases import CASES, Case
from oracle import GRAD_TOL, TOL
from parity import run_parity
from visattn import neighborhood_attention
from visattn.backends import select_backend, why_not
from visattn.backends.base import Problem
from visattn.backends.triton.backend import _axis_table, _triton_missing
from visattn.spec import axis_windows, make_spec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRET or _triton_missing() is not None,
    reason="runs inside test_interpreter_sweep's subprocess (TRITON_INTERPRET=1 must be set before "
           "the kernels are defined)")
needs_triton = pytest.mark.skipif(_triton_missing() is not None, reason=str(_triton_missing()))


# --- host side: no triton needed -------------------------------------------------------------

AXES = [(9, 3, 1, 1, False), (13, 4, 2, 2, True), (16, 3, 3, 5, False), (17, 6, 1, 2, False),
        (33, 7, 7, 1, True), (19, 6, 5, 3, False), (12, 4, 4, 1, False), (7, 2, 2, 3, True), (8, 8, 8, 1, False)]


@pytest.mark.parametrize("axis", AXES, ids=str)
def test_axis_table_matches_windows(axis):
    """Each key's [qmin, qmax] is exactly the set of same-group queries whose window holds it."""
    L, k, s, d, c = axis
    w = axis_windows(L, k, s, d, c)
    lo, hi, qmin, qmax = _axis_table(L, k, s, d, c).long()
    assert torch.equal(lo, w.lo) and torch.equal(hi, w.hi)
    for y in range(L):
        t = y // d
        seers = [x // d for x in range(y % d, L, d) if w.lo[x] <= t <= w.hi[x]]
        if seers:
            assert (int(qmin[y]), int(qmax[y])) == (min(seers), max(seers))
            assert seers == list(range(min(seers), max(seers) + 1))  # contiguous, as the kernel assumes
        else:
            assert qmin[y] > qmax[y]


def _problem(device: str = "cpu", dtype=torch.float32, **kw) -> Problem:
    spec = make_spec("test", (8, 8), 3)
    base = dict(spec=spec, batch=1, heads=2, heads_kv=2, dim=16, dim_v=16, dtype=dtype,
                device=torch.device(device), scale=0.25)
    base.update(kw)
    return Problem(**base)


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRET, reason="checks the no-GPU report")
def test_reports_why_unavailable_without_gpu(capsys):
    """Without a GPU (or without triton) the backend says why, and `visattn info` shows it."""
    reason = why_not("triton")
    assert reason is not None and ("CUDA" in reason or "triton is not installed" in reason)
    # Automatic selection still works on the other backends.
    assert select_backend(_problem()).name != "triton"
    from visattn.cli import info

    info.run(None)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("triton"))
    assert "unavailable" in line and reason in line


# --- interpreter (CPU) -----------------------------------------------------------------------

# Tiny, so the interpreter finishes within seconds each; together they cover every axis feature.
INTERP_CASES = [
    Case((9,), (3,), batch=1, dim=16),
    Case((13,), (4,), (2,), (2,), (True,), batch=1, heads=2, heads_kv=1, dim=16),
    Case((10,), (5,), (1,), (1,), (False,), batch=1, dim=16, extra=3),
    Case((7, 6), (3, 4), (1, 2), (2, 1), (False, True), batch=1, dim=16),
    Case((8, 8), (4, 4), (4, 4), batch=1, heads=1, dim=16),
    Case((9, 7), (5, 3), (2, 3), (1, 2), batch=1, heads=1, dim=16, dim_v=24),
    Case((4, 5, 3), (3, 3, 2), (1, 2, 1), (1, 1, 1), (True, False, False), batch=1, dim=16),
    Case((5, 4, 4), (2, 3, 2), (2, 1, 1), (2, 1, 2), batch=1, heads=2, heads_kv=1, dim=16),
]


@needs_triton
@pytest.mark.skipif(INTERPRET, reason="this is the parent of the interpreter run")
def test_interpreter_sweep():
    """Run the ``test_interp_*`` tests in Triton's CPU interpreter, in a fresh process."""
    src = os.path.dirname(os.path.dirname(visattn.__file__))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "interp_"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"interpreter tests failed:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    assert " passed" in res.stdout and " failed" not in res.stdout


@needs_interpreter
@pytest.mark.parametrize("case", INTERP_CASES, ids=str)
def test_interp_parity(case: Case):
    """Forward (out, LSE) and backward (dQ, dK, dV, extra KV, gradient into LSE) vs the oracle."""
    run_parity("triton", case, torch.float32)


@needs_interpreter
def test_interp_parity_fp16():
    run_parity("triton", INTERP_CASES[3], torch.float16)


def _rpb_check(device: str, dtype: torch.dtype) -> None:
    """Relative positional bias: forward and all gradients (q, k, v, rpb) match the reference in fp64."""
    g = torch.Generator().manual_seed(3)
    shape, kw = (1, 6, 8, 2, 16), dict(kernel_size=(3, 4), dilation=(2, 1), stride=(1, 2), is_causal=(False, False))
    leaves = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]
    leaves.append(torch.randn(2, 5, 7, generator=g, dtype=torch.float64))
    mine = [t.to(device, dtype).requires_grad_() for t in leaves]
    ref = [t.clone().requires_grad_() for t in leaves]
    out, lse = neighborhood_attention(*mine[:3], **kw, rpb=mine[3], backend="triton", return_lse=True)
    r_out, r_lse = neighborhood_attention(*ref[:3], **kw, rpb=ref[3], backend="reference", return_lse=True)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), r_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double().cpu(), r_lse, atol=atol, rtol=rtol)
    d_out = torch.randn(r_out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * d_out.to(device)).sum() + lse.double().sum(), mine)
    r_grads = torch.autograd.grad((r_out * d_out).sum() + r_lse.sum(), ref)
    gatol, grtol = GRAD_TOL[dtype]
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), grads, r_grads):
        torch.testing.assert_close(a.double().cpu(), b, atol=gatol, rtol=grtol, msg=lambda m, name=name: f"{name}: {m}")


@needs_interpreter
def test_interp_rpb():
    _rpb_check("cpu", torch.float32)


@needs_interpreter
def test_interp_through_the_library_ops_and_compile():
    """The kernels run behind the library's own custom ops (no Triton-private ops): ``opcheck`` passes
    with ``backend="triton"`` and ``torch.compile(fullgraph=True)`` traces forward and backward."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 16, generator=g).requires_grad_() for _ in range(3))
    args = (q, k, v, None, None, None, [3], [1], [1], [False], 0.25, "triton", False)
    # test_aot_dispatch_dynamic is left out: the torch.compile check below covers tracing.
    torch.library.opcheck(torch.ops.visattn.na_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def f(q, k, v):
        out, lse = neighborhood_attention(q, k, v, 3, backend="triton", return_lse=True)
        return out.sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@needs_interpreter
def test_interp_dispatch():
    """On CPU the interpreter is only used when forced; unsupported features are refused, not faked."""
    assert select_backend(_problem()).name != "triton"
    assert "float64" in why_not("triton", _problem(dtype=torch.float64))
    for flag in ("has_attn_bias", "has_key_padding_mask", "return_attn"):
        assert why_not("triton", _problem(**{flag: True})) is not None
    q = torch.randn(1, 6, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton' cannot serve this call: dtype torch.float64"):
        neighborhood_attention(q, q, q, 3, backend="triton")


# --- GPU code generation without a GPU --------------------------------------------------------

def _compile(kind: str, arch: int, dtype: str, cfg, dim: int = 64, warps: int = 4):
    """Lower one kernel to a cubin for ``sm_<arch>`` with Triton's bundled LLVM and ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from visattn.backends.triton import kernels as tk
    from visattn.backends.triton.backend import _meta

    fn = {"fwd": tk.na_fwd_kernel, "dq": tk.na_bwd_dq_kernel, "dkdv": tk.na_bwd_dkdv_kernel}[kind]
    consts = dict(HEAD_DIM=dim, HEAD_DIM_V=dim, BLOCK_D=dim, BLOCK_DV=dim, HAS_RPB=True,
                  PREC="tf32x3" if dtype == "fp32" else "tf32", **_meta(cfg))
    ptr = {**dict.fromkeys(("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "RPB"), f"*{dtype}"),
           **dict.fromkeys(("LSE", "DELTA", "DRPB"), "*fp32"), **dict.fromkeys(("TAB0", "TAB1", "TAB2"), "*i32")}
    sig = {a: "constexpr" if a in consts else ptr.get(a, "fp32" if a == "scale" else "i32") for a in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=2))


@pytest.mark.slow
@needs_triton
@pytest.mark.skipif(INTERPRET, reason="the interpreter replaces the kernels; nothing to compile")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
def test_kernels_compile_for_gpu(kind: str, arch: int):
    """Without a GPU: each kernel lowers to a cubin for Ampere/Hopper, on tensor cores, within the
    shared-memory budget (catches GPU-only errors the interpreter cannot see)."""
    from visattn.backends.triton.backend import _GPU_CONFIGS

    cfg = _GPU_CONFIGS[2][0]
    compiled = _compile(kind, arch, "fp16", cfg if kind != "dkdv" else (cfg[1], cfg[0]))
    ptx = compiled.asm["ptx"]
    assert ("wgmma" in ptx) if arch == 90 else ("mma.sync" in ptx)
    assert compiled.metadata.shared <= (227 if arch == 90 else 163) * 1024


# --- GPU ------------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gpu_parity(case: Case, dtype: torch.dtype):
    run_parity("triton", case, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_gpu_rpb(dtype: torch.dtype):
    _rpb_check("cuda", dtype)


@pytest.mark.gpu
def test_gpu_selected_automatically():
    assert select_backend(_problem("cuda", torch.float16)).name == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [16, 32, 64, 128, 256])
def test_gpu_head_dims(dim: int):
    run_parity("triton", Case((12, 10), (5, 3), (1, 1), (2, 1), batch=1, dim=dim), torch.float16, device="cuda")
