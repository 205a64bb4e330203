"""``na_varlen``: packed samples of different sizes give what each sample alone gives, forward and
backward, with shared or per-sample window arguments; bad packing is refused with the fix."""

from __future__ import annotations

import pytest
import torch

from visattn import na_varlen, neighborhood_attention

SIZES_2D = [(5, 7), (9, 4), (5, 7), (3, 3), (12, 10), (9, 4)]  # repeats: batched together


def _packed(sizes, heads=(4, 2), dims=(8, 6), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    total = sum(torch.Size(s).numel() for s in sizes)
    q = torch.randn(total, heads[0], dims[0], generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(total, heads[1], dims[0], generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(total, heads[1], dims[1], generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


def _per_sample_loop(q, k, v, sizes, args, **kw):
    """The definition: every sample alone, outputs packed back in order."""
    outs, lses, at = [], [], 0
    for size, a in zip(sizes, args):
        n = torch.Size(size).numel()
        sample = [t[at:at + n].reshape(1, *size, *t.shape[1:]) for t in (q, k, v)]
        out, lse = neighborhood_attention(*sample, **a, **kw, return_lse=True)
        outs.append(out.reshape(n, *out.shape[-2:]))
        lses.append(lse.reshape(n, -1))
        at += n
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("sizes,common,per_sample", [
    ([(13,), (4,), (13,), (30,)], dict(kernel_size=5, dilation=2), None),
    (SIZES_2D, dict(kernel_size=3, stride=(1, 2)), None),
    (SIZES_2D, {}, dict(kernel_size=[3, 5, (3, 5), 3, 7, 3], is_causal=[False, True, False, False, (True, False),
                                                                           False])),
    ([(3, 4, 5), (2, 6, 3), (3, 4, 5)], dict(kernel_size=(2, 3, 3), dilation=(1, 2, 1)), None),
    ([(7, 6), (5, 9)], dict(kernel_size=3, periodic=(True, False)), None),
], ids=["1d", "2d-shared", "2d-per-sample", "3d", "2d-periodic"])
def test_equals_each_sample_alone(sizes, common, per_sample, dtype) -> None:
    q, k, v = _packed(sizes, dtype=dtype)
    per_sample = per_sample or {}
    args = [{**common, **{name: values[i] for name, values in per_sample.items()}} for i in range(len(sizes))]
    out, lse = na_varlen(q, k, v, sizes, **common, **per_sample, return_lse=True)
    ref_out, ref_lse = _per_sample_loop(q, k, v, sizes, args)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    g = torch.Generator().manual_seed(5)
    w, wl = torch.randn(out.shape, generator=g, dtype=dtype), torch.randn(lse.shape, generator=g, dtype=dtype)
    got = torch.autograd.grad((out * w).sum() + (lse * wl).sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * w).sum() + (ref_lse * wl).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_shared_bias_table_and_size_tensor() -> None:
    sizes = [(6, 5), (4, 8), (6, 5)]
    q, k, v = _packed(sizes, heads=(2, 2))
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    out = na_varlen(q, k, v, torch.tensor(sizes), 3, rpb=rpb)
    ref, _ = _per_sample_loop(q, k, v, sizes, [dict(kernel_size=3)] * 3, rpb=rpb)
    torch.testing.assert_close(out, ref)
    ga = torch.autograd.grad(out.square().sum(), rpb)[0]
    gb = torch.autograd.grad(ref.square().sum(), rpb)[0]
    torch.testing.assert_close(ga, gb)


def test_bad_packing_is_refused_with_the_fix() -> None:
    q, k, v = _packed([(4, 4), (3, 5)])
    with pytest.raises(ValueError, match=r"query has 31 rows but spatial_sizes add up to 32 tokens"):
        na_varlen(q, k, v, [(4, 4), (4, 4)], 3)
    with pytest.raises(ValueError, match=r"spatial_sizes\[1\]=\(3,\) has 1 axes"):
        na_varlen(q, k, v, [(4, 4), (3,)], 3)
    with pytest.raises(ValueError, match=r"must be a packed \[total_tokens, heads, head_dim\] tensor"):
        na_varlen(q[None], k, v, [(4, 4), (3, 5)], 3)
    with pytest.raises(ValueError, match=r"kernel_size=\[3, 3, 3\] is a list of 3 entries; give one entry per sample"):
        na_varlen(q, k, v, [(4, 4), (3, 5)], [3, 3, 3])
    with pytest.raises(ValueError, match=r"one rpb table is shared by all samples, but kernel_size differs"):
        na_varlen(q, k, v, [(4, 4), (3, 5)], [3, 5], rpb=torch.randn(4, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"spatial_sizes must be a non-empty list"):
        na_varlen(q, k, v, [], 3)
