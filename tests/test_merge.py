"""``merge_attentions``: attention over disjoint key sets, merged through their LSEs, equals
attention over the union; empty parts contribute nothing; gradients are exact and finite."""

from __future__ import annotations

import pytest
import torch

from visattn import merge_attentions, na2d


def _attend(q, k, v):
    """Plain attention over ``k/v [B, N, H, D]`` for ``q [B, M, H, D]``: ``(out, lse)``."""
    logits = torch.einsum("bmhd,bnhd->bmhn", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bmhn,bnhd->bmhd", torch.softmax(logits, -1), v), torch.logsumexp(logits, -1)


def _qkv(m=5, n=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, m, 3, 4, generator=g, dtype=dtype, requires_grad=True),
            torch.randn(2, n, 3, 4, generator=g, dtype=dtype, requires_grad=True),
            torch.randn(2, n, 3, 6, generator=g, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize("splits", [[6, 6], [1, 4, 7], [12]])
def test_merge_equals_attention_over_the_union(splits) -> None:
    q, k, v = _qkv()
    parts = [_attend(q, kk, vv) for kk, vv in zip(k.split(splits, 1), v.split(splits, 1))]
    out, lse = merge_attentions([p[0] for p in parts], [p[1] for p in parts])
    ref_out, ref_lse = _attend(q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_merge_gradcheck() -> None:
    q, k, v = _qkv(m=2, n=5)

    def f(q, k, v):
        a, b = _attend(q, k[:, :2], v[:, :2]), _attend(q, k[:, 2:], v[:, 2:])
        return merge_attentions([a[0], b[0]], [a[1], b[1]])

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


def test_empty_parts() -> None:
    """A part with LSE -inf (no keys) contributes nothing; all parts empty gives zeros and -inf, and
    the backward stays finite."""
    q, k, v = _qkv()
    o, lse_o = _attend(q, k, v)
    empty_o = torch.zeros_like(o, requires_grad=True)
    empty_l = torch.full_like(lse_o, float("-inf")).requires_grad_()
    out, lse = merge_attentions([o, empty_o], [lse_o, empty_l])
    torch.testing.assert_close(out, o)
    torch.testing.assert_close(lse, lse_o)
    out, lse = merge_attentions([empty_o, empty_o], [empty_l, empty_l])
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum() + lse.nan_to_num(neginf=0.0).sum(), [empty_o, empty_l])
    assert all(torch.isfinite(g).all() for g in grads)


def test_merge_splits_a_neighbourhood_from_global_tokens() -> None:
    """NA with extra KV tokens is NA plus attention over the extra tokens, merged."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 7, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    xk, xv = (torch.randn(1, 3, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    local = na2d(q, k, v, 3, return_lse=True)
    glob = _attend(q.reshape(1, 42, 2, 4), xk, xv)
    out, lse = merge_attentions([local[0], glob[0].reshape(1, 6, 7, 2, 4)], [local[1], glob[1].reshape(1, 6, 7, 2)])
    ref_out, ref_lse = na2d(q, k, v, 3, additional_keys=xk, additional_values=xv, return_lse=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_half_precision_lse_is_float32() -> None:
    q, k, v = (t.detach().to(torch.bfloat16) for t in _qkv())
    parts = [_attend(q.float(), kk.float(), vv.float()) for kk, vv in zip(k.split(6, 1), v.split(6, 1))]
    out, lse = merge_attentions([p[0].to(torch.bfloat16) for p in parts], [p[1] for p in parts])
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), _attend(q.float(), k.float(), v.float())[0], atol=2e-2, rtol=2e-2)


def test_merge_errors() -> None:
    with pytest.raises(ValueError, match="merge_attentions: got 2 outputs and 1 lses"):
        merge_attentions([torch.zeros(1, 2, 3)] * 2, [torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="merge_attentions: got 0 outputs"):
        merge_attentions([], [])
