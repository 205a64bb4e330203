"""Public API behaviour: argument validation (every error names the argument and the fix),
edge cases, dtypes, and the NATTEN-compatible call forms."""

from __future__ import annotations

import pytest
import torch

import visattn
from visattn import na1d, na2d, na3d, neighborhood_attention


def _qkv(*shape, dtype=torch.float32, heads_kv=None, dim_v=None):
    q = torch.randn(*shape, dtype=dtype)
    kv_shape = (*shape[:-2], heads_kv or shape[-2])
    k = torch.randn(*kv_shape, shape[-1], dtype=dtype)
    v = torch.randn(*kv_shape, dim_v or shape[-1], dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=0), r"kernel_size=0 must be >= 1"),
    (dict(kernel_size=3.0), r"kernel_size=3.0 must be a positive int"),
    (dict(kernel_size=(3, 3, 3)), r"kernel_size=\(3, 3, 3\) has 3 entries but the input has 2 spatial axes"),
    (dict(kernel_size=3, stride=4), r"stride=\(4, 4\) exceeds kernel_size=\(3, 3\) on axis 0"),
    (dict(kernel_size=3, dilation=-1), r"dilation=-1 must be >= 1"),
    (dict(kernel_size=3, is_causal=(True,)), r"is_causal=\(True,\) has 1 entries"),
    (dict(kernel_size=3, backend="nope"), r"backend='nope': no backend of that name. Known backends: reference, torch"),
    (dict(kernel_size=3, tile_shape=4), r"na2d: unexpected keyword argument\(s\) \['tile_shape'\]"),
])
def test_argument_errors_name_the_argument(kwargs, match) -> None:
    q, k, v = _qkv(1, 6, 6, 2, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        na2d(q, k, v, **kwargs)


def test_tensor_errors() -> None:
    q, k, v = _qkv(1, 6, 6, 2, 8)
    with pytest.raises(ValueError, match=r"na1d: query has shape \(1, 6, 6, 2, 8\) \(5 dims\) but na1d expects"):
        na1d(q, k, v, 3)
    with pytest.raises(ValueError, match=r"key batch/spatial shape \(1, 6, 5\) differs from query's \(1, 6, 6\)"):
        na2d(q, k[:, :, :5], v, 3)
    with pytest.raises(TypeError, match=r"key.dtype=torch.float64 but query.dtype=torch.float32"):
        na2d(q, k.double(), v, 3)
    with pytest.raises(ValueError, match=r"key head_dim=4 differs from query head_dim=8"):
        na2d(q, k[..., :4], v, 3)
    q3, k3, v3 = _qkv(1, 6, 6, 3, 8, heads_kv=2)
    with pytest.raises(ValueError, match=r"query has 3 heads, key/value 2; for GQA/MQA the kv heads must divide"):
        na2d(q3, k3, v3, 3)
    with pytest.raises(TypeError, match=r"floating-point"):
        na2d(q.long(), k.long(), v.long(), 3)
    with pytest.raises(ValueError, match=r"pass both additional_keys and additional_values"):
        na2d(q, k, v, 3, additional_keys=torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"additional_keys/values must be \[B, N, H_kv, D\]"):
        na2d(q, k, v, 3, additional_keys=torch.randn(1, 4, 3, 8), additional_values=torch.randn(1, 4, 3, 8))


def test_bias_and_mask_errors_name_the_argument() -> None:
    """Biases and masks on another device, or biases of an integer dtype, are refused up front with
    the fix (a meta tensor stands in for another device on a CPU-only machine)."""
    q, k, v = _qkv(1, 6, 6, 2, 8)
    rpb = torch.zeros(2, 5, 5)
    with pytest.raises(ValueError, match=r"na2d: rpb is on meta but the query is on cpu; move it with rpb.to"):
        na2d(q, k, v, 3, rpb=rpb.to("meta"))
    with pytest.raises(ValueError, match=r"na2d: rpb has dtype torch.int64; .* must be a floating-point tensor"):
        na2d(q, k, v, 3, rpb=rpb.long())
    with pytest.raises(ValueError, match=r"attn_bias is on meta but the query is on cpu"):
        na2d(q, k, v, 3, attn_bias=torch.zeros(1, 6, 6, 2, 9, device="meta"))
    with pytest.raises(ValueError, match=r"key_padding_mask is on meta but the query is on cpu"):
        na2d(q, k, v, 3, key_padding_mask=torch.zeros(1, 6, 6, dtype=torch.bool, device="meta"))
    torch.testing.assert_close(na2d(q, k, v, 3, rpb=rpb.double()), na2d(q, k, v, 3, rpb=rpb))  # any float dtype


def test_zero_size_batch_and_axis() -> None:
    q, k, v = _qkv(0, 6, 6, 2, 8, dim_v=5)
    out, lse = na2d(q, k, v, 3, return_lse=True)
    assert out.shape == (0, 6, 6, 2, 5) and lse.shape == (0, 6, 6, 2)
    q, k, v = _qkv(2, 0, 5, 1, 8)
    assert na2d(q, k, v, 3).shape == (2, 0, 5, 1, 8)


def test_natten_tuning_kwargs_are_accepted() -> None:
    """NATTEN call sites pass tile shapes and schedules; they are performance hints only."""
    q, k, v = _qkv(1, 9, 9, 2, 8)
    a = na2d(q, k, v, 3, q_tile_shape=(8, 8), kv_tile_shape=(8, 8), torch_compile=False)
    torch.testing.assert_close(a, na2d(q, k, v, 3))


def test_scale_and_defaults() -> None:
    q, k, v = _qkv(1, 7, 7, 2, 16)
    torch.testing.assert_close(na2d(q, k, v, 3), na2d(q, k, v, 3, scale=16 ** -0.5))
    torch.testing.assert_close(na2d(q * 2, k, v, 3, scale=0.125), na2d(q, k, v, 3, scale=0.25))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype) -> None:
    q, k, v = _qkv(1, 9, 11, 2, 16, dtype=dtype)
    out, lse = na2d(q, k, v, (3, 5), backend="torch", return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref, ref_lse = na2d(q.double(), k.double(), v.double(), (3, 5), backend="reference", return_lse=True)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


def test_gqa_equals_repeated_heads() -> None:
    q, k, v = _qkv(2, 10, 4, 8, heads_kv=2)
    rep = lambda t: t.repeat_interleave(2, dim=-2)  # noqa: E731
    for backend in ("torch", "reference"):
        torch.testing.assert_close(na1d(q, k, v, 5, backend=backend), na1d(q, rep(k), rep(v), 5, backend=backend))


def test_rank_generic_equals_ranked() -> None:
    q, k, v = _qkv(1, 4, 5, 6, 2, 8)
    torch.testing.assert_close(na3d(q, k, v, 3, dilation=(1, 2, 1)),
                               neighborhood_attention(q, k, v, 3, dilation=(1, 2, 1)))


def test_backend_refusal_is_explained(monkeypatch) -> None:
    from visattn import backends
    from visattn.backends import Backend, Result, register_backend

    monkeypatch.setattr(backends, "_INSTANCES", dict(backends._INSTANCES))  # the registration ends with the test

    class Picky(Backend):
        name = "picky-test"

        def refuse(self, p):
            return "only head_dim 64"

        def forward(self, q, k, v, p, extras):  # pragma: no cover - never called
            return Result(q, q[..., 0])

    register_backend(Picky())
    q, k, v = _qkv(1, 6, 2, 8)
    with pytest.raises(ValueError, match=r"backend='picky-test' cannot serve this call: only head_dim 64"):
        na1d(q, k, v, 3, backend="picky-test")
    # Automatic selection skips it.
    torch.testing.assert_close(na1d(q, k, v, 3), na1d(q, k, v, 3, backend="reference"))


def test_public_names() -> None:
    for name in visattn.__all__:
        assert hasattr(visattn, name)
