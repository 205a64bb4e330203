"""BiFormer (Zhu et al., CVPR 2023) on the stage builder.

Layout, as the official ``biformer_{tiny,small,base}`` (rayleizhu/BiFormer, ``models/biformer.py``):

* ``stem`` (:class:`BiFormerStem`): 3x3 stride-2 conv + BatchNorm + GELU, 3x3 stride-2 conv +
  BatchNorm;
* ``stages[i]``: for ``i > 0`` a 3x3 stride-2 conv + BatchNorm (width x2), then ``depths[i]``
  blocks, each a residual 3x3 depthwise conv (:class:`~visattn.nn.layers.ConvPosEnc`, ``cpe``, the
  official ``pos_embed``: renamed because the builder exempts ``pos_embed`` parameters from weight
  decay) followed by a pre-norm :class:`~visattn.nn.layers.MixerBlock` (LayerNorm eps 1e-6, MLP ratio 3).
  The mixer of stages 0-2 is bi-level routing attention (``"biformer"``: 7x7 regions, the
  ``topks[i]`` best-routed regions per query region, 32-channel heads, a 5x5 depthwise LCE on V);
  in the last stage it is global attention with 8 heads, no qkv bias and a 5x5 depthwise conv on
  its input (:class:`~visattn.nn.layers.GlobalLePEAttention2D`, the official ``AttentionLePE``);
* ``norm`` (BatchNorm on the last map) + global average pool + ``head``; per-output LayerNorms
  (eps 1e-6) in ``features_only`` mode, as the official segmentation backbone.

The routed attention keeps the official scale, ``dim ** -0.5`` (not ``head_dim ** -0.5``).
Any input size: where 7 does not divide a map, the routed attention zero-pads it to the next
multiple and crops, as the official code does with ``auto_pad``. No window attention, hence no
``mixer="na"`` switch. The official checkpoints load with ``create_model("biformer_tiny",
checkpoint_path=...)``, mapped by :func:`biformer_from_official` (their download links all end in
``/content``, which ``torch.hub``'s cache would file under one name, so ``pretrained=True`` is not offered).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.layers import BatchNorm2dChannelsLast, ConvDownsample, ConvPosEnc, GlobalLePEAttention2D, MixerBlock
from .backbone import Backbone, Stage, drop_path_rates
from .convert import rename_state_dict, timm_checkpoint_loader
from .registry import register_model

__all__ = ["BIFORMER_CONFIGS", "BiFormer", "BiFormerStem", "biformer_from_official"]


@dataclass(frozen=True)
class BiFormerConfig:
    """A BiFormer variant and the numbers its paper prints at 224x224 (millions of parameters, GMACs)."""

    depths: tuple[int, ...]
    embed_dims: tuple[int, ...]
    drop_path_rate: float
    paper_params_m: float
    paper_gmacs: float


_PAPER = ("BiFormer: Vision Transformer with Bi-Level Routing Attention (CVPR 2023), ImageNet-1K table; "
          "the official repository's README (parameters to 0.1M)")
BIFORMER_CONFIGS: dict[str, BiFormerConfig] = {
    "biformer_tiny": BiFormerConfig((2, 2, 8, 2), (64, 128, 256, 512), 0.1, 13.1, 2.2),
    "biformer_small": BiFormerConfig((4, 4, 18, 4), (64, 128, 256, 512), 0.15, 25.5, 4.5),
    "biformer_base": BiFormerConfig((4, 4, 18, 4), (96, 192, 384, 768), 0.4, 56.8, 9.8),
}


class BiFormerStem(nn.Sequential):
    """3x3 stride-2 conv + BatchNorm + GELU, 3x3 stride-2 conv + BatchNorm:
    ``[B, C_in, H, W] -> [B, ceil(H/4), ceil(W/4), C]`` (channels-first in, channels-last out)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__(nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(dim // 2), nn.GELU(),
                         nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).permute(0, 2, 3, 1)


def _layer_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6)


class BiFormer(Backbone):
    """BiFormer backbone and classifier (module docstring: layout, sizes).

    ``forward(x [B, C_in, H, W])`` -> logits ``[B, num_classes]``; ``features_only=True`` ->
    channels-first maps at strides 4, 8, 16, 32 for the stages in ``out_indices``. Any input size.
    ``topks[i] > 0`` routes that many regions in stage ``i``; ``0`` makes the stage global
    attention with LePE (the official ``topk=-2``).
    """

    def __init__(self, depths: Sequence[int] = (2, 2, 8, 2), embed_dims: Sequence[int] = (64, 128, 256, 512),
                 topks: Sequence[int] = (1, 4, 16, 0), n_win: int = 7, head_dim: int = 32, global_heads: int = 8,
                 mlp_ratio: float = 3.0, side_dwconv: int = 5, drop_path_rate: float = 0.1, in_chans: int = 3,
                 num_classes: int = 1000, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None) -> None:
        dims = list(embed_dims)
        rates = drop_path_rates(drop_path_rate, depths)

        def mixer(i: int) -> tuple:
            if topks[i] > 0:
                return "biformer", dict(num_heads=dims[i] // head_dim, n_win=n_win, topk=topks[i], qkv_bias=True,
                                        qk_scale=dims[i] ** -0.5, side_dwconv=side_dwconv)
            return GlobalLePEAttention2D, dict(num_heads=global_heads, qkv_bias=False, lepe_kernel=side_dwconv,
                                               lepe_source="input")

        def block(i: int, p: float) -> nn.Module:
            return nn.Sequential(OrderedDict(
                cpe=ConvPosEnc(dims[i], 3),
                block=MixerBlock(dims[i], *mixer(i), mlp_ratio=mlp_ratio, norm_layer=_layer_norm, drop_path=p)))

        def stage(i: int) -> Stage:
            down = (ConvDownsample(dims[i - 1], dims[i], bias=True, norm_layer=BatchNorm2dChannelsLast)
                    if i > 0 else None)
            return Stage([block(i, p) for p in rates[i]], down)

        super().__init__(BiFormerStem(in_chans, dims[0]), [partial(stage, i) for i in range(len(depths))], dims,
                         [4 * 2 ** i for i in range(len(depths))], in_chans=in_chans, num_classes=num_classes,
                         features_only=features_only, out_indices=out_indices, norm_layer=BatchNorm2dChannelsLast,
                         out_norm_layer=_layer_norm)
        self.depths, self.topks, self.n_win = tuple(depths), tuple(topks), n_win


