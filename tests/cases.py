"""The shared case sweeps for backend parity: ranks 1-3, odd/even/irregular sizes, per-axis
kernel/stride/dilation/causal, GQA, extra KV, D_v != D (``CASES``); and the "beyond NATTEN" features
(relative positional bias, additive bias, key padding mask, returned weights, cross-grid keys,
periodic axes: ``FEATURE_CASES``).
Every backend runs all of these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class Case:
    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    is_causal: tuple[bool, ...] = ()
    batch: int = 2
    heads: int = 2
    heads_kv: Optional[int] = None
    dim: int = 8
    dim_v: Optional[int] = None
    extra: int = 0  # additional KV tokens

    def kwargs(self) -> dict:
        r = len(self.spatial)
        return dict(
            kernel_size=self.kernel_size,
            stride=self.stride or (1,) * r,
            dilation=self.dilation or (1,) * r,
            is_causal=self.is_causal or (False,) * r,
        )

    def make(self, dtype: torch.dtype, device: str = "cpu", seed: int = 0, requires_grad: bool = True):
        """Random ``q, k, v, (extra_k, extra_v)`` for this case."""
        g = torch.Generator().manual_seed(seed)
        hkv = self.heads_kv or self.heads
        dv = self.dim_v or self.dim
        mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
        q = mk(self.batch, *self.spatial, self.heads, self.dim)
        k = mk(self.batch, *self.spatial, hkv, self.dim)
        v = mk(self.batch, *self.spatial, hkv, dv)
        if self.extra:
            return q, k, v, mk(self.batch, self.extra, hkv, self.dim), mk(self.batch, self.extra, hkv, dv)
        return q, k, v, None, None

    def __str__(self) -> str:
        kw = self.kwargs()
        s = "x".join(map(str, self.spatial))
        tag = f"S{s}_k{kw['kernel_size']}_s{kw['stride']}_d{kw['dilation']}_c{tuple(int(c) for c in kw['is_causal'])}"
        if self.heads_kv:
            tag += f"_gqa{self.heads}:{self.heads_kv}"
        if self.extra:
            tag += f"_x{self.extra}"
        if self.dim_v:
            tag += f"_dv{self.dim_v}"
        return tag.replace(" ", "").replace(",)", ")")


CASES = [
    # 1-D
    Case((13,), (5,)),
    Case((13,), (4,), (2,), (2,), (True,)),
    Case((16,), (3,), (3,), (5,)),
    Case((17,), (6,), (1,), (2,), (False,), heads=4, heads_kv=1),
    Case((33,), (7,), (7,), (1,), (True,)),
    Case((20,), (5,), (1,), (1,), (False,), extra=3),
    # 2-D
    Case((17, 9), (3, 4), (1, 2), (2, 1), (False, True)),
    Case((12, 12), (4, 4), (4, 4)),
    Case((14, 11), (5, 3), (2, 3), (2, 3), dim_v=6),
    Case((9, 10), (7, 5), (3, 1), (1, 2), (True, True), heads=4, heads_kv=2),
    Case((8, 8), (8, 8)),
    Case((15, 13), (3, 3), (1, 1), (4, 3), extra=5),
    Case((19, 7), (6, 2), (5, 2), (3, 3)),
    # 3-D
    Case((5, 7, 11), (3, 3, 5), (1, 3, 2), (1, 2, 2), (False, False, True)),
    Case((6, 6, 6), (2, 3, 4), (2, 1, 4), (3, 2, 1), heads=3, heads_kv=1),
    Case((4, 9, 5), (4, 3, 5), (1, 1, 1), (1, 3, 1), (True, False, False), extra=2),
]


@dataclass(frozen=True)
class FeatureCase:
    """A call with the per-pair features: ``rpb``, ``attn_bias``, a random ``key_padding_mask`` masking
    a fraction ``mask`` of the keys; the weights are always returned and used by the loss."""

    spatial: tuple[int, ...]
    na: dict = field(hash=False)
    rpb: bool = False
    bias: bool = False
    mask: float = 0.0  # fraction of masked keys
    heads: int = 2
    heads_kv: int = 2
    dim: int = 8
    dim_v: int = 6
    batch: int = 2
    key_spatial: tuple[int, ...] = ()  # cross-grid: keys on this grid (default: the queries')

    def __str__(self) -> str:
        tags = [f"S{'x'.join(map(str, self.spatial))}"] + [f"{k[0]}{v}" for k, v in self.na.items()]
        tags += [f"Sk{'x'.join(map(str, self.key_spatial))}"] if self.key_spatial else []
        tags += [t for t, on in (("rpb", self.rpb), ("bias", self.bias), (f"mask{self.mask}", self.mask),
                                 (f"gqa{self.heads}:{self.heads_kv}", self.heads != self.heads_kv),
                                 (f"D{self.dim}-{self.dim_v}", (self.dim, self.dim_v) != (8, 6))) if on]
        return "_".join(tags).replace(" ", "")


FEATURE_CASES = [
    FeatureCase((11,), dict(kernel_size=5), rpb=True),
    FeatureCase((10,), dict(kernel_size=4, stride=2, dilation=2, is_causal=True), rpb=True, mask=0.3),
    FeatureCase((7, 8), dict(kernel_size=3, dilation=2), rpb=True, bias=True),
    FeatureCase((9, 6), dict(kernel_size=(4, 3), stride=(2, 3), dilation=(1, 2), is_causal=(False, True)),
                rpb=True, bias=True, mask=0.25),
    FeatureCase((6, 7), dict(kernel_size=3), mask=0.5, heads=4, heads_kv=2),  # many all-masked queries
    FeatureCase((3, 9), dict(kernel_size=5, dilation=(1, 3)), rpb=True, bias=True),  # variable resolution
    FeatureCase((4, 3, 5), dict(kernel_size=(2, 3, 3), stride=(1, 3, 1), dilation=(2, 1, 1),
                                is_causal=(True, False, False)), rpb=True, bias=True, mask=0.2),
    # Fused kernels' own blocking: windows of 7 (a pair's union is 8 keys), a 1-D window of 21 keys
    # (several vectors per row), an odd last axis (the last pair's second query is a duplicate), real
    # head dims, GQA with every feature at once.
    FeatureCase((9, 11), dict(kernel_size=7), rpb=True, bias=True, mask=0.2, heads=4, heads_kv=2, dim=32,
                dim_v=16, batch=1),
    FeatureCase((37,), dict(kernel_size=21, is_causal=True), bias=True, mask=0.15, dim=16, dim_v=24, batch=1),
    # cross-grid: upsampling, downsampling, with stride/causal/dilation, 3-D with GQA
    FeatureCase((11,), dict(kernel_size=3), rpb=True, mask=0.2, key_spatial=(5,)),
    FeatureCase((5, 7), dict(kernel_size=(3, 4), dilation=(2, 1)), rpb=True, bias=True, key_spatial=(9, 12)),
    FeatureCase((8,), dict(kernel_size=4, stride=2, is_causal=True), rpb=True, key_spatial=(13,)),
    FeatureCase((3, 4, 5), dict(kernel_size=3), rpb=True, heads=4, heads_kv=2, key_spatial=(5, 3, 6)),
    FeatureCase((4, 6), dict(kernel_size=5), bias=True, key_spatial=(3, 6)),  # kernel > key axis
    # periodic axes: with dilation, per axis, k * d > L (dilation fitted), k > L (whole axis once)
    FeatureCase((9,), dict(kernel_size=5, dilation=2, periodic=True), rpb=True, mask=0.2),
    FeatureCase((6, 7), dict(kernel_size=(3, 5), dilation=(2, 1), periodic=(True, False)), rpb=True, bias=True),
    FeatureCase((7,), dict(kernel_size=3, dilation=4, periodic=True), rpb=True),
    FeatureCase((4, 5), dict(kernel_size=5, periodic=True), rpb=True, bias=True),
    FeatureCase((3, 4, 5), dict(kernel_size=3, periodic=(True, True, True)), rpb=True, heads=4, heads_kv=1),
]
