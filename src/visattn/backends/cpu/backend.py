"""The ``cpu`` backend: fused C kernels (``na_cpu.c``) for the forward and the backward on CPU.

Why C: the kernel blocks two queries x eight keys with sixteen vector accumulators in registers and
one transpose-and-add reduction, which needs explicit vector types (see docs/cpu.md). The library is
compiled on the first call this backend serves (:mod:`.build`), never when it is only probed.

Served: float32, and half inputs computed in float32 (float64 goes to the ``torch`` backend); any
head dim (dims that are not multiples of the kernel's vector width of 8 are zero-padded here, which
changes no dot product); ranks 1-3, per-axis kernel/stride/dilation/causal, GQA, ``D_v != D`` and
relative positional bias with its gradient. Threads follow ``torch.get_num_threads()``, on torch's own
OpenMP pool where it can be found; ctypes releases the GIL during the call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...spec import NASpec
from ..base import Backend, Extras, Grads, Problem, Result
from . import build
from .geometry import colour_chunks, tables

#: The kernel's vector width: head dims are padded to multiples of it.
_VEC = 8
#: Above this many keys per query the torch backend's GEMMs win (measured on 2 cores: 625-key windows).
_MAX_WINDOW = 512
_MAX_THREADS = 256  # MAX_THREADS in na_cpu.c
#: Fewest parallel units per colour for the fused backward (see :func:`_fused_plan`).
_FUSED_MIN_UNITS = 8


def _threads() -> int:
    """torch's thread count, within what the kernel supports (one bias-gradient slice each)."""
    return min(max(1, torch.get_num_threads()), _MAX_THREADS)


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _args(q, k, v, rpb, spec: NASpec, scale: float, split: tuple[int, int] = (0, 0), **tensors) -> build.Args:
    """The kernel's argument struct for contiguous float32 rank-3 tensors (``split``: the fused
    backward's axis and chunk length; ``tensors``: the optional ones by their ``na_args`` name). The
    tables are cached per spec, so they outlive the call."""
    tabs = tables(spec)  # pos, lo, hi, rof, qlo, qhi, sof: int64 [3, Lmax]
    B, L0, L1, L2, H, D = q.shape
    Hk, Dv = k.shape[4], v.shape[5]
    R = rpb.shape[1:] if rpb is not None else (1, 1, 1)
    window = (1,) * (3 - spec.rank) + spec.kernel_size
    args = build.Args(*[_ptr(t) for t in (q, k, v, rpb, tensors.get("ab"), tensors.get("kpm"), *tabs)],
                      tabs[0].shape[1], B, L0, L1, L2, H, Hk, D, Dv, *R, *window, scale,
                      *[_ptr(tensors.get(n)) for n in ("attn", "dattn", "dab", "out", "lse", "dout", "dlse", "dq", "dk",
                                                       "dv", "drpb", "nlse_t", "delta_t")],
                      *split, _threads())
    # The struct holds raw pointers: it keeps the tensors alive (a temporary copy made for the call,
    # such as a contiguous attn_bias, would otherwise be freed before the kernel runs).
    args.keepalive = (q, k, v, rpb, tensors)
    return args


