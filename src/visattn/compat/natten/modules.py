"""``natten.NeighborhoodAttention{1,2,3}D``: NATTEN's modules of every release, on visattn's mixer.

The constructor changed four times; :mod:`._versions` reads a call with the release(s) it fits:

==================  ========================================================================  ====  =====
releases            arguments                                                                 rpb   pads
==================  ========================================================================  ====  =====
0.14.1-0.14.4       ``(dim, kernel_size, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop,  yes   yes
                    dilation=None)`` (read so only when pinned to those releases)
0.14.5-0.15.1       ``(dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias, qk_scale,  bias  yes
                    attn_drop, proj_drop)``; 3-D: ``kernel_size_d``/``dilation_d`` after
                    ``kernel_size``/``dilation``
0.17.0-0.17.5       ``(dim, num_heads, kernel_size, dilation=1, is_causal=False,               opt.  no
                    rel_pos_bias=False, qkv_bias, qk_scale, attn_drop, proj_drop,
                    use_experimental_ops=False)``
0.20.0-0.21.7       ``(embed_dim, num_heads, kernel_size, stride=1, dilation=1,                no    no
                    is_causal=False, qkv_bias, qk_scale, proj_drop)`` (0.20.0 names it ``dim``)
==================  ========================================================================  ====  =====

Parameters are named as NATTEN named them (``qkv``, ``rpb [heads, 2k-1, ...]``, ``proj``), so NATTEN
and official NAT/DiNAT state dicts load by key. Up to 0.15 an input smaller than the window
(``kernel_size * dilation``) is zero-padded at the end of each axis before ``qkv`` and cropped after,
as NATTEN did (0.15's 3-D module padded only height and width); later releases refused such inputs,
and the stand-in then follows visattn's variable-resolution rule instead. 0.17 modules with
``natten.use_fused_na()`` skip attention dropout, as NATTEN did.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.functional import pad

from ...nn import NeighborhoodAttention1D as _NA1D, NeighborhoodAttention2D as _NA2D, NeighborhoodAttention3D as _NA3D
from ...nn.mixers.base import na_attend
from ...spec import _as_tuple
from . import _versions, context
from ._versions import Era

__all__ = ["NeighborhoodAttention", "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]

logger = logging.getLogger("natten")

# What differs between releases only by default: the bias table, padding, and which release's forward runs.
_SOFT = frozenset({"rpb", "pad", "era"})


def _canon(rank: int, a: dict, *, dim, kernel, dilation, rpb: bool, pad_axes: int, era: str, stride=1,
           is_causal=False, attn_drop=0.0) -> dict:
    """The common reading of a constructor call (defaults filled in, per-axis tuples)."""
    for name in ("num_heads",):
        if not isinstance(a[name], int) or isinstance(a[name], bool):
            raise TypeError(f"{name} must be an int")
    tup = lambda name, v, kind=int: _as_tuple("NeighborhoodAttention", name, v, rank, kind)  # noqa: E731
    return dict(dim=dim, num_heads=a["num_heads"], kernel_size=tup("kernel_size", kernel), stride=tup("stride", stride),
                dilation="auto" if isinstance(dilation, str) else tup("dilation", dilation or 1),
                is_causal=tup("is_causal", is_causal, bool), qkv_bias=bool(a["qkv_bias"]), qk_scale=a["qk_scale"],
                attn_drop=float(attn_drop), proj_drop=float(a["proj_drop"]), rpb=bool(rpb), pad=pad_axes, era=era)


def _eras(rank: int) -> list[Era]:
    def v0141(dim, kernel_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
              dilation=None): ...

    def v0145(dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True, qk_scale=None, attn_drop=0.0,
              proj_drop=0.0): ...

    def v015_3d(dim, num_heads, kernel_size, kernel_size_d=None, dilation=1, dilation_d=None, bias=True,
                qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0): ...

    def v017(dim, num_heads, kernel_size, dilation=1, is_causal=False, rel_pos_bias=False, qkv_bias=True,
             qk_scale=None, attn_drop=0.0, proj_drop=0.0, use_experimental_ops=False): ...

    def v0200(dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True, qk_scale=None,
              proj_drop=0.0): ...

    def v020(embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True, qk_scale=None,
             proj_drop=0.0): ...

    def c015_3d(a):
        kd, dd = a["kernel_size_d"] or a["kernel_size"], a["dilation_d"] or a["dilation"] or 1
        return _canon(3, a, dim=a["dim"], kernel=(kd, a["kernel_size"], a["kernel_size"]),
                      dilation=(dd, a["dilation"] or 1, a["dilation"] or 1), rpb=a["bias"], pad_axes=2,
                      attn_drop=a["attn_drop"], era="0.15")

    def c017(a):
        if a["rel_pos_bias"] and any(_as_tuple("NeighborhoodAttention", "is_causal", a["is_causal"], rank, bool)):
            # NATTEN 0.17's own refusal, kept: its causal windows have no bias convention.
            raise NotImplementedError("Causal neighborhood attention is undefined with positional biases (NATTEN "
                                      "0.17). Disable rel_pos_bias or causal masking.")
        return _canon(rank, a, dim=a["dim"], kernel=a["kernel_size"], dilation=a["dilation"], rpb=a["rel_pos_bias"],
                      pad_axes=0, is_causal=a["is_causal"], attn_drop=a["attn_drop"], era="0.17")

    eras = []
    if rank < 3:
        eras.append(Era("0.14.1", "0.14.4", v0141, lambda a: _canon(
            rank, a, dim=a["dim"], kernel=a["kernel_size"], dilation=a["dilation"], rpb=True, pad_axes=rank,
            attn_drop=a["attn_drop"], era="0.14"), _SOFT, pinned_only=True))
        eras.append(Era("0.14.5", "0.15.1", v0145, lambda a: _canon(
            rank, a, dim=a["dim"], kernel=a["kernel_size"], dilation=a["dilation"], rpb=a["bias"], pad_axes=rank,
            attn_drop=a["attn_drop"], era="0.15"), _SOFT))
    else:
        eras.append(Era("0.15.0", "0.15.1", v015_3d, c015_3d, _SOFT))
    eras.append(Era("0.17.0", "0.17.5", v017, c017, _SOFT))
    eras.append(Era("0.20.0", "0.20.0", v0200, lambda a: _canon(
        rank, a, dim=a["dim"], kernel=a["kernel_size"], dilation=a["dilation"], stride=a["stride"], rpb=False,
        pad_axes=0, is_causal=a["is_causal"], era="0.20"), _SOFT))
    eras.append(Era("0.20.1", "0.21.7", v020, lambda a: _canon(
        rank, a, dim=a["embed_dim"], kernel=a["kernel_size"], dilation=a["dilation"], stride=a["stride"], rpb=False,
        pad_axes=0, is_causal=a["is_causal"], era="0.20"), _SOFT))
    return eras


_ERAS = {rank: _eras(rank) for rank in (1, 2, 3)}
_warned_dropout = False


class _NattenModule:
    """What NATTEN's modules add to visattn's: reading the constructor by release, zero-padding small
    inputs (up to 0.15), 0.17's fused switch, and a warning that explains a checkpoint whose bias table
    does not match the module. Mixed into visattn's ``NeighborhoodAttention{1,2,3}D``."""

    rank: int
    _eras: Optional[list] = None  # a fixed list (the 0.14 alias); None: _ERAS[rank]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        name = type(self).__name__
        _, c = _versions.resolve(name, self._eras or _ERAS[self.rank], args, kwargs)
        dilation = 1 if c["dilation"] == "auto" else c["dilation"]
        super().__init__(c["dim"], c["num_heads"], c["kernel_size"], c["stride"], dilation, c["is_causal"],
                         qkv_bias=c["qkv_bias"], qk_scale=c["qk_scale"], proj_drop=c["proj_drop"],
                         attn_drop=c["attn_drop"], rel_pos_bias=c["rpb"])
        self.natten_era = c["era"]
        self.auto_dilation = c["dilation"] == "auto"
        self.pad_axes = c["pad"]

    def _window_dilation(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        if self.auto_dilation:  # 0.14.1-0.14.4's dilation="..." string: the largest that fits the map
            return (max(min(spatial) // self.kernel_size[0], 1),) * self.rank
        return self.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, *S, C]`` -> ``[B, *S, C]`` (channels-last)."""
        name = type(self).__name__
        if x.dim() != self.rank + 2 or x.shape[-1] != self.dim:
            axes = ", ".join(f"S{i}" for i in range(self.rank))
            raise ValueError(f"{name}: expected a channels-last input [B, {axes}, {self.dim}], got {tuple(x.shape)}.")
        spatial = tuple(x.shape[1:-1])
        dilation = self._window_dilation(spatial)
        extra = [0] * self.rank
        if self.pad_axes:
            # Pad the last `pad_axes` axes up to the window (kernel * dilation), at the end, with zeros.
            for a in range(self.rank - self.pad_axes, self.rank):
                extra[a] = max(0, self.kernel_size[a] * dilation[a] - spatial[a])
            if any(extra):
                widths = [0, 0]
                for e in reversed(extra):
                    widths += [0, e]
                x = pad(x, widths)
        q, k, v = self._qkv(x)
        drop = self.attn_drop
        if self.natten_era == "0.17" and context.is_fused_na_enabled() and drop > 0 and self.training:
            _warn_fused_dropout(name)
            drop = 0.0
        na_args = dict(kernel_size=self.kernel_size, stride=self.stride, dilation=dilation, is_causal=self.is_causal)
        out = self._out(na_attend(q, k, v, na_args=na_args, scale=self.scale, rpb=self.rpb, attn_drop=drop,
                                  training=self.training))
        if any(extra):
            out = out[(slice(None), *(slice(0, L) for L in spatial))]
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # torch reports the key itself (an error for strict loads); this says why it happens and the fix.
        has = prefix + "rpb" in state_dict
        if has != (self.rpb is not None):
            name = type(self).__name__
            if has:
                fix = ("it was built without one: NATTEN <= 0.15 made one by default (bias=True), 0.17 with "
                       "rel_pos_bias=True. Pass that argument, or pin the release the code was written for "
                       f"({_versions.ENV_VAR}=0.15.1 or install_natten(version='0.15.1'))")
            else:
                fix = "the module has one: build it with bias=False (0.15) / rel_pos_bias=False (0.17), or 0.20+ style"
            warnings.warn(f"{name} at '{prefix}': the checkpoint {'has' if has else 'has no'} relative positional bias "
                          f"table '{prefix}rpb' but {fix}.", UserWarning, stacklevel=2)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _warn_fused_dropout(name: str) -> None:
    global _warned_dropout
    if not _warned_dropout:
        _warned_dropout = True
        logger.error(f"{name}: fused neighborhood attention (natten.use_fused_na()) does not apply attention dropout "
                     f"(as in NATTEN 0.17); the attn_drop rate is ignored.")


class NeighborhoodAttention1D(_NattenModule, _NA1D):
    """NATTEN's 1-D module (any release's constructor, see the module docstring): ``[B, L, C] -> [B, L, C]``."""

    rank = 1


class NeighborhoodAttention2D(_NattenModule, _NA2D):
    """NATTEN's 2-D module (any release's constructor, see the module docstring): ``[B, H, W, C] -> [B, H, W, C]``."""

    rank = 2


class NeighborhoodAttention3D(_NattenModule, _NA3D):
    """NATTEN's 3-D module (0.15+ constructors): ``[B, D, H, W, C] -> [B, D, H, W, C]``."""

    rank = 3


class NeighborhoodAttention(NeighborhoodAttention2D):
    """NATTEN 0.14.1-0.14.4's deprecated 2-D alias: ``(dim, kernel_size, num_heads, qkv_bias=True,
    qk_scale=None, attn_drop=0.0, proj_drop=0.0, dilation=None)``."""

    _eras = [dataclasses.replace(e, pinned_only=False) for e in _ERAS[2] if e.first == "0.14.1"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn("Using NeighborhoodAttention has been deprecated since natten v0.13. Please consider using "
                      "NeighborhoodAttention2D instead.", DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
