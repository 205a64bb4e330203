"""Every backend against the loop oracle (``brute.py``) on the "beyond NATTEN" features: relative
positional bias, additive bias, key padding mask, attention weights, variable resolution, keys on
another grid (cross-grid) and periodic axes, forward (out, LSE, weights) and backward (q, k, v, rpb,
attn_bias, gradients flowing through the weights). A backend that refuses a feature must be routed
around by automatic selection."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import pytest
import torch

from brute import brute_force, on_backend, problem_for
from oracle import GRAD_TOL, TOL
from visattn import neighborhood_attention
from visattn.backends import list_backends
from visattn.spec import make_spec


@dataclass(frozen=True)
class FeatureCase:
    spatial: tuple[int, ...]
    na: dict = field(hash=False)
    rpb: bool = False
    bias: bool = False
    mask: float = 0.0  # fraction of masked keys
    heads: int = 2
    heads_kv: int = 2
    key_spatial: tuple[int, ...] = ()  # cross-grid: keys on this grid

    def __str__(self) -> str:
        tags = [f"S{'x'.join(map(str, self.spatial))}"] + [f"{k[0]}{v}" for k, v in self.na.items()]
        tags += [f"Sk{'x'.join(map(str, self.key_spatial))}"] if self.key_spatial else []
        tags += [t for t, on in (("rpb", self.rpb), ("bias", self.bias), (f"mask{self.mask}", self.mask),
                                 (f"gqa{self.heads}:{self.heads_kv}", self.heads != self.heads_kv)) if on]
        return "_".join(tags).replace(" ", "")


CASES = [
    FeatureCase((11,), dict(kernel_size=5), rpb=True),
    FeatureCase((10,), dict(kernel_size=4, stride=2, dilation=2, is_causal=True), rpb=True, mask=0.3),
    FeatureCase((7, 8), dict(kernel_size=3, dilation=2), rpb=True, bias=True),
    FeatureCase((9, 6), dict(kernel_size=(4, 3), stride=(2, 3), dilation=(1, 2), is_causal=(False, True)),
                rpb=True, bias=True, mask=0.25),
    FeatureCase((6, 7), dict(kernel_size=3), mask=0.5, heads=4, heads_kv=2),  # many all-masked queries
    FeatureCase((3, 9), dict(kernel_size=5, dilation=(1, 3)), rpb=True, bias=True),  # variable resolution
    FeatureCase((4, 3, 5), dict(kernel_size=(2, 3, 3), stride=(1, 3, 1), dilation=(2, 1, 1),
                                is_causal=(True, False, False)), rpb=True, bias=True, mask=0.2),
    # cross-grid: upsampling, downsampling, with stride/causal/dilation, 3-D with GQA
    FeatureCase((11,), dict(kernel_size=3), rpb=True, mask=0.2, key_spatial=(5,)),
    FeatureCase((5, 7), dict(kernel_size=(3, 4), dilation=(2, 1)), rpb=True, bias=True, key_spatial=(9, 12)),
    FeatureCase((8,), dict(kernel_size=4, stride=2, is_causal=True), rpb=True, key_spatial=(13,)),
    FeatureCase((3, 4, 5), dict(kernel_size=3), rpb=True, heads=4, heads_kv=2, key_spatial=(5, 3, 6)),
    FeatureCase((4, 6), dict(kernel_size=5), bias=True, key_spatial=(3, 6)),  # kernel > key axis
    # periodic axes: with dilation, per axis, k * d > L (dilation fitted), k > L (whole axis once)
    FeatureCase((9,), dict(kernel_size=5, dilation=2, periodic=True), rpb=True, mask=0.2),
    FeatureCase((6, 7), dict(kernel_size=(3, 5), dilation=(2, 1), periodic=(True, False)), rpb=True, bias=True),
    FeatureCase((7,), dict(kernel_size=3, dilation=4, periodic=True), rpb=True),
    FeatureCase((4, 5), dict(kernel_size=5, periodic=True), rpb=True, bias=True),
    FeatureCase((3, 4, 5), dict(kernel_size=3, periodic=(True, True, True)), rpb=True, heads=4, heads_kv=1),
]


def _inputs(case: FeatureCase, dtype: torch.dtype):
    """Inputs drawn in float32, so the float64 and float32 runs see the same values (one oracle run)."""
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    B, S, Sk = 2, case.spatial, case.key_spatial or case.spatial
    q = mk(B, *S, case.heads, 8)
    k, v = mk(B, *Sk, case.heads_kv, 8), mk(B, *Sk, case.heads_kv, 6)
    spec = make_spec("test", S, **case.na, key_spatial=Sk)
    extras = {}
    if case.rpb:
        extras["rpb"] = mk(case.heads, *(2 * r - 1 for r in spec.requested_kernel_size))
    if case.bias:
        extras["attn_bias"] = mk(B, *S, case.heads, spec.window_size)
    if case.mask:
        extras["key_padding_mask"] = torch.rand(B, *Sk, generator=g) < case.mask
    return q, k, v, extras


def _loss(out, lse, attn):
    """A random projection of all three outputs (LSE only where finite: -inf has no gradient)."""
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (out, lse, attn)]
    lse = lse.double().nan_to_num(neginf=0.0)
    return (out.double() * w[0]).sum() + (lse * w[1]).sum() + (attn.double() * w[2]).sum()


@lru_cache(maxsize=None)
def _reference(case: FeatureCase):
    """The loop oracle's outputs and gradients for ``case`` (slow, so computed once per case)."""
    q, k, v, extras = _inputs(case, torch.float64)
    outs = brute_force(q, k, v, **case.na, **extras)
    diff = [q, k, v] + [t for t in extras.values() if t.is_floating_point()]
    return tuple(t.detach() for t in outs), torch.autograd.grad(_loss(*outs), diff)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", list_backends())
def test_feature_parity(backend: str, case: FeatureCase, dtype: torch.dtype) -> None:
    q, k, v, extras = _inputs(case, dtype)
    problem = problem_for(q, k, v, **case.na, **extras, return_attn=True)

    def call(name):
        return neighborhood_attention(q, k, v, **case.na, **extras, backend=name, return_lse=True, return_attn=True)

    out, lse, attn = on_backend(backend, call, problem)
    ref, ref_grads = _reference(case)
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and attn.dtype == dtype
    torch.testing.assert_close(out.double(), ref[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref[1], atol=atol, rtol=rtol)  # -inf where a query has no key
    torch.testing.assert_close(attn.double(), ref[2], atol=atol, rtol=rtol)

    names = ["q", "k", "v"] + [n for n, t in extras.items() if t.is_floating_point()]
    diff = [q, k, v] + [t for t in extras.values() if t.is_floating_point()]
    grads = torch.autograd.grad(_loss(out, lse, attn), diff)
    gatol, grtol = GRAD_TOL[dtype]
    for name, a, b in zip(names, grads, ref_grads):
        assert torch.isfinite(a).all(), f"d{name} is not finite"
        torch.testing.assert_close(a.double(), b, atol=gatol, rtol=grtol, msg=lambda m: f"d{name}: {m}")
