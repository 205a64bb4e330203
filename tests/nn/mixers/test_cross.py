"""NeighborhoodCrossAttention1D/2D/3D: a query map attending a context map on another grid, against a
hand-written composition of the projections and the functional operator; gradients reach both maps;
bad inputs name the argument; and the periodic flag of NeighborhoodAttention*D."""

from __future__ import annotations

import pytest
import torch

from brute import brute_force
from visattn import (NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodCrossAttention1D,
                     NeighborhoodCrossAttention2D, NeighborhoodCrossAttention3D)


@pytest.mark.parametrize("cls,xs,cs,kw", [
    (NeighborhoodCrossAttention1D, (11,), (6,), dict(kernel_size=3)),
    (NeighborhoodCrossAttention2D, (9, 7), (5, 12), dict(kernel_size=(3, 5), dilation=(1, 2), rel_pos_bias=True)),
    (NeighborhoodCrossAttention3D, (3, 4, 5), (5, 2, 5), dict(kernel_size=3, kv_dim=8)),
], ids=["1d", "2d", "3d"])
def test_matches_the_definition(cls, xs, cs, kw) -> None:
    torch.manual_seed(0)
    m = cls(16, 2, **kw).double()
    x = torch.randn(2, *xs, 16, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, *cs, m.kv_dim, dtype=torch.float64, requires_grad=True)
    out = m(x, context)
    q = m.q(x).reshape(*x.shape[:-1], 2, 8)
    k, v = m.kv(context).reshape(*context.shape[:-1], 2, 2, 8).unbind(-3)
    na = {n: kw[n] for n in ("kernel_size", "dilation") if n in kw}
    ref, _, _ = brute_force(q, k, v, **na, rpb=m.rpb)
    want = m.proj(ref.flatten(-2))
    assert out.shape == x.shape
    torch.testing.assert_close(out, want)
    gx, gc = torch.autograd.grad(out.square().sum(), (x, context))
    assert gx.abs().sum() > 0 and gc.abs().sum() > 0


def test_input_errors() -> None:
    m = NeighborhoodCrossAttention2D(16, 2, 3, kv_dim=8)
    with pytest.raises(ValueError, match=r"expected context channels-last \[B, S0, S1, 8\], got \(1, 5, 5, 16\)"):
        m(torch.randn(1, 6, 6, 16), torch.randn(1, 5, 5, 16))
    with pytest.raises(ValueError, match=r"x has batch 2 but context has 1"):
        m(torch.randn(2, 6, 6, 16), torch.randn(1, 5, 5, 8))
    with pytest.raises(ValueError, match=r"dim=16 is not divisible by num_heads=3"):
        NeighborhoodCrossAttention2D(16, 3, 3)


def test_periodic_modules_wrap_around() -> None:
    """A periodic NeighborhoodAttention1D is translation-equivariant: rolling the input rolls the
    output (a non-periodic one is not, at the borders)."""
    torch.manual_seed(0)
    periodic = NeighborhoodAttention1D(16, 2, 5, dilation=2, periodic=True, rel_pos_bias=True)
    x = torch.randn(1, 17, 16)
    torch.testing.assert_close(periodic(torch.roll(x, 3, dims=1)), torch.roll(periodic(x), 3, dims=1),
                               atol=1e-5, rtol=1e-5)
    plain = NeighborhoodAttention1D(16, 2, 5, dilation=2, rel_pos_bias=True)
    plain.load_state_dict(periodic.state_dict())
    assert not torch.allclose(plain(torch.roll(x, 3, dims=1)), torch.roll(plain(x), 3, dims=1), atol=1e-3)
    m2 = NeighborhoodAttention2D(16, 2, 3, periodic=(True, False))
    assert m2.periodic == (True, False) and "periodic=(True, False)" in repr(m2)
