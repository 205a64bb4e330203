"""Triton backend: fused forward and backward kernels on CUDA (or on CPU under ``TRITON_INTERPRET=1``).

The kernels (:mod:`visattn.backends.triton.kernels`) tile queries and keys in up to three
dimensions; this file builds the per-axis window tables from :mod:`visattn.spec`, chooses tiles
(autotuned on a GPU, fixed small ones in the interpreter) and launches the forward and the native
backward. Autograd and ``torch.compile`` see the library's own custom ops (:mod:`visattn.ops`), which
call this backend like any other. Extra KV tokens are merged through the LSE this backend returns, so
the backward accepts a gradient on LSE (``delta = rowsum(dO * O) - dLSE``).

Supported: ranks 1-3, per-axis kernel/stride/dilation/causal, GQA/MQA (natively), ``D``/``D_v`` up
to 256 (independently), fp16/bf16/fp32, relative positional bias (with its gradient). Refused (the
dispatcher routes elsewhere): float64, ``attn_bias``, ``key_padding_mask``, ``return_attn``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

import torch

from ...spec import NASpec, axis_windows, plain_tensors
from ..base import Backend, Extras, Grads, Problem, Result, refuse_general_geometry, refuse_unfused_features

_MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpret() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read when the kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=1)
def _triton_missing() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); install it with pip install 'visattn[triton]'"
    return None


# ---------------------------------------------------------------------------------------------
# Window tables


@lru_cache(maxsize=256)
@plain_tensors()
def _axis_table(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> torch.Tensor:
    """``[4, L]`` int32 per axis: ``lo, hi`` (each query's window, group positions) and ``qmin,
    qmax`` (the group positions of the queries that see each key; ``qmin > qmax`` if none).

    Windows are monotone in the group position, so the queries seeing key ``t`` are the contiguous
    run ``{p : lo(p) <= t <= hi(p)}``, found by two binary searches per dilation group.
    """
    w = axis_windows(length, kernel, stride, dilation, causal)
    qmin = torch.empty(length, dtype=torch.int64)
    qmax = torch.empty(length, dtype=torch.int64)
    for g in range(dilation):
        coords = torch.arange(g, length, dilation)
        t = torch.arange(len(coords))
        qmin[coords] = torch.searchsorted(w.hi[coords].contiguous(), t, right=False)
        qmax[coords] = torch.searchsorted(w.lo[coords].contiguous(), t, right=True) - 1
    return torch.stack([w.lo, w.hi, qmin, qmax]).to(torch.int32)


_DEVICE_TABLES: dict = {}


def _tables(spec: NASpec, device: torch.device) -> list[torch.Tensor]:
    """The three per-axis tables (leading virtual axes of length 1 for rank < 3) on ``device``."""
    key = (spec, device)
    tabs = _DEVICE_TABLES.get(key)
    if tabs is None:
        if len(_DEVICE_TABLES) > 128:
            _DEVICE_TABLES.clear()
        axes = [(1, 1, 1, 1, False)] * (3 - spec.rank) + list(spec.axes())
        tabs = _DEVICE_TABLES[key] = [_axis_table(*a).to(device) for a in axes]
    return tabs


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pad3(values: tuple, fill) -> tuple:
    return (fill,) * (3 - len(values)) + tuple(values)


# ---------------------------------------------------------------------------------------------
# Tile configurations
#
# A config is (query tile T0,T1,T2, key tile K0,K1,K2); the leading axes of a rank-r problem are
# virtual (length 1), so their extents are 1. On a GPU, tl.dot needs >= 16 rows and columns, and
# 64-128 queries x 32-64 keys per step are what FlashAttention-class kernels use at D = 64.
#
# What decides the speed is the useful fraction of the (query, key) pairs a tile computes: a tile
# of T queries per axis visits a key box of T + k - 1 per axis, rounded up to key tiles. For 2-D
# NA with k = 13: T = 8x16 with 4x16 key tiles visits 20x32 keys per query for 169 useful (26 %);
# 8x8 with 4x8 visits 20x24 (35 %, smaller MMAs). A 1-D mask over the flattened image (FlexAttention
# with 128-token blocks) visits 13 rows x 128 (10 %). For 3-D NA with k = 7: 4x4x8 with 2x2x16 key
# tiles visits 10x10x16 (21 %) against ~13 % for the flattened view. Blocked attention (stride =
# kernel) with tiles aligned to the windows visits only useful keys. The autotuner picks per
# (sizes, dilation, window, GQA group, head dims); Triton caches the choice on disk. Each candidate
# costs a compile (seconds) the first time a shape is seen, so the lists are short;
# VISATTN_TRITON_AUTOTUNE=0 skips tuning and uses the first entry with 4 warps.

_GPU_CONFIGS = {
    1: [((1, 1, 128), (1, 1, 64)), ((1, 1, 64), (1, 1, 32)), ((1, 1, 128), (1, 1, 32))],
    2: [((1, 8, 16), (1, 4, 16)), ((1, 8, 8), (1, 4, 8)), ((1, 16, 16), (1, 8, 8))],
    3: [((4, 4, 8), (2, 2, 16)), ((2, 8, 8), (2, 4, 8)), ((4, 4, 8), (2, 4, 8))],
}
_GPU_WARPS = (4, 8)
# Interpreter: tiny tiles that still straddle every axis (several query and key tiles per axis,
# partial tiles, key tiles of a different shape than query tiles) so the CPU tests exercise the
# multi-dimensional walk; tl.dot has no minimum size there.
_INTERPRET_CONFIG = {
    1: ((1, 1, 8), (1, 1, 4)),
    2: ((1, 4, 4), (1, 2, 4)),
    3: ((2, 4, 4), (2, 2, 4)),
}


def _meta(cfg) -> dict:
    (t0, t1, t2), (k0, k1, k2) = cfg
    return dict(T0=t0, T1=t1, T2=t2, K0=k0, K1=k1, K2=k2)


_AUTOTUNED: dict = {}


def _launcher(kind: str, rank: int):
    """The kernel ``kind`` (fwd / dq / dkdv) for ``rank`` and the launch meta-parameters it still
    needs: autotuned on a GPU (meta chosen by the tuner), plain with a fixed tile in the interpreter.

    For dK/dV the roles swap (``K*`` is the key tile that a program owns, ``T*`` the query tiles it
    walks); each config is transposed so the owned tile gets the forward's query-tile shape.
    """
    from . import kernels as tk

    fn = {"fwd": tk.na_fwd_kernel, "dq": tk.na_bwd_dq_kernel, "dkdv": tk.na_bwd_dkdv_kernel}[kind]
    if _interpret():
        cfg = _INTERPRET_CONFIG[rank]
        return fn, _meta((cfg[1], cfg[0]) if kind == "dkdv" else cfg)
    tune = os.environ.get("VISATTN_TRITON_AUTOTUNE", "1") != "0"
    key = (kind, rank, tune)
    if key not in _AUTOTUNED:
        import triton

        configs = []
        for cfg in _GPU_CONFIGS[rank] if tune else _GPU_CONFIGS[rank][:1]:
            if kind == "dkdv":  # own a key tile of the query-tile shape, walk queries in key-tile steps
                cfg = (cfg[1], cfg[0])
            for warps in _GPU_WARPS if tune else _GPU_WARPS[:1]:
                configs.append(triton.Config(_meta(cfg), num_warps=warps, num_stages=2))
        _AUTOTUNED[key] = triton.autotune(
            configs=configs,
            key=["L0", "L1", "L2", "DIL0", "DIL1", "DIL2", "WIN0", "WIN1", "WIN2", "G",
                 "HEAD_DIM", "HEAD_DIM_V", "HAS_RPB"],
            reset_to_zero=["DRPB"] if kind == "dq" else None,
            cache_results=True,
        )(fn)
    return _AUTOTUNED[key], {}


def _grid(spec3: tuple, dil3: tuple, rows: int, tile_names: tuple[str, str, str]):
    """1-D launch grid: ``rows`` (B * heads) x the query or key tiles of all dilation groups."""
    def grid(meta):
        n = rows
        for L, d, name in zip(spec3, dil3, tile_names):
            n *= d * _cdiv(_cdiv(L, d), meta[name])
        return (n,)
    return grid


# ---------------------------------------------------------------------------------------------
# Launch


def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision. fp32 on NVIDIA: 3xTF32 keeps fp32 accuracy on tensor cores
    (plain TF32 misses the fp32 tolerance by ~1e-3; "ieee" falls back to FMA loops, several times
    slower). Half inputs ignore it. ROCm builds only accept "ieee" for fp32."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if torch.version.hip else "tf32x3"


class _Call:
    """Everything a launch needs besides the tensors: padded rank-3 geometry and scalar arguments."""

    def __init__(self, spec: NASpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_rpb: bool,
                 scale: float):
        self.rank = spec.rank
        self.spatial3 = _pad3(spec.spatial, 1)
        self.dil3 = _pad3(spec.dilation, 1)
        rk3 = _pad3(spec.requested_kernel_size if has_rpb else (1,) * spec.rank, 1)
        win3 = _pad3(tuple(k_ * d for k_, d in zip(spec.kernel_size, spec.dilation)), 1)
        self.tabs = _tables(spec, q.device)
        self.batch, self.heads, self.heads_kv = q.shape[0], q.shape[-2], k.shape[-2]
        dim, dim_v = q.shape[-1], v.shape[-1]
        self.common = dict(
            L0=self.spatial3[0], L1=self.spatial3[1], L2=self.spatial3[2],
            DIL0=self.dil3[0], DIL1=self.dil3[1], DIL2=self.dil3[2],
            RK0=rk3[0], RK1=rk3[1], RK2=rk3[2], WIN0=win3[0], WIN1=win3[1], WIN2=win3[2],
            H=self.heads, G=self.heads // self.heads_kv, scale=float(scale),
            HEAD_DIM=dim, HEAD_DIM_V=dim_v,
            BLOCK_D=max(16, _next_pow2(dim)), BLOCK_DV=max(16, _next_pow2(dim_v)),
            HAS_RPB=has_rpb,
            PREC=_dot_precision(q.dtype),
        )

    def strides(self, *tensors: torch.Tensor) -> list[int]:
        """``(batch, axis0, axis1, axis2, head)`` strides of each ``[B, *S, H, ...]`` tensor."""
        out: list[int] = []
        for t in tensors:
            s = t.stride()
            out.extend((s[0], *_pad3(tuple(s[1:self.rank + 1]), 0), s[self.rank + 1]))
        return out

    def launch(self, kind: str, tile_names: tuple[str, str, str], rows: int, *args) -> None:
        kernel, meta = _launcher(kind, self.rank)
        kernel[_grid(self.spatial3, self.dil3, rows, tile_names)](*args, **self.common, **meta)


def _prepare(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with unit stride; every other dim may be strided."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_forward(spec: NASpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``out [B, *S, H, D_v]`` (q's dtype) and ``lse [B, *S, H]`` (float32)."""
    q, k, v = _prepare(q), _prepare(k), _prepare(v)
    call = _Call(spec, q, k, v, rpb is not None, scale)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    rpb_arg = rpb.contiguous() if rpb is not None else lse  # never read without HAS_RPB
    call.launch("fwd", ("T0", "T1", "T2"), call.batch * call.heads,
                q, k, v, out, lse, rpb_arg, *call.tabs,
                *call.strides(q, k, v, out, lse.unsqueeze(-1)))  # lse as [B, *S, H, 1] for its strides
    return out, lse


def _launch_backward(spec: NASpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, rpb: Optional[torch.Tensor], dout: torch.Tensor, dlse: Optional[torch.Tensor],
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``dq, dk, dv`` (contiguous, input dtypes) and ``drpb`` (``None`` without rpb)."""
    # dq/dk/dv are written with q/k/v's strides, so those must be dense.
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
    lse = lse.float().contiguous()
    call = _Call(spec, q, k, v, rpb is not None, scale)
    # delta folds the LSE gradient in: dlogits = P * (dP - (rowsum(dO * O) - dLSE)).
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # Without rpb the kernel never touches DRPB, but the autotuner zeroes it between trials: give
    # it a scratch buffer of its own, never a live tensor.
    drpb = torch.zeros(rpb.shape if rpb is not None else (1,), device=q.device, dtype=torch.float32)
    rpb_arg = rpb.contiguous() if rpb is not None else delta
    strides = call.strides(q, k, v, dout, delta.unsqueeze(-1))
    call.launch("dq", ("T0", "T1", "T2"), call.batch * call.heads,
                q, k, v, dout, lse, delta, dq, drpb, rpb_arg, *call.tabs, *strides)
    call.launch("dkdv", ("K0", "K1", "K2"), call.batch * call.heads_kv,
                q, k, v, dout, lse, delta, dk, dv, rpb_arg, *call.tabs, *strides)
    return dq, dk, dv, (drpb.to(rpb.dtype) if rpb is not None else None)


class TritonBackend(Backend):
    name = "triton"
    description = "fused Triton kernels: multi-dim query tiles x key boxes, online softmax, fused backward"
    supports_gqa = True
    native_backward = True

    def unavailable(self) -> Optional[str]:
        missing = _triton_missing()
        if missing:
            return missing
        if not torch.cuda.is_available() and not _interpret():
            return ("no CUDA GPU on this machine (set TRITON_INTERPRET=1 before importing visattn to run "
                    "the kernels on CPU in Triton's interpreter, for testing only: it is very slow)")
        return None

    def refuse(self, p: Problem) -> Optional[str]:
        if p.device.type != "cuda" and not _interpret():
            return f"tensors are on {p.device}; the Triton kernels need CUDA tensors"
        if p.dtype not in _DTYPES:
            return f"dtype {p.dtype} is not supported (float16, bfloat16, float32); use backend='torch'"
        if max(p.dim, p.dim_v) > _MAX_HEAD_DIM:
            return f"head_dim={p.dim}, dim_v={p.dim_v}: at most {_MAX_HEAD_DIM} is supported"
        return refuse_unfused_features(p) or refuse_general_geometry(p)

    def priority(self, p: Problem) -> float:
        # First choice on CUDA; in the interpreter (CPU) only when forced by name.
        return 10.0 if p.device.type == "cuda" else -50.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, extras: Extras) -> Result:
        return Result(*_launch_forward(p.spec, q, k, v, extras.rpb, p.scale))

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 dout: torch.Tensor, dlse: Optional[torch.Tensor], p: Problem, extras: Extras,
                 attn: Optional[torch.Tensor] = None, dattn: Optional[torch.Tensor] = None) -> Grads:
        # attn/dattn are always None here: refuse() declines return_attn (refuse_unfused_features).
        return Grads(*_launch_backward(p.spec, q, k, v, out, lse, extras.rpb, dout, dlse, p.scale))


__all__ = ["TritonBackend"]
