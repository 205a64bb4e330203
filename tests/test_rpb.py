"""Relative positional bias: which table entry each key gets (by hand, with stride and dilation),
gradients (gradcheck), the module's ``rel_pos_bias=True`` and the error on a wrong table shape."""

from __future__ import annotations

import pytest
import torch

from visattn import NeighborhoodAttention1D, NeighborhoodAttention2D, na1d, na2d


def _bias_only_weights(rpb: torch.Tensor, length: int, **na) -> torch.Tensor:
    """1-D weights when q = k = 0: the softmax of the RPB entries alone, ``[L, K]``."""
    q = torch.zeros(1, length, 1, 2, dtype=torch.float64)
    _, attn = na1d(q, q, q, **na, rpb=rpb, return_attn=True)
    return attn[0, :, 0]


@pytest.mark.parametrize("na, query, keys, offsets", [
    # NA, k=3 on 7 tokens: the corner query 0 sees keys 0, 1, 2 (window shifted), offsets 0, +1, +2.
    (dict(kernel_size=3), 0, [0, 1, 2], [0, 1, 2]),
    (dict(kernel_size=3), 3, [2, 3, 4], [-1, 0, 1]),
    (dict(kernel_size=3), 6, [4, 5, 6], [-2, -1, 0]),
    # Dilation 2: query 5 is in group 1 at position 2; keys 3, 5 ... offsets counted in group steps.
    (dict(kernel_size=3, dilation=2), 5, [3, 5, 1], None),
    # Stride 2: queries 2 and 3 share one window (leader 3) but each gets its own offsets.
    (dict(kernel_size=3, stride=2), 2, [2, 3, 4], [0, 1, 2]),
    (dict(kernel_size=3, stride=2), 3, [2, 3, 4], [-1, 0, 1]),
    # Causal: query 1 sees keys 0, 1 only (offsets -1, 0); the first slot is empty.
    (dict(kernel_size=3, is_causal=True), 1, [0, 1], [-1, 0]),
])
def test_rpb_entry_per_key(na, query, keys, offsets) -> None:
    """Key minus query in group positions picks ``rpb[h, offset + k - 1]``; stride does not change
    what an offset means (it is relative to the query itself, not to its stride group's leader)."""
    L, k = 7, na["kernel_size"]
    if offsets is None:  # dilation: group positions, computed from the coordinates
        d = na["dilation"]
        offsets = [(key - query) // d for key in keys]
    # A table whose entry e has logit e: the weights then reveal which entries were used.
    rpb = torch.arange(2 * k - 1, dtype=torch.float64)[None] * 3.0
    w = _bias_only_weights(rpb, L, **na)[query]
    expected = torch.softmax(torch.tensor([3.0 * (o + k - 1) for o in offsets], dtype=torch.float64), 0)
    torch.testing.assert_close(w[w > 0].sort().values, expected.sort().values)


def test_rpb_is_per_head_and_per_axis() -> None:
    """A 2-D table ``[H, 2k0-1, 2k1-1]``: a bias on one entry of head 1 only moves head 1's weight
    onto the key at that (row, col) offset."""
    q = torch.zeros(1, 5, 6, 2, 4, dtype=torch.float64)
    rpb = torch.zeros(2, 5, 3, dtype=torch.float64)  # kernel (3, 2)
    rpb[1, 2 + 1, 1 + 0] = 10.0  # offset (+1, 0) for head 1
    _, attn = na2d(q, q, q, (3, 2), rpb=rpb, return_attn=True)
    torch.testing.assert_close(attn[0, 2, 3, 0], torch.full((6,), 1 / 6, dtype=torch.float64))
    # Query (2, 3): rows 1..3, cols 2..3 (an even kernel 2 covers the left neighbour and self);
    # key (3, 3) is row slot 2, column slot 1: flat slot 2 * 2 + 1 = 5.
    assert attn[0, 2, 3, 1].argmax() == 5 and attn[0, 2, 3, 1, 5] > 0.99


def test_rpb_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, rpb):
        return na2d(q, k, v, (3, 2), stride=(2, 1), dilation=(1, 2), rpb=rpb, backend="torch", return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v, rpb))


def test_module_rel_pos_bias() -> None:
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(8, 2, kernel_size=(3, 5), dilation=(2, 1), rel_pos_bias=True)
    assert m.rpb.shape == (2, 5, 9) and "rel_pos_bias=True" in repr(m)
    x = torch.randn(2, 7, 9, 8)
    y = m(x)
    y.square().sum().backward()
    assert m.rpb.grad is not None and m.rpb.grad.abs().sum() > 0
    with torch.no_grad():
        m.rpb.add_(torch.randn_like(m.rpb))
        assert not torch.allclose(m(x), y)
    assert NeighborhoodAttention1D(8, 2, 3).rpb is None


def test_rpb_wrong_shape_error() -> None:
    q = torch.randn(1, 6, 6, 2, 4)
    with pytest.raises(ValueError, match=r"na2d: rpb has shape \(2, 3, 3\); expected .* \(2, 5, 5\)"):
        na2d(q, q, q, 3, rpb=torch.zeros(2, 3, 3))
