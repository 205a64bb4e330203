"""Forward-mode AD, vmap and double backward through every public op.

* ``torch.func.jvp`` (and ``torch.autograd.forward_ad``) against central finite differences in float64;
* ``torch.func.vmap`` against a Python loop on every backend, and per-sample gradients
  (``vmap(grad(...))``) against a loop of ``grad``;
* ``gradgradcheck`` in float64, and double backward through a fused float32 backend against the
  portable one.
"""

from __future__ import annotations

import pytest
import torch

from visattn import merge_attentions, na1d, na2d, na_av, na_varlen, neighborhood_attention
from visattn.backends import list_backends, why_not

G = torch.Generator().manual_seed(0)


def _rand(*shape, dtype=torch.float64, requires_grad=False):
    return torch.randn(*shape, generator=G, dtype=dtype).requires_grad_(requires_grad)


def _fd_jvp(f, primals, tangents, eps=1e-6):
    plus = f(*(p + eps * t for p, t in zip(primals, tangents)))
    minus = f(*(p - eps * t for p, t in zip(primals, tangents)))
    if isinstance(plus, tuple):
        return tuple((a - b) / (2 * eps) for a, b in zip(plus, minus))
    return (plus - minus) / (2 * eps)


# Small shapes: gradgradcheck's numerical Jacobians cost (input elements) x (output elements).
OPS = {
    "na2d+rpb+bias+lse": (lambda q, k, v, rpb, bias: na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, attn_bias=bias,
                                                          return_lse=True),
                          lambda: (_rand(1, 4, 3, 1, 2), _rand(1, 4, 3, 1, 2), _rand(1, 4, 3, 1, 2), _rand(1, 5, 5),
                                   _rand(1, 4, 3, 1, 9))),
    "na1d+extra-kv+mask": (lambda q, k, v, xk, xv: neighborhood_attention(
        q, k, v, 3, additional_keys=xk, additional_values=xv,
        key_padding_mask=torch.tensor([[True, False, False, True, False, False, False]] * 2)),
        lambda: (_rand(2, 7, 2, 4), _rand(2, 7, 1, 4), _rand(2, 7, 1, 3), _rand(2, 2, 1, 4), _rand(2, 2, 1, 3))),
    "cross-grid": (lambda q, k, v: na2d(q, k, v, 3), lambda: (_rand(1, 4, 3, 1, 2), _rand(1, 3, 5, 1, 2),
                                                                _rand(1, 3, 5, 1, 2))),
    "periodic": (lambda q, k, v: na1d(q, k, v, 3, dilation=2, periodic=True),
                 lambda: (_rand(2, 8, 2, 4), _rand(2, 8, 2, 4), _rand(2, 8, 2, 4))),
    "na_av": (lambda a, v: na_av(a, v, 3), lambda: (_rand(1, 5, 4, 2, 9), _rand(1, 5, 4, 2, 3))),
    "merge_attentions": (lambda o1, l1, o2, l2: merge_attentions([o1, o2], [l1, l2]),
                         lambda: (_rand(2, 5, 2, 3), _rand(2, 5, 2), _rand(2, 5, 2, 3), _rand(2, 5, 2))),
    "na_varlen": (lambda q, k, v: na_varlen(q, k, v, [(3, 2), (2, 2), (3, 2)], 3),
                  lambda: (_rand(16, 1, 2), _rand(16, 1, 2), _rand(16, 1, 2))),
}


