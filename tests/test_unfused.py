"""The unfused operators ``na_qk`` / ``na_av``: both implementations against the independent loop oracle
(``tests/brute.py``) on the shared case sweep, composition into ``neighborhood_attention``, gradients
(bias table included) by ``gradcheck`` in float64, half inputs, heads-first views, and bad input."""

from __future__ import annotations

import pytest
import torch

from brute import brute_force
from cases import CASES, Case
from visattn import na_av, na_qk, neighborhood_attention
from visattn.unfused import UNFUSED_BACKENDS


def _rpb(case: Case, g: torch.Generator) -> torch.Tensor:
    return torch.randn(case.heads, *(2 * k - 1 for k in case.kwargs()["kernel_size"]), generator=g,
                       dtype=torch.float64)


def _oracle_logits(q, k, v, kw, scale, rpb):
    """Logits from the loop oracle: ``log(p) + lse`` in every slot that holds a key, ``-inf`` elsewhere."""
    _, lse, attn = brute_force(q, k, v, **kw, scale=scale, rpb=rpb)
    valid = attn > 0  # random logits: a real key never gets probability exactly 0
    return torch.where(valid, attn.clamp_min(1e-300).log() + lse[..., None], float("-inf")), attn


@pytest.mark.parametrize("backend", UNFUSED_BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if not c.extra], ids=str)
def test_qk_and_av_match_the_loop_oracle(case: Case, backend: str) -> None:
    q, k, v, _, _ = case.make(torch.float64, requires_grad=False)
    kw = case.kwargs()
    rpb = _rpb(case, torch.Generator().manual_seed(1))
    logits, attn = _oracle_logits(q, k, v, kw, 0.3, rpb)
    got = na_qk(q, k, **kw, scale=0.3, rpb=rpb, backend=backend)
    torch.testing.assert_close(got, logits, atol=1e-10, rtol=1e-10)
    # na_av applies the oracle's weights; garbage in the empty slots must be ignored.
    noisy = torch.where(attn > 0, attn, torch.full_like(attn, 7.0))
    want = brute_force(q, k, v, **kw, scale=0.3, rpb=rpb)[0]
    torch.testing.assert_close(na_av(noisy, v, **kw, backend=backend), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", UNFUSED_BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if c.extra], ids=str)
def test_extra_tokens_come_last(case: Case, backend: str) -> None:
    q, k, v, xk, xv = case.make(torch.float64, requires_grad=False)
    kw = case.kwargs()
    logits = na_qk(q, k, **kw, scale=0.5, additional_keys=xk, backend=backend)
    K = logits.shape[-1] - case.extra
    G = case.heads // (case.heads_kv or case.heads)
    extra = torch.einsum("b...hd,bnhd->b...hn", q, xk.repeat_interleave(G, 2)) * 0.5
    torch.testing.assert_close(logits[..., K:], extra)
    out = na_av(logits.softmax(-1), v, **kw, additional_values=xv, backend=backend)
    want = neighborhood_attention(q, k, v, **kw, scale=0.5, additional_keys=xk, additional_values=xv,
                                  backend="reference")
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)


def test_implementations_agree_in_float32_and_with_heads_first_views() -> None:
    """The tiled path reads heads-first data (NATTEN's layout) through views without a copy."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 13, 16, generator=g).movedim(1, -2) for _ in range(3))
    rpb = torch.randn(3, 9, 11, generator=g)
    kw = dict(kernel_size=(5, 6), dilation=(3, 2), is_causal=(True, False))
    got = {b: na_qk(q, k, **kw, rpb=rpb, backend=b) for b in UNFUSED_BACKENDS}
    torch.testing.assert_close(got["torch"], got["reference"], atol=1e-5, rtol=1e-5)
    w = got["torch"].softmax(-1)
    torch.testing.assert_close(na_av(w, v, **kw), na_av(w, v, **kw, backend="reference"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(na_av(w, v, **kw), neighborhood_attention(q, k, v, **kw, scale=1.0, rpb=rpb),
                               atol=1e-5, rtol=1e-5)


def test_half_inputs_are_computed_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 8, 2, 8, generator=g) for _ in range(3))
    got = na_av(na_qk(q.half(), k.half(), 3, scale=8 ** -0.5).float().softmax(-1).half(), v.half(), 3)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), neighborhood_attention(q, k, v, 3), atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("backend", UNFUSED_BACKENDS)
def test_gradcheck_with_bias_table(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v, rpb = mk(1, 5, 4, 2, 3), mk(1, 5, 4, 1, 3), mk(1, 5, 4, 1, 2), mk(2, 5, 3)
    kw = dict(kernel_size=(3, 2), dilation=(1, 2), is_causal=(True, False))

    def f(q, k, v, rpb):
        return na_av(na_qk(q, k, **kw, scale=0.7, rpb=rpb, backend=backend).softmax(-1), v, **kw, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, rpb))


def test_bad_input_names_the_argument() -> None:
    q = torch.randn(1, 6, 6, 2, 4)
    with pytest.raises(ValueError, match=r"na_qk: rpb has shape \(2, 3, 3\); expected .* \(2, 5, 5\)"):
        na_qk(q, q, 3, rpb=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"na_qk: key has shape .* but query has"):
        na_qk(q, torch.cat([q, q]), 3)  # another batch (another grid is cross-grid attention, allowed)
    with pytest.raises(ValueError, match=r"na_av: attn has shape \(1, 6, 6, 2, 8\); expected .* \(1, 6, 6, 2, 9\)"):
        na_av(torch.rand(1, 6, 6, 2, 8), q, 3)
    with pytest.raises(ValueError, match=r"na_qk: backend='cpu' has no unfused operator"):
        na_qk(q, q, 3, backend="cpu")
    with pytest.raises(ValueError, match=r"na_av: additional_values has shape"):
        na_av(torch.rand(1, 6, 6, 2, 11), q, 3, additional_values=torch.randn(1, 2, 3, 4))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("q_shape,k_shape,kw", [
    ((1, 7, 9, 2, 4), (1, 4, 5, 2, 4), dict(kernel_size=3, dilation=(1, 2))),     # cross-grid
    ((2, 8, 6, 2, 4), (2, 8, 6, 1, 4), dict(kernel_size=(3, 5), periodic=(True, False))),  # periodic, GQA
], ids=["cross-grid", "periodic"])
def test_unfused_pair_on_general_grids_is_the_fused_operator(backend, q_shape, k_shape, kw) -> None:
    """``na_av(softmax(na_qk(...)))`` equals the fused operator for keys on another grid and for
    periodic axes too."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(q_shape, generator=g, dtype=torch.float64)
    k, v = (torch.randn(k_shape, generator=g, dtype=torch.float64) for _ in range(2))
    attn = na_qk(q, k, **kw, scale=q.shape[-1] ** -0.5, backend=backend).softmax(-1)
    torch.testing.assert_close(na_av(attn, v, **kw, backend=backend), neighborhood_attention(q, k, v, **kw))
