"""Cross-grid attention and periodic axes beyond the feature sweep (``test_features_parity.py``, which
checks both against the loop oracle on every backend): the centre map, the circular-padding
equivalence of periodic axes, and the refused combinations."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from visattn import na1d, na2d, na3d
from visattn.spec import key_center, make_spec


def test_key_center_is_the_documented_formula() -> None:
    """``min(floor((x + 1/2) Lk / Lq), Lk - 1)`` exactly (integer arithmetic, no float rounding), the
    identity for equal lengths, monotone, and every key row reached when upsampling."""
    for Lq in range(1, 40):
        for Lk in range(1, 40):
            x = torch.arange(Lq)
            got = key_center(x, Lq, Lk).tolist()
            want = [min(int(Fraction(2 * i + 1, 2) * Fraction(Lk, Lq)), Lk - 1) for i in range(Lq)]
            assert got == want, (Lq, Lk)
            assert all(a <= b for a, b in zip(got, got[1:]))
            if Lq >= Lk:
                assert set(got) == set(range(Lk))
    assert torch.equal(key_center(torch.arange(17), 17, 17), torch.arange(17))


def test_equal_grids_are_plain_neighborhood_attention() -> None:
    """Keys given as other tensors on the same grid: the cross-grid path is plain NA."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 8, 2, 8, generator=g) for _ in range(3))
    assert not make_spec("t", (9, 8), 3, key_spatial=(9, 8)).cross_grid
    torch.testing.assert_close(na2d(q, k.clone(), v.clone(), 3, dilation=2), na2d(q, k, v, 3, dilation=2))


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("shape,kw", [
    ((13,), dict(kernel_size=5, dilation=2)),
    ((9, 10), dict(kernel_size=(3, 5), dilation=(3, 1))),
    ((5, 6, 7), dict(kernel_size=(3, 3, 5))),
], ids=["1d", "2d", "3d"])
def test_periodic_equals_circular_padding(shape, kw, backend) -> None:
    """On a periodic axis the window never shifts: padding the axis circularly by ``d * (k // 2)``
    before and ``d * (k - 1 - k // 2)`` after and running plain NA gives the same output and gradients
    on the original positions (the padded grid is large enough that their windows never shift)."""
    rank = len(shape)
    ks = kw["kernel_size"] if isinstance(kw["kernel_size"], tuple) else (kw["kernel_size"],) * rank
    dl = kw.get("dilation", 1)
    dl = dl if isinstance(dl, tuple) else (dl,) * rank
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, *shape, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, *(2 * x - 1 for x in ks), generator=g, requires_grad=True)
    fn = {1: na1d, 2: na2d, 3: na3d}[rank]
    out = fn(q, k, v, **kw, periodic=True, rpb=rpb, backend=backend)

    emulated = fn(_pad(q, ks, dl), _pad(k, ks, dl), _pad(v, ks, dl), **kw, rpb=rpb, backend=backend)
    crop = tuple(slice(d * (kk // 2), d * (kk // 2) + s) for kk, d, s in zip(ks, dl, shape))
    emulated = emulated[(slice(None), *crop)]
    torch.testing.assert_close(out, emulated, atol=1e-5, rtol=1e-5)
    w = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * w).sum(), (q, k, v, rpb))
    want = torch.autograd.grad((emulated * w).sum(), (q, k, v, rpb))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _before(ks, dl):
    return [d * (k // 2) for k, d in zip(ks, dl)]


def _after(ks, dl):
    return [d * (k - 1 - k // 2) for k, d in zip(ks, dl)]


def _pad(t: torch.Tensor, ks, dl) -> torch.Tensor:
    """Pad the spatial axes of ``t [B, *S, H, D]`` circularly (by index, so autograd folds the copies back)."""
    for axis, (before, after) in enumerate(zip(_before(ks, dl), _after(ks, dl))):
        L = t.shape[1 + axis]
        index = torch.arange(-before, L + after) % L
        t = t.index_select(1 + axis, index)
    return t


def test_refused_combinations_say_why() -> None:
    q = torch.randn(1, 8, 9, 2, 8)
    with pytest.raises(ValueError, match=r"na2d: axis 0 is periodic but stride=\(2, 1\) is 2 there"):
        na2d(q, q, q, 3, stride=(2, 1), periodic=(True, False))
    with pytest.raises(ValueError, match=r"axis 1 is both periodic and causal"):
        na2d(q, q, q, 3, is_causal=(False, True), periodic=True)
    k = torch.randn(1, 8, 5, 2, 8)
    with pytest.raises(ValueError, match=r"axis 1 is periodic but the keys' length there \(5\) differs"):
        na2d(q, k, k, 3, periodic=True)
    with pytest.raises(ValueError, match=r"value's spatial shape \(8, 9\) differs from key's \(8, 5\)"):
        na2d(q, k, q, 3)
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor of shape \[B, \*spatial\] of the keys = "
                                         r"\(1, 8, 5\)"):
        na2d(q, k, k, 3, key_padding_mask=torch.zeros(1, 8, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"periodic=\('yes',\) must be a bool"):
        na1d(q[:, 0], q[:, 0], q[:, 0], 3, periodic=("yes",))
    with pytest.raises(ValueError, match=r"key has spatial shape \(8, 0\) with an empty axis"):
        na2d(q, k[:, :, :0], k[:, :, :0], 3)


def test_fused_cpu_backend_serves_cross_grid_and_periodic_calls() -> None:
    """The fused C kernels index keys on their own grid (cross-grid) and run periodic axes on the
    virtual key grid; automatic selection picks them for both, and they match the reference."""
    from brute import problem_for
    from visattn.backends import select_backend, why_not

    if why_not("cpu") is not None:
        pytest.skip(why_not("cpu"))
    q, k = torch.randn(1, 8, 9, 2, 8), torch.randn(1, 4, 5, 2, 8)
    for kk, kw in ((k, {}), (torch.randn(1, 17, 12, 2, 8), dict(dilation=(2, 1))), (q, dict(periodic=True)),
                   (q, dict(periodic=(False, True), dilation=2))):
        assert why_not("cpu", problem_for(q, kk, kk, kernel_size=3, **kw)) is None
        assert select_backend(problem_for(q, kk, kk, kernel_size=3, **kw)).name == "cpu"
        torch.testing.assert_close(na2d(q, kk, kk, 3, backend="cpu", **kw),
                                   na2d(q, kk, kk, 3, backend="reference", **kw), atol=1e-5, rtol=1e-5)
