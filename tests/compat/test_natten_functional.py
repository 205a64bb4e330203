"""``natten.functional`` of the stand-in: every operator of every release against NATTEN's own window
rules (``natten_rules.py``, written from NATTEN's reference kernels) and visattn's oracle, forward and
backward (bias table included), on every backend that serves the call; bad input gets clear errors."""

from __future__ import annotations

import pytest
import torch

import visattn
from natten_rules import natten_av, natten_logits
from visattn.compat.natten import functional as F
from visattn.compat.natten import _versions

G = torch.Generator().manual_seed(0)


def _rand(*shape, dtype=torch.float64, requires_grad=False):
    return torch.randn(*shape, generator=G, dtype=dtype).requires_grad_(requires_grad)


def _tup(v, r):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * r


# (spatial, kernel_size, dilation, is_causal): odd kernels where NATTEN's unfused kernels took only
# odd ones (non-causal); causal windows near the start exercise NATTEN's keys-first slot order.
UNFUSED = [
    ((11,), 5, 2, False),
    ((9,), 3, 2, True),
    ((8, 9), 3, (2, 1), False),
    ((7, 8), (3, 5), 1, (True, False)),
    ((6, 7), 3, (2, 2), (True, True)),
    ((4, 5, 6), 3, (1, 1, 2), False),
    ((4, 5, 5), (2, 3, 3), 1, (True, False, False)),
]


@pytest.mark.parametrize("spatial, kernel, dilation, causal", UNFUSED, ids=str)
def test_unfused_ops_follow_natten_rules(spatial, kernel, dilation, causal) -> None:
    r = len(spatial)
    ks, dl, ca = _tup(kernel, r), _tup(dilation, r), _tup(causal, r)
    q, k, v = _rand(2, 3, *spatial, 4), _rand(2, 3, *spatial, 4), _rand(2, 3, *spatial, 5)
    rpb = None if any(ca) else _rand(3, *(2 * x - 1 for x in ks))
    qk, av = getattr(F, f"na{r}d_qk"), getattr(F, f"na{r}d_av")
    logits = qk(q, k, kernel, dilation, is_causal=causal, rpb=rpb)
    want = natten_logits(q, k, ks, dl, ca, rpb)
    torch.testing.assert_close(logits, want, atol=1e-12, rtol=1e-12)
    attn = logits.softmax(-1)
    torch.testing.assert_close(av(attn, v, kernel, dilation, is_causal=causal), natten_av(attn, v, ks, dl, ca),
                               atol=1e-12, rtol=1e-12)


def test_legacy_names_agree_with_the_017_operators() -> None:
    q, k, v = _rand(1, 2, 9, 10, 4), _rand(1, 2, 9, 10, 4), _rand(1, 2, 9, 10, 4)
    rpb = _rand(2, 5, 5)
    want = F.na2d_qk(q, k, 3, 2, rpb=rpb)
    torch.testing.assert_close(F.natten2dqkrpb(q, k, rpb, 3, 2), want)     # 0.14.5-0.17.4
    torch.testing.assert_close(F.natten2dqkrpb(q, k, rpb, 2), want)        # 0.14.1-0.14.4: kernel from rpb
    torch.testing.assert_close(F.na2d_qk_with_bias(q, k, rpb, 3, 2), want)  # 0.15
    torch.testing.assert_close(F.natten2dqk(q, k, 3, 2), F.na2d_qk(q, k, 3, 2))
    attn = want.softmax(-1)
    out = F.na2d_av(attn, v, 3, 2)
    torch.testing.assert_close(F.natten2dav(attn, v, 3, 2), out)
    torch.testing.assert_close(F.natten2dav(attn, v, 2), out)              # 0.14.1-0.14.5: kernel from attn
    q1, k1, rpb1 = _rand(2, 3, 12, 4), _rand(2, 3, 12, 4), _rand(3, 9)
    torch.testing.assert_close(F.natten1dqkrpb(q1, k1, rpb1, 5, 2), F.na1d_qk(q1, k1, 5, 2, rpb=rpb1))
    torch.testing.assert_close(F.natten1dqkrpb(q1, k1, rpb1, 2), F.na1d_qk(q1, k1, 5, 2, rpb=rpb1))
    torch.testing.assert_close(F.na1d_qk_with_bias(q1, k1, rpb1, 5, 2), F.na1d_qk(q1, k1, 5, 2, rpb=rpb1))
    torch.testing.assert_close(F.natten1dqk(q1, k1, 5, 2), F.na1d_qk(q1, k1, 5, 2))
    a1 = F.natten1dqk(q1, k1, 5, 2).softmax(-1)
    torch.testing.assert_close(F.natten1dav(a1, q1, 5, 2), F.na1d_av(a1, q1, 5, 2))
    torch.testing.assert_close(F.natten1dav(a1, q1, 2), F.na1d_av(a1, q1, 5, 2))


