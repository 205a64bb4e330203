"""Swin window attention and shifted-window attention, built on the GNA operator.

Window attention is blocked neighbourhood attention: ``kernel = stride = M``. Swin's relative
position bias (a ``(2M-1)^2 x heads`` table indexed by key minus query inside the window) is exactly
the operator's ``rpb [heads, 2M-1, 2M-1]``, so both run on every visattn backend.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import nn

from ...spec import make_spec, neighbor_table
from .base import QKVMixer, check_input, na_attend
from ..registry import register_attn

__all__ = ["WindowAttention", "ShiftedWindowAttention", "swin_shift_bias"]

_PAPER = "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (2021)"


@lru_cache(maxsize=32)
def _shift_blocked(fn: str, size: tuple[int, int], window: int, shift: tuple[int, int]) -> torch.Tensor:
    """``[H, W, K]`` bool: key slot lies in another shift region than the query (CPU, cached)."""
    spec = make_spec(fn, size, window, window)
    index, _, _ = neighbor_table(spec)
    H, W = size
    rows = (torch.arange(H) >= H - shift[0]).long() if shift[0] else torch.zeros(H, dtype=torch.long)
    cols = (torch.arange(W) >= W - shift[1]).long() if shift[1] else torch.zeros(W, dtype=torch.long)
    region = (rows[:, None] * 2 + cols[None, :]).flatten()  # [N]
    return (region[index] != region[:, None]).reshape(H, W, -1)


def swin_shift_bias(fn: str, size: tuple[int, int], window: int, shift: tuple[int, int],
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Swin's shifted-window mask as additive logits in neighbourhood-slot order: ``[H, W, K]``.

    After the cyclic shift by ``-s`` the last ``s`` rows (columns) hold tokens that wrapped around
    from the top (left); a window may not mix wrapped and unwrapped tokens of an axis. Swin splits
    each axis into three slices ``[0, L-M), [L-M, L-s), [L-s, L)``; the first boundary is a window
    boundary when ``M`` divides ``L``, so "same wrap status per axis" is the same mask (proved in the
    tests) and it stays defined when GNA moves the last window inward (``M`` not dividing ``L``).
    Entries are ``0`` (allowed) or ``-inf`` (a different region).
    """
    blocked = _shift_blocked(fn, tuple(size), window, tuple(shift)).to(device)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill_(blocked, float("-inf"))


@register_attn("swin", layout="channels_last", paper=_PAPER, complexity="O(N M^2)", backends="visattn NA op",
               bench_kwargs=dict(num_heads=3))
