"""``natten.flops``: NATTEN's FLOP counters (0.14-0.17).

* ``fna_flop_count``, ``na_qk_flop_count``, ``na_av_flop_count`` (0.17): the formulas. Every
  neighbourhood slot counts (causal windows too, as NATTEN counted); ``QK`` is a
  ``[B*heads, tokens, D] x [D, K]`` product and ``AV`` a ``[B*heads, tokens, K] x [K, D]`` one.
* ``get_flops(model, input)``: the model's forward multiply-accumulates as fvcore and the NAT/DiNAT
  papers count them, by :func:`visattn.count_flops` (PyTorch's FLOP counter; fvcore is not needed).
  The stand-in's fused operators are counted by their formula, its unfused ones by the tiled
  products they run (a few times the formula: prefer the fused path or the formulas above).
* ``add_natten_handle(flop_ctr)``: returns the fvcore counter unchanged. NATTEN registered handles for
  its opaque autograd functions; the stand-in's operators trace to standard PyTorch operators that
  fvcore counts itself.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ...spec import _as_tuple

__all__ = ["add_natten_handle", "fna_flop_count", "get_flops", "na_av_flop_count", "na_qk_flop_count"]


def _qk_av(fn: str, shape: Sequence[int], kernel_size, is_heads_last: bool, return_macs: bool) -> tuple[int, int]:
    rank = len(shape) - 3
    if rank not in (1, 2, 3):
        raise ValueError(f"{fn}: shape {tuple(shape)} has {len(shape)} dims; expected 4-6 ([B, *spatial, heads, dim] "
                         f"or [B, heads, *spatial, dim]).")
    heads = shape[-2] if is_heads_last else shape[1]
    spatial = shape[1:rank + 1] if is_heads_last else shape[2:rank + 2]
    K = math.prod(_as_tuple(fn, "kernel_size", kernel_size, rank, int))
    macs = shape[0] * heads * math.prod(spatial) * K * shape[-1]
    return (macs, macs) if return_macs else (2 * macs, 2 * macs)


def fna_flop_count(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int], kernel_size: Any,
                   dilation: Any, is_causal: Any, is_heads_last: bool, return_macs: bool = False) -> int:
    """FLOPs (or MACs) of fused NA: ``QK + AV`` over every slot; bias and softmax not counted."""
    qk, av = _qk_av("fna_flop_count", q_shape, kernel_size, is_heads_last, return_macs)
    return qk + av


def na_qk_flop_count(q_shape: Sequence[int], k_shape: Sequence[int], kernel_size: Any, dilation: Any, is_causal: Any,
                     is_heads_last: bool, return_macs: bool = False) -> int:
    """FLOPs (or MACs) of the unfused ``QK``."""
    return _qk_av("na_qk_flop_count", q_shape, kernel_size, is_heads_last, return_macs)[0]


def na_av_flop_count(a_shape: Sequence[int], v_shape: Sequence[int], kernel_size: Any, dilation: Any, is_causal: Any,
                     is_heads_last: bool, return_macs: bool = False) -> int:
    """FLOPs (or MACs) of the unfused ``AV``."""
    return _qk_av("na_av_flop_count", v_shape, kernel_size, is_heads_last, return_macs)[1]


def add_natten_handle(flop_ctr: Any) -> Any:
    """fvcore hook of NATTEN; the stand-in needs none (module docstring): returns ``flop_ctr``."""
    return flop_ctr


def get_flops(model: Any, input: Any, disable_warnings: bool = False) -> int:
    """Forward MACs of ``model(input)`` (fvcore's and the papers' convention), by :func:`visattn.count_flops`."""
    from ...bench.flops import count_flops

    return count_flops(model, input)