def test_3d_operators_of_015_and_017() -> None:
    q, k = _rand(1, 2, 5, 6, 7, 4), _rand(1, 2, 5, 6, 7, 4)
    rpb = _rand(2, 3, 5, 5)
    want = F.na3d_qk(q, k, (2, 3, 3), (2, 1, 1), rpb=rpb)  # 0.17: per-axis tuples
    torch.testing.assert_close(F.natten3dqkrpb(q, k, rpb, 2, 3, 2, 1), want)  # (kernel_size_d, kernel_size, ...)
    torch.testing.assert_close(F.na3d_qk_with_bias(q, k, rpb, 2, 3, 2, 1), want)
    torch.testing.assert_close(F.natten3dqk(q, k, 2, 3, 2, 1), F.na3d_qk(q, k, 2, 3, 2, 1))  # 0.15 positional
    torch.testing.assert_close(F.na3d_qk(q, k, kernel_size_d=2, kernel_size=3, dilation_d=2, dilation=1),
                               F.na3d_qk(q, k, (2, 3, 3), (2, 1, 1)))
    attn = want.softmax(-1)
    out = F.na3d_av(attn, k, (2, 3, 3), (2, 1, 1))
    torch.testing.assert_close(F.natten3dav(attn, k, 2, 3, 2, 1), out)
    torch.testing.assert_close(F.na3d_av(attn, k, 2, 3, 2, 1), out)


def test_additional_tokens_follow_the_neighbourhood() -> None:
    """0.15-0.17: extra keys' logits after the neighbourhood's; the weights split the same way in ``av``."""
    q, k, v = _rand(2, 3, 7, 8, 4), _rand(2, 3, 7, 8, 4), _rand(2, 3, 7, 8, 4)
    xk, xv = _rand(2, 3, 5, 4), _rand(2, 3, 5, 4)
    logits = F.na2d_qk(q, k, 3, additional_keys=xk)
    assert logits.shape == (2, 3, 7, 8, 9 + 5)
    torch.testing.assert_close(logits[..., :9], F.na2d_qk(q, k, 3))
    torch.testing.assert_close(logits[..., 9:], torch.einsum("bhxyd,bhnd->bhxyn", q, xk))
    out = F.na2d_av(logits.softmax(-1), v, 3, additional_values=xv)
    want = visattn.na2d(*(t.movedim(1, -2) for t in (q, k, v)), 3, scale=1.0, additional_keys=xk.transpose(1, 2),
                        additional_values=xv.transpose(1, 2))
    torch.testing.assert_close(out, want.movedim(-2, 1))


def test_gradients_reach_the_bias_table() -> None:
    q, k, v = (_rand(1, 1, 4, 5, 2, requires_grad=True) for _ in range(3))
    rpb = _rand(1, 5, 5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, rpb: F.natten2dav(F.natten2dqkrpb(q, k, rpb, 3, 1).softmax(-1), v,
                                                                      3, 1), (q, k, v, rpb))
    q1, k1, v1 = (_rand(1, 2, 7, 2, requires_grad=True) for _ in range(3))
    rpb1 = _rand(2, 5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, rpb: F.na1d_av(F.na1d_qk(q, k, 3, 2, rpb=rpb).softmax(-1), v, 3, 2),
                                    (q1, k1, v1, rpb1))
    assert torch.autograd.gradcheck(lambda q, k, v: F.na1d_av(F.na1d_qk(q, k, 3, 2, is_causal=True).softmax(-1), v,
                                                              3, 2, is_causal=True), (q1, k1, v1))


@pytest.mark.parametrize("backend", ["torch", "reference", "cpu"])
def test_fused_ops_of_017_and_020(backend: str) -> None:
    if visattn.backends.why_not(backend) is not None:
        pytest.skip(visattn.backends.why_not(backend))
    dtype = torch.float32 if backend == "cpu" else torch.float64
    q, k, v = (_rand(2, 9, 10, 2, 8, dtype=dtype) for _ in range(3))
    rpb = _rand(2, 5, 5, dtype=dtype)
    want = visattn.na2d(q, k, v, 3, dilation=2, rpb=rpb, backend="reference")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(F.na2d(q, k, v, 3, dilation=2, rpb=rpb, backend=backend), want, **tol)
    with _pinned("0.17.5"):  # 0.17: (q, k, v, kernel_size, dilation, is_causal, rpb, scale)
        torch.testing.assert_close(F.na2d(q, k, v, 3, 2, False, rpb, 0), want, **tol)  # scale 0 meant the default
    with _pinned("0.21.7"):  # 0.20+: (q, k, v, kernel_size, stride, dilation, ...)
        out, lse = F.na2d(q, k, v, 3, 1, 2, backend="cutlass-fna", q_tile_shape=(8, 8), return_lse=True)
        torch.testing.assert_close(out, visattn.na2d(q, k, v, 3, dilation=2, backend="reference"), **tol)


