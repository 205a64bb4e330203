"""NAT and DiNAT: hierarchical neighborhood-attention backbones, one implementation.

"Neighborhood Attention Transformer" (Hassani et al., CVPR 2023) and "Dilated Neighborhood Attention
Transformer" (Hassani & Shi, 2022). DiNAT *is* NAT with a per-layer dilation: every other layer of a
stage uses dilated NA whose dilation is chosen so the window spans the whole feature map at the
training resolution (``feature_size // kernel_size``: 8, 4, 2, 1 at 224). So :class:`NAT` takes an
optional ``dilations`` list per stage, and the variants are configs (:data:`NAT_CONFIGS`), each
registered by a one-line builder at the end of this file.

Layout (module names differ from the official code on purpose; :mod:`visattn.models.convert` maps
official checkpoints):

* ``stem``: two 3x3 stride-2 convs (no activation between them, as in the paper) and a LayerNorm;
  ``[B, C_in, H, W] -> [B, ceil(H/4), ceil(W/4), C]`` (channels-last from here on);
* ``stages[i]``: for ``i > 0`` a 3x3 stride-2 conv (no bias) + LayerNorm that doubles the width,
  then ``depths[i]`` pre-norm blocks ``x + drop_path(ls1 * NA(norm1(x)))``,
  ``x + drop_path(ls2 * MLP(norm2(x)))``. The downsampler opens a stage (timm style) rather than
  closing the previous one, so stage ``i``'s output *is* the stride ``4 * 2**i`` feature map;
* ``norm`` + global average pool + ``head`` for classification, or per-output LayerNorms
  ``out_norms`` in ``features_only`` mode (as the official detection/segmentation backbones).

Any input size works: the stem and downsamplers round up, and a feature map smaller than a window
(or than a dilated window) follows the variable-resolution rule of :func:`visattn.spec.fit_axis`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Optional, Sequence

from torch import nn

from ..nn.layers import ConvDownsample, ConvStem, GlobalAttention2D, MixerBlock
from .backbone import Backbone, Stage, drop_path_rates, pyramid
from .convert import load_official_checkpoint
from .registry import register_model

__all__ = ["NAT", "NAT_CONFIGS", "NATConfig", "dinat_dilations"]


# --------------------------------------------------------------------------------------------------
# Variant configs
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NATConfig:
    """Architecture of one variant, plus the numbers its paper prints (for tests and docs).

    ``dilated`` turns a NAT into a DiNAT: odd layers (1, 3, ...) of every stage get dilation
    ``max(1, feature_size // kernel_size)`` at ``img_size`` (see :func:`dinat_dilations`).
    ``paper_params_m`` / ``paper_gmacs`` are the papers' "# of Params" (millions) and "FLOPs"
    (G multiply-accumulates, fvcore's convention) at 224x224.
    """

    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    embed_dim: int
    mlp_ratio: float
    drop_path_rate: float
    kernel_size: int = 7
    dilated: bool = False
    layer_scale: Optional[float] = None
    paper: str = ""
    paper_params_m: Optional[int] = None
    paper_gmacs: Optional[float] = None


_NAT_PAPER = "Neighborhood Attention Transformer (CVPR 2023), Table 1"
_DINAT_PAPER = "Dilated Neighborhood Attention Transformer (2022), Table 2 / official DiNAT.md"

# Sources: SHI-Labs/Neighborhood-Attention-Transformer classification/nat.py, dinat.py (model
# definitions) and NAT.md / DiNAT.md (params and FLOPs tables). DiNAT-Large's row is the
# ImageNet-22k-pretrained model at 224x224 (200M, 30.6G); 34.5G belongs to DiNAT_s-Large (Swin-like).
NAT_CONFIGS: dict[str, NATConfig] = {
    "nat_mini": NATConfig((3, 4, 6, 5), (2, 4, 8, 16), 64, 3.0, 0.2, paper=_NAT_PAPER,
                          paper_params_m=20, paper_gmacs=2.7),
    "nat_tiny": NATConfig((3, 4, 18, 5), (2, 4, 8, 16), 64, 3.0, 0.2, paper=_NAT_PAPER,
                          paper_params_m=28, paper_gmacs=4.3),
    "nat_small": NATConfig((3, 4, 18, 5), (3, 6, 12, 24), 96, 2.0, 0.3, layer_scale=1e-5, paper=_NAT_PAPER,
                           paper_params_m=51, paper_gmacs=7.8),
    "nat_base": NATConfig((3, 4, 18, 5), (4, 8, 16, 32), 128, 2.0, 0.5, layer_scale=1e-5, paper=_NAT_PAPER,
                          paper_params_m=90, paper_gmacs=13.7),
    "dinat_mini": NATConfig((3, 4, 6, 5), (2, 4, 8, 16), 64, 3.0, 0.2, dilated=True, paper=_DINAT_PAPER,
                            paper_params_m=20, paper_gmacs=2.7),
    "dinat_tiny": NATConfig((3, 4, 18, 5), (2, 4, 8, 16), 64, 3.0, 0.2, dilated=True, paper=_DINAT_PAPER,
                            paper_params_m=28, paper_gmacs=4.3),
    "dinat_small": NATConfig((3, 4, 18, 5), (3, 6, 12, 24), 96, 2.0, 0.3, dilated=True, paper=_DINAT_PAPER,
                             paper_params_m=51, paper_gmacs=7.8),
    "dinat_base": NATConfig((3, 4, 18, 5), (4, 8, 16, 32), 128, 2.0, 0.5, dilated=True, layer_scale=1e-5,
                            paper=_DINAT_PAPER, paper_params_m=90, paper_gmacs=13.7),
    # 0.35 is the ImageNet-1k fine-tuning rate; the 22k pre-training used 0.2.
    "dinat_large": NATConfig((3, 4, 18, 5), (6, 12, 24, 48), 192, 2.0, 0.35, dilated=True, paper=_DINAT_PAPER,
                             paper_params_m=200, paper_gmacs=30.6),
}


def dinat_dilations(depths: Sequence[int], kernel_size: int, img_size: Sequence[int] | int = 224,
                    stem_stride: int = 4) -> list[list[int]]:
    """DiNAT's per-layer dilations: 1 on even layers, ``feature_size // kernel_size`` on odd ones.

    This is the rule behind the official configs: at 224 the stage maps are 56, 28, 14, 7 and
    ``[[1, 8, 1], [1, 4, 1, 4], [1, 2, ...], [1, 1, ...]]``; at 384 it gives 13, 6, 3, 1, exactly the
    official ``dinat_large_384``. On a non-square input the shorter side decides (the dilation is one
    int per layer, as in the paper; :func:`visattn.spec.fit_axis` handles what is left).
    """
    size = min(img_size) if isinstance(img_size, (tuple, list)) else int(img_size)
    feat = -(-size // stem_stride)
    out = []
    for depth in depths:
        d = max(1, feat // kernel_size)
        out.append([1 if j % 2 == 0 else d for j in range(depth)])
        feat = -(-feat // 2)
    return out


# --------------------------------------------------------------------------------------------------
# Block and model
# --------------------------------------------------------------------------------------------------

class NATBlock(MixerBlock):
    """One NAT/DiNAT layer: the pre-norm :class:`~visattn.nn.layers.MixerBlock` with neighborhood attention.

    ``x [B, H, W, C] -> [B, H, W, C]``. ``dilation > 1`` makes it a DiNA layer; ``attn_type="global"``
    swaps the mixer for dense attention over all tokens (the same weights minus ``rpb``).
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale: Optional[float] = None, attn_type: str = "na", backend: Optional[str] = None) -> None:
        if attn_type == "na":
            mixer, kw = "na2d", dict(num_heads=num_heads, kernel_size=kernel_size, dilation=dilation,
                                     qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, rel_pos_bias=True,
                                     backend=backend)
        elif attn_type == "global":
            mixer, kw = GlobalAttention2D, dict(num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                                proj_drop=drop)
        else:
            raise ValueError(f"NATBlock: attn_type={attn_type!r}; choose 'na' (neighborhood attention, the paper) "
                             f"or 'global' (dense attention over all tokens, a baseline).")
        super().__init__(dim, mixer, kw, mlp_ratio=mlp_ratio, layer_scale=layer_scale, drop_path=drop_path, drop=drop)


class NAT(Backbone):
    """NAT / DiNAT backbone and classifier, on the stage builder (:class:`~visattn.models.backbone.Backbone`).

    ``forward(x [B, C_in, H, W])`` returns logits ``[B, num_classes]`` (or pooled features
    ``[B, num_features]`` when ``num_classes=0``); with ``features_only=True`` it returns a list of
    channels-first maps ``[B, feature_info[i]["num_chs"], ceil(H/r), ceil(W/r)]`` for the stages in
    ``out_indices`` (default: every stage), with ``r = 4 * 2**stage``, through per-output LayerNorms.

    Args: ``depths``/``num_heads`` per stage; ``embed_dim`` (doubles each stage); ``mlp_ratio``;
    ``kernel_size`` (7 in the papers); ``dilations`` one list per stage (``None``: NAT, all 1);
    ``layer_scale`` initial value or ``None``; ``drop_path_rate`` (linear over blocks);
    ``attn_type`` ``"na"`` or ``"global"`` (dense baseline); ``backend`` forwarded to
    :func:`visattn.neighborhood_attention`.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 18, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        embed_dim: int = 64,
        mlp_ratio: float = 3.0,
        kernel_size: int = 7,
        dilations: Optional[Sequence[Sequence[int]]] = None,
        layer_scale: Optional[float] = None,
        drop_path_rate: float = 0.2,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        qkv_bias: bool = True,
        in_chans: int = 3,
        num_classes: int = 1000,
        features_only: bool = False,
        out_indices: Optional[Sequence[int]] = None,
        attn_type: str = "na",
        backend: Optional[str] = None,
    ) -> None:
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(num_heads) != len(depths):
            raise ValueError(f"NAT: num_heads={num_heads} needs one entry per stage, like depths={depths}.")
        if dilations is None:
            dilations = [[1] * d for d in depths]
        dilations = [list(d) for d in dilations]
        if [len(d) for d in dilations] != list(depths):
            raise ValueError(f"NAT: dilations={dilations} must hold one list per stage with one entry per block "
                             f"(depths={depths}); see visattn.models.dinat_dilations.")
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        rates = drop_path_rates(drop_path_rate, depths)
        block_kw = dict(kernel_size=kernel_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                        attn_drop=attn_drop_rate, layer_scale=layer_scale, attn_type=attn_type, backend=backend)

        def stage(i: int) -> Stage:
            down = ConvDownsample(dims[i - 1], dims[i]) if i > 0 else None
            return Stage([NATBlock(dims[i], num_heads[i], dilation=d, drop_path=p, **block_kw)
                          for d, p in zip(dilations[i], rates[i])], down)

        super().__init__(ConvStem(in_chans, embed_dim), [partial(stage, i) for i in range(len(depths))], dims,
                         pyramid(len(depths)), in_chans=in_chans, num_classes=num_classes,
                         features_only=features_only, out_indices=out_indices, norm_layer=nn.LayerNorm,
                         out_norm_layer=nn.LayerNorm, pos_drop_rate=drop_rate)
        self.depths, self.num_heads, self.kernel_size, self.dilations = depths, num_heads, kernel_size, dilations
        self.embed_dims = dims


# NATConfig fields a caller may override (the paper_* fields are facts, not options).
_ARCH_FIELDS = ("depths", "num_heads", "embed_dim", "mlp_ratio", "drop_path_rate", "kernel_size", "dilated",
                "layer_scale")


def build_nat(name: str, *, img_size: Sequence[int] | int = 224, **kwargs) -> NAT:
    """Build the variant ``name`` of :data:`NAT_CONFIGS`; ``kwargs`` override its config or go to :class:`NAT`.

    For DiNAT variants, ``img_size`` picks the dilations (:func:`dinat_dilations`); pass
    ``dilations=...`` to set them by hand.
    """
    cfg = NAT_CONFIGS[name]
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _ARCH_FIELDS}
    cfg = replace(cfg, **overrides)
    if cfg.dilated and "dilations" not in kwargs:
        kwargs["dilations"] = dinat_dilations(cfg.depths, cfg.kernel_size, img_size)
    return NAT(depths=cfg.depths, num_heads=cfg.num_heads, embed_dim=cfg.embed_dim, mlp_ratio=cfg.mlp_ratio,
               kernel_size=cfg.kernel_size, layer_scale=cfg.layer_scale, drop_path_rate=cfg.drop_path_rate, **kwargs)


# --------------------------------------------------------------------------------------------------
# Registered variants: ``create_model(name, **kwargs)`` calls the builder below (kwargs as in build_nat)
# --------------------------------------------------------------------------------------------------

# Official ImageNet-1k checkpoints (SHI-Labs), mapped onto our layout by convert.py for pretrained=True.
_NAT_CKPT = "https://shi-labs.com/projects/nat/checkpoints/CLS/"
_DINAT_CKPT = "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/"


@register_model("nat_mini", url=_NAT_CKPT + "nat_mini.pth",
                load_checkpoint=load_official_checkpoint, config=NAT_CONFIGS["nat_mini"])
def nat_mini(**kwargs) -> NAT:
    """NAT-Mini; ``kwargs`` as in :func:`build_nat`."""
    return build_nat("nat_mini", **kwargs)


@register_model("nat_tiny", url=_NAT_CKPT + "nat_tiny.pth",
                load_checkpoint=load_official_checkpoint, config=NAT_CONFIGS["nat_tiny"])
def nat_tiny(**kwargs) -> NAT:
    """NAT-Tiny; ``kwargs`` as in :func:`build_nat`."""
    return build_nat("nat_tiny", **kwargs)


@register_model("nat_small", url=_NAT_CKPT + "nat_small.pth",
                load_checkpoint=load_official_checkpoint, config=NAT_CONFIGS["nat_small"])
def nat_small(**kwargs) -> NAT:
    """NAT-Small; ``kwargs`` as in :func:`build_nat`."""
    return build_nat("nat_small", **kwargs)


@register_model("nat_base", url=_NAT_CKPT + "nat_base.pth",
                load_checkpoint=load_official_checkpoint, config=NAT_CONFIGS["nat_base"])
def nat_base(**kwargs) -> NAT:
    """NAT-Base; ``kwargs`` as in :func:`build_nat`."""
    return build_nat("nat_base", **kwargs)


@register_model("dinat_mini", url=_DINAT_CKPT + "dinat_mini_in1k_224.pth",
                load_checkpoint=load_official_checkpoint, config=NAT_CONFIGS["dinat_mini"])
def dinat_mini(**kwargs) -> NAT:
    """DiNAT-Mini; ``kwargs`` as in :func:`build_nat`."""
    return build_nat("dinat_mini", **kwargs)


@register_model("dinat_tiny", url=_DINAT_CKPT + "dinat_tiny_in1k_224.pth",
                load_checkpoint=load_official_checkpoint, config=NAT_CONFIGS["dinat_tiny"])
def dinat_tiny(**kwargs) -> NAT:
    """DiNAT-Tiny; ``kwargs`` as in :func:`build_nat`."""
    return build_nat("dinat_tiny", **kwargs)


@register_model("dinat_small", url=_DINAT_CKPT + "dinat_small_in1k_224.pth",
                load_checkpoint=load_official_checkpoint, config=NAT_CONFIGS["dinat_small"])
def dinat_small(**kwargs) -> NAT:
    """DiNAT-Small; ``kwargs`` as in :func:`build_nat`."""
    return build_nat("dinat_small", **kwargs)


@register_model("dinat_base", url=_DINAT_CKPT + "dinat_base_in1k_224.pth",
                load_checkpoint=load_official_checkpoint, config=NAT_CONFIGS["dinat_base"])
def dinat_base(**kwargs) -> NAT:
    """DiNAT-Base; ``kwargs`` as in :func:`build_nat`."""
    return build_nat("dinat_base", **kwargs)


@register_model("dinat_large", url=_DINAT_CKPT + "dinat_large_in22k_in1k_224.pth",
                load_checkpoint=load_official_checkpoint, config=NAT_CONFIGS["dinat_large"])
def dinat_large(**kwargs) -> NAT:
    """DiNAT-Large (ImageNet-22k pre-trained, 1k fine-tuned checkpoint); ``kwargs`` as in :func:`build_nat`."""
    return build_nat("dinat_large", **kwargs)
