"""Variable resolution: ``kernel * dilation > length`` is defined (the window is clamped to what fits),
identical to NATTEN's semantics where NATTEN accepts the call, full attention along an axis shorter
than the kernel, and a DiNAT-style block runs at every resolution >= 1 token per axis."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from brute import brute_force
from visattn import NeighborhoodAttention2D, na1d, na2d
from visattn.spec import fit_axis, make_spec


@pytest.mark.parametrize("length, kernel, stride, dilation, expected", [
    (20, 5, 1, 4, (5, 1, 4)),   # k*d = 20 <= 20: NATTEN's domain, unchanged
    (19, 5, 2, 4, (5, 2, 3)),   # k*d = 20 > 19: the largest dilation that fits, 19 // 5 = 3
    (9, 5, 5, 3, (5, 5, 1)),    # 9 // 5 = 1: plain NA
    (4, 5, 3, 2, (4, 3, 1)),    # shorter than the kernel: the whole axis, dilation 1
    (3, 7, 7, 1, (3, 3, 1)),    # blocked attention on a short axis: one block; stride capped at the kernel
    (1, 7, 1, 4, (1, 1, 1)),    # a single token
])
def test_fit_axis_rule(length, kernel, stride, dilation, expected) -> None:
    assert fit_axis(length, kernel, stride, dilation) == expected


def test_spec_keeps_the_requested_kernel_for_the_bias_table() -> None:
    spec = make_spec("test", (3, 40), (7, 7), 1, (4, 4))
    assert spec.kernel_size == (3, 7) and spec.dilation == (1, 4) and spec.requested_kernel_size == (7, 7)


def test_natten_domain_is_unchanged() -> None:
    """Where ``k * d <= L`` the call equals the same call with explicitly fitting arguments (no
    silent change), and a dilated call equals NA on each dilation group's sub-grid."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 15, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out = na2d(q, k, v, 3, dilation=(4, 5))
    for gi, gj in itertools.product(range(4), range(5)):
        sub = lambda t: t[:, gi::4, gj::5]  # noqa: E731
        torch.testing.assert_close(out[:, gi::4, gj::5], na2d(sub(q), sub(k), sub(v), 3))


def test_short_axis_is_full_attention() -> None:
    """Kernel 7 on 5 tokens: every query sees the whole axis, i.e. SDPA."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v)).transpose(1, 2)
    torch.testing.assert_close(na1d(q, k, v, 7, dilation=3), ref)
    torch.testing.assert_close(na1d(q, k, v, 7, stride=7), ref)


def test_reduced_dilation_equals_explicit_dilation() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 17, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(2, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(na1d(q, k, v, 5, dilation=8, rpb=rpb), na1d(q, k, v, 5, dilation=3, rpb=rpb))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_every_small_resolution_matches_the_loop_oracle(backend: str) -> None:
    """Lengths 1..9 on both axes against the loop oracle, kernel 5 with dilation 2, with RPB."""
    g = torch.Generator().manual_seed(0)
    rpb = torch.randn(2, 9, 9, generator=g, dtype=torch.float64)
    for L0, L1 in [(1, 1), (1, 9), (2, 3), (4, 5), (5, 6), (6, 9), (9, 9), (3, 10)]:
        q, k, v = (torch.randn(1, L0, L1, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
        for na in (dict(kernel_size=5, dilation=2), dict(kernel_size=5, stride=(2, 5), is_causal=(True, False))):
            out, attn = na2d(q, k, v, **na, rpb=rpb, return_attn=True, backend=backend)
            ref_out, _, ref_attn = brute_force(q, k, v, **na, rpb=rpb)
            torch.testing.assert_close(out, ref_out, msg=lambda m: f"{(L0, L1)} {na}: {m}")
            torch.testing.assert_close(attn, ref_attn, msg=lambda m: f"{(L0, L1)} {na}: {m}")


class DiNATBlock(nn.Module):
    """Two pre-norm NA layers as in DiNAT (dense then dilated), kernel 7, dilation 4, with RPB."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.attns = nn.ModuleList([NeighborhoodAttention2D(dim, 2, 7, dilation=d, rel_pos_bias=True) for d in (1, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        return x


@pytest.mark.parametrize("size", [(1, 1), (1, 6), (2, 3), (7, 7), (9, 27), (28, 13)])
def test_dinat_block_runs_at_any_resolution(size) -> None:
    torch.manual_seed(0)
    block = DiNATBlock()
    x = torch.randn(2, *size, 16, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in block.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    if size == (1, 1):  # one token: attention returns its own value
        attn = block.attns[0]
        with torch.no_grad():
            z = torch.randn(1, 1, 1, 16)
            v = attn.qkv(z)[..., 32:]
            torch.testing.assert_close(attn(z), attn.proj(v))
