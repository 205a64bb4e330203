"""NATTEN's own window rules for its unfused operators, written out from its reference CPU kernels
(``get_window_start``, ``get_window_end`` and ``get_pb_start`` in NATTEN 0.17's
``csrc/include/natten/cpu/naive/natten_cpu_commons.h``), independently of visattn's ``spec.py``:
a second oracle for the stand-in's slot order (causal windows put their keys first) and bias indices.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch


def _window_start(index: int, length: int, kernel: int, dilation: int, causal: bool) -> int:
    ns = kernel // 2
    g, p = index % dilation, index // dilation
    n = (length + dilation - 1) // dilation
    padded = n * dilation - length
    n -= 1 if g >= dilation - padded else 0
    if causal:
        start = max(p - kernel + 1, 0)
    else:
        start = max(p - ns, 0) + (p + ns >= n) * (n - p - ns - 1)
    return start * dilation + g


def _pb_start(index: int, length: int, kernel: int, dilation: int) -> int:
    ns = kernel // 2
    if dilation <= 1:
        return ns + (index < ns) * (ns - index) + (index + ns >= length) * (length - index - 1 - ns)
    if index - ns * dilation < 0:
        return kernel - 1 - index // dilation
    if index + ns * dilation >= length:
        return (length - index - 1) // dilation
    return ns


def axis_slots(index: int, length: int, kernel: int, dilation: int, causal: bool) -> list[Optional[tuple[int, int]]]:
    """NATTEN's slots of query ``index`` on one axis: ``(key coordinate, bias index)`` or ``None`` (empty)."""
    start = _window_start(index, length, kernel, dilation, causal)
    end = min(length, index + dilation) if causal else min(length, start + kernel * dilation)
    pb = None if causal else _pb_start(index, length, kernel, dilation)
    return [(start + j * dilation, None if pb is None else pb + j) if start + j * dilation < end else None
            for j in range(kernel)]


def _pairs(S, kernel_size, dilation, is_causal):
    """Every ``(query coordinate, slot, key coordinate, bias index)`` with a key, by NATTEN's rules."""
    for x in itertools.product(*(range(L) for L in S)):
        per_axis = [axis_slots(x[a], S[a], kernel_size[a], dilation[a], is_causal[a]) for a in range(len(S))]
        for slot, combo in enumerate(itertools.product(*per_axis)):
            if all(c is not None for c in combo):
                yield x, slot, tuple(c[0] for c in combo), tuple(c[1] for c in combo)


def natten_logits(q: torch.Tensor, k: torch.Tensor, kernel_size, dilation, is_causal,
                  rpb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Heads-first ``q, k [B, H, *S, D]`` -> NATTEN's unfused ``qk`` logits ``[B, H, *S, K]`` (float64, loops)."""
    B, H, *S, _ = q.shape
    out = torch.full((B, H, *S, math.prod(kernel_size)), float("-inf"), dtype=torch.float64)
    q, k = q.double(), k.double()
    every = (slice(None), slice(None))
    for x, slot, coord, bias in _pairs(S, kernel_size, dilation, is_causal):
        z = (q[every + x] * k[every + coord]).sum(-1)
        if rpb is not None:
            z = z + rpb[(slice(None), *bias)].double()
        out[every + x + (slot,)] = z
    return out


def natten_av(attn: torch.Tensor, v: torch.Tensor, kernel_size, dilation, is_causal) -> torch.Tensor:
    """NATTEN's unfused ``av``: heads-first weights ``[B, H, *S, K]`` (empty slots ignored) applied to
    ``v [B, H, *S, D]`` (float64, loops)."""
    out = torch.zeros(v.shape, dtype=torch.float64)
    every = (slice(None), slice(None))
    for x, slot, coord, _ in _pairs(v.shape[2:-1], kernel_size, dilation, is_causal):
        out[every + x] += attn[every + x + (slot,)].double()[..., None] * v[every + coord].double()
    return out
