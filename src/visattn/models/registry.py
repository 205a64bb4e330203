"""Model registry: ``create_model(name, pretrained=False, **kw)``, ``list_models()``, ``model_info()``.

A model family registers each of its variants in its own file with the :func:`register_model`
decorator on a builder function, and :mod:`visattn.models` imports the family files; this file
imports none of them, so the dependency runs one way (families -> registry)::

    @register_model("nat_tiny", url="https://.../nat_tiny.pth", load_checkpoint=load_official_checkpoint,
                    config=NAT_CONFIGS["nat_tiny"])
    def nat_tiny(**kwargs) -> NAT:
        return build_nat("nat_tiny", **kwargs)

Keyword arguments of :func:`create_model` go to the builder (for NAT/DiNAT: config overrides such
as ``depths``, :class:`~visattn.models.nat.NAT` arguments such as ``num_classes``, and DiNAT's
``img_size``). timm: :func:`visattn.models.timm_hook.register_timm` adds the same names to timm.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any, Callable, Mapping, Optional, TypeVar, Union

from torch import nn

__all__ = ["create_model", "list_models", "model_info", "register_model"]

Builder = Callable[..., nn.Module]
#: ``load_checkpoint(model, checkpoint, strict=...)``: ``checkpoint`` is a path or a state dict
CheckpointLoader = Callable[..., Any]
B = TypeVar("B", bound=Builder)

_MODELS: dict[str, dict] = {}


def register_model(name: str, builder: Optional[B] = None, *, url: Optional[str] = None,
                   load_checkpoint: Optional[CheckpointLoader] = None, **info) -> Union[B, Callable[[B], B]]:
    """Register ``builder(**kwargs) -> nn.Module`` as ``name`` (lower-case, unique).

    Used as a decorator, ``@register_model(name, url=..., **info)`` on the builder (which it
    returns unchanged); ``register_model(name, builder, ...)`` registers directly. ``url`` is the
    checkpoint ``pretrained=True`` downloads and ``load_checkpoint(model, checkpoint, strict=...)``
    loads it (or a local ``checkpoint_path``) into the built model, mapping key names as the
    family's checkpoints need; ``info`` (e.g. the variant's ``config``) goes to :func:`model_info`.
    Registering another builder under a taken name raises ``ValueError``.
    """
    if name != name.lower():
        raise ValueError(f"register_model: names are lower-case, got {name!r}.")
    if url is not None and load_checkpoint is None:
        raise ValueError(f"register_model: {name!r} has a checkpoint url but no load_checkpoint to load it with.")

    def deco(fn: B) -> B:
        if name in _MODELS and _MODELS[name]["builder"] is not fn:
            raise ValueError(f"register_model: {name!r} is already registered (by "
                             f"{_MODELS[name]['builder'].__module__}.{_MODELS[name]['builder'].__qualname__}).")
        _MODELS[name] = dict(builder=fn, url=url, load_checkpoint=load_checkpoint, **info)
        return fn

    return deco if builder is None else deco(builder)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered names matching the shell-style ``pattern`` (e.g. ``"dinat_*"``)."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> dict:
    """Registration record of ``name``: ``builder``, checkpoint ``url`` and ``load_checkpoint``, and
    the family's extra facts (NAT/DiNAT: the variant's ``config``)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}.")
    return dict(_MODELS[name])


def create_model(name: str, pretrained: bool = False,
                 checkpoint_path: Optional[Union[str, os.PathLike, Mapping]] = None, **kwargs) -> nn.Module:
    """Build the registered model ``name``.

    ``pretrained=True`` downloads the variant's checkpoint (cached by ``torch.hub``) and loads it
    with its ``load_checkpoint`` (NAT/DiNAT: the official ImageNet weights through
    :func:`~visattn.models.convert.load_official_checkpoint`); ``checkpoint_path`` loads a local
    checkpoint the same way instead. A head of another size (``num_classes != 1000``) or
    ``features_only`` loads non-strictly and keeps its fresh layers.
    """
    record = model_info(name.lower())
    model = record["builder"](**kwargs)
    if pretrained or checkpoint_path is not None:
        if record["load_checkpoint"] is None:
            raise ValueError(f"create_model: {name!r} registers no checkpoint loader (load_checkpoint); use "
                             f"pretrained=False and no checkpoint_path.")
        if checkpoint_path is None:
            if record["url"] is None:
                hint = (f"; load timm's weights with checkpoint_path= (a timm checkpoint of {record['timm_name']!r}) "
                        f"or visattn.models.convert_timm_state_dict" if record.get("timm_name") else "")
                raise ValueError(f"create_model: {name!r} has no pretrained checkpoint to download; use "
                                 f"pretrained=False{hint}.")
            import torch.hub

            checkpoint = torch.hub.load_state_dict_from_url(record["url"], map_location="cpu")
        else:
            checkpoint = checkpoint_path
        strict = not kwargs.get("features_only", False) and kwargs.get("num_classes", 1000) == 1000
        record["load_checkpoint"](model, checkpoint, strict=strict)
    return model
