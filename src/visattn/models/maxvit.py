"""MaxViT (Tu et al., ECCV 2022) on the stage builder, with the TF checkpoints' layout and an NA switch.

Layout (timm's ``maxvit_{tiny,small,base}_tf_224``, ports of the official TF weights, map onto it
with :func:`maxvit_from_timm`):

* ``stem``: 3x3 stride-2 conv + BatchNorm + GELU, 3x3 conv (:class:`MaxViTStem`);
* ``stages[i]``: ``depths[i]`` MaxViT blocks, each ``conv`` (:class:`~visattn.nn.layers.MBConv`,
  stride 2 in the first block of a stage), ``attn_block`` (a :class:`~visattn.nn.layers.MixerBlock`
  with block attention over ``P x P`` windows, ``"maxvit_block"``) and ``attn_grid`` (the same with
  grid attention over a ``G x G`` grid spread over the map, ``"maxvit_grid"``); both attentions
  have 32-channel heads and a relative-position table;
* global average pool + ``head_norm`` + ``pre_logits`` (linear + tanh) + ``head``.

The TF details are kept: BatchNorm eps 1e-3, tanh-approximated GELU, TensorFlow's "SAME" padding of
the strided convs and pools. ``P = G = img_size // 32`` (7 at 224, 12 at 384, as the official
configs); ``window_size`` sets it directly.

``mixer="na"`` swaps block attention for neighborhood attention with kernel ``P`` and grid
attention for dilated neighborhood attention with kernel ``G`` and dilation ``feature_size // G``
at ``img_size`` (DiNAT's rule), keeping every parameter. Where ``P``/``G`` do not divide a side,
the mixers follow GNA (MaxViT requires divisibility); at sizes ``32 * P`` divides, the model equals
timm's.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..nn.layers import MBConv, MixerBlock
from ..nn.layers.mbconv import pad_same
from .backbone import Backbone, Stage, drop_path_rates, pyramid
from .convert import conv1x1_to_linear, rename_state_dict, timm_checkpoint_loader
from .registry import register_model

__all__ = ["MAXVIT_CONFIGS", "MaxViT", "MaxViTStem", "maxvit_from_timm"]

# TensorFlow's defaults in the official code: BatchNorm eps 1e-3, LayerNorm eps 1e-5, tanh GELU.
_BN_EPS, _LN_EPS = 1e-3, 1e-5


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


def _layer_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=_LN_EPS)


@dataclass(frozen=True)
class MaxViTConfig:
    """A MaxViT variant and the numbers its authors print at 224x224 (millions of parameters, GMACs)."""

    depths: tuple[int, ...]
    embed_dims: tuple[int, ...]
    stem_width: int
    head_hidden_size: int
    drop_path_rate: float
    paper_params_m: float
    paper_gmacs: float


_PAPER = "MaxViT: Multi-Axis Vision Transformer (ECCV 2022), official repository's ImageNet-1K table"
MAXVIT_CONFIGS: dict[str, MaxViTConfig] = {
    "maxvit_tiny": MaxViTConfig((2, 2, 5, 2), (64, 128, 256, 512), 64, 512, 0.2, 31, 5.6),
    "maxvit_small": MaxViTConfig((2, 2, 5, 2), (96, 192, 384, 768), 64, 768, 0.3, 69, 11.7),
    "maxvit_base": MaxViTConfig((2, 6, 14, 2), (96, 192, 384, 768), 64, 768, 0.4, 119, 24.2),
}


class MaxViTStem(nn.Module):
    """3x3 stride-2 conv (TF "SAME" padding) + BatchNorm + GELU, then a 3x3 conv:
    ``[B, C_in, H, W] -> [B, ceil(H/2), ceil(W/2), C]`` (channels-first in, channels-last out).

    ``act_layer``: MaxViT's tanh-approximated GELU by default; MOAT's stem is the same with the exact one.
    """

    def __init__(self, in_chans: int, dim: int, act_layer: Callable[[], nn.Module] = _gelu_tanh) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim, 3, stride=2)
        self.norm1 = nn.Sequential(nn.BatchNorm2d(dim, eps=_BN_EPS), act_layer())
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(pad_same(x, 3, 2)))).permute(0, 2, 3, 1)


def partition_mixers(mixer: str, num_heads: int, partition: int, feat_size: int, **kw) -> tuple[tuple, tuple]:
    """``(name, kwargs)`` of the block and the grid attention of a MaxViT block on a ``feat_size`` map.

    ``mixer="window"``: MaxViT's block and grid attention with ``P = G = partition``;
    ``mixer="na"``: neighborhood attention with kernel ``P``, and dilated neighborhood attention
    with kernel ``G`` and dilation ``max(1, feat_size // G)`` (DiNAT's rule). Raises ``ValueError``
    for another ``mixer``.
    """
    if mixer == "window":
        return (("maxvit_block", dict(num_heads=num_heads, window_size=partition, **kw)),
                ("maxvit_grid", dict(num_heads=num_heads, grid_size=partition, **kw)))
    if mixer == "na":
        na = dict(num_heads=num_heads, kernel_size=partition, rel_pos_bias=True, **kw)
        return ("na2d", na), ("na2d", dict(na, dilation=max(1, feat_size // partition)))
    raise ValueError(f"MaxViT: mixer={mixer!r}; choose 'window' (the paper's block and grid attention) or 'na' "
                     f"(neighborhood attention, dilated in place of the grid).")


class MaxViT(Backbone):
    """MaxViT backbone and classifier (module docstring: layout, ``mixer``, partition size).

    ``forward(x [B, C_in, H, W])`` -> logits ``[B, num_classes]``; ``features_only=True`` ->
    channels-first maps at strides 4, 8, 16, 32 for the stages in ``out_indices``. Any input size.
    """

    def __init__(self, depths: Sequence[int] = (2, 2, 5, 2), embed_dims: Sequence[int] = (64, 128, 256, 512),
                 stem_width: int = 64, head_hidden_size: Optional[int] = 512, img_size: int = 224,
                 window_size: Optional[int] = None, dim_head: int = 32, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.2, mixer: str = "window", in_chans: int = 3, num_classes: int = 1000,
                 features_only: bool = False, out_indices: Optional[Sequence[int]] = None,
                 backend: Optional[str] = None) -> None:
        partition = window_size or max(1, img_size // 32)
        dims = list(embed_dims)
        rates = drop_path_rates(drop_path_rate, depths)
        block_kw = dict(mlp_ratio=mlp_ratio, act_layer=_gelu_tanh, norm_layer=_layer_norm)
        partition_mixers(mixer, 1, partition, img_size)  # validates ``mixer`` before anything is built

        def maxvit_block(i: int, j: int, p: float) -> nn.Module:
            feat = -(-img_size // 2 ** (i + 2))
            block, grid = partition_mixers(mixer, dims[i] // dim_head, partition, feat, backend=backend)
            return nn.Sequential(OrderedDict(
                conv=MBConv(dims[i - 1] if j == 0 and i > 0 else (stem_width if j == 0 else dims[i]), dims[i],
                            stride=2 if j == 0 else 1, act_layer=_gelu_tanh, norm_eps=_BN_EPS, tf_padding=True,
                            drop_path=p),
                attn_block=MixerBlock(dims[i], *block, drop_path=p, **block_kw),
                attn_grid=MixerBlock(dims[i], *grid, drop_path=p, **block_kw)))

        def stage(i: int) -> Stage:
            return Stage([maxvit_block(i, j, p) for j, p in enumerate(rates[i])])

        super().__init__(MaxViTStem(in_chans, stem_width), [partial(stage, i) for i in range(len(depths))], dims,
                         pyramid(len(depths)), in_chans=in_chans, num_classes=num_classes,
                         features_only=features_only, out_indices=out_indices, head_norm_layer=_layer_norm,
                         head_hidden_size=head_hidden_size)
        self.depths, self.partition_size, self.mixer = tuple(depths), partition, mixer


_MB = r"^stages\.(\d+)\.blocks\.(\d+)\.conv\."
_TIMM_RULES = (
    (r"^stem\.(conv[12])\.(.+)$", r"stem.\1.\2"),
    (r"^stem\.norm1\.(.+)$", r"stem.norm1.0.\1"),
    (_MB + r"shortcut\.expand\.(.+)$", r"stages.\1.blocks.\2.conv.shortcut.\3"),
    (_MB + r"(pre_norm|norm1|norm2)\.(.+)$", r"stages.\1.blocks.\2.conv.\3.0.\4"),
    (_MB + r"conv(\d)_(?:1x1|kxk)\.(.+)$", r"stages.\1.blocks.\2.conv.conv\3.\4"),
    (_MB + r"se\.(fc[12])\.weight$", r"stages.\1.blocks.\2.conv.se.\3.weight", conv1x1_to_linear),
    (_MB + r"se\.(fc[12])\.bias$", r"stages.\1.blocks.\2.conv.se.\3.bias"),
    # TF's relative-position table is [heads, 2P-1, 2P-1] indexed by key minus query, like ours.
    (r"^(stages\.\d+\.blocks\.\d+\.attn_(?:block|grid)\.attn)\.rel_pos\.relative_position_bias_table$", r"\1.rpb"),
    (r"^(stages\.\d+\.blocks\.\d+\.attn_(?:block|grid)\..+)$", r"\1"),
    (r"^head\.norm\.(.+)$", r"head_norm.\1"),
    (r"^head\.pre_logits\.fc\.(.+)$", r"pre_logits.fc.\1"),
    (r"^head\.fc\.(.+)$", r"head.\1"),
)


def maxvit_from_timm(state_dict) -> dict[str, torch.Tensor]:
    """Rename a timm ``maxvit_*_tf_*`` state dict for :class:`MaxViT` (and reshape the SE's 1x1 convs)."""
    return rename_state_dict(state_dict, _TIMM_RULES, "maxvit_from_timm", "timm MaxViT (TF weights)")


def _build(name: str, **kwargs) -> MaxViT:
    cfg = MAXVIT_CONFIGS[name]
    arch = dict(depths=cfg.depths, embed_dims=cfg.embed_dims, stem_width=cfg.stem_width,
                head_hidden_size=cfg.head_hidden_size, drop_path_rate=cfg.drop_path_rate)
    return MaxViT(**{**arch, **kwargs})


_REGISTRATION = dict(paper=_PAPER, from_timm=maxvit_from_timm, load_checkpoint=timm_checkpoint_loader(maxvit_from_timm))


@register_model("maxvit_tiny", timm_name="maxvit_tiny_tf_224", config=MAXVIT_CONFIGS["maxvit_tiny"], **_REGISTRATION)
def maxvit_tiny(**kwargs) -> MaxViT:
    """MaxViT-T; ``kwargs`` override the config or go to :class:`MaxViT` (``img_size``, ``mixer="na"``, ...)."""
    return _build("maxvit_tiny", **kwargs)


@register_model("maxvit_small", timm_name="maxvit_small_tf_224", config=MAXVIT_CONFIGS["maxvit_small"],
                **_REGISTRATION)
def maxvit_small(**kwargs) -> MaxViT:
    """MaxViT-S; ``kwargs`` as in :func:`maxvit_tiny`."""
    return _build("maxvit_small", **kwargs)


@register_model("maxvit_base", timm_name="maxvit_base_tf_224", config=MAXVIT_CONFIGS["maxvit_base"], **_REGISTRATION)
def maxvit_base(**kwargs) -> MaxViT:
    """MaxViT-B; ``kwargs`` as in :func:`maxvit_tiny`."""
    return _build("maxvit_base", **kwargs)
