"""Checkpoint conversion: official NAT/DiNAT checkpoints, and timm state dicts of every family timm has.

:func:`rename_state_dict` is the one mechanism: an ordered list of rules ``(pattern, replacement[,
transform])`` on the keys, the first match wins, a key no rule matches raises. NAT/DiNAT's rules
are below; each family file that has a timm counterpart registers its own ``from_timm`` rules with
its variants (``@register_model(..., timm_name=..., from_timm=...)``), and
:func:`convert_timm_state_dict` looks them up by model name.

Official NAT/DiNAT checkpoints (SHI-Labs/Neighborhood-Attention-Transformer):

The official classification models (``classification/nat.py``, ``dinat.py``) and the detection /
segmentation backbones (``norm{i}`` output norms) name their weights differently from ours, and put
each downsampler at the *end* of a level where we open the next stage with it:

==========================================  =============================================
official key                                visattn key
==========================================  =============================================
``patch_embed.proj.0.*``                     ``stem.conv1.*``
``patch_embed.proj.1.*``                     ``stem.conv2.*``
``patch_embed.norm.*``                       ``stem.norm.*``
``levels.{i}.blocks.{j}.gamma1`` / ``gamma2``  ``stages.{i}.blocks.{j}.ls1.gamma`` / ``ls2.gamma``
``levels.{i}.blocks.{j}.<rest>``             ``stages.{i}.blocks.{j}.<rest>`` (``norm1``,
                                             ``attn.qkv``, ``attn.rpb``, ``attn.proj``, ``norm2``,
                                             ``mlp.fc1``, ``mlp.fc2``: unchanged)
``levels.{i}.downsample.reduction.weight``  ``stages.{i+1}.downsample.conv.weight``
``levels.{i}.downsample.norm.*``            ``stages.{i+1}.downsample.norm.*``
``norm.*``, ``head.*``                      unchanged
``norm{i}.*`` (detection/segmentation)      ``out_norms.{i}.*`` (``features_only=True``)
==========================================  =============================================

Tensors keep their shapes and values (the relative-position tables ``rpb [heads, 2k-1, 2k-1]``
index offsets the same way), so a converted checkpoint reproduces the official model exactly.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .registry import list_models, model_info

__all__ = ["conv1x1_to_linear", "convert_official_state_dict", "convert_timm_state_dict", "load_official_checkpoint",
           "rename_state_dict", "timm_checkpoint_loader"]

#: ``(pattern, replacement)`` or ``(pattern, replacement, transform)``: ``re.sub`` on the key, and
#: ``transform(value)`` (a reshape, permutation, ...) on the tensor when given. A ``None``
#: replacement drops the entry (a tensor that provably has no effect, said where the rule is).
Rule = Union[tuple[str, Union[str, Callable, None]], tuple[str, Union[str, Callable, None], Optional[Callable]]]

# (pattern on the official key, replacement); tried in order, the first match wins.
_RULES: tuple[tuple[str, object], ...] = (
    (r"^patch_embed\.proj\.0\.(.+)$", r"stem.conv1.\1"),
    (r"^patch_embed\.proj\.1\.(.+)$", r"stem.conv2.\1"),
    (r"^patch_embed\.norm\.(.+)$", r"stem.norm.\1"),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.gamma([12])$", r"stages.\1.blocks.\2.ls\3.gamma"),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.(.+)$", r"stages.\1.blocks.\2.\3"),
    (r"^levels\.(\d+)\.downsample\.reduction\.(.+)$",
     lambda m: f"stages.{int(m.group(1)) + 1}.downsample.conv.{m.group(2)}"),
    (r"^levels\.(\d+)\.downsample\.norm\.(.+)$",
     lambda m: f"stages.{int(m.group(1)) + 1}.downsample.norm.{m.group(2)}"),
    (r"^norm(\d+)\.(.+)$", r"out_norms.\1.\2"),
    (r"^(norm|head)\.(.+)$", r"\1.\2"),
)

# Training wrappers put the weights under one of these keys, and DDP prefixes every key with "module.".
_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema")


def _unwrap(checkpoint: Mapping) -> Mapping[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return checkpoint[key]
    return checkpoint


def conv1x1_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution's weight ``[out, in, 1, 1]`` as the same map's ``nn.Linear`` weight ``[out, in]``."""
    return weight.flatten(1)


