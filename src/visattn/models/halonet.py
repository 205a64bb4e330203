"""HaloNet (Vaswani et al., CVPR 2021): timm's ``halonet26t`` on the stage builder, with its weights.

HaloNet has no official code; timm's implementation (which has ImageNet weights for
``halonet26t``) is the reference, and :func:`halonet_from_timm` maps it. Layout:

* ``stem``: three 3x3 conv-BN-ReLU (24, 32, 64 channels, the first with stride 2) and a 3x3
  stride-2 max pool (:class:`HaloNetStem`);
* ``stages``: ResNet bottlenecks (:class:`~visattn.nn.layers.Bottleneck`, a quarter of the output
  width inside); in the last two stages some have the 3x3 conv replaced by halo attention
  (``"halo"``: 8x8 query blocks, halo 2, 8 heads; strided where the block downsamples);
* global average pool + ``head``.

The attention runs with HaloNet's zero-padded borders (``border="zero"``, as the checkpoints were
trained). ``mixer="gna"`` switches it to visattn's GNA operator instead: the same weights, the
haloed region moved inside the map at the borders (every query sees ``(b+2h)^2`` real tokens);
strided blocks keep the zero-padded form (GNA has no strided queries). timm's model needs
``H, W`` divisible by 256; ours takes any size (the attention pads to its block size).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.layers import Bottleneck, ConvNormAct
from .backbone import Backbone, Stage, drop_path_rates, pyramid
from .convert import rename_state_dict, timm_checkpoint_loader
from .registry import register_model

__all__ = ["HALONET_CONFIGS", "HaloNet", "HaloNetStem", "halonet_from_timm"]


@dataclass(frozen=True)
class HaloNetConfig:
    """A HaloNet variant: per stage the output width, and the kind of each block (``"conv"``/``"halo"``)."""

    widths: tuple[int, ...]
    blocks: tuple[tuple[str, ...], ...]
    stem_width: int
    block_size: int
    halo_size: int
    num_heads: int
    reference_params_m: float  # timm's model, key for key (no paper table lists this variant)


HALONET_CONFIGS: dict[str, HaloNetConfig] = {
    "halonet26t": HaloNetConfig((256, 512, 1024, 2048), (("conv", "conv"), ("conv", "conv"), ("conv", "halo"),
                                ("halo", "halo")), 64, 8, 2, 8, 12.48),
}


class HaloNetStem(nn.Sequential):
    """ResNet-T's tiered stem: 3x3 conv-BN-ReLU x3 (the first strided) + 3x3 stride-2 max pool:
    ``[B, C_in, H, W] -> [B, ceil(H/4), ceil(W/4), C]`` (channels-first in, channels-last out)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.add_module("conv1", ConvNormAct(in_chans, 3 * dim // 8, 3, stride=2))
        self.add_module("conv2", ConvNormAct(3 * dim // 8, dim // 2, 3))
        self.add_module("conv3", ConvNormAct(dim // 2, dim, 3))
        self.add_module("pool", nn.MaxPool2d(3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).permute(0, 2, 3, 1)


class HaloNet(Backbone):
    """HaloNet backbone and classifier (module docstring: layout, ``mixer``).

    ``forward(x [B, C_in, H, W])`` -> logits ``[B, num_classes]``; ``features_only=True`` ->
    channels-first maps at strides 4, 8, 16, 32 for the stages in ``out_indices``.
    """

    def __init__(self, widths: Sequence[int] = (256, 512, 1024, 2048),
                 blocks: Sequence[Sequence[str]] = (("conv",) * 2, ("conv",) * 2, ("conv", "halo"), ("halo",) * 2),
                 stem_width: int = 64, bottle_ratio: float = 0.25, block_size: int = 8, halo_size: int = 2,
                 num_heads: int = 8, drop_path_rate: float = 0.0, mixer: str = "zero", in_chans: int = 3,
                 num_classes: int = 1000, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None) -> None:
        if mixer not in ("zero", "gna"):
            raise ValueError(f"HaloNet: mixer={mixer!r}; choose 'zero' (HaloNet's zero-padded borders) or 'gna' "
                             f"(the GNA operator, regions moved inside the map).")
        rates = drop_path_rates(drop_path_rate, [len(b) for b in blocks])
        halo_kw = dict(num_heads=num_heads, block_size=block_size, halo_size=halo_size, out_proj=False)

        def block(i: int, j: int, kind: str) -> Bottleneck:
            stride = 2 if i > 0 and j == 0 else 1
            in_chs = (widths[i - 1] if i > 0 else stem_width) if j == 0 else widths[i]
            attn = dict(mixer="halo", mixer_kwargs=dict(halo_kw, border="zero" if stride > 1 else mixer)) \
                if kind == "halo" else {}
            return Bottleneck(in_chs, widths[i], int(widths[i] * bottle_ratio), stride, drop_path=rates[i][j], **attn)

        def stage(i: int) -> Stage:
            return Stage([block(i, j, kind) for j, kind in enumerate(blocks[i])])

        super().__init__(HaloNetStem(in_chans, stem_width), [partial(stage, i) for i in range(len(widths))],
                         list(widths), pyramid(len(widths)), in_chans=in_chans,
                         num_classes=num_classes, features_only=features_only, out_indices=out_indices)
        self.mixer = mixer


_BLOCK = r"^stages\.(\d+)\.(\d+)\."
_TIMM_RULES = (
    (r"^stem\.(.+)$", r"stem.\1"),
    (_BLOCK + r"(shortcut\..+)$", r"stages.\1.blocks.\2.\3"),
    (_BLOCK + r"conv(\d)_(?:1x1|kxk)\.(.+)$", r"stages.\1.blocks.\2.conv\3.\4"),
    (_BLOCK + r"post_attn\.(.+)$", r"stages.\1.blocks.\2.post_attn.0.\3"),
    (_BLOCK + r"self_attn\.(q|kv)\.weight$", r"stages.\1.blocks.\2.attn.\3.weight"),  # fused below
    (_BLOCK + r"self_attn\.pos_embed\.height_rel$", r"stages.\1.blocks.\2.attn.rel_row"),
    (_BLOCK + r"self_attn\.pos_embed\.width_rel$", r"stages.\1.blocks.\2.attn.rel_col"),
    (r"^head\.fc\.(.+)$", r"head.\1"),
)


def halonet_from_timm(state_dict, num_heads: int = 8) -> dict[str, torch.Tensor]:
    """Rename a timm ``halonet26t`` state dict for :class:`HaloNet`.

    Besides the names: timm's separate ``q`` and ``kv`` 1x1 convs (``kv`` interleaved per head:
    ``[k_h, v_h]``) become our fused ``qkv`` linear, and timm's unscaled relative embeddings are
    divided by the logit scale (ours scale the relative term with the content term, as HaloNet's
    equation does).
    """
    out = rename_state_dict(state_dict, _TIMM_RULES, "halonet_from_timm", "timm HaloNet")
    for key in [k for k in out if k.endswith(".attn.q.weight")]:
        prefix = key[: -len("q.weight")]
        q = out.pop(key).flatten(1)
        kv = out.pop(prefix + "kv.weight").flatten(1)
        dim = q.shape[0]
        k, v = kv.reshape(num_heads, 2, dim // num_heads, -1).unbind(1)
        out[prefix + "qkv.weight"] = torch.cat([q, k.reshape(dim, -1), v.reshape(dim, -1)])
        scale = (dim // num_heads) ** -0.5
        for name in ("rel_row", "rel_col"):
            out[prefix + name] = out[prefix + name] / scale
    return out


def _build(name: str, **kwargs) -> HaloNet:
    cfg = HALONET_CONFIGS[name]
    arch = dict(widths=cfg.widths, blocks=cfg.blocks, stem_width=cfg.stem_width, block_size=cfg.block_size,
                halo_size=cfg.halo_size, num_heads=cfg.num_heads)
    return HaloNet(**{**arch, **kwargs})


@register_model("halonet26t", timm_name="halonet26t", config=HALONET_CONFIGS["halonet26t"],
                paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones (CVPR 2021); "
                      "variant and weights: timm", from_timm=halonet_from_timm,
                load_checkpoint=timm_checkpoint_loader(halonet_from_timm))
def halonet26t(**kwargs) -> HaloNet:
    """HaloNet-26T (timm's variant); ``kwargs`` override the config or go to :class:`HaloNet`."""
    return _build("halonet26t", **kwargs)
