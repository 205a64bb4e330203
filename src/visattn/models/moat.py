"""MOAT (Yang et al., ICLR 2023) and tiny-MOAT on the stage builder.

Layout, as the official TensorFlow models (google-research/deeplab2, ``model/pixel_encoder/moat.py``)
in their ImageNet configuration (global attention, 2x2 shortcut pooling):

* ``stem``: 3x3 stride-2 conv + BatchNorm + GELU, 3x3 conv (:class:`~visattn.models.maxvit.MaxViTStem`
  with the exact GELU);
* ``stages[0, 1]``: :class:`~visattn.nn.layers.MBConv` blocks (expansion 4, squeeze-excitation
  with a quarter of the output width), the first of each stage with stride 2;
* ``stages[2, 3]``: :class:`MOATBlock` s: an MBConv without squeeze-excitation (stride 2 in the
  first block), then ``x + attn(LayerNorm(x))`` with :class:`MOATAttention`, global attention over
  the map with 32-channel heads and a relative-position bias; no MLP (the MBConv replaces it);
* global average pool + ``head_norm`` (LayerNorm on the pooled vector) + ``head``.

TensorFlow's details are kept: BatchNorm eps 1e-3, the exact GELU, "SAME" padding of the strided
convs and shortcut pools. The relative-position tables are learned for 14x14 (stride 16) and 7x7
(stride 32) maps, their size at 224, and are resized bilinearly for any other map, as the
official code does, so any input size works. The stride-32 feature map is ``img_size / 32``; at
224 the attention is exactly MOAT's. Global attention has no window, hence no ``mixer="na"`` switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layers import DropPath, MBConv
from ..nn.mixers.base import QKVMixer, check_input, na_attend
from .backbone import Backbone, Stage, drop_path_rates
from .maxvit import MaxViTStem
from .registry import register_model

__all__ = ["MOAT", "MOATAttention", "MOATBlock", "MOAT_CONFIGS"]

# TensorFlow's defaults in the official code: BatchNorm eps 1e-3, LayerNorm eps 1e-5.
_BN_EPS, _LN_EPS = 1e-3, 1e-5


def _layer_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=_LN_EPS)


@dataclass(frozen=True)
class MOATConfig:
    """A MOAT variant and the numbers its paper prints at 224x224 (millions of parameters, GMACs)."""

    depths: tuple[int, ...]
    embed_dims: tuple[int, ...]
    stem_width: int
    drop_path_rate: float
    paper_params_m: float
    paper_gmacs: float


_PAPER = ("MOAT: Alternating Mobile Convolution and Attention Brings Strong Vision Models (ICLR 2023), "
          "ImageNet-1K tables at 224 (MOAT and tiny-MOAT families)")
MOAT_CONFIGS: dict[str, MOATConfig] = {
    "moat_0": MOATConfig((2, 3, 7, 2), (96, 192, 384, 768), 64, 0.2, 27.8, 5.7),
    "moat_1": MOATConfig((2, 6, 14, 2), (96, 192, 384, 768), 64, 0.3, 41.6, 9.1),
    "moat_2": MOATConfig((2, 6, 14, 2), (128, 256, 512, 1024), 128, 0.3, 73.4, 17.2),
    "moat_3": MOATConfig((2, 12, 28, 2), (160, 320, 640, 1280), 160, 0.6, 190.0, 44.9),
    "tiny_moat_0": MOATConfig((2, 3, 7, 2), (32, 64, 128, 256), 32, 0.0, 3.4, 0.8),
    "tiny_moat_1": MOATConfig((2, 3, 7, 2), (40, 80, 160, 320), 40, 0.0, 5.1, 1.2),
    "tiny_moat_2": MOATConfig((2, 3, 7, 2), (56, 112, 224, 448), 56, 0.0, 9.8, 2.3),
    "tiny_moat_3": MOATConfig((2, 3, 7, 2), (80, 160, 320, 640), 80, 0.1, 19.5, 4.5),
}


class MOATAttention(QKVMixer):
    """Global self-attention with a relative-position bias, as MOAT (after CoAtNet) uses it:
    ``x [B, H, W, C] -> [B, H, W, C]``.

    Every token attends to every token; the logit of query ``(i, j)`` and key ``(k, l)`` gets
    ``rpb[head, k - i + H - 1, l - j + W - 1]``. The learned table ``rpb [heads, 2P-1, 2P-1]`` is
    for a ``P x P`` map (``pos_size``); on an ``H x W`` map it is resized bilinearly (half-pixel
    centres, TensorFlow's ``tf.image.resize``) to ``[heads, 2H-1, 2W-1]``. The attention runs on the
    visattn operator with the window set to the whole map, so it takes every backend.
    """

    def __init__(self, dim: int, num_heads: int, pos_size: int = 7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: Optional[str] = None) -> None:
        super().__init__(dim, num_heads, qkv_bias, None, attn_drop, proj_drop)
        self.pos_size, self.backend = pos_size, backend
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * pos_size - 1, 2 * pos_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02)

    def relative_bias(self, height: int, width: int) -> torch.Tensor:
        """The table for an ``height x width`` map: ``[heads, 2 * height - 1, 2 * width - 1]``."""
        size = (2 * height - 1, 2 * width - 1)
        if size == tuple(self.rpb.shape[1:]):
            return self.rpb
        return F.interpolate(self.rpb[None], size=size, mode="bilinear", align_corners=False)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W = check_input(self, x, self.dim)
        q, k, v = self._qkv(x)
        o = na_attend(q, k, v, na_args=dict(kernel_size=(H, W)), scale=self.scale, rpb=self.relative_bias(H, W),
                      attn_drop=self.attn_drop, training=self.training, backend=self.backend)
        return self._out(o)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, pos_size={self.pos_size}"


class MOATBlock(nn.Module):
    """MOAT block: ``x = mbconv(x)``, then ``x + drop_path(attn(norm(x)))``:
    ``[B, H, W, C_in] -> [B, ceil(H/s), ceil(W/s), C]``.

    ``mbconv`` is an :class:`~visattn.nn.layers.MBConv` without squeeze-excitation (stride ``s``,
    TF padding, exact GELU), ``norm`` a LayerNorm and ``attn`` a :class:`MOATAttention` with
    ``dim // head_dim`` heads: the transformer block with its MLP replaced by an MBConv moved
    before the attention.
    """

    def __init__(self, in_dim: int, dim: int, stride: int = 1, head_dim: int = 32, pos_size: int = 7,
                 expand_ratio: float = 4.0, drop_path: float = 0.0, backend: Optional[str] = None) -> None:
        super().__init__()
        self.mbconv = MBConv(in_dim, dim, stride, expand_ratio, se_ratio=0.0, act_layer=nn.GELU, norm_eps=_BN_EPS,
                             tf_padding=True, drop_path=drop_path)
        self.norm = _layer_norm(dim)
        self.attn = MOATAttention(dim, dim // head_dim, pos_size, backend=backend)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mbconv(x)
        return x + self.drop_path(self.attn(self.norm(x)))


class MOAT(Backbone):
    """MOAT backbone and classifier (module docstring: layout, sizes).

    ``forward(x [B, C_in, H, W])`` -> logits ``[B, num_classes]``; ``features_only=True`` ->
    channels-first maps at strides 4, 8, 16, 32 for the stages in ``out_indices``. ``block_types``
    is ``"mbconv"`` or ``"moat"`` per stage; ``pos_sizes`` the relative-position table's map size
    per stage (used by MOAT stages).
    """

    def __init__(self, depths: Sequence[int] = (2, 3, 7, 2), embed_dims: Sequence[int] = (96, 192, 384, 768),
                 stem_width: int = 64, block_types: Sequence[str] = ("mbconv", "mbconv", "moat", "moat"),
                 pos_sizes: Sequence[int] = (56, 28, 14, 7), head_dim: int = 32, expand_ratio: float = 4.0,
                 se_ratio: float = 0.25, drop_path_rate: float = 0.2, in_chans: int = 3, num_classes: int = 1000,
                 features_only: bool = False, out_indices: Optional[Sequence[int]] = None,
                 backend: Optional[str] = None) -> None:
        bad = [t for t in block_types if t not in ("mbconv", "moat")]
        if bad or len(block_types) != len(depths):
            raise ValueError(f"MOAT: block_types={tuple(block_types)} needs one of 'mbconv'/'moat' per stage "
                             f"({len(depths)}).")
        dims = list(embed_dims)
        rates = drop_path_rates(drop_path_rate, depths)

        def block(i: int, j: int, p: float) -> nn.Module:
            in_dim, stride = ((dims[i - 1] if i > 0 else stem_width), 2) if j == 0 else (dims[i], 1)
            if block_types[i] == "moat":
                return MOATBlock(in_dim, dims[i], stride, head_dim, pos_sizes[i], expand_ratio, p, backend)
            return MBConv(in_dim, dims[i], stride, expand_ratio, se_ratio=se_ratio, act_layer=nn.GELU,
                          norm_eps=_BN_EPS, tf_padding=True, drop_path=p)

        def stage(i: int) -> Stage:
            return Stage([block(i, j, p) for j, p in enumerate(rates[i])])

        stem = MaxViTStem(in_chans, stem_width, act_layer=nn.GELU)
        super().__init__(stem, [partial(stage, i) for i in range(len(depths))], dims,
                         [4 * 2 ** i for i in range(len(depths))], in_chans=in_chans, num_classes=num_classes,
                         features_only=features_only, out_indices=out_indices, head_norm_layer=_layer_norm)
        self.depths, self.block_types = tuple(depths), tuple(block_types)


def _build(name: str, **kwargs) -> MOAT:
    cfg = MOAT_CONFIGS[name]
    arch = dict(depths=cfg.depths, embed_dims=cfg.embed_dims, stem_width=cfg.stem_width,
                drop_path_rate=cfg.drop_path_rate)
    return MOAT(**{**arch, **kwargs})


_REGISTRATION = dict(paper=_PAPER)


@register_model("moat_0", config=MOAT_CONFIGS["moat_0"], **_REGISTRATION)
def moat_0(**kwargs) -> MOAT:
    """MOAT-0; ``kwargs`` override the config or go to :class:`MOAT` (``num_classes``, ``features_only``, ...)."""
    return _build("moat_0", **kwargs)


@register_model("moat_1", config=MOAT_CONFIGS["moat_1"], **_REGISTRATION)
def moat_1(**kwargs) -> MOAT:
    """MOAT-1; ``kwargs`` as in :func:`moat_0`."""
    return _build("moat_1", **kwargs)


@register_model("moat_2", config=MOAT_CONFIGS["moat_2"], **_REGISTRATION)
def moat_2(**kwargs) -> MOAT:
    """MOAT-2; ``kwargs`` as in :func:`moat_0`."""
    return _build("moat_2", **kwargs)


@register_model("moat_3", config=MOAT_CONFIGS["moat_3"], **_REGISTRATION)
def moat_3(**kwargs) -> MOAT:
    """MOAT-3; ``kwargs`` as in :func:`moat_0`."""
    return _build("moat_3", **kwargs)


@register_model("tiny_moat_0", config=MOAT_CONFIGS["tiny_moat_0"], **_REGISTRATION)
def tiny_moat_0(**kwargs) -> MOAT:
    """tiny-MOAT-0; ``kwargs`` as in :func:`moat_0`."""
    return _build("tiny_moat_0", **kwargs)


@register_model("tiny_moat_1", config=MOAT_CONFIGS["tiny_moat_1"], **_REGISTRATION)
def tiny_moat_1(**kwargs) -> MOAT:
    """tiny-MOAT-1; ``kwargs`` as in :func:`moat_0`."""
    return _build("tiny_moat_1", **kwargs)


@register_model("tiny_moat_2", config=MOAT_CONFIGS["tiny_moat_2"], **_REGISTRATION)
def tiny_moat_2(**kwargs) -> MOAT:
    """tiny-MOAT-2; ``kwargs`` as in :func:`moat_0`."""
    return _build("tiny_moat_2", **kwargs)


@register_model("tiny_moat_3", config=MOAT_CONFIGS["tiny_moat_3"], **_REGISTRATION)
def tiny_moat_3(**kwargs) -> MOAT:
    """tiny-MOAT-3; ``kwargs`` as in :func:`moat_0`."""
    return _build("tiny_moat_3", **kwargs)