class _pinned:
    def __init__(self, version):
        self.version = version

    def __enter__(self):
        _versions.pin(self.version)

    def __exit__(self, *exc):
        _versions.pin(None)


def test_attention_is_dense_attention() -> None:
    q, k, v = _rand(2, 11, 4, 8), _rand(2, 13, 2, 8), _rand(2, 13, 2, 6)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1),
                                                           v.transpose(1, 2).repeat_interleave(2, 1), scale=0.3)
    out, lse = F.attention(q, k, v, scale=0.3, return_lse=True)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2)) * 0.3
    torch.testing.assert_close(lse, logits.logsumexp(-1).transpose(1, 2))
    qs = _rand(1, 10, 2, 4)
    causal = torch.nn.functional.scaled_dot_product_attention(*(qs.transpose(1, 2),) * 3, is_causal=True)
    torch.testing.assert_close(F.attention(qs, qs, qs, True), causal.transpose(1, 2))  # 0.21.5+: is_causal 4th
    with _pinned("0.20.1"):  # 0.20-0.21.1: scale 4th
        torch.testing.assert_close(F.attention(qs, qs, qs, 0.5), F.attention(qs, qs, qs, scale=0.5))
    # varlen: two packed sequences of 4 and 6 tokens, each attending only to itself
    lens = torch.tensor([4, 6])
    packed = F.attention(qs, qs, qs, seqlens_Q=lens, seqlens_KV=lens)
    torch.testing.assert_close(packed[:, :4], F.attention(qs[:, :4], qs[:, :4], qs[:, :4]))
    cum = torch.tensor([0, 4, 10])
    torch.testing.assert_close(F.attention(qs, qs, qs, cumulative_seqlen_Q=cum, cumulative_seqlen_KV=cum,
                                           max_seqlen_Q=6, max_seqlen_KV=6), packed)