def _fused_plan(spec: NASpec, batch: int, heads_kv: int) -> Optional[tuple[int, int, int]]:
    """``(axis, chunk, count)`` of :func:`colour_chunks` when the fused backward is used, else None.

    The fused pass saves the dQ pass's recomputation of S and dP (5 products instead of 7) but runs
    each colour's ``(batch, chunk, kv head)`` units in parallel: with fewer than ``_FUSED_MIN_UNITS``
    in a colour, threads would idle and the two-pass backward (parallel over every key pair) wins.
    The choice depends on the geometry alone, so results never depend on the thread count.
    """
    axis, chunk, count = colour_chunks(spec)
    smaller = max(1, count // 2)  # the odd chunks, unless there is only one chunk
    return (axis, chunk, count) if batch * heads_kv * smaller >= _FUSED_MIN_UNITS else None


def _padded(dim: int) -> int:
    return -(-dim // _VEC) * _VEC


def _kernel_view(t: torch.Tensor, p: Problem, dim: int) -> torch.Tensor:
    """``t [B, *S, heads, d]`` as the kernel's contiguous float32 ``[B, L0, L1, L2, heads, dim]``
    (leading axes of length 1 for rank < 3; the head dim zero-padded to ``dim``)."""
    t = t.float()
    if t.shape[-1] != dim:
        t = F.pad(t, (0, dim - t.shape[-1]))
    shape3 = (1,) * (3 - p.spec.rank) + p.spec.spatial
    return t.reshape(p.batch, *shape3, *t.shape[-2:]).contiguous()


def _bias_view(rpb: Optional[torch.Tensor], p: Problem) -> Optional[torch.Tensor]:
    """The bias table as ``[H, R0, R1, R2]`` float32 (``None`` without one)."""
    if rpb is None:
        return None
    return rpb.float().reshape(p.heads, *((1,) * (3 - p.spec.rank)), *rpb.shape[1:]).contiguous()


def _slots_view(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-pair tensor ``[B, *S, H, K]`` (attn_bias, the weights' gradient) as contiguous float32
    (the kernel reads row ``token * H + head`` of ``K`` slots); ``None`` stays ``None``."""
    return None if t is None else t.float().contiguous()


def _mask_view(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``key_padding_mask [B, *S]`` as contiguous bytes, one per token (nonzero: ignore the key)."""
    return None if mask is None else mask.contiguous().view(torch.uint8)


class CpuBackend(Backend):
    name = "cpu"
    supports_gqa = True
    native_backward = True

    @property
    def description(self) -> str:  # type: ignore[override]
        lib = build._LIB
        where = (f"compiled for this CPU, cached in {build.cache_dir()}" if lib is not None else
                 f"compiled on the first call with {build.compiler()} and cached in {build.cache_dir()}")
        return (f"fused C CPU kernels (2x8 register-blocked), forward and race-free backward; float64 goes to "
                f"`torch`; {where}")

    def unavailable(self) -> Optional[str]:
        return build.status()

    def load(self) -> Optional[str]:
        return build.library()[1]

    def refuse(self, p: Problem) -> Optional[str]:
        if p.device.type != "cpu":
            return f"tensors are on {p.device}, this backend runs on CPU tensors only"
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return (f"dtype {p.dtype} is not supported (float32; half types computed in float32; float64 goes to the "
                    f"torch backend)")
        return None

    def priority(self, p: Problem) -> float:
        return 20.0 if p.spec.window_size <= _MAX_WINDOW else -1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, extras: Extras) -> Result:
        d, dv = _padded(p.dim), _padded(p.dim_v)
        q3, k3, v3 = _kernel_view(q, p, d), _kernel_view(k, p, d), _kernel_view(v, p, dv)
        rpb = _bias_view(extras.rpb, p)
        out = q3.new_empty(*q3.shape[:-1], dv)
        lse = q3.new_empty(q3.shape[:-1])
        lead = (p.batch, *p.spec.spatial, p.heads)
        attn = q3.new_empty(*lead, p.spec.window_size) if p.return_attn else None  # rows zeroed by the kernel
        build.run(_args(q3, k3, v3, rpb, p.spec, p.scale, out=out, lse=lse, attn=attn,
                        ab=_slots_view(extras.attn_bias), kpm=_mask_view(extras.key_padding_mask)), 0)
        out = out[..., : p.dim_v].reshape(*lead, p.dim_v)
        return Result(out.to(q.dtype), lse.reshape(lead), attn.to(q.dtype) if attn is not None else None)

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 dout: torch.Tensor, dlse: Optional[torch.Tensor], p: Problem, extras: Extras,
                 attn: Optional[torch.Tensor] = None, dattn: Optional[torch.Tensor] = None) -> Grads:
        d, dv = _padded(p.dim), _padded(p.dim_v)
        q3, k3, v3 = _kernel_view(q, p, d), _kernel_view(k, p, d), _kernel_view(v, p, dv)
        out3, dout3 = _kernel_view(out, p, dv), _kernel_view(dout, p, dv)
        lse3 = lse.float().contiguous()
        dattn3 = _slots_view(dattn)
        if dattn3 is not None:
            # Weights P = exp(s - lse) with gradient dA: dS = P * (dO.V + dA - delta), where delta =
            # rowsum(dO * O) - dLSE + sum(P * dA); the kernel adds dA to dO.V, the last term goes
            # into the LSE's gradient here.
            extra = (attn.float() * dattn3).sum(-1)
            dlse = -extra if dlse is None else dlse.float() - extra
        dlse3 = dlse.float().contiguous() if dlse is not None else None
        rpb = _bias_view(extras.rpb, p)
        dk, dv_ = torch.empty_like(k3), torch.empty_like(v3)
        dq = torch.empty_like(q3)  # zeroed in pass 3
        # -lse and delta per query, laid out so that a key's queries are consecutive (see qt in
        # na_cpu.c), plus a vector of zeros that padding slots may read.
        side = torch.empty(2, lse3.numel() + 8, dtype=torch.float32)
        side[:, -8:] = 0
        # One bias-gradient slice per thread (no races, deterministic for a given thread count).
        drpb = torch.zeros(_threads(), *rpb.shape, dtype=torch.float32) if rpb is not None else None
        plan = _fused_plan(p.spec, p.batch, k3.shape[4])
        dab = torch.empty_like(extras.attn_bias, dtype=torch.float32) if extras.attn_bias is not None else None
        args = _args(q3, k3, v3, rpb, p.spec, p.scale, plan[:2] if plan else (0, 0), out=out3, lse=lse3, dout=dout3,
                     dlse=dlse3, dq=dq, dk=dk, dv=dv_, drpb=drpb, nlse_t=side[0], delta_t=side[1],
                     ab=_slots_view(extras.attn_bias), kpm=_mask_view(extras.key_padding_mask), dattn=dattn3,
                     dab=dab)  # dab: rows zeroed in pass 3
        build.run(args, 3)  # -lse and delta copies, dq zeroed
        if plan:  # dQ, dK, dV and drpb from the key side: even chunks, then odd ones
            for pass_ in (4, 5)[: 2 if plan[2] > 1 else 1]:
                build.run(args, pass_)
        else:
            build.run(args, 1)  # dQ, drpb
            build.run(args, 2)  # dK, dV
        shape = (p.batch, *p.spec.spatial)
        return Grads(
            dq=dq[..., : p.dim].reshape(*shape, p.heads, p.dim).to(q.dtype),
            dk=dk[..., : p.dim].reshape(*shape, k.shape[-2], p.dim).to(k.dtype),
            dv=dv_[..., : p.dim_v].reshape(*shape, v.shape[-2], p.dim_v).to(v.dtype),
            drpb=drpb.sum(0).reshape(extras.rpb.shape).to(extras.rpb.dtype) if drpb is not None else None,
            dattn_bias=dab.to(extras.attn_bias.dtype) if dab is not None else None,
        )
