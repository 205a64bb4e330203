"""A stand-in for NATTEN: NATTEN's Python API of releases 0.14 to 0.21, computed by visattn.

``visattn.compat.install_natten()`` makes ``import natten`` resolve to this package (see
:mod:`visattn.compat`); it can also be imported under its own name. Every public function, module and
flag of those releases is here, by the name and in the module NATTEN had it:

* ``natten.functional``: the unfused operators of 0.14-0.17 (``natten2dqkrpb``, ``natten2dav``,
  ``na2d_qk``, ``na2d_av``, ... heads-first), the fused ``na1d/na2d/na3d`` of 0.17 and 0.20+
  (heads-last), ``attention``, ``merge_attentions``;
* ``natten.NeighborhoodAttention{1,2,3}D`` (also as ``natten.natten2d.NeighborhoodAttention2D``,
  ``natten.na2d.NeighborhoodAttention2D``, ``natten.modules...``), 0.14's ``NeighborhoodAttention``;
* ``natten.context`` and the top-level flags and capability checks; ``natten.flops``;
  ``natten.nested``, ``natten.experimental``, ``natten.flex``, ``natten.types``, ``natten.version``,
  ``natten.attn_merge``, ``natten.backends`` (its kernel-configuration queries return no configs).

Where releases disagree, :mod:`._versions` decides (pin a release with ``VISATTN_NATTEN_VERSION`` or
``install_natten(version=...)``); ``__version__`` is the pinned release, else the newest covered.
The documentation page ``docs/natten.md`` lists every name, what it maps to and what differs.
"""

from __future__ import annotations

import sys
import types as _pytypes
from typing import Any, Callable

from . import _versions, context, flops, functional, modules, types as types  # noqa: F401 (submodules)
from ._versions import version_string
from .context import (
    HAS_LIBNATTEN,
    allow_flex_compile,
    allow_flex_compile_backprop,
    are_deterministic_algorithms_enabled,
    disable_autotuner,
    disable_flex_compile,
    disable_flex_compile_backprop,
    disable_gemm_na,
    disable_tf32,
    disable_tiled_na,
    enable_gemm_na,
    enable_tf32,
    enable_tiled_na,
    force_flex_attention,
    get_memory_usage_preference,
    has_bfloat,
    has_cuda,
    has_fna,
    has_fp32_gemm,
    has_fp64_gemm,
    has_fused_na,
    has_gemm,
    has_half,
    has_tf32_gemm,
    is_autotuner_enabled,
    is_autotuner_enabled_for_backward,
    is_autotuner_enabled_for_forward,
    is_autotuner_thorough_for_backward,
    is_autotuner_thorough_for_forward,
    is_flex_compile_allowed,
    is_flex_compile_backprop_allowed,
    is_fna_enabled,
    is_fused_na_enabled,
    is_gemm_na_enabled,
    is_kv_parallelism_in_fused_na_enabled,
    is_memory_usage_default,
    is_memory_usage_strict,
    is_memory_usage_unrestricted,
    is_tf32_in_gemm_na_enabled,
    is_tiled_na_enabled,
    set_memory_usage_preference,
    use_autotuner,
    use_deterministic_algorithms,
    use_flex_attention,
    use_fna,
    use_fused_na,
    use_gemm_na,
    use_kv_parallelism_in_fused_na,
    use_tf32_in_gemm_na,
    use_tiled_na,
)
from .functional import attention, merge_attentions
from .modules import NeighborhoodAttention, NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

_versions.pin_from_environment()


def __getattr__(name: str) -> Any:
    # __version__ follows the pin (install_natten(version=...) may change it after import).
    if name == "__version__":
        return version_string()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(_pytypes.ModuleType):
    """A submodule that can also be called: ``natten.na2d`` is the module ``natten/na2d.py`` in 0.17
    (holding ``NeighborhoodAttention2D``) and the function ``na2d`` from 0.20. Importing the module
    binds it as the package attribute, so it must also be the function."""

    _call: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)


def _submodule(name: str, doc: str, call: Callable[..., Any] | None = None, **attrs: Any) -> _pytypes.ModuleType:
    """Register ``<package>.<name>`` (a module NATTEN had under that path) holding ``attrs``."""
    full = f"{__name__}.{name}"
    module = _CallableModule(full, doc) if call is not None else _pytypes.ModuleType(full, doc)
    if call is not None:
        module._call = call
        module.__wrapped__ = call
    module.__dict__.update(attrs, __all__=sorted(a for a in attrs if not a.startswith("__")))
    sys.modules[full] = module
    globals()[name] = module
    return module


