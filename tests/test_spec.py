"""The window rules (spec.py): properties stated in DESIGN.md section 2, checked exhaustively on
small axes, independent of any backend."""

from __future__ import annotations

import itertools

import pytest
import torch

from visattn.spec import axis_windows, fit_axis, make_spec, na_flops, neighbor_table


def _axis_configs():
    for L in (1, 2, 5, 8, 13):
        for k in range(1, 6):
            for d in (1, 2, 3):
                if k * d > L:
                    continue
                for s in range(1, k + 1):
                    for c in (False, True):
                        yield L, k, s, d, c


@pytest.mark.parametrize("L,k,s,d,c", list(_axis_configs()))
def test_axis_window_properties(L: int, k: int, s: int, d: int, c: bool) -> None:
    w = axis_windows(L, k, s, d, c)
    count = w.hi - w.lo + 1
    n = w.group_size()
    assert (w.lo >= 0).all() and (w.hi <= n - 1).all(), "keys stay inside the dilation group"
    assert (w.lo >= w.base).all() and (w.hi <= w.base + k - 1).all(), "keys fit the k slots"
    if c:
        assert (w.hi == w.pos).all(), "causal: the last key is the query itself"
        assert (count >= 1).all()
    else:
        assert (count == k).all(), "non-causal: exactly k keys, windows shift at borders"
        assert ((w.lo <= w.pos) & (w.pos <= w.hi)).all(), "a query always sees itself"
        if s == 1:
            # Interior queries are centred: k//2 keys before them.
            interior = (w.pos >= k // 2) & (w.pos <= n - 1 - (k - 1 - k // 2))
            assert (w.lo[interior] == w.pos[interior] - k // 2).all()
    if s > 1:
        # Queries of one stride group share one window.
        for x in range(L):
            for y in range(L):
                same = w.group[x] == w.group[y] and w.pos[x] // s == w.pos[y] // s
                if same and not c:
                    assert w.lo[x] == w.lo[y] and w.hi[x] == w.hi[y]


def test_stride_equal_kernel_is_window_partition() -> None:
    """s = k with k dividing L: non-overlapping blocks, each query sees exactly its block."""
    w = axis_windows(12, 4, 4, 1, False)
    assert torch.equal(w.lo, torch.arange(12) // 4 * 4)
    assert torch.equal(w.hi, w.lo + 3)


def test_full_kernel_is_global() -> None:
    w = axis_windows(9, 9, 1, 1, False)
    assert (w.lo == 0).all() and (w.hi == 8).all()


def test_even_kernel_covers_more_left() -> None:
    """An even kernel 2r covers r keys left, self, r-1 right (NATTEN convention)."""
    w = axis_windows(20, 4, 1, 1, False)
    assert int(w.lo[10]) == 8 and int(w.hi[10]) == 11


@pytest.mark.parametrize("L,k,s,d,expect", [
    (10, 3, 1, 3, (3, 1, 3)),     # fits: unchanged
    (10, 3, 1, 4, (3, 1, 3)),     # 12 > 10: dilation drops to 10 // 3 = 3
    (5, 7, 7, 2, (5, 5, 1)),      # axis shorter than kernel: whole axis, dilation 1, stride capped
    (1, 7, 1, 4, (1, 1, 1)),
    (14, 7, 1, 2, (7, 1, 2)),
])
def test_fit_axis(L, k, s, d, expect) -> None:
    assert fit_axis(L, k, s, d) == expect


def test_neighbor_table_is_row_major_product() -> None:
    spec = make_spec("t", (5, 6), (3, 2), (1, 1), (1, 2), (False, True))
    index, valid, _ = neighbor_table(spec)
    w0, w1 = axis_windows(5, 3, 1, 1, False), axis_windows(6, 2, 1, 2, True)
    for x0, x1 in itertools.product(range(5), range(6)):
        q = x0 * 6 + x1
        for j0, j1 in itertools.product(range(3), range(2)):
            t0, t1 = int(w0.base[x0]) + j0, int(w1.base[x1]) + j1
            ok = bool(w0.lo[x0] <= t0 <= w0.hi[x0]) and bool(w1.lo[x1] <= t1 <= w1.hi[x1])
            slot = j0 * 2 + j1
            assert bool(valid[q, slot]) == ok
            if ok:
                assert int(index[q, slot]) == t0 * 6 + (int(w1.group[x1]) + 2 * t1)


def test_flops_formula() -> None:
    spec = make_spec("t", (56, 56), 7)
    assert na_flops(spec, batch=1, heads=4, dim=32) == 4 * 56 * 56 * 49 * 32 * 4
