"""Neighborhood attention over a batch of samples of different sizes, packed without padding.

``na_varlen(query, key, value, spatial_sizes, kernel_size, ...)`` takes ``[total_tokens, heads, dim]``
tensors in which sample ``i`` contributes ``prod(spatial_sizes[i])`` consecutive rows (row-major over
its spatial axes), and returns what running every sample alone would.

Two paths, one result:

* **one kernel launch** (inference on the fused C ``cpu`` backend): when no gradient is recorded,
  nothing traces or transforms the call (``torch.compile``, dispatch modes, ``torch.func``,
  forward-mode AD, the TorchScript tracer), the tensors are plain CPU float32/bfloat16/float16 ones
  and the ``cpu`` backend is what automatic selection (or ``backend="cpu"``) picks for every sample,
  all samples run in one ``na_run_many`` launch: each sample (or run of consecutive samples of one
  size and window arguments, as one batch) is its own problem pointing into the packed rows, and
  the kernel writes straight into one packed output. No padding to the largest sample.
* **per group** (everything else: autograd, compile, transforms, other backends): samples that share
  a size and window arguments are run as one batch (a sample alone is a view of the packed rows, no
  copy); every batch goes through :func:`visattn.neighborhood_attention`, so every backend, feature
  and autograd path applies.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence, Union

import torch

from . import dispatch
from .backends import Extras, Problem, select_backend
from .functional import _check_extras, _check_scale, neighborhood_attention
from .spec import BoolOrTuple, IntOrTuple, NASpec, _as_tuple, make_spec

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


#: Dtypes the single launch takes (the cpu backend's: float16 is computed in float32, as it does).
_LAUNCH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@lru_cache(maxsize=512)
def _spec(fn: str, size: tuple[int, ...], args: tuple) -> NASpec:
    """:func:`make_spec` of one sample (pure, so cached: a batch of 32 sizes re-validated on every call
    cost ~0.3 ms; errors are raised, never cached)."""
    ks, st, dl, ca, pe = args
    return make_spec(fn, size, ks, st, dl, ca, periodic=pe)


def _single_launch_possible(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            rpb: Optional[torch.Tensor], backend: Optional[str]) -> bool:
    """Whether the call may take the single-launch path, before looking at the samples: a plain eager
    inference call on CPU tensors the cpu backend reads. Inconsistent tensors (dtypes, devices, heads,
    head dims) answer False: the per-group path then raises its usual errors."""
    if backend not in (None, "cpu"):
        return False
    tensors = [t for t in (query, key, value, rpb) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the native backward is the per-group path's (through the custom op)
    if (dispatch._through_custom_op() or torch._C._are_functorch_transforms_active() or torch.jit.is_tracing()
            or torch.autograd.forward_ad._current_level >= 0):
        return False
    # Subclasses (fake, functional, distributed tensors) have no data pointers worth handing to C.
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu" for t in tensors):
        return False
    return (query.dtype in _LAUNCH_DTYPES and key.dtype == value.dtype == query.dtype
            and key.shape[1] == value.shape[1] and query.shape[1] % key.shape[1] == 0
            and key.shape[2] == query.shape[2])


def _single_launch(fn: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   sizes: list[tuple[int, ...]], args: list[tuple], offsets: list[int], scale: Optional[float],
                   rpb: Optional[torch.Tensor], backend: Optional[str]
                   ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(out [T, H, D_v], lse [T, H])`` from one packed launch over all samples
    (:meth:`Backend.forward_packed`; the ``cpu`` backend's ``na_run_many``), or ``None`` when the
    samples would not all be served by one backend that has such a launch (the caller then runs the
    groups).

    Validation and backend selection are those of :func:`visattn.neighborhood_attention` on each group
    (same spec, scale and bias checks, same :func:`select_backend` on the group's problem), so the
    launch serves exactly the calls the per-group path would hand to ``cpu``.
    """
    H, Hk, D, Dv = query.shape[1], key.shape[1], query.shape[2], value.shape[2]
    scale = _check_scale(fn, scale, D)
    counts: dict[tuple, int] = {}
    for key_ in zip(sizes, args):
        counts[key_] = counts.get(key_, 0) + 1
    specs: dict[tuple, NASpec] = {}
    chosen: set = set()
    for (size, a), members in counts.items():
        spec = _spec(fn, size, a)
        _check_extras(fn, query, spec, H, Extras(rpb=rpb))
        # The group's problem as the per-group path would build it (batch: the group's size).
        p = Problem(spec=spec, batch=members, heads=H, heads_kv=Hk, dim=D, dim_v=Dv, dtype=query.dtype,
                    device=query.device, scale=scale, has_rpb=rpb is not None)
        chosen.add(select_backend(p, backend, fn))
        specs[(size, a)] = spec
    if len(chosen) != 1:  # samples on different backends: per group
        return None
    impl = chosen.pop()

    # One problem per run of consecutive samples of one size and window arguments (a batch: fewer
    # argument structs, and one item space the kernel walks in order).
    problems: list[tuple[Problem, int]] = []
    run_key, run_start = None, 0
    for i, key_ in enumerate([*zip(sizes, args), None]):
        if key_ != run_key:
            if run_key is not None:
                p = Problem(spec=specs[run_key], batch=i - run_start, heads=H, heads_kv=Hk, dim=D, dim_v=Dv,
                            dtype=query.dtype, device=query.device, scale=scale, has_rpb=rpb is not None)
                problems.append((p, offsets[run_start]))
            run_key, run_start = key_, i
    with torch.no_grad():
        return impl.forward_packed(query, key, value, problems, rpb)


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
    if _single_launch_possible(query, key, value, rpb, backend):
        launched = _single_launch(fn, query, key, value, sizes, args, offsets, scale, rpb, backend)
        if launched is not None:
            return launched if return_lse else launched[0]

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
