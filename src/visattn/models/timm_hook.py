"""Register visattn's models with timm: ``timm.create_model("dinat_tiny", features_only=True)``.

timm is optional and heavy, so nothing here runs on ``import visattn``. :func:`register_timm` runs
by itself when :mod:`visattn.models` is imported *after* timm; otherwise call it once (it is
idempotent)::

    import timm, visattn.models
    visattn.models.register_timm()
    model = timm.create_model("dinat_tiny", num_classes=10)

Each model gets an entry point in this module (timm files entry points by function name and lists
them in the defining module's ``__all__``), which forwards to :func:`visattn.models.create_model`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .registry import create_model, list_models

__all__: list[str] = ["register_timm"]

# Keywords timm.create_model passes to every entry point; our builders have no use for them.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_registered: list[str] = []
_done = False


def register_timm() -> list[str]:
    """Add every :func:`~visattn.models.list_models` name that timm does not have to timm's registry;
    returns the names added.

    A name timm already has (``focalnet_tiny_srf``, ...) stays timm's own model: visattn's
    counterpart is reached through :func:`visattn.models.create_model`, and
    :func:`~visattn.models.convert_timm_state_dict` moves weights between the two. Raises
    ``ImportError`` with the install command when timm cannot be imported.
    """
    global _done
    if _done:
        return list(_registered)
    try:
        from timm.models import is_model, register_model
    except ImportError as e:
        raise ImportError(f"visattn.models.register_timm: timm is not importable ({e}); `pip install timm`.") from e
    for name in list_models():
        if is_model(name):
            continue
        fn = _entrypoint(name)
        globals()[name] = fn
        register_model(fn)  # appends ``name`` to this module's __all__
        _registered.append(name)
    _done = True
    return list(_registered)


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        return create_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"timm entry point for visattn's {name!r} (see visattn.models.create_model)."
    return entrypoint
