"""Equivalences that pin the semantics to independent implementations, on every usable backend:
full kernel = dense SDPA, stride = kernel = window partition, dilation = NA on strided sub-grids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visattn import neighborhood_attention
from brute import takes_float64
from visattn.backends import list_backends, why_not

BACKENDS = [b for b in list_backends() if why_not(b) is None]


def _rand(backend: str, *shape):
    """float64 where the backend takes it; float32 for float32-only kernels (cpu_c), then compared
    with assert_close's float32 tolerances."""
    return torch.randn(*shape, dtype=torch.float64 if takes_float64(backend) else torch.float32)


def _sdpa_heads_last(q, k, v, is_causal=False):
    """Dense attention over all tokens: ``[B, *S, H, D]`` in and out."""
    B, H = q.shape[0], q.shape[-2]
    f = lambda t: t.reshape(B, -1, H, t.shape[-1]).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(f(q), f(k), f(v), is_causal=is_causal)
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spatial", [(11,), (5, 7), (3, 4, 5)])
def test_full_kernel_equals_sdpa(backend: str, spatial) -> None:
    q, k, v = _rand(backend, 2, *spatial, 2, 8), _rand(backend, 2, *spatial, 2, 8), _rand(backend, 2, *spatial, 2, 8)
    out = neighborhood_attention(q, k, v, kernel_size=spatial, backend=backend)
    torch.testing.assert_close(out, _sdpa_heads_last(q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_full_kernel_equals_causal_sdpa(backend: str) -> None:
    q, k, v = _rand(backend, 1, 13, 2, 8), _rand(backend, 1, 13, 2, 8), _rand(backend, 1, 13, 2, 8)
    out = neighborhood_attention(q, k, v, kernel_size=13, is_causal=True, backend=backend)
    torch.testing.assert_close(out, _sdpa_heads_last(q, k, v, is_causal=True))


def _window_partition_attention(q, k, v, window: tuple[int, int]):
    """Swin-style: cut [B, H, W, heads, D] into non-overlapping windows, dense attention in each."""
    B, Hs, Ws, nh, D = q.shape
    wh, ww = window

    def part(t):
        t = t.reshape(B, Hs // wh, wh, Ws // ww, ww, nh, t.shape[-1]).permute(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(B, Hs // wh, Ws // ww, nh, wh * ww, t.shape[-1])

    attn = torch.softmax(part(q) @ part(k).transpose(-1, -2) * D ** -0.5, dim=-1)
    out = (attn @ part(v)).reshape(B, Hs // wh, Ws // ww, nh, wh, ww, D)
    return out.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hs, Ws, nh, D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(4, 3), (2, 6)])
def test_stride_equal_kernel_is_window_attention(backend: str, window) -> None:
    q, k, v = _rand(backend, 2, 8, 12, 2, 8), _rand(backend, 2, 8, 12, 2, 8), _rand(backend, 2, 8, 12, 2, 8)
    out = neighborhood_attention(q, k, v, kernel_size=window, stride=window, backend=backend)
    torch.testing.assert_close(out, _window_partition_attention(q, k, v, window))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dilation", [(2, 3), (3, 1)])
def test_dilation_is_na_on_subgrids(backend: str, dilation) -> None:
    """DiNA with dilation d equals plain NA run separately on each d-strided sub-grid."""
    S, kernel = (13, 11), (3, 3)
    q, k, v = _rand(backend, 1, *S, 2, 8), _rand(backend, 1, *S, 2, 8), _rand(backend, 1, *S, 2, 8)
    out = neighborhood_attention(q, k, v, kernel_size=kernel, dilation=dilation, backend=backend)
    d0, d1 = dilation
    for g0 in range(d0):
        for g1 in range(d1):
            sub = lambda t: t[:, g0::d0, g1::d1]  # noqa: E731
            ref = neighborhood_attention(sub(q), sub(k), sub(v), kernel_size=kernel, backend="reference")
            torch.testing.assert_close(sub(out), ref)