_BLOCK = r"^stages\.(\d+)\.(\d+)\."
_OFFICIAL_RULES = (
    (r"^downsample_layers\.0\.(.+)$", r"stem.\1"),
    (r"^downsample_layers\.(\d+)\.0\.(.+)$", r"stages.\1.downsample.conv.\2"),
    (r"^downsample_layers\.(\d+)\.1\.(.+)$", r"stages.\1.downsample.norm.\2"),
    (_BLOCK + r"pos_embed\.(.+)$", r"stages.\1.blocks.\2.cpe.proj.\3"),
    (_BLOCK + r"attn\.qkv\.qkv\.(.+)$", r"stages.\1.blocks.\2.block.attn.qkv.\3"),  # routed attention
    (_BLOCK + r"attn\.wo\.(.+)$", r"stages.\1.blocks.\2.block.attn.proj.\3"),
    (_BLOCK + r"attn\.lepe\.(.+)$", lambda m: f"stages.{m[1]}.blocks.{m[2]}.block.attn.{_lepe_name(m[1])}.{m[3]}"),
    (_BLOCK + r"mlp\.0\.(.+)$", r"stages.\1.blocks.\2.block.mlp.fc1.\3"),
    (_BLOCK + r"mlp\.3\.(.+)$", r"stages.\1.blocks.\2.block.mlp.fc2.\3"),
    (_BLOCK + r"((?:norm[12]|attn\.qkv|attn\.proj)\..+)$", r"stages.\1.blocks.\2.block.\3"),
    (r"^extra_norms\.(\d+)\.(.+)$", r"out_norms.\1.\2"),
    (r"^(norm|head)\.(.+)$", r"\1.\2"),
)


def _lepe_name(stage: str) -> str:
    # The routed attention calls its depthwise conv on V "lce" (BiFormer's "local context enhancement").
    return "lepe" if int(stage) == 3 else "lce"


def biformer_from_official(state_dict) -> dict[str, torch.Tensor]:
    """Rename an official BiFormer state dict (rayleizhu/BiFormer, ``models/biformer.py``) for :class:`BiFormer`.

    ``downsample_layers.0`` is the stem, ``downsample_layers.i`` stage ``i``'s downsampler; each
    block's ``pos_embed`` is our ``cpe`` and the rest our ``block`` (``attn.qkv.qkv`` ->
    ``attn.qkv``, ``attn.wo`` -> ``attn.proj``, ``mlp.0/3`` -> ``mlp.fc1/2``); the segmentation
    backbone's ``extra_norms.i`` are the per-output norms. For the default four-stage layout (the
    last stage global). Raises ``KeyError`` for keys outside that layout.
    """
    return rename_state_dict(state_dict, _OFFICIAL_RULES, "biformer_from_official", "official BiFormer")


def _build(name: str, **kwargs) -> BiFormer:
    cfg = BIFORMER_CONFIGS[name]
    arch = dict(depths=cfg.depths, embed_dims=cfg.embed_dims, drop_path_rate=cfg.drop_path_rate)
    return BiFormer(**{**arch, **kwargs})


_REGISTRATION = dict(paper=_PAPER, from_official=biformer_from_official,
                     load_checkpoint=timm_checkpoint_loader(biformer_from_official))


@register_model("biformer_tiny", config=BIFORMER_CONFIGS["biformer_tiny"], **_REGISTRATION)
def biformer_tiny(**kwargs) -> BiFormer:
    """BiFormer-T; ``kwargs`` override the config or go to :class:`BiFormer` (``num_classes``, ...)."""
    return _build("biformer_tiny", **kwargs)


@register_model("biformer_small", config=BIFORMER_CONFIGS["biformer_small"], **_REGISTRATION)
def biformer_small(**kwargs) -> BiFormer:
    """BiFormer-S; ``kwargs`` as in :func:`biformer_tiny`."""
    return _build("biformer_small", **kwargs)


@register_model("biformer_base", config=BIFORMER_CONFIGS["biformer_base"], **_REGISTRATION)
def biformer_base(**kwargs) -> BiFormer:
    """BiFormer-B; ``kwargs`` as in :func:`biformer_tiny`."""
    return _build("biformer_base", **kwargs)
