"""Neighborhood attention over a batch of samples of different sizes, packed without padding.

``na_varlen(query, key, value, spatial_sizes, kernel_size, ...)`` takes ``[total_tokens, heads, dim]``
tensors in which sample ``i`` contributes ``prod(spatial_sizes[i])`` consecutive rows (row-major over
its spatial axes), and returns what running every sample alone would. Samples that share a size and
window arguments are run as one batch (a sample alone is a view of the packed rows, no copy); every
batch goes through :func:`visattn.neighborhood_attention`, so every backend, feature and autograd path
applies.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .functional import neighborhood_attention
from .spec import BoolOrTuple, IntOrTuple, _as_tuple

__all__ = ["na_varlen"]

PerSample = Union[IntOrTuple, BoolOrTuple, list]


def _sizes(fn: str, spatial_sizes) -> list[tuple[int, ...]]:
    """``spatial_sizes`` as a list of per-sample tuples of one rank (1-3), or a clear error."""
    if isinstance(spatial_sizes, torch.Tensor):
        if spatial_sizes.dim() != 2 or spatial_sizes.is_floating_point():
            raise ValueError(f"{fn}: spatial_sizes as a tensor must be an integer [num_samples, rank] tensor, got "
                             f"{spatial_sizes.dtype} {tuple(spatial_sizes.shape)}.")
        spatial_sizes = spatial_sizes.tolist()
    if not isinstance(spatial_sizes, (list, tuple)) or not spatial_sizes:
        raise ValueError(f"{fn}: spatial_sizes must be a non-empty list of per-sample sizes such as "
                         f"[(8, 12), (16, 16)], got {spatial_sizes!r}.")
    sizes = [tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in spatial_sizes]
    rank = len(sizes[0])
    for i, s in enumerate(sizes):
        if len(s) != rank or rank not in (1, 2, 3):
            raise ValueError(f"{fn}: spatial_sizes[{i}]={s} has {len(s)} axes; every sample needs the same number "
                             f"of spatial axes, 1 to 3 (sample 0 has {rank}).")
        if any(isinstance(L, bool) or not isinstance(L, int) or L < 1 for L in s):
            raise ValueError(f"{fn}: spatial_sizes[{i}]={s} must hold positive ints.")
    return sizes


def _per_sample(fn: str, name: str, value, n: int, rank: int, kind: type) -> list[tuple]:
    """One normalized per-axis tuple per sample: a *list* of ``n`` entries gives one per sample;
    anything else (an int/bool or a per-axis tuple) applies to every sample."""
    if isinstance(value, list) and len(value) == n:
        return [_as_tuple(f"{fn} (sample {i})", name, v, rank, kind) for i, v in enumerate(value)]
    if isinstance(value, list):
        raise ValueError(f"{fn}: {name}={value!r} is a list of {len(value)} entries; give one entry per sample "
                         f"({n}) as a list, or one value (an int, or a per-axis tuple) for all samples.")
    return [_as_tuple(fn, name, value, rank, kind)] * n


def na_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spatial_sizes: Union[Sequence[Sequence[int]], torch.Tensor],
    kernel_size: PerSample,
    stride: PerSample = 1,
    dilation: PerSample = 1,
    is_causal: PerSample = False,
    scale: Optional[float] = None,
    *,
    periodic: PerSample = False,
    rpb: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Neighborhood attention on samples of different sizes packed into one tensor.

    Shapes: ``query [T, H, D]``, ``key [T, H_kv, D]``, ``value [T, H_kv, D_v]`` with
    ``T = sum_i prod(spatial_sizes[i])``; sample ``i``'s tokens are rows ``offset_i ...`` in
    row-major order. ``spatial_sizes``: one tuple per sample (all of one rank, 1-3), or an int tensor
    ``[num_samples, rank]``. ``kernel_size``, ``stride``, ``dilation``, ``is_causal``, ``periodic``: one
    value for every sample (an int/bool or a per-axis tuple), or a *list* with one such value per
    sample. ``rpb [H, 2k0-1, ...]`` is shared by all samples (so their kernel sizes must agree).

    Returns ``out [T, H, D_v]`` (and ``lse [T, H]`` with ``return_lse``), equal to running each sample
    alone with :func:`visattn.neighborhood_attention`.
    """
    fn = "na_varlen"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{fn}: {name} must be a packed [total_tokens, heads, head_dim] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}.")
    sizes = _sizes(fn, spatial_sizes)
    n, rank = len(sizes), len(sizes[0])
    counts = [math.prod(s) for s in sizes]
    total = sum(counts)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.shape[0] != total:
            raise ValueError(f"{fn}: {name} has {t.shape[0]} rows but spatial_sizes add up to {total} tokens "
                             f"({n} samples); pack every sample's tokens, row-major, one after another.")
    args = list(zip(*(_per_sample(fn, name, a, n, rank, kind) for name, a, kind in (
        ("kernel_size", kernel_size, int), ("stride", stride, int), ("dilation", dilation, int),
        ("is_causal", is_causal, bool), ("periodic", periodic, bool)))))
    if rpb is not None and len({a[0] for a in args}) > 1:
        raise ValueError(f"{fn}: one rpb table is shared by all samples, but kernel_size differs between samples "
                         f"({sorted({a[0] for a in args})}); use one kernel_size, or no rpb.")
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)

    groups: dict[tuple, list[int]] = {}
    for i, (size, a) in enumerate(zip(sizes, args)):
        groups.setdefault((size, a), []).append(i)
    # Each group runs as one batch; its result is cut back into per-sample pieces, and one
    # concatenation in sample order packs them (no index tensors, no permutation afterwards).
    outs: list[Optional[torch.Tensor]] = [None] * n
    lses: list[Optional[torch.Tensor]] = [None] * n
    for (size, (ks, st, dl, ca, pe)), members in groups.items():
        rows = [slice(offsets[i], offsets[i + 1]) for i in members]
        batch = [t[rows[0]].view(1, *size, *t.shape[1:]) if len(members) == 1  # a view, no copy
                 else torch.stack([t[r].view(*size, *t.shape[1:]) for r in rows])
                 for t in (query, key, value)]
        out, lse = neighborhood_attention(*batch, ks, st, dl, ca, scale, rpb=rpb, backend=backend, periodic=pe,
                                          return_lse=True, _fn=fn)
        for i, o, l_ in zip(members, out.unbind(0), lse.unbind(0)):
            outs[i] = o.reshape(-1, *o.shape[-2:])
            lses[i] = l_.reshape(-1, l_.shape[-1])
    out = torch.cat(outs) if n > 1 else outs[0]
    lse = (torch.cat(lses) if n > 1 else lses[0]) if return_lse else None
    return (out, lse) if return_lse else out