@pytest.mark.parametrize("name", list(OPS))
def test_jvp_matches_finite_differences(name: str) -> None:
    f, make = OPS[name]
    primals = make()
    tangents = tuple(_rand(*p.shape) for p in primals)
    _, jvp_out = torch.func.jvp(f, primals, tangents)
    fd = _fd_jvp(f, primals, tangents)
    for a, b in zip(jvp_out if isinstance(jvp_out, tuple) else (jvp_out,), fd if isinstance(fd, tuple) else (fd,)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_forward_ad_dual_tensors() -> None:
    import torch.autograd.forward_ad as fwAD

    q, t = _rand(1, 6, 5, 2, 8), _rand(1, 6, 5, 2, 8)
    with fwAD.dual_level():
        out = na2d(fwAD.make_dual(q, t), q, q, 3)
        tangent = fwAD.unpack_dual(out).tangent
    fd = _fd_jvp(lambda x: na2d(x, q, q, 3), (q,), (t,))
    torch.testing.assert_close(tangent, fd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(OPS))
def test_gradgradcheck(name: str) -> None:
    f, make = OPS[name]
    inputs = tuple(p.requires_grad_() for p in make())
    assert torch.autograd.gradgradcheck(f, inputs, atol=1e-6)


def _usable(backend: str) -> None:
    if why_not(backend) is not None:
        pytest.skip(f"{backend}: {why_not(backend)}")


@pytest.mark.parametrize("backend", list_backends())
def test_vmap_matches_a_loop_on_every_backend(backend: str) -> None:
    _usable(backend)
    qs = _rand(3, 2, 7, 6, 2, 8, dtype=torch.float32)
    rpbs = _rand(3, 2, 5, 5, dtype=torch.float32)
    f = lambda q, rpb: na2d(q, q, q, 3, rpb=rpb, backend=backend)  # noqa: E731
    shared = torch.func.vmap(f, in_dims=(0, None))(qs, rpbs[0])  # one table for all: folded into the batch
    per = torch.func.vmap(f)(qs, rpbs)  # a table per vmapped sample: one call each
    for got, tables in ((shared, [rpbs[0]] * 3), (per, rpbs)):
        want = torch.stack([f(q, r) for q, r in zip(qs, tables)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", list_backends())
def test_vmap_then_autograd_on_every_backend(backend: str) -> None:
    """``vmap`` in a training step: the vmapped op's backward is the fused backward on the folded batch."""
    _usable(backend)
    qs, rpb = _rand(3, 2, 7, 2, 8, dtype=torch.float32, requires_grad=True), _rand(2, 5, dtype=torch.float32,
                                                                                  requires_grad=True)
    out = torch.func.vmap(lambda q: na1d(q, q, q, 3, rpb=rpb, backend=backend))(qs)
    got = torch.autograd.grad(out.square().sum(), (qs, rpb))
    loop = torch.stack([na1d(q, q, q, 3, rpb=rpb, backend=backend) for q in qs])
    want = torch.autograd.grad(loop.square().sum(), (qs, rpb))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_per_sample_gradients() -> None:
    qs, rpb = _rand(4, 1, 9, 2, 8), _rand(2, 5)
    loss = lambda q, r: na1d(q, q, q, 3, dilation=2, rpb=r).square().sum()  # noqa: E731
    got = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, None))(qs, rpb)
    for i, q in enumerate(qs):
        want = torch.func.grad(loss, argnums=(0, 1))(q, rpb)
        torch.testing.assert_close(got[0][i], want[0])
        torch.testing.assert_close(got[1][i], want[1])


def test_double_backward_through_a_fused_backend() -> None:
    """A gradient penalty on a float32 call served by the fused CPU kernels: the first backward is the
    native one, its own gradient (create_graph) equals the portable backend's."""
    _usable("cpu")
    results = []
    q0, k, v = (_rand(2, 8, 7, 2, 8, dtype=torch.float32) for _ in range(3))
    for backend in ("cpu", "torch"):
        q = q0.clone().requires_grad_()
        out = na2d(q, k, v, 3, backend=backend)
        (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        results.append(torch.autograd.grad(gq.square().sum(), q)[0])
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


def test_a_forced_fused_backend_under_jvp_says_what_serves_it() -> None:
    _usable("cpu")
    q = _rand(1, 6, 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"backend='cpu' cannot be differentiated by torch.func transforms"):
        torch.func.jvp(lambda x: na1d(x, x, x, 3, backend="cpu"), (q,), (q,))


def test_tables_built_under_a_transform_outlive_it() -> None:
    """Window tables and tile plans are cached per geometry; one first built inside ``grad``/``vmap``
    must still serve plain calls afterwards (a tensor made under a transform dies with it)."""
    x = _rand(2, 1, 13, 11, 2, 8, dtype=torch.float32)
    torch.func.vmap(torch.func.grad(lambda t: na2d(t, t, t, 5, dilation=(2, 1)).sum()))(x)
    for backend in [b for b in ("torch", "cpu") if why_not(b) is None]:
        out = na2d(x[0], x[0], x[0], 5, dilation=(2, 1), backend=backend)
        torch.testing.assert_close(out, na2d(x[0], x[0], x[0], 5, dilation=(2, 1), backend="reference"),
                                   atol=1e-5, rtol=1e-5)
