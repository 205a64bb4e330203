"""The fused C ``cpu`` backend beyond the shared parity sweeps (which run it automatically): both
backward paths (fused, two-pass) over the sweep and the per-pair features (attn_bias, key padding
mask, returned weights and their gradients), in float32 and in bfloat16 (its own kernels), real and
odd head dims (zero-padded to the vector width), relative positional bias, float16 inputs,
thread-count independence, concurrent callers, and selection and refusals."""

from __future__ import annotations

import pytest
import torch

from brute import assert_concurrent_calls_identical
from cases import CASES, FEATURE_CASES, Case, FeatureCase
from oracle import GRAD_TOL, TOL, oracle
from parity import run_feature_parity, run_parity
from visattn import NeighborhoodAttention2D, na1d, na2d, na3d, neighborhood_attention
from visattn.backends import Problem, select_backend, why_not
from visattn.backends.cpu import backend as cpu
from visattn.spec import make_spec

pytestmark = pytest.mark.skipif(why_not("cpu") is not None, reason=f"cpu unusable here: {why_not('cpu')}")


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
    monkeypatch.setattr(cpu, "_FUSED_MIN_UNITS", BACKWARD_PATHS[request.param])
    return request.param


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_backward_path_matches_the_oracle(case, dtype, backward_path) -> None:
    """The shared sweep picks a path per geometry (small cases take the two-pass one): here every
    case runs through both, forward and backward, in float32 and in bfloat16 (bf16 kernels: bf16 pair
    dot products, float32 accumulation and softmax statistics; bf16 tolerances of the oracle)."""
    run_parity("cpu", case, dtype)


# Every feature case, cross-grid keys and periodic axes included: the kernels serve them all.
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=str)
def test_features_through_each_backward_path(case: FeatureCase, dtype, backward_path) -> None:
    """rpb, attn_bias, key_padding_mask and the returned weights inside the fused kernels, through
    both backward paths: out, LSE, weights, and the gradients of q, k, v, rpb and attn_bias (those
    flowing through the weights included) against the loop oracle."""
    assert why_not("cpu", _feature_problem(case, dtype)) is None
    run_feature_parity("cpu", case, dtype)


def _feature_problem(case: FeatureCase, dtype: torch.dtype = torch.float32) -> Problem:
    spec = make_spec("t", case.spatial, **case.na, key_spatial=case.key_spatial or None)
    return Problem(spec=spec, batch=case.batch, heads=case.heads, heads_kv=case.heads_kv, dim=case.dim,
                   dim_v=case.dim_v, dtype=dtype, device=torch.device("cpu"), scale=1.0, has_rpb=case.rpb,
                   has_attn_bias=case.bias, has_key_padding_mask=bool(case.mask), return_attn=True)


def test_the_default_problem_takes_the_fused_backward() -> None:
    spec = make_spec("na2d", (56, 56), 7)
    assert cpu._fused_plan(spec, batch=1, heads_kv=4) is not None
    assert cpu._fused_plan(make_spec("na2d", (9, 9), 7), batch=1, heads_kv=2) is None  # one chunk, 2 units


def _with_bias(case: Case, dtype: torch.dtype, backend: str, seed: int = 3):
    torch.manual_seed(seed)
    q, k, v, _, _ = case.make(dtype)
    rpb = (torch.randn(case.heads, *(2 * x - 1 for x in case.kernel_size), dtype=torch.float64) * 0.5).to(dtype)
    rpb.requires_grad_()
    out, lse = neighborhood_attention(q, k, v, **case.kwargs(), rpb=rpb, backend=backend, return_lse=True)
    g = torch.Generator().manual_seed(7)
    loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() + \
        (lse.double() * torch.randn(lse.shape, generator=g, dtype=torch.float64)).sum()
    return out, lse, torch.autograd.grad(loss, (q, k, v, rpb))


# (case, with a bias) chosen to hit every table path: dilation (group-major order), stride, causal,
# variable resolution (requested kernel > axis), GQA, rank 1-3; then real head dims: eight-key
# groups (D <= 32), four-key groups (D > 32), and head dims that are not multiples of the vector
# width (33, 24 -> zero-padded), windows whose flattened key list leaves 8/4/1 remainders.
BIAS_CASES = [
    Case((15,), (5,), (2,), (2,), (False,)),
    Case((9, 11), (3, 5), (1, 2), (2, 1), (True, False)),
    Case((5, 12), (7, 3), (1, 1), (1, 3)),  # requested 7 > 5: window is the whole axis
    Case((4, 6, 5), (3, 3, 3), (1, 2, 1), (1, 1, 2), (False, True, False), heads=4, heads_kv=2),
    Case((6, 9), (3, 5), (1, 1), (1, 2), batch=1, heads=2, dim=40, dim_v=33),
    Case((13,), (11,), (1,), (1,), (True,), batch=1, heads=2, heads_kv=1, dim=32),
    Case((4, 5, 6), (1, 3, 5), (1, 1, 2), (1, 1, 1), (False, False, True), batch=1, heads=1, dim=64, dim_v=24),
    Case((7, 6), (3, 3), batch=1, heads=2, dim=3, dim_v=5),
]


