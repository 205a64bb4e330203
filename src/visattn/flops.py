"""Count a model's multiply-accumulates (MACs) the way the NAT/DiNAT papers (fvcore) do.

:func:`count_flops` runs one forward pass under :class:`torch.utils.flop_counter.FlopCounterMode`
and reports **MACs** (one fused multiply-add = 1), the unit of every "FLOPs" column in the vision
literature that used fvcore (NAT, DiNAT, Swin, ConvNeXt, ...). PyTorch's counter reports FLOPs
(= 2 x MACs for matmuls and convolutions); we halve it.

Neighborhood attention needs care: a backend computes it with whatever ops suit it (tiles with
padding, gathers, a fused kernel PyTorch cannot see), so what PyTorch counts *inside* it is the
backend's work, not the operator's. :func:`count_flops` therefore replaces whatever was counted
inside each neighborhood-attention call by the operator's exact count, from :func:`na_macs`:
``QK^T + AV = 2 * B * tokens * K * H * D`` MACs plus ``B * tokens * K * H`` additions of the
relative-positional bias (as NATTEN's fvcore handle counts it), ``K = prod(kernel_size)`` after the
variable-resolution rule. Dense ``scaled_dot_product_attention`` on CPU, which PyTorch 2.13's counter
misses, is counted with PyTorch's own SDPA formula.

PyTorch's own counter: under any ``TorchDispatchMode`` (``FlopCounterMode`` is one) a call goes
through the ``visattn::na_forward`` custom op, whose formula (:func:`na_forward_op_flops`, and 2x
for ``visattn::na_backward``) :mod:`visattn.ops` registers, so a plain ``FlopCounterMode`` counts
neighborhood attention exactly too. :func:`count_flops` keeps its per-module replacement, which
then replaces the op's count by the same number (and also covers NA modules it cannot see otherwise).
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .spec import IntOrTuple, NASpec, make_spec, na_flops

__all__ = ["count_flops", "na_backward_op_flops", "na_forward_op_flops", "na_macs", "na_op_flop_formula", "register_na_flop_formula"]

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


def na_op_flop_formula(query_shape, key_shape, value_shape, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                       dilation: IntOrTuple = 1, is_causal=False, *args, out_val: Any = None, **kwargs) -> int:
    """``torch.utils.flop_counter`` formula (FLOPs = 2 x MACs) for an op with NATTEN's signature.

    Shapes are heads-last, ``query [B, *S, H, D]``, ``value [B, *S, H_kv, D_v]``; the op's
    ``rpb`` keyword, when it is a tensor shape, adds the bias term. For :func:`register_na_flop_formula`.
    """
    rank = len(query_shape) - 3
    spec = make_spec("na_op_flop_formula", tuple(query_shape[1:rank + 1]), kernel_size, stride, dilation, is_causal)
    rpb = kwargs.get("rpb") is not None
    return 2 * na_macs(spec, query_shape[0], query_shape[-2], query_shape[-1], value_shape[-1], rpb=rpb)


def na_forward_op_flops(query_shape, key_shape, value_shape, rpb_shape, attn_bias_shape, key_padding_mask_shape,
                        kernel_size, stride, dilation, is_causal, *args, out_val: Any = None, **kwargs) -> int:
    """FLOP formula (FLOPs = 2 x MACs) of ``visattn::na_forward`` (see :mod:`visattn.ops`)."""
    rank = len(query_shape) - 3
    spec = make_spec("visattn::na_forward", tuple(query_shape[1:rank + 1]), kernel_size, stride, dilation, is_causal)
    return 2 * na_macs(spec, query_shape[0], query_shape[-2], query_shape[-1], value_shape[-1],
                       rpb=rpb_shape is not None)


def na_backward_op_flops(grad_out_shape, grad_lse_shape, grad_attn_shape, query_shape, key_shape, value_shape,
                         rpb_shape, attn_bias_shape, key_padding_mask_shape, kernel_size, stride, dilation,
                         is_causal, *args, out_val: Any = None, **kwargs) -> int:
    """FLOP formula of ``visattn::na_backward``: 2x the forward's (the convention of the papers and
    of ``visattn bench``)."""
    return 2 * na_forward_op_flops(query_shape, key_shape, value_shape, rpb_shape, attn_bias_shape,
                                   key_padding_mask_shape, kernel_size, stride, dilation, is_causal)


def register_na_flop_formula(op) -> None:
    """Register :func:`na_op_flop_formula` with PyTorch's FLOP counter for the custom op ``op``.

    ``op`` is a ``torch.ops.<ns>.<name>`` packet whose schema starts like NATTEN's
    ``na*d(query, key, value, kernel_size, stride, dilation, is_causal, ...)``.
    """
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(op)(na_op_flop_formula)


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


def _na_call_macs(module: nn.Module, x: torch.Tensor) -> int:
    spec = make_spec(type(module).__name__, tuple(x.shape[1:-1]), module.kernel_size, module.stride,
                     module.dilation, module.is_causal)
    return na_macs(spec, x.shape[0], module.num_heads, module.head_dim, rpb=module.rpb is not None)


def _attention_kernels() -> dict[type, Callable[[nn.Module, torch.Tensor], int]]:
    """Module classes whose attention core is counted by formula: class -> ``(module, input) -> MACs``."""
    from .nn.neighborhood import _NeighborhoodAttentionNd

    return {_NeighborhoodAttentionNd: _na_call_macs}


class _KernelReplacer:
    """Hooks that swap what the counter saw inside each attention call for the exact count.

    For one call of an attention module ``m``: counted inside ``m`` minus counted inside its child
    modules (its ``qkv``/``proj`` projections, which stay as counted) is the backend's kernel work;
    it is removed per op and ``formula(m, input)`` is added under ``"neighborhood_attention"``.
    """

    def __init__(self, model: nn.Module, counter) -> None:
        self.counter = counter
        self.removed: dict[Any, int] = {}
        self.macs = 0
        self._targets = []
        kernels = _attention_kernels()
        for m in model.modules():
            for cls, formula in kernels.items():
                if isinstance(m, cls):
                    self._targets.append((m, formula))

    def _snapshot(self) -> dict:
        return dict(self.counter.get_flop_counts().get("Global", {}))

    def __enter__(self) -> "_KernelReplacer":
        self._handles = []
        for m, formula in self._targets:
            state: dict = {}

            def pre(mod, args, state=state):
                state["start"], state["children"] = self._snapshot(), {}

            def post(mod, args, out, state=state, formula=formula):
                inside = _diff(self._snapshot(), state["start"])
                for op, n in inside.items():
                    self.removed[op] = self.removed.get(op, 0) + n - state["children"].get(op, 0)
                self.macs += formula(mod, args[0])

            def child_pre(mod, args, state=state):
                state["child_start"] = self._snapshot()

            def child_post(mod, args, out, state=state):
                for op, n in _diff(self._snapshot(), state["child_start"]).items():
                    state["children"][op] = state["children"].get(op, 0) + n

            self._handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
            for child in m.children():
                self._handles += [child.register_forward_pre_hook(child_pre), child.register_forward_hook(child_post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def _diff(after: dict, before: dict) -> dict:
    return {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}


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
    replacer = _KernelReplacer(model, counter)
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(counter)
        stack.enter_context(replacer)
        model(*inputs)
    per_op = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        kept = flops - replacer.removed.get(op, 0)
        if kept:
            per_op[str(op).removeprefix("aten.")] = kept // 2
    if replacer.macs:
        per_op["neighborhood_attention"] = replacer.macs
    return per_op if by_op else sum(per_op.values())
