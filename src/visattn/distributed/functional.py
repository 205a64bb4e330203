"""Sharded neighborhood attention: ``neighborhood_attention`` and ``na1d/na2d/na3d`` over a process group.

Every rank passes its shard of global ``[B, *S, H, D]`` tensors, cut along one spatial axis (or one
axis per process-grid dimension) into contiguous slabs in rank order. The call

1. checks that the ranks agree on the arguments and that the shards tile the global tensor
   (:mod:`.consensus`: one small all-gather, so a bad call raises on every rank instead of hanging);
2. plans each axis's halo from the global window rules (:mod:`.plan`) and exchanges it, point to
   point, one axis after the other (:mod:`.exchange`; a process grid thus also moves the corners);
3. runs the ordinary single-process operator (:func:`visattn.neighborhood_attention`: every backend
   and feature) on the rank's queries, zero-padded to the slab, against the key/value slab, with
   arguments that reproduce the global windows exactly, and returns the rank's part of the result.

The output, LSE, attention weights and the gradients of the sharded inputs are the same slice of the
single-process results. Replicated inputs (``rpb``, ``additional_keys/values``) receive this rank's
part of their gradient (the contribution of its queries): the full gradient is the sum over the
group, which is what the gradient reduction of data-parallel training (DDP, FSDP, or an
``all_reduce`` of parameter gradients) computes for them as for every other parameter of a model
whose activations are sharded. Summing inside the operator would count them ``world_size`` times
there.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import functional as single
from ..backends import Extras
from ..functional import Output, _check_additional, _check_extras, _check_scale, _check_tensors, _ranked
from ..spec import BoolOrTuple, IntOrTuple, _as_tuple, make_spec
from .consensus import Fingerprint, agree, dtype_code, scale_bits
from .dtensor import is_dtensor, local_arg, local_layout, wrap
from .exchange import halo_exchange
from .plan import AxisPlan, plan_axis

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention"]

Group = Optional[dist.ProcessGroup]
Groups = Union[Group, Sequence[Group]]


def _sharding(fn: str, shard_axis: Union[int, Sequence[int]], group: Groups) -> tuple[tuple[int, ...], tuple[Group, ...]]:
    """Normalize ``shard_axis``/``group`` to one group per sharded axis; check this rank belongs to them."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{fn}: torch.distributed is not initialized. Call torch.distributed.init_process_group("
                           f"'gloo') (CPU) or ('nccl') (GPU) first (torchrun sets the rendezvous variables), or "
                           f"use visattn.{fn.rpartition('.')[2]} for a single process.")
    axes = (shard_axis,) if isinstance(shard_axis, int) else tuple(shard_axis)
    if not axes or any(isinstance(a, bool) or not isinstance(a, int) for a in axes) or len(set(axes)) != len(axes):
        raise TypeError(f"{fn}: shard_axis={shard_axis!r} must be a spatial axis (0 = the first spatial axis, tensor "
                        f"dim 1) or a tuple of distinct ones.")
    if isinstance(group, (list, tuple)):
        groups = tuple(group)
    elif len(axes) == 1:
        groups = (group,)
    else:
        raise ValueError(f"{fn}: shard_axis={shard_axis!r} shards {len(axes)} axes, so group must be a tuple of "
                         f"{len(axes)} process groups (one per axis: the ranks that share the other axes' shards, "
                         f"e.g. DeviceMesh.get_group(i)); got {group!r}.")
    if len(groups) != len(axes):
        raise ValueError(f"{fn}: shard_axis={shard_axis!r} has {len(axes)} axes but group has {len(groups)} entries; "
                         f"pass one process group per sharded axis.")
    for i, g in enumerate(groups):
        if dist.get_rank(g) < 0:
            raise ValueError(f"{fn}: this process (global rank {dist.get_rank()}) is not a member of group[{i}]; "
                             f"every rank that holds a shard must call with a group it belongs to.")
    return axes, groups


