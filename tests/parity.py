"""The shared parity harness: one backend, forward (out, LSE) and backward (dQ, dK, dV, extra KV
grads, and gradients flowing into LSE) against the float64 oracle, on one case of the sweep
(:func:`run_parity`); and the same for the per-pair features (rpb, attn_bias, key_padding_mask, the
returned weights and every gradient, including those flowing through the weights) against the
loop oracle of ``brute.py`` (:func:`run_feature_parity`)."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from brute import brute_force, on_backend, problem_for
from cases import Case, FeatureCase
from oracle import GRAD_TOL, TOL, oracle
from visattn import neighborhood_attention
from visattn.backends import why_not
from visattn.spec import make_spec


def usable(name: str) -> None:
    """Skip unless backend ``name`` can run on this machine."""
    reason = why_not(name)
    if reason is not None:
        pytest.skip(f"backend {name!r} is not usable on this machine: {reason}")


def run_parity(backend: str, case: Case, dtype: torch.dtype, device: str = "cpu") -> None:
    """Compare ``backend`` with the oracle on ``case``; shared by every backend's test file."""
    q, k, v, xk, xv = case.make(dtype, device)
    refusal = why_not(backend, problem_for(q, k, v, **case.kwargs()))
    if refusal is not None:  # a stated limit (e.g. triton: no float64), routed around by the dispatcher
        pytest.skip(f"backend {backend!r} declines this case: {refusal}")
    inputs = [t for t in (q, k, v, xk, xv) if t is not None]
    out, lse = neighborhood_attention(q, k, v, **case.kwargs(), additional_keys=xk, additional_values=xv,
                                      backend=backend, return_lse=True)
    ref_out, ref_lse = oracle(*(t.detach().requires_grad_() for t in (q, k, v)),
                              *((xk, xv) if xk is not None else ()), **case.kwargs())
    atol, rtol = TOL[dtype]
    assert out.shape == ref_out.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=rtol)

    g = torch.Generator().manual_seed(1)
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    d_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * d_out.to(device)).sum() + (lse.double() * d_lse.to(device)).sum(), inputs)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    r_out, r_lse = oracle(*ref_inputs, **case.kwargs())
    ref_grads = torch.autograd.grad((r_out * d_out.to(device)).sum() + (r_lse * d_lse.to(device)).sum(), ref_inputs)
    gatol, grtol = GRAD_TOL[dtype]
    for name, a, b in zip(("dq", "dk", "dv", "d_extra_k", "d_extra_v"), grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=gatol, rtol=grtol, msg=lambda m: f"{name}: {m}")


def _feature_inputs(case: FeatureCase, dtype: torch.dtype):
    """Inputs drawn in float32, so runs in every dtype see the same values (one oracle run)."""
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    B, S, Sk = case.batch, case.spatial, case.key_spatial or case.spatial
    q = mk(B, *S, case.heads, case.dim)
    k, v = mk(B, *Sk, case.heads_kv, case.dim), mk(B, *Sk, case.heads_kv, case.dim_v)
    spec = make_spec("test", S, **case.na, key_spatial=Sk)
    extras = {}
    if case.rpb:
        extras["rpb"] = mk(case.heads, *(2 * r - 1 for r in spec.requested_kernel_size))
    if case.bias:
        extras["attn_bias"] = mk(B, *S, case.heads, spec.window_size)
    if case.mask:
        extras["key_padding_mask"] = torch.rand(B, *Sk, generator=g) < case.mask
    return q, k, v, extras


def _feature_loss(out, lse, attn):
    """A random projection of all three outputs (LSE only where finite: -inf has no gradient)."""
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (out, lse, attn)]
    lse = lse.double().nan_to_num(neginf=0.0)
    return (out.double() * w[0]).sum() + (lse * w[1]).sum() + (attn.double() * w[2]).sum()


@lru_cache(maxsize=None)
def _feature_reference(case: FeatureCase):
    """The loop oracle's outputs and gradients for ``case`` (slow, so computed once per case)."""
    q, k, v, extras = _feature_inputs(case, torch.float64)
    outs = brute_force(q, k, v, **case.na, **extras)
    diff = [q, k, v] + [t for t in extras.values() if t.is_floating_point()]
    return tuple(t.detach() for t in outs), torch.autograd.grad(_feature_loss(*outs), diff)


def run_feature_parity(backend: str, case: FeatureCase, dtype: torch.dtype) -> None:
    """``backend`` (or, where it declines the call, the backend automatic selection picks) against the
    loop oracle: out, LSE (-inf where a query has no key), weights, and the gradients of q, k, v, rpb
    and attn_bias of a loss on all three outputs."""
    q, k, v, extras = _feature_inputs(case, dtype)
    problem = problem_for(q, k, v, **case.na, **extras, return_attn=True)

    def call(name):
        return neighborhood_attention(q, k, v, **case.na, **extras, backend=name, return_lse=True, return_attn=True)

    out, lse, attn = on_backend(backend, call, problem)
    ref, ref_grads = _feature_reference(case)
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and attn.dtype == dtype
    torch.testing.assert_close(out.double(), ref[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref[1], atol=atol, rtol=rtol)  # -inf where a query has no key
    torch.testing.assert_close(attn.double(), ref[2], atol=atol, rtol=rtol)

    names = ["q", "k", "v"] + [n for n, t in extras.items() if t.is_floating_point()]
    diff = [q, k, v] + [t for t in extras.values() if t.is_floating_point()]
    grads = torch.autograd.grad(_feature_loss(out, lse, attn), diff)
    gatol, grtol = GRAD_TOL[dtype]
    for name, a, b in zip(names, grads, ref_grads):
        assert torch.isfinite(a).all(), f"d{name} is not finite"
        torch.testing.assert_close(a.double(), b, atol=gatol, rtol=grtol, msg=lambda m: f"d{name}: {m}")