def test_merge_attentions_return_by_release() -> None:
    q, k = _rand(1, 8, 2, 4), _rand(1, 8, 2, 4)
    parts = [F.attention(q, k[:, :5], k[:, :5], return_lse=True), F.attention(q, k[:, 5:], k[:, 5:], return_lse=True)]
    want = F.attention(q, k, k)
    with _pinned("0.21.7"):
        out, lse = F.merge_attentions([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, want)
    with _pinned("0.20.1"):
        torch.testing.assert_close(F.merge_attentions([p[0] for p in parts], [p[1] for p in parts]), want)
    with pytest.warns(UserWarning, match="merge_attentions: NATTEN 0.20.0-0.21.1 would build this"):
        assert isinstance(F.merge_attentions([p[0] for p in parts], [p[1] for p in parts]), tuple)
    with pytest.raises(ValueError, match="at least two"):
        F.merge_attentions([parts[0][0]], [parts[0][1]], use_autograd_fix=True)


def test_nested_tensors_run_per_sample() -> None:
    from visattn.compat.natten import nested

    qs = [_rand(2, 6, 7, 4), _rand(2, 8, 5, 4)]
    nq = torch.nested.nested_tensor(qs)
    logits = nested.na2d_qk_nested(nq, nq, None, 3, 1)
    for got, q in zip(logits.unbind(), qs):
        torch.testing.assert_close(got, F.na2d_qk(q[None], q[None], 3)[0])
    out = nested.na2d_av_nested(torch.nested.nested_tensor([t.softmax(-1) for t in logits.unbind()]), nq, 3, 1)
    torch.testing.assert_close(out.unbind()[1], F.na2d_av(logits.unbind()[1].softmax(-1)[None], qs[1][None], 3)[0])


# ------------------------------------------------------------------------------------------------
# Bad input

def test_heads_last_where_heads_first_is_expected() -> None:
    q = _rand(1, 14, 14, 2, 8)  # heads-last: NATTEN's unfused ops read [B, heads=14, 14, 2, dim]
    with pytest.raises(ValueError, match=r"natten2dqkrpb: kernel_size=\(7, 7\) .* spatial axis 1, which has 2 .*"
                                         r"heads-last, that axis holds the heads.* t\.permute\(0, 3, 1, 2, 4\)"):
        F.natten2dqkrpb(q, q, _rand(2, 13, 13), 7, 1)
    with pytest.raises(ValueError, match=r"na2d_qk: query has shape \(1, 14, 14, 8\) \(4 dims\); expected 5 dims"):
        F.na2d_qk(q[..., 0, :], q[..., 0, :], 3)
    with pytest.raises(ValueError, match=r"natten2dav: attn has shape .* and value .*heads-first"):
        F.natten2dav(_rand(1, 2, 14, 14, 9), q, 3, 1)


def test_weights_of_the_wrong_size() -> None:
    v = _rand(1, 2, 9, 9, 4)
    with pytest.raises(ValueError, match=r"na2d_av: attn has 10 weights per query .*expected prod\(kernel_size\) = 9 "
                                         r"for kernel_size=\(3, 3\) \(pass additional_values for the extra weights\)"):
        F.na2d_av(_rand(1, 2, 9, 9, 10), v, 3)
    with pytest.raises(ValueError, match=r"expected prod\(kernel_size\) \+ 2 additional values = 11"):
        F.na2d_av(_rand(1, 2, 9, 9, 12), v, 3, additional_values=_rand(1, 2, 2, 4))
    with pytest.raises(TypeError, match=r"natten2dav: .*attn's last dim 10 is not a kernel_size \*\* 2"):
        F.natten2dav(_rand(1, 2, 9, 9, 10), v, 1)


def test_bias_table_of_the_wrong_shape() -> None:
    q = _rand(1, 2, 9, 9, 4)
    with pytest.raises(ValueError, match=r"natten2dqkrpb: rpb has shape \(2, 5, 5\); expected .* = \(2, 13, 13\) for "
                                         r"heads=2 .* kernel_size=\(7, 7\)"):
        F.natten2dqkrpb(q, q, _rand(2, 5, 5), 7, 1)
    with pytest.raises(ValueError, match=r"na2d_qk: rpb has shape \(3, 5, 5\); expected .* \(2, 5, 5\)"):
        F.na2d_qk(q, q, 3, rpb=_rand(3, 5, 5))


def test_kernel_and_dilation_that_do_not_fit() -> None:
    q = _rand(1, 2, 9, 12, 4)
    with pytest.raises(ValueError, match=r"na2d_qk: kernel_size=\(5, 5\) with dilation=\(2, 2\) needs 10 positions on "
                                         r"spatial axis 0, which has 9 .* kernel_size \* dilation <= 9"):
        F.na2d_qk(q, q, 5, 2)
    with pytest.raises(TypeError, match=r"na2d: this call means different things .*0\.17.*dilation=\(2, 2\).*"
                                        r"0\.20.*stride=\(2, 2\).*VISATTN_NATTEN_VERSION"):
        F.na2d(q.movedim(1, -2), q.movedim(1, -2), q.movedim(1, -2), 3, 2)
    with pytest.raises(TypeError, match=r"natten2dqkrpb: these arguments match no NATTEN release"):
        F.natten2dqkrpb(q, q, None, 3, 1, 1)


def test_017_variants_read_the_017_signature() -> None:
    """``natten.experimental.na2d`` (0.17) and ``natten.flex.flex_na2d`` (0.17.5) only had 0.17's signature, so
    their positional fifth argument is the dilation without a pin."""
    from visattn.compat.natten import experimental, flex

    q = _rand(1, 9, 10, 2, 4)
    want = visattn.na2d(q, q, q, 3, dilation=2)
    torch.testing.assert_close(experimental.na2d(q, q, q, 3, 2), want)
    torch.testing.assert_close(flex.flex_na2d(q, q, q, 3, 2), want)
    with pytest.raises(TypeError, match="flex_na2d: these arguments match no NATTEN release"):
        flex.flex_na2d(q, q, q, 3, rpb=_rand(2, 5, 5))  # Flex had no bias


def test_fused_ops_match_an_installed_natten() -> None:
    """The stand-in's 0.20+ calls against NATTEN itself (0.21.7 in CI), with its argument order."""
    import visattn.compat

    if visattn.compat.real_natten() is None:
        pytest.skip("NATTEN is not installed (optional oracle)")
    import importlib
    import sys

    real = sys.modules.get("natten")
    if real is None or real.__name__ != "natten":
        real = importlib.import_module("natten")
    q, k, v = (_rand(1, 9, 10, 2, 16, dtype=torch.float32) for _ in range(3))
    with _pinned("0.21.7"):
        for args in [(3,), (3, 1, 2), (5, (2, 1), (1, 2), (True, False))]:
            torch.testing.assert_close(F.na2d(q, k, v, *args), real.na2d(q, k, v, *args), atol=2e-5, rtol=2e-4)
        out, lse = F.na2d(q, k, v, 3, return_lse=True)
        want, want_lse = real.na2d(q, k, v, 3, return_lse=True)
        torch.testing.assert_close((out, lse), (want, want_lse), atol=2e-5, rtol=2e-4)
