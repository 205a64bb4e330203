"""The hierarchical stage builder every model family is assembled with.

A backbone is a stem, stages and a head::

    image [B, C_in, H, W] --stem--> [B, H/r0, W/r0, C0] --stage 0--> ... --stage n-1--> [B, h, w, C]
                                                                     --norm, pool, head--> logits

* the **stem** turns the image into a channels-last map (:class:`~visattn.nn.layers.ConvStem`,
  :class:`~visattn.nn.layers.PatchEmbed`, or a family's own);
* a **stage** (:class:`Stage`) is an optional downsampler followed by blocks, channels-last in
  and out: :class:`~visattn.nn.layers.MixerBlock` (norm + any registered token mixer + MLP, with
  layer scale and stochastic depth), :class:`~visattn.nn.layers.MBConv`, or a family's own.
  The downsampler opens a stage (timm's convention), so stage ``i``'s output *is* the stride
  ``reductions[i]`` feature map;
* the **head**: ``norm`` (per token, on the last map), global average pooling, ``head_norm``
  (on the pooled vector), an optional ``pre_logits`` ``Linear + tanh`` and the classifier ``head``.
  Each piece is optional, which covers NAT/Swin/FocalNet (norm, pool, linear), DaViT (pool, norm,
  linear), MaxViT (pool, norm, MLP, linear) and MambaOut (pool, norm, MLP with a norm, linear).

With ``features_only=True`` the model returns the channels-first maps of the stages in
``out_indices`` (optionally through per-output norms ``out_norms``, as detection backbones have),
and builds no stage past the deepest one it returns.

A family is a subclass (or a builder function) that makes its stem, one zero-argument factory per
stage (so that unneeded stages are never built) and the head options, and hands them to
:class:`Backbone`; see :mod:`visattn.models.nat` for a complete example.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

__all__ = ["Backbone", "Stage", "drop_path_rates", "init_trunc_normal", "pyramid"]

NormLayer = Callable[[int], nn.Module]


class Stage(nn.Module):
    """``downsample`` (optional), then ``blocks`` in sequence: ``[B, H, W, C_in] -> [B, H', W', C]``."""

    def __init__(self, blocks: Iterable[nn.Module], downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic-depth rates growing linearly from 0 (first block) to ``rate`` (last block), one list per stage."""
    total = sum(depths)
    flat = [rate * j / max(total - 1, 1) for j in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start:start + d])
        start += d
    return out


def pyramid(num_stages: int, first: int = 4) -> list[int]:
    """The strides of a 4-stage-style pyramid: ``first``, then doubling per stage (4, 8, 16, 32)."""
    return [first * 2 ** i for i in range(num_stages)]


