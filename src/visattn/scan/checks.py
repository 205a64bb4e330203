"""Validation and shape bookkeeping shared by every selective-scan path.

The argument convention is ``mamba-ssm``'s: ``u, delta, z: [batch, dim, L]``, ``A: [dim, N]``,
``B, C: [batch, N, L]`` or grouped ``[batch, groups, N, L]`` (channel ``d`` reads group
``d // (dim // groups)``), ``D, delta_bias: [dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["ScanShape", "check_scan", "compute_dtype", "grouped", "per_channel"]


@dataclass(frozen=True)
class ScanShape:
    """Sizes of one scan: ``batch``, ``dim`` channels, ``length`` tokens, ``state`` N, ``groups`` of B/C."""

    batch: int
    dim: int
    length: int
    state: int
    groups: int


def check_scan(fn: str, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
               delta_bias: Optional[torch.Tensor] = None) -> ScanShape:
    """Check every argument against the convention (module docstring) and return the sizes.

    Raises ``TypeError``/``ValueError`` naming ``fn``, the argument, its value and the fix.
    """
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    for name, t in named.items():
        if t is None and name in ("D", "z", "delta_bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.is_complex():
            raise TypeError(f"{fn}: {name} is complex ({t.dtype}); only real selective scans are supported. "
                            f"Pass a real {name}.")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name}.dtype={t.dtype}; the scan needs floating-point tensors "
                            f"(e.g. {name}.float()).")
        if t.device != u.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but u is on {u.device}; move it with {name}.to(u.device).")
    if u.dim() != 3:
        raise ValueError(f"{fn}: u has shape {tuple(u.shape)}; expected [batch, dim, L] (3 dims).")
    batch, dim, length = u.shape
    for name in ("delta", "z"):
        t = named[name]
        if t is not None and t.shape != u.shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)} but u has {tuple(u.shape)}; both are "
                             f"[batch, dim, L].")
        if t is not None and t.dtype != u.dtype:
            raise TypeError(f"{fn}: {name}.dtype={t.dtype} but u.dtype={u.dtype}; u, delta and z share one dtype "
                            f"(cast with {name}.to(u.dtype)).")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"{fn}: A has shape {tuple(A.shape)}; expected [dim, N] = [{dim}, N] (one row per "
                         f"channel of u).")
    state = A.shape[1]
    groups = []
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            want, g = (batch, state, length), 1
        elif t.dim() == 4:
            want, g = (batch, t.shape[1], state, length), t.shape[1]
        else:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}; expected [batch, N, L] = "
                             f"{[batch, state, length]} or grouped [batch, groups, N, L]. Time-invariant "
                             f"[dim, N] matrices are not supported: expand them over batch and L.")
        if tuple(t.shape) != want:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}; expected {list(want)} "
                             f"([batch, {'groups, ' if t.dim() == 4 else ''}N, L] with N = A.shape[1] = {state}).")
        if g < 1 or dim % g:
            raise ValueError(f"{fn}: {name} has {g} groups, which do not divide dim={dim}; choose a number of "
                             f"groups among the divisors of dim.")
        groups.append(g)
    if groups[0] != groups[1]:
        raise ValueError(f"{fn}: B has {groups[0]} groups but C has {groups[1]}; give both the same grouping.")
    for name in ("D", "delta_bias"):
        t = named[name]
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}; expected [dim] = [{dim}].")
    return ScanShape(batch, dim, length, state, groups[0])


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def grouped(t: torch.Tensor) -> torch.Tensor:
    """``B`` or ``C`` as ``[batch, groups, N, L]`` (a view; a 3-D tensor is one group)."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def per_channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``B`` or ``C`` repeated for every channel of its group: ``[batch, dim, N, L]`` (a broadcast view)."""
    t = grouped(t)
    batch, groups, state, length = t.shape
    return t[:, :, None].expand(batch, groups, dim // groups, state, length).reshape(batch, dim, state, length)
