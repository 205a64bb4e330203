"""Count a model's multiply-accumulates (MACs) the way the NAT/DiNAT papers (fvcore) do.

:func:`count_flops` runs one forward pass under :class:`torch.utils.flop_counter.FlopCounterMode`
and reports **MACs** (one fused multiply-add = 1), the unit of every "FLOPs" column in the vision
literature that used fvcore (NAT, DiNAT, Swin, ConvNeXt, ...). PyTorch's counter reports FLOPs
(= 2 x MACs for matmuls and convolutions); we halve it.

Neighborhood attention is counted by its formula, not by what a backend happens to compute: under a
dispatch mode every call goes through the ``visattn::na_forward`` custom op, whose FLOP formula
(:func:`visattn.ops.na_forward_op_flops`: ``QK^T + AV = 2 * B * tokens * K * H * D`` MACs plus
``B * tokens * K * H`` additions of the relative-positional bias, as NATTEN's fvcore handle counts it,
``K = prod(kernel_size)`` after the variable-resolution rule) PyTorch's counter applies. Dense
``scaled_dot_product_attention`` on CPU, which PyTorch 2.13's counter misses, is counted with
PyTorch's own SDPA formula; LayerNorm/GroupNorm at fvcore's 5 ops per element.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..spec import NASpec, na_flops

__all__ = ["count_flops", "na_macs"]

#: How :func:`count_flops` names the attention op in its ``by_op`` result.
_NA_OPS = {"visattn.na_forward": "neighborhood_attention"}

# fvcore's estimate for affine LayerNorm/GroupNorm: 5 ops per element (4 without affine). The NAT
# papers' numbers include it; it is ~0.5% of NAT-Tiny, so it matters only at the last digit.
_NORM_OPS_PER_ELEMENT = 5


def na_macs(spec: NASpec, batch: int, heads: int, dim: int, dim_v: Optional[int] = None, rpb: bool = False) -> int:
    """MACs of one neighborhood-attention forward: ``QK^T`` and ``AV`` (+ the bias adds with ``rpb``).

    ``spec`` is the call's :class:`~visattn.spec.NASpec` (effective kernel after the
    variable-resolution rule). Every window slot is counted, as NATTEN and the papers do.
    """
    macs = na_flops(spec, batch, heads, dim, dim_v) // 2
    if rpb:
        macs += batch * spec.num_tokens * spec.window_size * heads
    return macs


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _norm_ops(input_shape, affine: bool) -> int:
    per = _NORM_OPS_PER_ELEMENT if affine else _NORM_OPS_PER_ELEMENT - 1
    return 2 * per * math.prod(input_shape)  # in PyTorch's FLOP unit, halved back with everything else


def _layer_norm_flops(input_shape, normalized_shape, weight=None, *args, out_val=None, **kwargs) -> int:
    return _norm_ops(input_shape, weight is not None)


def _group_norm_flops(input_shape, weight=None, *args, out_val=None, **kwargs) -> int:
    return _norm_ops(input_shape, weight is not None)


def count_flops(model: nn.Module, inputs: Union[torch.Tensor, tuple], *, by_op: bool = False
                ) -> Union[int, dict[str, int]]:
    """Forward multiply-accumulates of ``model(*inputs)``, as fvcore and the NAT/DiNAT papers count.

    ``inputs`` is a tensor or a tuple of positional arguments; run on ``device="meta"`` tensors
    and a meta model to count a large model without computing it. Counted: convolutions and
    matmuls (MACs), neighborhood attention (:func:`na_macs`), dense SDPA (``QK^T + AV``), and
    LayerNorm/GroupNorm at fvcore's 5 ops per element. Not counted, as in fvcore: activations,
    softmax, residual adds, pooling.

    Returns the total MACs (an int; divide by 1e9 for the papers' "G"), or with ``by_op=True`` a
    dict ``{op name: MACs}`` whose values sum to the total.
    """
    # Imported here: torch.utils.flop_counter costs ~0.1-0.5 s, too much for ``import visattn``.
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
              torch.ops.aten.native_layer_norm: _layer_norm_flops,
              torch.ops.aten.native_group_norm: _group_norm_flops}
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    with torch.no_grad(), counter:
        model(*inputs)
    per_op: dict[str, int] = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        name = _NA_OPS.get(str(op), str(op).removeprefix("aten."))
        if flops:
            per_op[name] = per_op.get(name, 0) + flops // 2
    return per_op if by_op else sum(per_op.values())