def init_trunc_normal(m: nn.Module) -> None:
    """The ViT/Swin/NAT initialisation: truncated-normal (std 0.02) linears with zero bias, unit LayerNorms.
    Convolutions keep PyTorch's default."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Backbone(nn.Module):
    """Stem, stages, head; a classifier, or a multi-scale backbone with ``features_only=True``.

    ``forward(x [B, C_in, H, W])`` returns logits ``[B, num_classes]`` (pooled features
    ``[B, num_features]`` when ``num_classes=0``); with ``features_only=True`` a list of
    channels-first maps ``[B, dims[i], ~H/reductions[i], ~W/reductions[i]]`` for ``i`` in
    ``out_indices`` (default: every stage).

    Args:
        stem: image ``[B, C_in, H, W]`` -> channels-last map.
        stages: one zero-argument callable per stage that builds it (only those up to the deepest
            output are called when ``features_only``).
        dims, reductions: each stage's output width and stride with respect to the image.
        in_chans: image channels (for the input check).
        norm_layer / head_norm_layer: norm on the last map before pooling / on the pooled vector.
        head_hidden_size: width of a ``Linear + head_act_layer`` pre-logits layer (MaxViT), or ``None``;
            ``head_hidden_norm_layer`` adds a norm after it (MambaOut's MLP head).
        pos_drop_rate: dropout after the stem; head_drop_rate: dropout before the classifier.
        out_norm_layer: norm per returned map in ``features_only`` mode (``out_norms``), or ``None``.
        init_weights: applied to every module once built (default :func:`init_trunc_normal`).

    Raises ``ValueError`` for ``out_indices`` outside the stages, and for images whose channel
    count or layout is wrong.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[Callable[[], nn.Module]], dims: Sequence[int],
                 reductions: Sequence[int], *, in_chans: int = 3, num_classes: int = 1000, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None, norm_layer: Optional[NormLayer] = None,
                 head_norm_layer: Optional[NormLayer] = None, head_hidden_size: Optional[int] = None,
                 head_act_layer: Callable[[], nn.Module] = nn.Tanh,
                 head_hidden_norm_layer: Optional[NormLayer] = None, pos_drop_rate: float = 0.0,
                 head_drop_rate: float = 0.0, out_norm_layer: Optional[NormLayer] = None,
                 init_weights: Optional[Callable[[nn.Module], None]] = init_trunc_normal) -> None:
        super().__init__()
        name = type(self).__name__
        num_stages = len(stages)
        if not len(dims) == len(reductions) == num_stages:
            raise ValueError(f"{name}: dims={tuple(dims)} and reductions={tuple(reductions)} need one entry per "
                             f"stage ({num_stages}).")
        out_indices = tuple(range(num_stages)) if out_indices is None else tuple(out_indices)
        bad = [i for i in out_indices if not 0 <= i < num_stages]
        if bad or not out_indices:
            raise ValueError(f"{name}: out_indices={out_indices} has {bad} outside 0..{num_stages - 1}.")
        self.in_chans = in_chans
        self.features_only = features_only
        self.out_indices = out_indices
        self.num_features = dims[-1]
        self.feature_info = [dict(num_chs=c, reduction=r, module=f"stages.{i}")
                             for i, (c, r) in enumerate(zip(dims, reductions))]

        self.stem = stem
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # A backbone stops at its deepest requested output: later stages would be dead weight (and
        # unused parameters, which DistributedDataParallel rejects).
        built = max(out_indices) + 1 if features_only else num_stages
        self.stages = nn.ModuleList(build() for build in stages[:built])
        if features_only:
            if out_norm_layer is not None:
                self.out_norms = nn.ModuleDict({str(i): out_norm_layer(dims[i]) for i in out_indices})
            self.num_classes = 0
        else:
            self.norm = norm_layer(self.num_features) if norm_layer is not None else nn.Identity()
            self.head_norm = head_norm_layer(self.num_features) if head_norm_layer is not None else nn.Identity()
            self.head_features = head_hidden_size or self.num_features
            if head_hidden_size:
                self.pre_logits = nn.Sequential()
                self.pre_logits.add_module("fc", nn.Linear(self.num_features, head_hidden_size))
                self.pre_logits.add_module("act", head_act_layer())
                if head_hidden_norm_layer is not None:
                    self.pre_logits.add_module("norm", head_hidden_norm_layer(head_hidden_size))
            else:
                self.pre_logits = nn.Identity()
            self.head_drop = nn.Dropout(head_drop_rate)
            self.num_classes = num_classes
            self.head = nn.Linear(self.head_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights = init_weights
        if init_weights is not None:
            self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        """Parameter-name fragments to exclude from weight decay (relative-position tables, embeddings)."""
        return {"rpb", "rel_", "pos_embed", "cls_token"}

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__}: expected images [B, {self.in_chans}, H, W] (channels-first), "
                             f"got {tuple(x.shape)}.")

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every built stage's output, channels-last: ``[B, C_in, H, W] -> [[B, h_i, w_i, C_i], ...]``."""
        self._check_input(x)
        x = self.pos_drop(self.stem(x))
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map, normalized: ``[B, C_in, H, W] -> [B, h, w, num_features]`` (channels-last)."""
        if self.features_only:
            raise RuntimeError(f"{type(self).__name__}.forward_features: this model was built with features_only=True "
                               f"(no final norm); call the model itself to get the multi-scale maps.")
        return self.norm(self.forward_stages(x)[-1])

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling of a channels-last map: ``[B, h, w, C] -> [B, C]``."""
        return x.mean(dim=(1, 2))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify: ``[B, h, w, C] -> [B, num_classes]`` (``[B, head_features]`` with ``pre_logits``)."""
        x = self.head_drop(self.pre_logits(self.head_norm(self.pool(x))))
        return x if pre_logits else self.head(x)

    def feature_maps(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The stage outputs as channels-last maps ``[B, h_i, w_i, C_i]`` (a family whose stages carry
        extra tokens, such as ConViT's class token, strips them here)."""
        return outs

    def forward(self, x: torch.Tensor):
        if not self.features_only:
            return self.forward_head(self.forward_features(x))
        outs = self.feature_maps(self.forward_stages(x))
        norms = getattr(self, "out_norms", None)
        return [(norms[str(i)](outs[i]) if norms is not None else outs[i]).permute(0, 3, 1, 2).contiguous()
                for i in self.out_indices]

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a fresh ``Linear(head_features, num_classes)`` (``0``: pooled features)."""
        if self.features_only:
            raise RuntimeError(f"{type(self).__name__}.reset_classifier: a features_only model has no classifier.")
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0 and self._init_weights is not None:
            self._init_weights(self.head)