class WindowAttention(QKVMixer):
    """Swin (W-MSA) window attention with relative position bias, on the GNA operator.

    Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (2021).
    Tokens attend to the other tokens of their ``M x M`` window, with a learned bias per head and
    relative offset. ``x [B, H, W, C] -> [B, H, W, C]``.

    Equals :func:`~visattn.neighborhood_attention` with ``kernel_size = stride = M`` and
    ``rpb [heads, 2M-1, 2M-1]`` (the same ``(2M-1)^2 x heads`` numbers as Swin's table).

    Deliberate differences: where ``M`` does not divide a side, Swin zero-pads the feature map and
    lets the padded (bias-only) tokens act as keys; we follow GNA instead: the last window moves
    inward (it overlaps its neighbour) and every query sees exactly ``M`` real tokens per axis.
    A side shorter than ``M`` becomes one window of the whole side (Swin's rule too).
    ``shift_size`` is 0 here; see :class:`ShiftedWindowAttention`. ``rel_pos_bias=False`` drops the
    bias table (DaViT's spatial window attention has none).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: Optional[str] = None, rel_pos_bias: bool = True) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        if not 0 <= shift_size < window_size:
            raise ValueError(f"{type(self).__name__}: shift_size={shift_size} must be in [0, window_size="
                             f"{window_size}); Swin uses window_size // 2.")
        self.window_size, self.shift_size, self.backend = window_size, shift_size, backend
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * window_size - 1, 2 * window_size - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02)
        else:
            self.register_parameter("rpb", None)

    def _shifted_bands(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       shift: tuple[int, int]) -> torch.Tensor:
        """SW-MSA without the roll and the mask, where ``M`` divides every shifted side.

        In image coordinates Swin's shifted windows tile each shifted axis as ``[0, s)``, then
        windows of ``M`` from ``s``, then ``[L - (M - s), L)``: the two clipped windows are the
        pieces its mask separates (the wrapped-around half of the last rolled window). So the
        attention is blocked NA on up to 3 x 3 bands of the map, each with the window size of its
        band (``s``, ``M`` or ``M - s`` per axis) and the matching centre slice of the bias table;
        it runs on the fused kernels (an ``attn_bias`` mask does not). Heads-last in and out.
        """
        M = self.window_size

        def bands(L: int, s: int) -> list[tuple[int, int, int]]:  # (start, stop, window) per band
            cuts = [(0, s, s), (s, L - (M - s), M), (L - (M - s), L, M - s)] if s else [(0, L, M)]
            return [c for c in cuts if c[1] > c[0]]

        out = torch.empty_like(v)
        for r0, r1, kr in bands(q.shape[1], shift[0]):
            for c0, c1, kc in bands(q.shape[2], shift[1]):
                rpb = None
                if self.rpb is not None:
                    rpb = self.rpb[:, M - kr:M + kr - 1, M - kc:M + kc - 1]
                band = (slice(None), slice(r0, r1), slice(c0, c1))
                out[band] = na_attend(q[band], k[band], v[band], na_args=dict(kernel_size=(kr, kc), stride=(kr, kc)),
                                      scale=self.scale, rpb=rpb, attn_drop=self.attn_drop, training=self.training,
                                      backend=self.backend)
        return out

    def _shifted_masked(self, x: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
        """SW-MSA as Swin writes it, at any size: roll by ``-s``, blocked attention with the region
        mask of :func:`swin_shift_bias` as ``attn_bias``, roll back. ``[B, H, W, C] -> [B, H, W, C]``."""
        B, H, W, _ = x.shape
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        q, k, v = self._qkv(x)
        mask = swin_shift_bias(type(self).__name__, (H, W), self.window_size, shift, x.device, q.dtype)
        bias = mask[None, :, :, None, :].expand(B, H, W, self.num_heads, mask.shape[-1])
        o = na_attend(q, k, v, na_args=dict(kernel_size=self.window_size, stride=self.window_size), scale=self.scale,
                      rpb=self.rpb, attn_bias=bias, attn_drop=self.attn_drop, training=self.training,
                      backend=self.backend)
        return torch.roll(self._out(o), shifts=shift, dims=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W = check_input(self, x, self.dim)
        M = self.window_size
        # Swin's rule: no shift along a side that fits in one window (nothing to connect).
        shift = tuple(self.shift_size if L > M else 0 for L in (H, W))
        if any(shift):
            if all(L % M == 0 for L, s in zip((H, W), shift) if s):
                return self._out(self._shifted_bands(*self._qkv(x), shift))
            return self._shifted_masked(x, shift)
        o = na_attend(*self._qkv(x), na_args=dict(kernel_size=M, stride=M), scale=self.scale, rpb=self.rpb,
                      attn_drop=self.attn_drop, training=self.training, backend=self.backend)
        return self._out(o)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}")


@register_attn("swin_shifted", layout="channels_last", paper=_PAPER, complexity="O(N M^2)",
               backends="visattn NA op", bench_kwargs=dict(num_heads=3))
class ShiftedWindowAttention(WindowAttention):
    """Swin SW-MSA: window attention after a cyclic shift by ``M // 2``, with Swin's region mask.

    Liu et al. (2021). The map is rolled by ``-s``, blocked attention runs with the mask of
    :func:`swin_shift_bias` (tokens that wrapped around never attend to unwrapped ones), and the
    output is rolled back. ``x [B, H, W, C] -> [B, H, W, C]``.

    Deliberate differences: the mask is ``-inf`` (Swin adds ``-100``, which leaves ``e^-100``-sized
    leaks); non-dividing sizes follow GNA as in :class:`WindowAttention` (Swin pads, then shifts).
    Where ``M`` divides the shifted sides, the same attention runs without roll or mask, as blocked
    NA on the bands the shift cuts the map into (:meth:`WindowAttention._shifted_bands`), on the
    fused kernels; elsewhere through the mask (``attn_bias``, served by the ``torch`` backend).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: Optional[int] = None,
                 **kwargs) -> None:
        super().__init__(dim, num_heads, window_size, window_size // 2 if shift_size is None else shift_size,
                         **kwargs)