@pytest.mark.parametrize("case", BIAS_CASES, ids=str)
def test_bias_and_head_dims_match_the_reference(case: Case) -> None:
    """Output, LSE and the gradients of q, k, v and the bias table against the float64 reference."""
    out, lse, grads = _with_bias(case, torch.float32, "cpu")
    r_out, r_lse, r_grads = _with_bias(case, torch.float64, "reference")
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out.double(), r_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), r_lse, atol=atol, rtol=rtol)
    gatol, grtol = GRAD_TOL[torch.float32]
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), grads, r_grads):
        torch.testing.assert_close(a.double(), b, atol=gatol, rtol=grtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dims", [(8, 8), (16, 40), (24, 72), (64, 32), (12, 20)], ids=lambda d: f"D{d[0]}-Dv{d[1]}")
def test_head_dims_hit_every_value_block(dims) -> None:
    """Value rows are updated 8, 16, 24 or 32 features per pass: every remainder is exercised, with
    an odd last axis (the second query of the last pair is a discarded duplicate); 12/20 are padded."""
    D, Dv = dims
    torch.manual_seed(0)
    q, k = torch.randn(2, 7, 9, 2, D), torch.randn(2, 7, 9, 2, D)
    v = torch.randn(2, 7, 9, 2, Dv)
    got = _grads(na2d, q, k, v, "cpu", kernel_size=(3, 5))
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
    got = _grads(fn, q, k, v, "cpu", rpb=rpb, **kw)
    ref = _grads(fn, q, k, v, "reference", rpb=rpb, **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("shape,key_spatial,kw", [
    ((2, 24, 20, 4, 16), None, dict(kernel_size=7, dilation=(1, 2), periodic=True)),
    ((1, 9, 23, 2, 8), None, dict(kernel_size=(9, 5), periodic=(True, False), is_causal=(False, True))),
    ((2, 20, 18, 4, 16), (9, 13), dict(kernel_size=7, dilation=(1, 2))),
    ((1, 4, 30, 2, 8), (30, 11), dict(kernel_size=(3, 3), stride=(1, 2))),  # most key rows in no window
    ((1, 12, 10, 2, 8), (12, 7), dict(kernel_size=(3, 7))),
], ids=["periodic-both-dilated", "periodic-kernel-is-axis-causal-other", "coarser-keys-dilated",
        "finer-and-coarser-keys-stride", "kernel-is-key-axis"])
def test_cross_grid_and_periodic_at_larger_sizes_match_reference(shape, key_spatial, kw, backward_path) -> None:
    """Beyond the small feature cases: several colour chunks and segments per line, periodic copies
    on both axes (their gradients folded by the kernel), queries sharing a window (coarser keys) and
    keys no window reaches (finer keys with stride), against the reference, with a bias table."""
    torch.manual_seed(4)
    q = torch.randn(shape)
    kv_shape = (shape[0], *(key_spatial or shape[1:-2]), *shape[-2:])
    k, v = torch.randn(kv_shape), torch.randn(kv_shape)
    ks = kw["kernel_size"] if isinstance(kw["kernel_size"], tuple) else (kw["kernel_size"],) * 2
    rpb = torch.randn(shape[-2], *[2 * x - 1 for x in ks])
    got = _grads(na2d, q, k, v, "cpu", rpb=rpb, **kw)
    ref = _grads(na2d, q, k, v, "reference", rpb=rpb, **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_periodic_and_cross_grid_results_do_not_depend_on_thread_count(dtype, backward_path) -> None:
    """The fold of a periodic key's copies sums them in a fixed order, and cross-grid chunks are cut
    on the key grid: out, LSE, dQ, dK and dV are bitwise the same for 1 and 3 threads."""
    torch.manual_seed(5)
    q = torch.randn(2, 11, 13, 3, 16).to(dtype)
    kc = torch.randn(2, 6, 19, 3, 16).to(dtype)
    before = torch.get_num_threads()
    for k, kw in ((q, dict(kernel_size=5, dilation=(2, 1), periodic=True)), (kc, dict(kernel_size=(3, 5)))):
        results = []
        try:
            for n in (1, 3):
                torch.set_num_threads(n)
                results.append(_grads(na2d, q, k, k, "cpu", **kw))
        finally:
            torch.set_num_threads(before)
        for a, b in zip(results[0], results[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_results_do_not_depend_on_thread_count(dtype, backward_path) -> None:
    """Work is split by rows, never by reductions, and the fused backward's dQ rows sum their terms
    in chunk order: out, LSE, dQ, dK and dV are bitwise the same for 1 and 3 threads (the bias-table
    gradient sums per-thread slices, so it is only close)."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 11, 13, 3, 16).to(dtype) for _ in range(3))
    rpb = torch.randn(3, 9, 9)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(_grads(na2d, q, k, v, "cpu", rpb=rpb, kernel_size=5, dilation=(2, 1)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results[0][:5], results[1][:5]):
        assert torch.equal(a, b)
    torch.testing.assert_close(results[0][5], results[1][5], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_masked_results_do_not_depend_on_thread_count(dtype, backward_path) -> None:
    """With attn_bias, a key padding mask and the weights returned and used, every output and every
    gradient (the attn_bias one is written once per pair, never summed across threads) is bitwise
    the same for 1 and 3 threads."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 11, 13, 3, 16, generator=g).to(dtype) for _ in range(3))
    bias = torch.randn(2, 11, 13, 3, 25, generator=g)
    mask = torch.rand(2, 11, 13, generator=g) < 0.3
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            ts = [t.clone().requires_grad_() for t in (q, k, v, bias)]
            out, lse, attn = na2d(*ts[:3], 5, dilation=(2, 1), attn_bias=ts[3], key_padding_mask=mask, backend="cpu",
                                  return_lse=True, return_attn=True)
            loss = (out * torch.cos(out)).sum() + lse.nan_to_num(neginf=0.0).sum() + (attn * attn).sum()
            results.append([out, lse, attn, *torch.autograd.grad(loss, ts)])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_float64_default_dtype_does_not_leak_into_the_kernel(backward_path) -> None:
    """The kernel's own buffers (bias-gradient slices, the backward's -lse/delta copies) are float32
    whatever torch's default dtype is."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 9, 10, 2, 8) for _ in range(3))
    rpb = torch.randn(2, 5, 5)
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        got = _grads(na2d, q, k, v, "cpu", rpb=rpb, kernel_size=3)
        ref = _grads(na2d, q, k, v, "reference", rpb=rpb, kernel_size=3)
    finally:
        torch.set_default_dtype(before)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=3e-5)


def test_concurrent_callers_get_identical_results() -> None:
    """The kernel keeps no global state (scratch is per call and thread), so Python threads may
    call it at once."""
    assert_concurrent_calls_identical("cpu", torch.randn(1, 12, 10, 2, 16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_half_inputs(dtype: torch.dtype, monkeypatch) -> None:
    """bfloat16 runs the bf16 kernels on the inputs as they are (no float32 copy of q, k, v, out, dout
    is made; gradients come back in bf16); float16 is converted to float32 (no float16 dot product)."""
    seen = []
    run = cpu.build.run
    monkeypatch.setattr(cpu.build, "run", lambda args, pass_: (seen.append((args.dt, args.keepalive[:3])),
                                                                run(args, pass_))[1])
    case = Case((9, 8), (3, 5), (1, 2), (2, 1), (False, True), dim=16)
    q, k, v, _, _ = case.make(dtype)
    out, lse = neighborhood_attention(q, k, v, **case.kwargs(), backend="cpu", return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = oracle(q, k, v, **case.kwargs())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=rtol)
    out.float().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()
    native = dtype == torch.bfloat16
    assert len(seen) == 2 and all(dt == (cpu.build.Args.BF16 if native else cpu.build.Args.F32) for dt, _ in seen)
    if native:  # the kernel read the caller's own q, k, v (views, no copies)
        fwd = seen[0][1]
        assert [t.data_ptr() for t in fwd] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]


def test_module_with_rel_pos_bias_matches_torch_backend() -> None:
    mods = {}
    for be in ("cpu", "torch"):
        torch.manual_seed(0)
        mods[be] = NeighborhoodAttention2D(16, 2, kernel_size=5, dilation=2, rel_pos_bias=True, backend=be)
    x = torch.randn(2, 11, 12, 16)
    outs = {be: m(x) for be, m in mods.items()}
    torch.testing.assert_close(outs["cpu"], outs["torch"], atol=1e-5, rtol=1e-5)
    for be in outs:
        outs[be].square().sum().backward()
    torch.testing.assert_close(mods["cpu"].rpb.grad, mods["torch"].rpb.grad, atol=1e-4, rtol=1e-4)


def _problem(**kw) -> Problem:
    base = dict(spec=make_spec("na2d", (14, 14), 7), batch=1, heads=2, heads_kv=2, dim=32, dim_v=32,
                dtype=torch.float32, device=torch.device("cpu"), scale=0.2)
    return Problem(**{**base, **kw})


def test_selection_and_refusals() -> None:
    assert select_backend(_problem()).name == "cpu"
    assert select_backend(_problem(dtype=torch.bfloat16)).name == "cpu"  # bf16 kernels
    assert select_backend(_problem(dtype=torch.float16)).name == "cpu"  # computed in float32
    assert select_backend(_problem(dim=12)).name == "cpu"  # padded to 16
    for flags in (dict(has_attn_bias=True), dict(has_key_padding_mask=True), dict(return_attn=True)):
        assert select_backend(_problem(**flags)).name == "cpu"  # served inside the fused kernels
    for p, words in [(_problem(dtype=torch.float64), "float64 goes to the torch backend"),
                     (_problem(device=torch.device("meta")), "CPU tensors only")]:
        reason = why_not("cpu", p)
        assert reason is not None and words in reason
    assert select_backend(_problem(dtype=torch.float64)).name == "torch"
    big = _problem(spec=make_spec("na2d", (40, 40), 25))  # 625-key windows: dense GEMMs win
    assert select_backend(big).name == "torch" and select_backend(big, "cpu").name == "cpu"


def test_refused_calls_are_served_elsewhere_correctly() -> None:
    q, k, v, _, _ = Case((8, 8), (3, 3)).make(torch.float64, requires_grad=False)
    with pytest.raises(ValueError, match="float64"):
        neighborhood_attention(q, k, v, 3, backend="cpu")
    got = neighborhood_attention(q, k, v, 3)
    want = neighborhood_attention(q, k, v, 3, backend="reference")
    torch.testing.assert_close(got, want)


def test_weights_gradient_without_the_weights_is_an_error() -> None:
    """The op's native backward needs the weights the forward returned to use their gradient."""
    from visattn.ops import na_backward

    q = torch.randn(1, 6, 6, 1, 8)
    out, lse = na2d(q, q, q, 3, backend="cpu", return_lse=True)
    with pytest.raises(ValueError, match="grad_attn was given without attn"):
        na_backward(out, None, torch.zeros(1, 6, 6, 1, 9), q, q, q, out, lse, None, None, None, None, [3, 3], [1, 1],
                    [1, 1], [False, False], 8 ** -0.5, "cpu", True)


def test_per_pair_tensors_in_any_layout_and_dtype(backward_path) -> None:
    """An expanded attn_bias (Swin's mask: one row shared by the batch and heads), a float64 one, and a
    sliced key padding mask are copied for the kernel; the copies must outlive the call (they once
    did not: a freed copy was read)."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 8, 12, 4, 8, generator=g) for _ in range(3))
    row = torch.randn(8, 12, 16, generator=g).masked_fill(torch.rand(8, 12, 16, generator=g) < 0.3, float("-inf"))
    mask = (torch.rand(2, 8, 24, generator=g) < 0.2)[:, :, ::2]
    for bias in (row[None, :, :, None].expand(2, 8, 12, 4, 16), row[None, :, :, None].expand(2, 8, 12, 4, 16).double()):
        got = _grads(na2d, q, k, v, "cpu", kernel_size=4, stride=(4, 2), attn_bias=bias, key_padding_mask=mask)
        ref = _grads(na2d, q, k, v, "reference", kernel_size=4, stride=(4, 2), attn_bias=bias, key_padding_mask=mask)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=3e-5, rtol=3e-5, equal_nan=True)


def test_a_fully_masked_image_gives_zeros_and_minus_inf(backward_path) -> None:
    """Every key masked: no query has a key. Zeros out and weights, LSE -inf, finite zero gradients
    (the backward must never form inf - inf)."""
    ts = [torch.randn(1, 9, 8, 2, 8, requires_grad=True) for _ in range(3)]
    bias = torch.randn(1, 9, 8, 2, 9, requires_grad=True)
    mask = torch.ones(1, 9, 8, dtype=torch.bool)
    out, lse, attn = na2d(*ts, 3, attn_bias=bias, key_padding_mask=mask, backend="cpu", return_lse=True,
                          return_attn=True)
    assert (out == 0).all() and (attn == 0).all() and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum() + attn.sum(), [*ts, bias])
    assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("name", ["nat_mini", "dinat_mini"])
def test_autocast_runs_the_bf16_kernels_end_to_end(name: str, monkeypatch) -> None:
    """``torch.autocast("cpu", dtype=torch.bfloat16)`` around a NAT/DiNAT forward: every attention call
    reaches the bf16 kernels with bf16 q, k, v (no float32 round trip), and the logits stay close to
    the float32 model's."""
    from visattn.models import create_model

    seen = []
    run = cpu.build.run
    monkeypatch.setattr(cpu.build, "run", lambda args, pass_: (seen.append((args.dt, args.keepalive[0].dtype)),
                                                                run(args, pass_))[1])
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        calls = len(seen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    bf16_calls = seen[calls:]
    assert calls == len(bf16_calls) > 0
    assert all(dt == cpu.build.Args.BF16 and t == torch.bfloat16 for dt, t in bf16_calls)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)
