"""Properties every registered attention module must have, shared by the zoo's test files.

Each check asserts something a user relies on: shape kept, gradients reach every parameter, eval
mode is deterministic, a sample's output does not depend on its batch neighbours.
"""

from __future__ import annotations

import torch
from torch import nn


def check_shape_and_grads(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output has the input's shape and dtype; every trainable parameter gets a finite, non-zero
    gradient (a parameter that never receives gradient is dead weight or a bug)."""
    module.train()
    x = x.clone().requires_grad_(True)
    y = module(x)
    assert y.shape == x.shape, f"{type(module).__name__}: output {tuple(y.shape)} != input {tuple(x.shape)}"
    assert y.dtype == x.dtype
    # A random projection so that no gradient cancels by symmetry (e.g. a plain sum after a norm).
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype)
    (y * w).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{type(module).__name__}.{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{type(module).__name__}.{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{type(module).__name__}.{name} has an all-zero gradient"
    return y


def check_eval_deterministic(module: nn.Module, x: torch.Tensor) -> None:
    """Two eval-mode calls on the same input agree exactly."""
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), module(x), atol=0, rtol=0)


def check_batch_independent(module: nn.Module, x: torch.Tensor, atol: float = 1e-5) -> None:
    """In eval mode, sample 0's output is the same alone and inside a batch of other samples."""
    assert x.shape[0] >= 2
    module.eval()
    with torch.no_grad():
        together = module(x)[:1]
        alone = module(x[:1])
    torch.testing.assert_close(together, alone, atol=atol, rtol=1e-4)


def receptive_field(module: nn.Module, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """Which input positions the output at ``(i, j)`` of sample 0 depends on: bool ``[H, W]`` of
    nonzero gradients (``x``: ``[B, H, W, C]`` with ``requires_grad``)."""
    (g,) = torch.autograd.grad(module(x)[0, i, j].sum(), x)
    return g[0].abs().sum(-1) > 0


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_all(module: nn.Module, x: torch.Tensor) -> None:
    """Every generic property above on ``x`` (batch >= 2)."""
    check_shape_and_grads(module, x)
    check_eval_deterministic(module, x)
    check_batch_independent(module, x)
