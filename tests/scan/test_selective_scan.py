"""visattn.selective_scan against the sequential reference (every output and gradient), gradcheck,
mamba-ssm's own reference when it is installed, dtypes, torch.compile, memory linear in L, errors."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from visattn import selective_scan
from visattn.scan import selective_scan_reference
from visattn.scan.ops import CHUNK, why_not

CPU_KERNEL = pytest.mark.skipif(why_not("cpu", torch.device("cpu"), torch.float32) is not None,
                                reason="the C kernel cannot be built here (no C compiler)")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch=2, dim=12, length=70, state=5, groups=None, dtype=torch.float64, seed=0, D=True, z=True,
                bias=True):
    """Random arguments in mamba-ssm's shapes; ``A < 0`` as every Mamba layer has (``-exp(A_log)``)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bc = (batch, state, length) if groups is None else (batch, groups, state, length)
    return dict(u=r(batch, dim, length), delta=0.5 * r(batch, dim, length),
                A=-torch.rand(dim, state, generator=g, dtype=dtype) * 2 - 0.1, B=r(*bc), C=r(*bc),
                D=r(dim) if D else None, z=r(batch, dim, length) if z else None,
                delta_bias=0.3 * r(dim) if bias else None)


def positive_steps(args: dict) -> dict:
    """``delta`` and ``delta_bias`` made positive, for float32 comparisons without softplus: a negative
    step grows the state exponentially, where float32 itself loses the digits."""
    return {k: (v.abs() if k in ("delta", "delta_bias") and v is not None else v) for k, v in args.items()}


def outputs_and_grads(fn, args: dict, softplus: bool = True, seed: int = 1):
    """``out``, ``last_state`` and the gradient of every tensor argument under random projections of both."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in args.items()}
    out, last = fn(**leaves, delta_softplus=softplus, return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64)
    loss = (out.double() * w_out).sum() + (last.double() * w_last).sum()
    wanted = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in wanted])
    return out, last, dict(zip(wanted, grads))


def assert_matches(got, want, atol, rtol):
    (out, last, grads), (out_r, last_r, grads_r) = got, want
    torch.testing.assert_close(out.double(), out_r.double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(last.double(), last_r.double(), atol=atol, rtol=rtol)
    assert grads.keys() == grads_r.keys()
    for k in grads:
        scale = grads_r[k].abs().max().item() + 1e-12  # dA, dD, ddelta_bias are sums over batch and L
        torch.testing.assert_close(grads[k].double() / scale, grads_r[k].double() / scale, atol=atol, rtol=rtol,
                                   msg=lambda m: f"d{k}: {m}")


CASES = [
    dict(),                                              # everything, one group, L not a multiple of the chunk
    dict(groups=3),                                      # grouped B, C
    dict(D=False, z=False, bias=False),                  # the bare recurrence
    dict(length=1, state=1),                             # one token, one state
    dict(length=CHUNK, dim=8, state=16),                 # exactly one chunk, one vector of channels
    dict(length=2 * CHUNK + 1, dim=21, groups=3),        # a one-token last chunk, 7 channels per group
    dict(batch=1, dim=3, length=5, state=2, groups=3),   # one channel per group
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("softplus", [True, False])
def test_torch_path_matches_the_sequential_reference_in_float64(case, softplus):
    args = make_inputs(**case)
    want = outputs_and_grads(selective_scan_reference, args, softplus)
    got = outputs_and_grads(lambda **a: selective_scan(**a, backend="torch"), args, softplus)
    assert_matches(got, want, atol=1e-10, rtol=1e-9)


@CPU_KERNEL
@pytest.mark.parametrize("case", CASES + [dict(state=16, dim=40, length=90)],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("softplus", [True, False])
def test_cpu_kernel_matches_the_float64_reference(case, softplus):
    """The kernel computes in float32: compared with the float64 reference at float32 tolerances."""
    args = make_inputs(**case) if softplus else positive_steps(make_inputs(**case))
    want = outputs_and_grads(selective_scan_reference, args, softplus)
    args32 = {k: (v.float() if v is not None else None) for k, v in args.items()}
    got = outputs_and_grads(lambda **a: selective_scan(**a, backend="cpu"), args32, softplus)
    assert got[0].dtype == torch.float32
    assert_matches(got, want, atol=2e-5, rtol=1e-4)


@CPU_KERNEL
def test_cpu_kernel_equals_the_torch_path_in_float32_and_any_thread_count():
    """Same float32 inputs: the kernel agrees with the chunked scan; its results do not depend on the
    thread count (the work partition depends on the shapes only)."""
    args = {k: (v.float() if v is not None else None) for k, v in make_inputs(dim=70, groups=2, length=150).items()}
    torch_path = outputs_and_grads(lambda **a: selective_scan(**a, backend="torch"), args)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            runs.append(outputs_and_grads(lambda **a: selective_scan(**a, backend="cpu"), args))
    finally:
        torch.set_num_threads(before)
    assert_matches(runs[0], torch_path, atol=1e-5, rtol=1e-4)
    assert_matches(runs[0], runs[1], atol=0, rtol=0)


def test_gradcheck_and_gradgradcheck():
    """Every argument, float64, through the custom ops (double backward differentiates the torch path)."""
    fn = lambda *a: selective_scan(*a, delta_softplus=True, return_last_state=True)  # noqa: E731
    args = make_inputs(batch=1, dim=4, length=9, state=3, groups=2)
    assert torch.autograd.gradcheck(fn, [args[k].requires_grad_() for k in NAMES])
    args = make_inputs(batch=1, dim=2, length=3, state=2, groups=2)
    assert torch.autograd.gradgradcheck(fn, [args[k].requires_grad_() for k in NAMES])


def _mamba_reference():
    """mamba-ssm's pure-PyTorch ``selective_scan_ref``. Its module imports the CUDA extension at the
    top, which a CPU-only install (``MAMBA_SKIP_CUDA_BUILD=TRUE``) does not have: an empty stand-in
    lets the import reach the function, which never calls it."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    interface = pytest.importorskip(
        "mamba_ssm.ops.selective_scan_interface",
        reason="mamba-ssm is not installed (MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install mamba-ssm)")
    return interface.selective_scan_ref


