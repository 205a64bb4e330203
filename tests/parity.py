"""The shared parity harness: one backend, forward (out, LSE) and backward (dQ, dK, dV, extra KV
grads, and gradients flowing into LSE) against the float64 oracle, on one case of the sweep."""

from __future__ import annotations

import pytest
import torch

from brute import problem_for
from cases import Case
from oracle import GRAD_TOL, TOL, oracle
from visattn import neighborhood_attention
from visattn.backends import why_not


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
