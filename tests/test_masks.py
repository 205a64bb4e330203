"""Key padding mask and additive bias: masked keys get no weight, fully masked queries give zeros
(no NaN, forward or backward), a -inf bias is a mask, extra KV tokens survive a masked neighbourhood,
gradcheck of the bias, and clear errors."""

from __future__ import annotations

import pytest
import torch

from visattn import na1d, na2d
from visattn.backends import list_backends

BACKENDS = list_backends()


def _qkv(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_queries_give_zeros_and_finite_grads(backend: str) -> None:
    """Rows 0-2 are padding: queries in rows 0-1 (kernel 3) see only padding keys."""
    from brute import on_backend, problem_for

    q, k, v = _qkv(2, 6, 5, 2, 4)
    bias = torch.randn(2, 6, 5, 2, 9, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 6, 5, dtype=torch.bool)
    mask[:, :3] = True
    problem = problem_for(q, k, v, kernel_size=3, attn_bias=bias, key_padding_mask=mask, return_attn=True)
    out, lse, attn = on_backend(backend, lambda b: na2d(q, k, v, 3, attn_bias=bias, key_padding_mask=mask,
                                                        return_lse=True, return_attn=True, backend=b), problem)
    assert (out[:, :2] == 0).all() and torch.isneginf(lse[:, :2]).all() and (attn[:, :2] == 0).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, 2:]).all()
    torch.testing.assert_close(attn[:, 2:].sum(-1), torch.ones_like(lse[:, 2:]))
    # Masked keys get exactly zero weight: out only depends on unmasked values.
    loss = (out * torch.randn_like(out)).sum() + (attn * torch.randn_like(attn)).sum() + lse[:, 2:].sum()
    dq, dk, dv, dbias = torch.autograd.grad(loss, [q, k, v, bias])
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv), ("dbias", dbias)):
        assert torch.isfinite(g).all(), name
    assert (dq[:, :2] == 0).all() and (dbias[:, :2] == 0).all(), "fully masked queries have no gradient"
    assert (dk[:, :3] == 0).all() and (dv[:, :3] == 0).all(), "padding keys have no gradient"


def test_mask_equals_dropping_the_keys() -> None:
    """Masking the last 3 tokens of a 1-D sequence with full attention (kernel >= length) equals
    attention over the first tokens alone (SDPA)."""
    q, k, v = _qkv(1, 9, 2, 4)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[:, 6:] = True
    out = na1d(q, k, v, 9, key_padding_mask=mask)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(t(q), t(k[:, :6]), t(v[:, :6])).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_minus_inf_bias_is_a_mask() -> None:
    """An additive bias of -inf on the slots that hold masked keys equals the key padding mask."""
    from visattn.spec import make_spec, neighbor_table

    q, k, v = _qkv(1, 7, 6, 2, 4)
    mask = torch.rand(1, 7, 6, generator=torch.Generator().manual_seed(3)) < 0.4
    index, _, _ = neighbor_table(make_spec("test", (7, 6), 3, 1, 2))
    bias = torch.zeros(1, 42, 2, 9, dtype=torch.float64)
    bias.masked_fill_(mask.reshape(1, -1)[:, index][:, :, None, :], float("-inf"))
    a = na2d(q, k, v, 3, dilation=2, key_padding_mask=mask, return_lse=True)
    b = na2d(q, k, v, 3, dilation=2, attn_bias=bias.reshape(1, 7, 6, 2, 9), return_lse=True)
    torch.testing.assert_close(a, b)


def test_extra_tokens_survive_a_masked_neighbourhood() -> None:
    """A query whose neighbourhood is fully masked still attends to the extra KV tokens: its output
    is plain attention over those tokens."""
    q, k, v = _qkv(1, 8, 2, 4)
    xk, xv = _qkv(1, 3, 2, 4, seed=1)[:2]
    mask = torch.ones(1, 8, dtype=torch.bool)
    out, attn = na1d(q, k, v, 3, additional_keys=xk, additional_values=xv, key_padding_mask=mask, return_attn=True)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(t(q), t(xk), t(xv)).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    assert (attn[..., :3] == 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 8, 2, dtype=torch.float64))


def test_attn_bias_gradcheck() -> None:
    q, k, v = _qkv(1, 4, 5, 1, 3)
    bias = torch.randn(1, 4, 5, 1, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(1, 4, 5, dtype=torch.bool)
    mask[0, 0, :3] = True

    def f(q, k, v, bias):
        out, lse = na2d(q, k, v, (2, 3), is_causal=(True, False), attn_bias=bias, key_padding_mask=mask,
                        backend="torch", return_lse=True)
        return out, lse.nan_to_num(neginf=0.0)  # query (0, 0) sees only masked keys: LSE -inf

    assert torch.autograd.gradcheck(f, (q, k, v, bias), fast_mode=True)


def test_mask_and_bias_errors() -> None:
    q = torch.randn(2, 6, 6, 2, 4)
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor of shape \[B, \*spatial\]"):
        na2d(q, q, q, 3, key_padding_mask=torch.zeros(2, 6, 6))
    with pytest.raises(ValueError, match=r"key_padding_mask .* \(2, 6, 6\)"):
        na2d(q, q, q, 3, key_padding_mask=torch.zeros(2, 36, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_bias has shape \(2, 6, 6, 2, 25\); expected .* \(2, 6, 6, 2, 9\)"):
        na2d(q, q, q, 3, attn_bias=torch.zeros(2, 6, 6, 2, 25))