@pytest.mark.parametrize("groups", [None, 3])
@pytest.mark.parametrize("softplus", [True, False])
def test_matches_mamba_ssm_selective_scan_ref(groups, softplus):
    reference = _mamba_reference()
    args = make_inputs(groups=groups, dtype=torch.float32, length=100)
    args = args if softplus else positive_steps(args)
    want = outputs_and_grads(reference, args, softplus)
    for backend in ("torch", "cpu"):
        if why_not(backend, torch.device("cpu"), torch.float32) is None:
            got = outputs_and_grads(lambda **a: selective_scan(**a, backend=backend), args, softplus)
            assert_matches(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_half_inputs_are_computed_in_float32(backend):
    """bfloat16 ``u, delta, z`` with float32 weights (a Mamba layer under autocast): ``out`` and the
    gradients come back in each argument's dtype, close to the float32 computation."""
    args = make_inputs(dtype=torch.float32, length=40)
    half = {k: (v.bfloat16() if k in ("u", "delta", "z") else v) for k, v in args.items()}
    got = outputs_and_grads(lambda **a: selective_scan(**a, backend=backend), half)
    want = outputs_and_grads(lambda **a: selective_scan(**a, backend="torch"),
                             {k: (v.float() if v is not None else None) for k, v in half.items()})
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert got[2]["u"].dtype == torch.bfloat16 and got[2]["A"].dtype == torch.float32
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


def test_output_layout_and_empty_sequence():
    """``out`` is a view of channels-last memory (what the mixers consume); L = 0 is an empty scan."""
    args = make_inputs(dtype=torch.float32)
    out = selective_scan(**args)
    assert out.shape == args["u"].shape and out.transpose(1, 2).is_contiguous()
    empty = {k: (v[..., :0] if k in ("u", "delta", "z", "B", "C") else v) for k, v in args.items()}
    out, last = selective_scan(**empty, return_last_state=True)
    assert out.shape == (2, 12, 0) and torch.equal(last, torch.zeros(2, 12, 5))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_backward_memory_is_linear_in_length(backend):
    """What autograd keeps for the backward: the inputs and one state per chunk, never the
    ``[batch, L, dim, N]`` states (which would be N times the input)."""
    if why_not(backend, torch.device("cpu"), torch.float32):
        pytest.skip(why_not(backend, torch.device("cpu"), torch.float32))
    saved = []
    args = {k: (v.float().requires_grad_() if v is not None else None)
            for k, v in make_inputs(dim=16, length=10 * CHUNK, state=16).items()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        selective_scan(**args, delta_softplus=True)
    inputs = sum(v.numel() for v in args.values())
    states = 2 * 10 * 16 * 16  # batch * chunks * N * dim
    assert sum(saved) == inputs + states


def test_compile_fullgraph_matches_eager():
    """One custom op in the graph (fake impls, no graph break), forward and backward as in eager, and
    dynamic lengths without a recompile per length."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def f(u, delta, A, B, C, D, z, delta_bias):
        out, last = selective_scan(u, delta, A, B, C, D, z, delta_bias, True, True)
        return out.sin().sum() + last.cos().sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    for length in (40, 47, 53):
        args = [t.float().requires_grad_() for t in make_inputs(length=length, groups=2).values()]
        got = torch.autograd.grad(compiled(*args), args)
        want = torch.autograd.grad(f(*args), args)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def test_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake impl against the real shapes and strides, autograd registration."""
    args = [t.float().requires_grad_() for t in make_inputs(length=20).values()]
    torch.library.opcheck(torch.ops.visattn.selective_scan_fwd.default, (*args, True, "", CHUNK, True))


def test_flop_counter_counts_the_papers_formula():
    from torch.utils.flop_counter import FlopCounterMode

    args = make_inputs(dtype=torch.float32)
    counter = FlopCounterMode(display=False)
    with counter:
        selective_scan(**args)
    batch, dim, length, state = 2, 12, 70, 5
    assert counter.get_total_flops() == 9 * batch * length * dim * state + 2 * batch * dim * length


@pytest.mark.parametrize("change, match", [
    (dict(u=torch.randn(2, 12)), r"u has shape \(2, 12\); expected \[batch, dim, L\]"),
    (dict(delta=torch.randn(2, 12, 71)), r"delta has shape \(2, 12, 71\) but u has \(2, 12, 70\)"),
    (dict(A=torch.randn(11, 5)), r"A has shape \(11, 5\); expected \[dim, N\] = \[12, N\]"),
    (dict(B=torch.randn(2, 5, 5, 70)), r"B has 5 groups, which do not divide dim=12"),
    (dict(C=torch.randn(2, 4, 70)), r"C has shape \(2, 4, 70\); expected \[2, 5, 70\]"),
    (dict(B=torch.randn(12, 5)), r"Time-invariant \[dim, N\] matrices are not supported"),
    (dict(D=torch.randn(3)), r"D has shape \(3,\); expected \[dim\] = \[12\]"),
    (dict(z=torch.randn(2, 12, 70, dtype=torch.float64)), r"z.dtype=torch.float64 but u.dtype=torch.float32"),
    (dict(A=torch.randn(12, 5, dtype=torch.complex64)), r"A is complex"),
    (dict(delta=torch.ones(2, 12, 70, dtype=torch.int64)), r"delta.dtype=torch.int64"),
])
def test_bad_arguments_raise_clear_errors(change, match):
    args = {**make_inputs(dtype=torch.float32), **change}
    with pytest.raises((TypeError, ValueError), match=match):
        selective_scan(**args)


def test_a_forced_backend_that_cannot_serve_says_why():
    with pytest.raises(ValueError, match="backend='cpu' cannot serve this call: it computes in float32, this call "
                                         "in torch.float64"):
        selective_scan(**make_inputs(), backend="cpu")
    with pytest.raises(ValueError, match="backend='cuda' cannot serve this call: no selective-scan path"):
        selective_scan(**make_inputs(), backend="cuda")