def rename_state_dict(state_dict: Mapping[str, torch.Tensor], rules: Sequence[Rule], owner: str,
                      layout: str) -> dict[str, torch.Tensor]:
    """Apply ``rules`` (see :data:`Rule`; the first whose pattern matches a key wins) to every entry.

    Accepts a bare state dict or a training checkpoint holding one under ``state_dict``/``model``;
    strips a DDP ``module.`` prefix. Raises ``KeyError`` naming ``owner`` and listing any key no
    rule matches (so a wrong file fails loudly instead of loading half a model); ``layout`` names
    what was expected.
    """
    compiled = [(re.compile(r[0]), r[1], r[2] if len(r) > 2 else None) for r in rules]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in _unwrap(state_dict).items():
        key = key.removeprefix("module.")
        for pattern, repl, transform in compiled:
            if pattern.match(key):
                if repl is not None:
                    out[pattern.sub(repl, key)] = transform(value) if transform is not None else value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise KeyError(f"{owner}: keys not in the {layout} layout: {shown}.")
    return out


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official NAT/DiNAT state dict to visattn's layout (table in the module docstring).

    Accepts a bare state dict or a training checkpoint holding one under ``state_dict``/``model``;
    strips a DDP ``module.`` prefix. Raises ``KeyError`` listing any key that is not part of the
    official layout (so a wrong file fails loudly instead of loading half a model).
    """
    return rename_state_dict(state_dict, _RULES, "convert_official_state_dict",
                             "official NAT/DiNAT (SHI-Labs/Neighborhood-Attention-Transformer)")


def convert_timm_state_dict(name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the state dict of timm's implementation of ``name`` onto ``visattn.create_model(name)``.

    ``name`` is visattn's model name (``"swin_tiny"``); the timm model it maps from is
    ``model_info(name)["timm_name"]`` (``"swin_tiny_patch4_window7_224"``), any of its pretrained
    tags. With the result loaded (strictly) the two models compute the same logits. Raises
    ``ValueError`` for a model without a timm counterpart, ``KeyError`` for keys the family's
    rules do not know.
    """
    record = model_info(name.lower())
    if record.get("from_timm") is None:
        have = [n for n in list_models() if model_info(n).get("from_timm") is not None]
        raise ValueError(f"convert_timm_state_dict: {name!r} has no timm counterpart; models with one: "
                         f"{', '.join(have)}.")
    return record["from_timm"](state_dict)


def load_official_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                             strict: bool = True):
    """Load an official checkpoint (path or state dict) into a visattn NAT/DiNAT ``model``.

    Returns ``model.load_state_dict``'s result. With ``strict=False``, weights the model lacks or
    holds in another shape (a 1000-class head in a 10-class or ``features_only`` model) are
    skipped and reported as unexpected/missing instead of raising.
    """
    state = convert_official_state_dict(_read(checkpoint))
    return load_converted(model, state, strict)


def load_converted(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True):
    """``model.load_state_dict(state)``; with ``strict=False`` tensors the model lacks or holds in another
    shape (a 1000-class head in a 10-class or ``features_only`` model) are skipped and reported."""
    if not strict:
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    return model.load_state_dict(state, strict=strict)


def _read(checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def timm_checkpoint_loader(from_timm: Callable[[Mapping[str, torch.Tensor]], dict]) -> Callable:
    """A ``load_checkpoint(model, checkpoint, strict=True)`` for :func:`~visattn.models.register_model` that
    reads a timm-layout checkpoint (path or state dict) and maps it with the family's ``from_timm`` rules."""

    def load(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]], strict: bool = True):
        return load_converted(model, from_timm(_read(checkpoint)), strict)

    return load