def _no_configs(*args: Any, **kwargs: Any) -> list:
    """NATTEN 0.20+'s kernel-configuration query: the stand-in runs no CUTLASS/Flex kernels, so none."""
    return []


_NA = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}
for _rank, _cls in _NA.items():
    _name = _cls.__name__
    # 0.14-0.17: natten/natten{1,2,3}d.py; 0.17: natten/na{1,2,3}d.py, whose name 0.20 gave the function.
    _extra = {"NeighborhoodAttention": NeighborhoodAttention} if _rank == 2 else {}
    _submodule(f"natten{_rank}d", f"NATTEN 0.14-0.17's natten{_rank}d module.", **{_name: _cls}, **_extra)
    _submodule(f"na{_rank}d", f"NATTEN 0.17's na{_rank}d module; calling it runs natten.na{_rank}d (0.20+).",
               call=getattr(functional, f"na{_rank}d"), **{_name: _cls})
_submodule("nattencuda", "NATTEN 0.14.1's 2-D module path.", NeighborhoodAttention=NeighborhoodAttention)
_submodule("nattencuda1d", "NATTEN 0.14.1's 1-D module path.", NeighborhoodAttention1D=NeighborhoodAttention1D)
_submodule("nattencuda2d", "NATTEN 0.14.1's 2-D module path.", NeighborhoodAttention2D=NeighborhoodAttention2D)
_submodule("modules", "NATTEN 0.20+'s modules.", **{c.__name__: c for c in _NA.values()})


def _nested(rank: int, kind: str) -> Callable[..., Any]:
    """0.15-0.17's ``natten.nested.na{rank}d_{kind}_nested``: the operator on nested tensors."""
    if kind == "qk":
        def op(query, key, bias, kernel_size, dilation, additional_keys=None, is_causal=False):
            return getattr(functional, f"na{rank}d_qk")(query, key, kernel_size, dilation, additional_keys, is_causal,
                                                        rpb=bias)
    else:
        def op(attn, value, kernel_size, dilation, additional_values=None, is_causal=False):
            return getattr(functional, f"na{rank}d_av")(attn, value, kernel_size, dilation, additional_values,
                                                        is_causal)
    op.__name__ = op.__qualname__ = f"na{rank}d_{kind}_nested"
    op.__doc__ = f"NATTEN 0.17's ``natten.nested.{op.__name__}``: nested (per-sample) heads-first tensors."
    return op


_submodule("nested", "NATTEN 0.15-0.17's operators on nested tensors.",
           **{f"na{r}d_{k}_nested": _nested(r, k) for r in (1, 2, 3) for k in ("qk", "av")})
_submodule("experimental", "NATTEN 0.17's experimental fused operators (0.17 signature).",
           **{f"na{r}d": functional.fused_op(r, f"na{r}d", ("0.17",)) for r in (1, 2, 3)})
_submodule("flex", "NATTEN 0.17.5's Flex Attention operators (here: visattn's fused operator).",
           **{f"flex_na{r}d": functional.fused_op(r, f"flex_na{r}d", ("flex",)) for r in (1, 2, 3)})
_submodule("attn_merge", "NATTEN 0.20+'s attention merging.", merge_attentions=merge_attentions)
_submodule("version", "NATTEN 0.20+'s version module.", __getattr__=__getattr__)
_CONFIG_QUERIES = [f"get_{bwd}configs_for_{kind}" for bwd in ("", "bwd_") for kind in (
    "cutlass_fmha", "cutlass_fna", "cutlass_hopper_fmha", "cutlass_hopper_fna", "cutlass_blackwell_fmha",
    "cutlass_blackwell_fna")] + ["get_configs_for_flex_fmha", "get_configs_for_flex_fna"]
_submodule("backends", "NATTEN 0.20+'s backends: configuration queries (no CUTLASS/Flex kernels here).",
           **{name: _no_configs for name in _CONFIG_QUERIES})
globals().update({name: _no_configs for name in _CONFIG_QUERIES})
na1d, na2d, na3d = (globals()[f"na{r}d"] for r in (1, 2, 3))  # the callable modules, for static readers
del _rank, _cls, _name, _extra


__all__ = [
    "__version__", "HAS_LIBNATTEN", "NeighborhoodAttention", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
    "NeighborhoodAttention3D", "attention", "merge_attentions", "na1d", "na2d", "na3d",
    *_CONFIG_QUERIES, *(name for name in context.__all__ if name in globals()),
]