#: The per-axis arguments, in the order of ``requested`` tuples.
_AXIS_ARGS = (("kernel_size", int), ("stride", int), ("dilation", int), ("is_causal", bool), ("periodic", bool))


def _check_local(fn: str, rank: Optional[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 requested: tuple, axes: Sequence[int], scale, ak, av, extras: Extras, flags: dict
                 ) -> tuple[int, tuple[tuple, ...]]:
    """The checks each rank can do alone (the single-process operator's, on the shard).

    Returns the number of spatial axes and the per-axis arguments (:data:`_AXIS_ARGS`) as tuples.
    """
    r = _check_tensors(fn, rank, q, k, v)
    if k.shape[1: r + 1] != q.shape[1: r + 1]:
        raise ValueError(f"{fn}: key has spatial shape {tuple(k.shape[1: r + 1])} but query has "
                         f"{tuple(q.shape[1: r + 1])}; sharded attention needs keys on the queries' grid (shards "
                         f"of one global grid, cut alike).")
    per_axis = tuple(_as_tuple(fn, name, a, r, kind) for (name, kind), a in zip(_AXIS_ARGS, requested))
    kernel, stride, dilation, causal, periodic = per_axis
    # the shard's own spatial shape is what rpb and key_padding_mask must fit; attn_bias's last dim (the
    # window size) depends on the global lengths and is checked once they are known
    spec = make_spec(fn, tuple(q.shape[1: r + 1]), kernel, stride, dilation, causal, periodic=periodic)
    for a in axes:
        if not 0 <= a < r:
            raise ValueError(f"{fn}: shard_axis={tuple(axes)} names axis {a}, but the input has {r} spatial axes "
                             f"(0..{r - 1}; spatial axis i is tensor dim i + 1).")
    _check_scale(fn, scale, q.shape[-1])
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{fn}: {name}={value!r} must be True or False.")
    _check_additional(fn, q, k, v, ak, av)
    _check_extras(fn, q, spec, q.shape[-2], Extras(rpb=extras.rpb, key_padding_mask=extras.key_padding_mask))
    b = extras.attn_bias
    if b is not None:
        want = (q.shape[0], *q.shape[1: r + 1], q.shape[-2])
        if not isinstance(b, torch.Tensor) or b.dim() != r + 3 or tuple(b.shape[:-1]) != want:
            raise ValueError(f"{fn}: attn_bias has shape {tuple(getattr(b, 'shape', ()))}; expected this rank's "
                             f"[B, *spatial, heads, prod(kernel_size)] = {want} + (prod(kernel_size),).")
        if b.device != q.device or not b.is_floating_point():
            raise ValueError(f"{fn}: attn_bias is {b.dtype} on {b.device}; it must be a floating-point tensor on the "
                             f"query's device ({q.device}).")
    return r, per_axis


def _fingerprint(r: int, q, k, v, per_axis: tuple[tuple, ...], axes: Sequence[int], scale, ak, extras: Extras,
                 flags: dict) -> Fingerprint:
    """What must be equal on every rank (see :mod:`.consensus`): shapes, dtype, arguments, which inputs need grad."""
    kernel, stride, dilation, causal, periodic = per_axis
    return {
        "number of spatial axes": (r,),
        "batch size": (q.shape[0],),
        "query heads": (q.shape[-2],),
        "key/value heads": (k.shape[-2],),
        "head_dim": (q.shape[-1],),
        "value head_dim": (v.shape[-1],),
        "dtype": (dtype_code(q.dtype),),
        "spatial shape off the sharded axis": tuple(q.shape[1: r + 1]),
        "kernel_size": kernel,
        "stride": stride,
        "dilation": dilation,
        "is_causal": tuple(map(int, causal)),
        "periodic": tuple(map(int, periodic)),
        "shard_axis": tuple(axes),
        "scale": (scale_bits(scale),),
        "rpb (present)": (int(extras.rpb is not None),),
        "attn_bias (last dim)": (0 if extras.attn_bias is None else extras.attn_bias.shape[-1],),
        "key_padding_mask (present)": (int(extras.key_padding_mask is not None),),
        "additional_keys (number of tokens)": (-2 if ak is None else ak.shape[1],),
        "return_lse": (int(flags["return_lse"]),),
        "return_attn": (int(flags["return_attn"]),),
        "requires_grad of query, key, value": tuple(int(t.requires_grad) for t in (q, k, v)),
        "grad mode": (int(torch.is_grad_enabled()),),
    }


def _pad(t: torch.Tensor, plans: Sequence[AxisPlan], ranks: Sequence[int], axes: Sequence[int]) -> torch.Tensor:
    """Zero-pad ``t`` along each sharded axis from the rank's shard to its slab (differentiable)."""
    pad = [0] * (2 * t.dim())
    for plan, rank, axis in zip(plans, ranks, axes):
        shard = plan.shards[rank]
        j = 2 * (t.dim() - 2 - axis)  # F.pad lists the last dim first; spatial axis a is dim a + 1
        pad[j], pad[j + 1] = shard.pad_before, shard.pad_after
    return F.pad(t, pad) if any(pad) else t


def _crop(t: torch.Tensor, plans: Sequence[AxisPlan], ranks: Sequence[int], axes: Sequence[int]) -> torch.Tensor:
    """The rank's own queries' part of a slab-shaped result."""
    for plan, rank, axis in zip(plans, ranks, axes):
        shard = plan.shards[rank]
        t = t.narrow(axis + 1, shard.pad_before, shard.stop - shard.start)
    return t


def sharded_attention(fn: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, requested: tuple,
                      scale: Optional[float], additional_keys: Optional[torch.Tensor],
                      additional_values: Optional[torch.Tensor], extras: Extras, *, axes: Sequence[int],
                      groups: Sequence[Group], split: str, backend: Optional[str], return_lse: bool,
                      return_attn: bool, spatial_rank: Optional[int]) -> Output:
    """The sharded call on plain (local) tensors; ``axes[i]`` is sharded over ``groups[i]`` following ``split``.

    Shapes and returns as :func:`neighborhood_attention`; raises on every rank of the groups or on none.
    """
    flags = {"return_lse": return_lse, "return_attn": return_attn}
    error, fingerprint = None, {}
    try:
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"{fn}: backend={backend!r} must be None (automatic) or a backend name such as 'torch'.")
        r, per_axis = _check_local(fn, spatial_rank, query, key, value, requested, axes, scale, additional_keys,
                                   additional_values, extras, flags)
        fingerprint = _fingerprint(r, query, key, value, per_axis, axes, scale, additional_keys, extras, flags)
    except (TypeError, ValueError) as e:
        error = e
    local = [query.shape[1 + a] if error is None else 0 for a in axes]
    sizes = agree(fn, axes, groups, fingerprint, local, error, split)  # raises on every rank if any failed

    kernel, stride, dilation, causal, periodic = per_axis
    spatial = list(query.shape[1: r + 1])
    for a, s in zip(axes, sizes):
        spatial[a] = sum(s)
    spec = make_spec(fn, tuple(spatial), kernel, stride, dilation, causal, periodic=periodic)
    for a, s in zip(axes, sizes):
        if periodic[a] and kernel[a] > sum(s):  # the same sizes on every rank: all of them raise
            raise ValueError(f"{fn}: spatial axis {a} is sharded and periodic, and its kernel_size={kernel[a]} is "
                             f"longer than the axis ({sum(s)}): such a window is the whole ring, which the sharded "
                             f"call does not build. Use kernel_size <= {sum(s)} or shard another axis.")
    window = spec.window_size
    if extras.attn_bias is not None and extras.attn_bias.shape[-1] != window:
        raise ValueError(f"{fn}: attn_bias has {extras.attn_bias.shape[-1]} entries per query; the global spatial "
                         f"shape {tuple(spatial)} gives windows of prod(kernel_size) = {window} slots (kernel as "
                         f"used, after the variable-resolution rule).")

    if query.numel() == 0:
        # Nothing to attend and nothing to exchange: this rank holds no keys and needs none. Its output
        # still reaches every differentiable input, so that their gradients are (empty or zero) tensors
        # as on the other ranks, not None: data-parallel gradient reduction expects every rank to
        # produce the same parameters' gradients.
        result = single._empty(query, value.shape[-1], spec, return_lse, return_attn, additional_keys)
        link = sum(0 * t.sum() for t in (key, value, extras.rpb, extras.attn_bias, additional_keys, additional_values)
                   if t is not None)
        return tuple(t + link for t in result) if isinstance(result, tuple) else result + link

    ranks = [dist.get_rank(g) for g in groups]
    plans = [plan_axis(s, kernel[a], stride[a], dilation[a], causal[a], periodic[a]) for a, s in zip(axes, sizes)]
    mask = extras.key_padding_mask
    for plan, rk, a, g in zip(plans, ranks, axes, groups):
        key, value = halo_exchange([key, value], plan, rk, g, a + 1)
        if mask is not None:  # slab positions nobody attends come out unmasked: they are never read
            mask = halo_exchange([mask.to(torch.uint8)], plan, rk, g, a + 1)[0].bool()
    local_dilation = list(dilation)
    for plan, a in zip(plans, axes):
        local_dilation[a] = plan.dilation
    attn_bias = None if extras.attn_bias is None else _pad(extras.attn_bias, plans, ranks, axes)
    result = single.neighborhood_attention(
        _pad(query, plans, ranks, axes), key, value, kernel, stride, tuple(local_dilation), causal, scale,
        additional_keys, additional_values, backend=backend, return_lse=return_lse, return_attn=return_attn,
        rpb=extras.rpb, attn_bias=attn_bias, key_padding_mask=mask,
        periodic=tuple(p and a not in axes for a, p in enumerate(periodic)), _fn=fn)  # sharded: the slab wraps
    if isinstance(result, tuple):
        return tuple(_crop(t, plans, ranks, axes) for t in result)
    return _crop(result, plans, ranks, axes)


