"""HaloNet blocked local self-attention with haloed key regions, on the GNA operator."""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...spec import make_spec, neighbor_table
from .base import QKVMixer, check_input, na_attend
from ..registry import register_attn

__all__ = ["HaloAttention"]


@lru_cache(maxsize=32)
def _axis_offsets(H: int, W: int, kernel: int, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis relative offsets of the neighbourhood slots, as indices into a ``2k-1`` table: ``dy [H, k0]``
    (query row, slot row) and ``dx [W, k1]`` (query column, slot column), from the spec's flat
    relative index ``dy * (2k-1) + dx`` (effective kernels ``k0, k1`` per axis)."""
    spec = make_spec("HaloAttention", (H, W), kernel, block)
    _, _, rel = neighbor_table(spec)  # [H*W, k0*k1]
    k0, k1 = spec.kernel_size
    rel = rel.reshape(H, W, k0, k1)
    span = 2 * kernel - 1
    return (rel[:, 0, :, 0] // span).to(device), (rel[0, :, 0, :] % span).to(device)


@register_attn("halo", layout="channels_last",
               paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones (2021)",
               complexity="O(N (b+2h)^2)", backends="visattn NA op", bench_kwargs=dict(num_heads=3))
class HaloAttention(QKVMixer):
    """HaloNet attention: each ``b x b`` query block attends to its ``(b+2h) x (b+2h)`` haloed region,
    with content-dependent relative position logits. ``x [B, H, W, C] -> [B, H, W, C]``.

    Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (2021).
    Logits are ``scale * q.(k + r_row[dy] + r_col[dx])`` with learned ``r_row, r_col [2k-1, C/heads]``
    (factorised relative embeddings shared by the heads, as in HaloNet / SASA), ``k = b + 2h``.

    On GNA: kernel ``b + 2h`` with stride ``b`` puts every query of a block on the same window,
    ``[block_start - h, block_end + h)`` away from the borders, i.e. exactly HaloNet's region; the
    relative logits enter as ``attn_bias``. So it runs on every visattn backend.

    Deliberate differences (``border="gna"``, the default): at the image border HaloNet zero-pads, so
    border blocks see zero keys (logit = relative term only) and zero values that dilute their
    attention; GNA instead moves the region inward, so every query sees ``(b+2h)^2`` real tokens
    (identical to HaloNet on interior blocks; both are tested). When ``b`` does not divide a side
    (HaloNet requires it), the last partial block follows GNA's stride rule.

    ``border="zero"`` is HaloNet as its public implementation (timm's) computes it, for its
    checkpoints: k/v zero-padded by ``h``, the map zero-padded to a multiple of ``b``, relative
    indices *block-local* (key position in the ``k``-wide region minus query position in its
    block, ``+ k - 1``: an offset of ``h`` from the true one at ``stride=1``), and ``stride=2``
    subsampling the queries (HaloNet's strided attention: ``[B, ceil(H/2), ceil(W/2), C]`` out).
    That path is pure PyTorch (unfolded regions). ``out_proj=False`` drops ``proj``: HaloNet has no
    output projection inside the attention (the bottleneck's 1x1 conv follows).
    """

    def __init__(self, dim: int, num_heads: int, block_size: int = 8, halo_size: int = 3, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: Optional[str] = None, border: str = "gna", stride: int = 1, out_proj: bool = True) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        if block_size < 1 or halo_size < 0:
            raise ValueError(f"HaloAttention: need block_size >= 1 and halo_size >= 0, got {block_size}, {halo_size}.")
        if border not in ("gna", "zero"):
            raise ValueError(f"HaloAttention: border={border!r}; choose 'gna' (regions moved inside the map) or "
                             f"'zero' (HaloNet's zero padding).")
        if stride != 1 and (border != "zero" or block_size % stride):
            raise ValueError(f"HaloAttention: stride={stride} needs border='zero' and a block_size ({block_size}) "
                             f"divisible by it.")
        self.block_size, self.halo_size, self.backend = block_size, halo_size, backend
        self.border, self.stride = border, stride
        if not out_proj:
            self.proj = nn.Identity()
        self.kernel_size = block_size + 2 * halo_size
        std = self.head_dim ** -0.5
        self.rel_row = nn.Parameter(torch.randn(2 * self.kernel_size - 1, self.head_dim) * std)
        self.rel_col = nn.Parameter(torch.randn(2 * self.kernel_size - 1, self.head_dim) * std)

    def _rel_logits(self, q: torch.Tensor) -> torch.Tensor:
        """``q [B, H, W, heads, D]`` -> ``scale * q.(r_row[dy] + r_col[dx])`` per neighbourhood slot:
        ``[B, H, W, heads, K]``. The row offset dy depends only on the query's row and the slot's row,
        dx on the columns, so the two terms are gathered per axis (``k`` slots each) and added by
        broadcasting over the ``k x k`` slots, never gathering ``[..., K]`` indices."""
        B, H, W, nh, _ = q.shape
        dy, dx = _axis_offsets(H, W, self.kernel_size, self.block_size, q.device)  # [H, k0], [W, k1]
        lr = torch.einsum("bhwnd,rd->bhwnr", q, self.rel_row)  # [B, H, W, heads, 2k-1]
        lc = torch.einsum("bhwnd,rd->bhwnr", q, self.rel_col)
        rows = torch.gather(lr, 4, dy[None, :, None, None, :].expand(B, H, W, nh, dy.shape[1]))
        cols = torch.gather(lc, 4, dx[None, None, :, None, :].expand(B, H, W, nh, dx.shape[1]))
        bias = (rows * self.scale)[..., :, None] + (cols * self.scale)[..., None, :]
        return bias.reshape(B, H, W, nh, -1)

    def _zero_border(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """HaloNet's blocked attention with zero padding (``border="zero"``): heads-last
        ``q, k, v [B, H, W, heads, D]`` -> ``[B, ceil(H/s), ceil(W/s), heads, D]``."""
        B, H, W, nh, d = q.shape
        b, h, s, win = self.block_size, self.halo_size, self.stride, self.kernel_size
        pad_h, pad_w = -H % b, -W % b
        pad = lambda t, p: F.pad(t, (0, 0, 0, 0, p, p + pad_w, p, p + pad_h))  # noqa: E731  (W, then H)
        q = pad(q, 0)[:, ::s, ::s]
        bq, nbh, nbw = b // s, (H + pad_h) // b, (W + pad_w) // b
        # [B, nbh, bq, nbw, bq, heads, D] -> [B, nbh, nbw, heads, bq*bq, D]
        q = q.reshape(B, nbh, bq, nbw, bq, nh, d).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, nbh, nbw, nh, bq * bq, d)

        def regions(t: torch.Tensor) -> torch.Tensor:  # [B, Hp+2h, Wp+2h, heads, D] -> [B, nbh, nbw, heads, win^2, D]
            t = pad(t, h).unfold(1, win, b).unfold(2, win, b)  # [B, nbh, nbw, heads, D, win, win]
            return t.permute(0, 1, 2, 3, 5, 6, 4).reshape(B, nbh, nbw, nh, win * win, d)

        k, v = regions(k), regions(v)
        # Block-local relative index: region position j minus query position i (both per axis), + win - 1.
        idx = torch.arange(win, device=q.device)[None, :] - torch.arange(bq, device=q.device)[:, None] + win - 1
        qi = q.unflatten(-2, (bq, bq))  # [..., bq (row), bq (col), D]
        rel = (torch.einsum("...ijd,ird->...ijr", qi, self.rel_row[idx])[..., :, None]  # [.., i, j, r, 1]
               + torch.einsum("...ijd,jcd->...ijc", qi, self.rel_col[idx])[..., None, :])  # [.., i, j, 1, c]
        logits = self.scale * (q @ k.transpose(-1, -2) + rel.flatten(-4, -3).flatten(-2))
        attn = logits.softmax(-1)
        if self.attn_drop > 0 and self.training:
            attn = F.dropout(attn, self.attn_drop, training=True)
        o = (attn @ v).reshape(B, nbh, nbw, nh, bq, bq, d).permute(0, 1, 4, 2, 5, 3, 6)
        return o.reshape(B, nbh * bq, nbw * bq, nh, d)[:, :-(-H // s), :-(-W // s)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.dim)
        q, k, v = self._qkv(x)
        if self.border == "zero":
            return self._out(self._zero_border(q, k, v))
        o = na_attend(q, k, v, na_args=dict(kernel_size=self.kernel_size, stride=self.block_size),
                      scale=self.scale, attn_bias=self._rel_logits(q), attn_drop=self.attn_drop,
                      training=self.training, backend=self.backend)
        return self._out(o)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, block_size={self.block_size}, "
                f"halo_size={self.halo_size}, border={self.border!r}, stride={self.stride}")
