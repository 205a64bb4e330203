"""One registry for every attention module: ``create_attn(name, channels_or_dim, **kw)``.

A module file registers its classes with the :func:`register_attn` decorator; its folder's
``__init__`` (:mod:`visattn.nn.mixers`, :mod:`visattn.nn.plugins`) imports the file, and
:mod:`visattn.nn` imports the folders. Importing any part of :mod:`visattn.nn`, this file
included, runs that package first, so the registry is complete before it is read. This file
imports no module file itself: the dependency runs one way, from the modules to the registry.
A new family is one file in its folder plus one import line in the folder's ``__init__``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["register_attn", "create_attn", "list_attn", "attn_info"]

_REGISTRY: dict[str, dict] = {}


def register_attn(name: str, *, layout: str, paper: str = "", **info) -> Callable[[type], type]:
    """Class decorator: register ``cls`` under the lower-case ``name``.

    ``layout`` is ``"channels_last"`` (token mixers, ``[B, H, W, C]``) or ``"channels_first"``
    (CNN plug-ins, ``[B, C, H, W]``); ``paper`` is "Title (year)"; extra keys (e.g. ``complexity``)
    go into :func:`attn_info`.
    """
    if name != name.lower():
        raise ValueError(f"register_attn: names are lower-case, got {name!r}.")
    if layout not in ("channels_last", "channels_first"):
        raise ValueError(f"register_attn: layout must be 'channels_last' or 'channels_first', got {layout!r}.")

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name]["cls"] is not cls:
            raise ValueError(f"register_attn: {name!r} is already registered to {_REGISTRY[name]['cls'].__name__}.")
        _REGISTRY[name] = dict(cls=cls, layout=layout, paper=paper, **info)
        return cls

    return deco


def list_attn(layout: str | None = None) -> list[str]:
    """Sorted registered names, optionally only one ``layout``."""
    return sorted(n for n, i in _REGISTRY.items() if layout is None or i["layout"] == layout)


def attn_info(name: str) -> dict:
    """Registration record of ``name``: class, layout, paper and extra facts."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention {name!r}; choose one of: {', '.join(list_attn())}.")
    return dict(_REGISTRY[name])


def create_attn(name: str, channels_or_dim: int, **kwargs) -> nn.Module:
    """Build the registered module ``name`` for ``channels_or_dim`` channels; ``kwargs`` go to its constructor."""
    return attn_info(name.lower())["cls"](channels_or_dim, **kwargs)
