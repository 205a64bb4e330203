"""Helpers shared by the CNN plug-in tests (``test_plugins_common.py`` and the per-family files beside it)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Run on one intra-op thread: the inputs are tiny, and on a loaded 2-core machine thread hand-offs
    made these tests ~50x slower than the arithmetic (measured: 0.7-2.3 s vs 0.01-0.04 s per check)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def gate_ratio(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y / x`` elementwise: the effective gate of a module that multiplies its input."""
    return y / x


def away_from_zero(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Random values with ``|x| >= 0.5`` so that ``y / x`` is well conditioned."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    return torch.where(x >= 0, x + 0.5, x - 0.5)


def assert_rank_one(r: torch.Tensor) -> None:
    """Every 2-D slice ``r[..., i, j]`` is an outer product ``a_i * b_j`` (a factorized gate)."""
    lhs = r[..., :, None, :, None] * r[..., None, :, None, :]   # r[i,j] r[k,l]
    rhs = r[..., :, None, None, :] * r[..., None, :, :, None]   # r[i,l] r[k,j]
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-8)


def seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter from N(0, 0.5^2) so that no test passes thanks to a special init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module