def _dtensor_attention(fn: str, query, key, value, requested: tuple, scale: Optional[float], additional_keys,
                       additional_values, extras: Extras, *, backend: Optional[str], return_lse: bool,
                       return_attn: bool, spatial_rank: Optional[int]) -> Output:
    """The sharded call on DTensor ``query``/``key``/``value`` (one mesh, one layout); DTensor results.

    ``attn_bias``/``key_padding_mask`` may be DTensors laid out as the query, ``rpb`` and the extra
    tokens DTensors replicated on the mesh, or plain tensors (this rank's shard, resp. the full tensor).
    """
    from torch.distributed.tensor import Replicate

    if not all(is_dtensor(t) for t in (query, key, value)):
        raise TypeError(f"{fn}: query, key and value must all be DTensors or all plain tensors; got "
                        f"{', '.join(type(t).__name__ for t in (query, key, value))}.")
    r = query.dim() - 3
    axes, groups, mesh, placements = local_layout(fn, query, r)
    for name, t in (("key", key), ("value", value)):
        if t.device_mesh != mesh or tuple(t.placements) != placements:
            raise ValueError(f"{fn}: {name} has placements {tuple(t.placements)} on {t.device_mesh} but query has "
                             f"{placements} on {mesh}; lay them out alike.")
    replicated = (Replicate(),) * mesh.ndim
    result = sharded_attention(
        fn, query.to_local(), key.to_local(), value.to_local(), requested, scale,
        local_arg(fn, "additional_keys", additional_keys, mesh, replicated),
        local_arg(fn, "additional_values", additional_values, mesh, replicated),
        Extras(rpb=local_arg(fn, "rpb", extras.rpb, mesh, replicated),
               attn_bias=local_arg(fn, "attn_bias", extras.attn_bias, mesh, placements),
               key_padding_mask=local_arg(fn, "key_padding_mask", extras.key_padding_mask, mesh, placements)),
        axes=axes, groups=groups, split="chunk", backend=backend, return_lse=return_lse, return_attn=return_attn,
        spatial_rank=spatial_rank)
    outs = result if isinstance(result, tuple) else (result,)
    wrapped = tuple(wrap(t, mesh, placements, tuple(query.shape[:-2]) + tuple(t.shape[r + 1:])) for t in outs)
    return wrapped if isinstance(result, tuple) else wrapped[0]


def neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: Optional[float] = None,
    additional_keys: Optional[torch.Tensor] = None,
    additional_values: Optional[torch.Tensor] = None,
    *,
    shard_axis: Union[int, Sequence[int]] = 0,
    group: Groups = None,
    backend: Optional[str] = None,
    return_lse: bool = False,
    rpb: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    return_attn: bool = False,
    periodic: BoolOrTuple = False,
    _fn: str = "neighborhood_attention",
    _rank: Optional[int] = None,
) -> Output:
    """Neighborhood attention on a volume sharded across the ranks of a process group.

    Each rank of ``group`` (default: the world) passes its shard of global ``query [B, *S, H, D]``,
    ``key [B, *S, H_kv, D]``, ``value [B, *S, H_kv, D_v]``: the piece
    ``torch.tensor_split(global, world_size, dim=1 + shard_axis)[rank]`` (uneven lengths allowed, any
    length down to zero). With ``shard_axis`` a tuple of axes, ``group`` is a tuple of groups, one per
    axis, forming a process grid: the ranks of ``group[i]`` share the shards of the other axes and
    split axis ``shard_axis[i]`` in their order. ``torch.distributed.tensor.DTensor`` inputs sharded
    on spatial dims (``Shard(d)``) bring their own layout instead (``shard_axis``/``group`` are then
    ignored) and give DTensors with the same placements.

    Arguments and features are those of :func:`visattn.neighborhood_attention` (kernel, stride,
    dilation, causal per axis; GQA; extra KV tokens, replicated on every rank; ``rpb``; ``attn_bias``
    and ``key_padding_mask`` as this rank's shards; ``periodic``, sharded axes too). Returns this
    rank's shard of the single-process result (``out``, and ``lse`` / ``attn`` when asked), equal to
    the same slice of it, forward and backward. Replicated inputs get this rank's partial gradient
    (sum it over the group, as DDP does for parameters; module docstring).

    Every rank of the group must make the call (it communicates), and every rank must backpropagate
    through its output if any does. Raises, on every rank alike: ``RuntimeError`` when
    torch.distributed is not initialized; ``ValueError`` when a shard has the wrong length or the
    ranks' arguments disagree; the single-process operator's ``TypeError``/``ValueError`` on bad
    arguments.
    """
    fn = f"visattn.distributed.{_fn}"
    requested = (kernel_size, stride, dilation, is_causal, periodic)
    extras = Extras(rpb=rpb, attn_bias=attn_bias, key_padding_mask=key_padding_mask)
    if any(is_dtensor(t) for t in (query, key, value)):
        return _dtensor_attention(fn, query, key, value, requested, scale, additional_keys, additional_values, extras,
                                  backend=backend, return_lse=return_lse, return_attn=return_attn, spatial_rank=_rank)
    axes, groups = _sharding(fn, shard_axis, group)
    return sharded_attention(fn, query, key, value, requested, scale, additional_keys, additional_values, extras,
                             axes=axes, groups=groups, split="tensor_split", backend=backend, return_lse=return_lse,
                             return_attn=return_attn, spatial_rank=_rank)


na1d = _ranked(1, neighborhood_attention, "sharded neighborhood attention (local shards)")
na2d = _ranked(2, neighborhood_attention, "sharded neighborhood attention (local shards)")
na3d = _ranked(3, neighborhood_attention, "sharded neighborhood attention (local shards)")
