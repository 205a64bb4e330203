"""Attention weights (``return_attn=True``): they are probabilities, they map back to pixels in the
documented order (via ``neighbor_table``), ``na_av`` re-applies them, and the module's attention
dropout (which uses them) behaves."""

from __future__ import annotations

import pytest
import torch

from brute import axis_args, axis_neighbors
from visattn import NeighborhoodAttention2D, na1d, na2d, na3d, na_av
from visattn.spec import make_spec, neighbor_table


def _qkv(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("na", [dict(kernel_size=3), dict(kernel_size=(4, 3), stride=(2, 3), dilation=(1, 2)),
                                dict(kernel_size=(3, 5), is_causal=(True, False))])
def test_weights_map_back_to_pixels(na) -> None:
    """Values that are one-hot per key pixel turn the output into the attention *map* over pixels;
    it equals the weights scattered through the documented slot order: slot
    ``j = j0 * k1 + j1`` holds the key at row/column ``neighbor_table(spec)[0][query, j]``."""
    H, W = 7, 8
    q, k, _ = _qkv(1, H, W, 1, 4)
    v = torch.eye(H * W, dtype=torch.float64).reshape(1, H, W, 1, H * W)
    out, attn = na2d(q, k, v, **na, return_attn=True)
    index, valid, _ = neighbor_table(make_spec("test", (H, W), **na))
    maps = torch.zeros(H * W, H * W, dtype=torch.float64)
    maps.scatter_add_(1, index, attn.reshape(H * W, -1) * valid)
    torch.testing.assert_close(out.reshape(H * W, H * W), maps)
    # The same order from the per-axis rule (the loop oracle): query (5, 6), slot by slot.
    args = axis_args(na, 2)
    _, rows = axis_neighbors(5, H, *args[0])
    k1, cols = axis_neighbors(6, W, *args[1])
    for si, r, _ in rows:
        for sj, c, _ in cols:
            assert index[5 * W + 6, si * k1 + sj] == r * W + c


@pytest.mark.parametrize("fn, spatial, kernel", [(na1d, (11,), 4), (na2d, (6, 7), (3, 2)), (na3d, (3, 4, 5), 3)])
def test_weights_are_probabilities(fn, spatial, kernel) -> None:
    q, k, v = _qkv(2, *spatial, 3, 4)
    out, lse, attn = fn(q, k, v, kernel, return_lse=True, return_attn=True)
    assert attn.shape == (2, *spatial, 3, torch.tensor(kernel).expand(len(spatial)).prod())
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(lse))
    # Re-applying the weights to the values gives the output back.
    torch.testing.assert_close(na_av(attn, v, kernel), out)


def test_weights_with_extra_tokens() -> None:
    """Extra tokens come last; neighbourhood + extra weights sum to one (one softmax)."""
    q, k, v = _qkv(1, 6, 5, 2, 4)
    xk, xv = _qkv(1, 4, 2, 4, seed=1)[:2]
    out, attn = na2d(q, k, v, 3, additional_keys=xk, additional_values=xv, return_attn=True)
    assert attn.shape == (1, 6, 5, 2, 9 + 4)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 6, 5, 2, dtype=torch.float64))
    extra_part = torch.einsum("bxyhn,bnhd->bxyhd", attn[..., 9:], xv)
    torch.testing.assert_close(na_av(attn[..., :9].contiguous(), v, 3) + extra_part, out)


def test_na_av_gradcheck_and_gqa() -> None:
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(1, 5, 4, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 5, 4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)  # 2 kv heads
    assert torch.autograd.gradcheck(lambda a, v: na_av(a, v, (3, 2), dilation=(1, 2)), (attn, v))


def test_na_av_shape_error() -> None:
    with pytest.raises(ValueError, match=r"na_av: attn has shape .* expected .* \(1, 5, 4, 2, 9\)"):
        na_av(torch.rand(1, 5, 4, 2, 6), torch.randn(1, 5, 4, 2, 3), 3)


def test_module_attention_dropout() -> None:
    """``attn_drop`` drops weights in training (output changes with the seed, gradients flow) and is
    the identity in eval (equal to the same module without dropout)."""
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(8, 2, 3, attn_drop=0.5, rel_pos_bias=True)
    ref = NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 6, 7, 8)
    m.train()
    torch.manual_seed(1)
    y1 = m(x)
    torch.manual_seed(2)
    y2 = m(x)
    assert not torch.allclose(y1, y2)
    y1.square().sum().backward()
    assert m.rpb.grad is not None and torch.isfinite(m.rpb.grad).all() and m.rpb.grad.abs().sum() > 0
    m.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x))
