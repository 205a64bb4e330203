"""The ``cpu`` backend: fused C kernels (``na_cpu.c``) for the forward and the backward on CPU.

Why C: the kernels block two queries x eight keys with explicit vector types and, for bfloat16, the
CPU's bf16 dot-product instructions (see docs/cpu.md). The library is compiled on the first call
this backend serves (:mod:`.build`), never when it is only probed.

Served: float32; bfloat16 computed on bf16 pairs with float32 accumulation and softmax statistics
(``vdpbf16ps`` where the CPU has AVX512-BF16, the same sums widened to float32 elsewhere); float16
converted to float32 (one copy per input: no CPU here has a float16 dot product the kernels use);
float64 goes to the ``torch`` backend. Any head dim (dims that are not multiples of the kernel's
vector width of 8 are zero-padded here, which changes no dot product); ranks 1-3, per-axis
kernel/stride/dilation/causal, GQA, ``D_v != D``, relative positional bias, ``attn_bias`` (with
their gradients), ``key_padding_mask`` and ``return_attn`` (with the weights' gradient), all of them
also with keys on another grid than the queries (cross-grid) and on periodic axes: the kernels index
queries and keys on separate grids, and a periodic problem is run as a cross-grid one on the virtual
key grid of :func:`visattn.spec.axis_windows` (the axis padded circularly), whose keys the kernels
read from the real k, v and mask in place; the gradients of a key's virtual copies are summed by the
kernel's last phase. Threads
follow ``torch.get_num_threads()``, on torch's own OpenMP pool where it can be found; ctypes releases
the GIL during the call.
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from ...spec import NASpec
from ..base import Backend, Extras, Grads, Problem, Result
from . import build
from .geometry import colour_chunks, key_grid, periodic_offsets, tables

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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The element type the kernels read and write for inputs of ``dtype``: bfloat16 natively,
    float16 as float32 (converted), float32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _l2p(spec: NASpec) -> int:
    """Padded last axis of the bf16 layout copies (a chunk of 8 lanes may start at its last index), one
    length for the copies of both grids (the query grid's and the kernels' key grid's)."""
    return _padded(max(spec.spatial[-1], key_grid(spec)[-1])) + _VEC


#: Scratch reused across calls, per thread (the kernel fills it completely on every call; concurrent
#: callers each have their own). Larger requests are allocated for the call only.
_WORKSPACE = threading.local()
_WORKSPACE_KEEP_BYTES = 64 * 2**20


def _scratch(nbytes: int) -> torch.Tensor:
    """``nbytes`` of uint8 scratch: a view of this thread's workspace (grown as needed). Fresh
    allocations of this size page-fault on every call (glibc returns them to the OS: docs/cpu.md)."""
    if nbytes > _WORKSPACE_KEEP_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8)
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _WORKSPACE.buf = torch.empty(max(nbytes, 2 * buf.numel() if buf is not None else 0), dtype=torch.uint8)
    return buf[:nbytes]


def _copies(p: Problem, names: tuple[str, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            extra_floats: int = 0) -> tuple[dict, Optional[torch.Tensor]]:
    """Scratch for the bf16 layout copies ``names`` (kt, vt, kp, vp of k/v; qt, qp of q; dot, dop of
    dout: see na_cpu.c): ``lines * heads * l2p * dim`` bf16 each (lines of the query grid for q and
    dout, of the key grid for k and v), filled by the kernel; plus ``extra_floats`` float32 (or
    ``None``). All from this thread's workspace, 64-byte aligned."""
    grid = (1,) * (3 - p.spec.rank) + key_grid(p.spec)  # the copies of k and v are laid out on the key grid
    qlines, klines = q.shape[0] * q.shape[1] * q.shape[2], k.shape[0] * grid[0] * grid[1]
    l2p = _l2p(p.spec)
    size = {"k": (klines, k.shape[4], k.shape[5]), "v": (klines, v.shape[4], v.shape[5]),
            "q": (qlines, q.shape[4], q.shape[5]), "d": (qlines, q.shape[4], v.shape[5])}
    nbytes = [-(-2 * size[n[0]][0] * size[n[0]][1] * l2p * size[n[0]][2] // 64) * 64 for n in names]
    buf = _scratch(sum(nbytes) + 4 * extra_floats)
    out, at = {}, 0
    for n, b in zip(names, nbytes):
        out[n] = buf[at: at + b].view(torch.bfloat16)
        at += b
    return out, (buf[at:].view(torch.float32) if extra_floats else None)


#: Optional tensors of ``na_args``, by field name.
_OPTIONAL = ("kpm", "attn", "dattn", "dab", "out", "lse", "dout", "dlse", "dq", "dk", "dv", "dq_out", "drpb", "nlse_t",
             "delta_t", "kt", "vt", "qt", "dot", "kp", "vp", "qp", "dop")
_TEMPLATES: dict = {}


def _template(spec: NASpec, shapes: tuple, dt: int, scale: float, rpb_shape: Optional[tuple], split: tuple,
              threads: int) -> build.Args:
    """The call-independent fields of the argument struct (tables, sizes, flags), cached: a call copies
    it and sets its pointers (building the 60-field struct each time cost ~15 us)."""
    key = (spec, shapes, dt, scale, rpb_shape, split, threads)
    args = _TEMPLATES.get(key)
    if args is None:
        if len(_TEMPLATES) > 256:
            _TEMPLATES.clear()
        tabs = tables(spec)  # pos, lo, hi, rof, qlo, qhi, sof, kpos, ksrc: int64 [3, Lmax] (cached, kept alive)
        (B, L0, L1, L2, H, D), (_, N0, N1, N2, Hk, _), (*_, Dv) = shapes
        pad = (1,) * (3 - spec.rank)
        (M0, M1, M2), (kb0, kb1, kb2) = pad + key_grid(spec), (0,) * (3 - spec.rank) + periodic_offsets(spec)
        args = build.Args()
        for name, t in zip(("pos", "lo", "hi", "rof", "qlo", "qhi", "sof", "kpos", "ksrc"), tabs):
            setattr(args, name, t.data_ptr())
        for name, value in zip(("lmax", "B", "L0", "L1", "L2", "M0", "M1", "M2", "N0", "N1", "N2", "kb0", "kb1", "kb2",
                                "H", "Hk", "D", "Dv"),
                               (tabs[0].shape[1], B, L0, L1, L2, M0, M1, M2, N0, N1, N2, kb0, kb1, kb2, H, Hk, D, Dv)):
            setattr(args, name, value)
        args.R0, args.R1, args.R2 = rpb_shape[1:] if rpb_shape is not None else (1, 1, 1)
        args.K0, args.K1, args.K2 = (1,) * (3 - spec.rank) + spec.kernel_size
        args.scale, args.dt, args.l2p, args.nthreads = scale, dt, _l2p(spec), threads
        args.split, args.chunk = split
        args.keepalive = tabs
        _TEMPLATES[key] = args
    return args


def _args(q, k, v, rpb, spec: NASpec, scale: float, split: tuple[int, int] = (0, 0), **tensors) -> build.Args:
    """The kernel's argument struct for contiguous rank-3 tensors of one compute dtype (``split``: the
    fused backward's axis and chunk length; ``tensors``: the optional ones by their ``na_args`` name,
    ``ab`` as ``(tensor, batch, token, head strides)``)."""
    dt = build.Args.BF16 if q.dtype == torch.bfloat16 else build.Args.F32
    template = _template(spec, (tuple(q.shape), tuple(k.shape), tuple(v.shape)), dt, scale,
                         tuple(rpb.shape) if rpb is not None else None, tuple(split), _threads())
    args = build.Args.from_buffer_copy(template)
    args.q, args.k, args.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    if rpb is not None:
        args.rpb = rpb.data_ptr()
    ab = tensors.get("ab")
    if ab is not None:
        args.ab = ab[0].data_ptr()
        args.ab_sb, args.ab_st, args.ab_sh = ab[1:]
    for name, t in tensors.items():
        if t is not None and name != "ab":
            setattr(args, name, t.data_ptr())
    # The struct holds raw pointers: it keeps the tensors alive (a temporary copy made for the call,
    # such as a contiguous attn_bias, would otherwise be freed before the kernel runs), and the tables.
    args.keepalive = (q, k, v, rpb, tensors, template.keepalive)
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


def _kernel_view(t: torch.Tensor, p: Problem, dim: int, keys: bool = False) -> torch.Tensor:
    """``t [B, *S, heads, d]`` as the kernel's contiguous ``[B, L0, L1, L2, heads, dim]`` in the compute
    dtype (leading axes of length 1 for rank < 3; the head dim zero-padded to ``dim``). No copy for a
    contiguous input of the compute dtype whose head dim is a multiple of 8. ``keys``: ``t`` is on the
    keys' grid (``spec.key_spatial``)."""
    cdt = compute_dtype(p.dtype)
    if t.dtype != cdt:
        t = t.to(cdt)
    if t.shape[-1] != dim:
        t = F.pad(t, (0, dim - t.shape[-1]))
    shape3 = (p.batch, *(1,) * (3 - p.spec.rank), *(p.spec.key_spatial if keys else p.spec.spatial), *t.shape[-2:])
    return t.view(shape3) if t.is_contiguous() else t.reshape(shape3).contiguous()


def _bias_view(rpb: Optional[torch.Tensor], p: Problem) -> Optional[torch.Tensor]:
    """The bias table as ``[H, R0, R1, R2]`` float32 (``None`` without one)."""
    if rpb is None:
        return None
    return rpb.float().reshape(p.heads, *((1,) * (3 - p.spec.rank)), *rpb.shape[1:]).contiguous()


def _attn_bias_view(ab: Optional[torch.Tensor], p: Problem) -> Optional[tuple]:
    """``attn_bias [B, *S, H, K]`` as float32 ``(tensor, batch stride, token stride, head stride)``
    (slots contiguous). A broadcast bias (Swin's shift mask expanded over batch and heads: strides 0)
    is read in place, not copied; a layout whose spatial axes do not flatten to one token stride is
    copied."""
    if ab is None:
        return None
    ab = ab.float()
    flat = (p.batch, p.spec.num_tokens, p.heads, p.spec.window_size)
    try:
        view = ab.view(flat) if ab.stride(-1) == 1 else None
    except RuntimeError:  # spatial axes not collapsible into one stride
        view = None
    if view is None:
        view = ab.contiguous().view(flat)
    return (view, *view.stride()[:3])


def _slots_view(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-pair tensor ``[B, *S, H, K]`` (the weights' gradient) as contiguous float32 (the kernel
    reads row ``token * H + head`` of ``K`` slots); ``None`` stays ``None``."""
    return None if t is None else t.float().contiguous()


def _mask_view(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``key_padding_mask [B, *Sk]`` as contiguous bytes, one per key token (nonzero: ignore the key)."""
    return None if mask is None else mask.contiguous().view(torch.uint8)


def _forward_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problems: list[tuple[Problem, int]],
                   rpb: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of several problems on packed rows, in one kernel launch (``na_run_many``).

    Shapes: ``q [T, H, D]``, ``k [T, H_kv, D]``, ``v [T, H_kv, D_v]`` (one dtype, CPU); ``problems``:
    ``(problem, first row)`` pairs, problem ``i`` owning rows ``first .. first + batch * num_tokens``
    of all three (same-grid problems, row-major per sample), together covering every row once. Every
    problem must have ``H``, ``H_kv``, ``D``, ``D_v``, the dtype and the scale of the call and no
    per-pair feature (``rpb [H, ...]``, the one bias table, is shared by all: so are their kernel
    sizes). Returns ``out [T, H, D_v]`` in q's dtype and ``lse [T, H]`` float32.

    The packed tensors are converted, padded and made contiguous once for all problems (no copy for
    contiguous inputs of the compute dtype with head dims that are multiples of 8); each problem's
    argument struct then points into them at its first row, and the kernel writes straight into the
    packed output and LSE.
    """
    p0 = problems[0][0]
    cdt = compute_dtype(q.dtype)
    d, dv = _padded(p0.dim), _padded(p0.dim_v)

    def packed(t: torch.Tensor, dim: int) -> torch.Tensor:
        t = t if t.dtype == cdt else t.to(cdt)
        t = t if t.shape[-1] == dim else F.pad(t, (0, dim - t.shape[-1]))
        return t.contiguous()

    q3, k3, v3 = packed(q, d), packed(k, d), packed(v, dv)
    T, H, Hk = q3.shape[0], q3.shape[1], k3.shape[1]
    out = q3.new_empty(T, H, dv)
    lse = torch.empty(T, H, dtype=torch.float32)
    bias = _bias_view(rpb, p0)
    bf16 = cdt == torch.bfloat16
    dt = build.Args.BF16 if bf16 else build.Args.F32
    es, threads = q3.element_size(), _threads()
    # bf16: every problem's key (T layout) and value (P layout) copies, on its own key grid, carved
    # from one workspace in 64-byte aligned pieces (see _copies).
    pieces: list[tuple[int, int]] = []
    if bf16:
        for p, _ in problems:
            grid = (1,) * (3 - p.spec.rank) + key_grid(p.spec)
            lines = p.batch * grid[0] * grid[1] * Hk * _l2p(p.spec)
            pieces.append(tuple(-(-2 * lines * dim // 64) * 64 for dim in (d, dv)))
    buf = _scratch(sum(map(sum, pieces))) if bf16 else None
    at = buf.data_ptr() if buf is not None else 0
    structs = []
    for i, (p, row) in enumerate(problems):
        pad = (1,) * (3 - p.spec.rank)
        lead = (p.batch, *pad, *p.spec.spatial)
        shapes = ((*lead, H, d), (p.batch, *pad, *p.spec.key_spatial, Hk, d), (p.batch, *pad, *p.spec.key_spatial, Hk, dv))
        template = _template(p.spec, shapes, dt, p.scale, tuple(bias.shape) if bias is not None else None, (0, 0),
                             threads)
        args = build.Args.from_buffer_copy(template)
        args.q, args.out = q3.data_ptr() + row * H * d * es, out.data_ptr() + row * H * dv * es
        args.k, args.v = k3.data_ptr() + row * Hk * d * es, v3.data_ptr() + row * Hk * dv * es
        args.lse = lse.data_ptr() + row * H * 4
        if bias is not None:
            args.rpb = bias.data_ptr()
        if bf16:
            args.kt, args.vp = at, at + pieces[i][0]
            at += sum(pieces[i])
        args.keepalive = template.keepalive  # the tables the struct points to
        structs.append(args)
    build.run_many(structs, build.FORWARD)
    del q3, k3, v3, bias, buf  # alive (the kernel's inputs and scratch) until the launch returned
    if dv != p0.dim_v:  # one copy of the whole packed output drops the padding
        out = out[..., : p0.dim_v].contiguous()
    return out.to(q.dtype), lse


class CpuBackend(Backend):
    name = "cpu"
    supports_gqa = True
    native_backward = True

    @property
    def description(self) -> str:  # type: ignore[override]
        lib = build._LIB
        if lib is not None:
            feats = build.features()
            bf16 = ("bfloat16 on AVX512-BF16 dot products" if feats["bf16_dot"] else
                    "bfloat16 widened to float32 (this build has no AVX512-BF16)")
            where = f"compiled for this CPU ({bf16}), cached in {build.cache_dir()}"
        else:
            where = f"compiled on the first call with {build.compiler()} and cached in {build.cache_dir()}"
        return (f"fused C CPU kernels (2x8 register-blocked), forward and race-free backward, masks and weights "
                f"inside; float64 goes to `torch`; {where}")

    def unavailable(self) -> Optional[str]:
        return build.status()

    def load(self) -> Optional[str]:
        return build.library()[1]

    def refuse(self, p: Problem) -> Optional[str]:
        if p.device.type != "cpu":
            return f"tensors are on {p.device}, this backend runs on CPU tensors only"
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return (f"dtype {p.dtype} is not supported (float32, bfloat16; float16 computed in float32; float64 goes "
                    f"to the torch backend)")
        return None  # every geometry: same-grid, cross-grid and periodic axes

    def priority(self, p: Problem) -> float:
        return 20.0 if p.spec.window_size <= _MAX_WINDOW else -1.0

    def forward_packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       problems: list[tuple[Problem, int]], rpb: Optional[torch.Tensor] = None
                       ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return _forward_packed(q, k, v, problems, rpb)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, extras: Extras) -> Result:
        d, dv = _padded(p.dim), _padded(p.dim_v)
        q3, k3, v3 = _kernel_view(q, p, d), _kernel_view(k, p, d, keys=True), _kernel_view(v, p, dv, keys=True)
        rpb = _bias_view(extras.rpb, p)
        out = q3.new_empty(*q3.shape[:-1], dv)
        lse = torch.empty(q3.shape[:-1], dtype=torch.float32)
        lead = (p.batch, *p.spec.spatial, p.heads)
        attn = (torch.empty(*lead, p.spec.window_size, dtype=torch.float32)  # rows zeroed by the kernel
                if p.return_attn else None)
        copies = _copies(p, ("kt", "vp"), q3, k3, v3)[0] if q3.dtype == torch.bfloat16 else {}
        build.run(_args(q3, k3, v3, rpb, p.spec, p.scale, out=out, lse=lse, attn=attn,
                        ab=_attn_bias_view(extras.attn_bias, p), kpm=_mask_view(extras.key_padding_mask), **copies),
                  build.FORWARD)
        out = out[..., : p.dim_v].reshape(*lead, p.dim_v)
        return Result(out.to(q.dtype), lse.reshape(lead), attn.to(q.dtype) if attn is not None else None)

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 dout: torch.Tensor, dlse: Optional[torch.Tensor], p: Problem, extras: Extras,
                 attn: Optional[torch.Tensor] = None, dattn: Optional[torch.Tensor] = None) -> Grads:
        d, dv = _padded(p.dim), _padded(p.dim_v)
        q3, k3, v3 = _kernel_view(q, p, d), _kernel_view(k, p, d, keys=True), _kernel_view(v, p, dv, keys=True)
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
        bf16 = q3.dtype == torch.bfloat16
        plan = _fused_plan(p.spec, p.batch, k3.shape[4])
        # Scratch: bf16 layout copies (key side: q, dout; two-pass dQ side: k, v); -lse and delta per
        # query, laid out so that a key's queries are consecutive (see qt in na_cpu.c), plus a vector
        # of zeros that padding slots may read; for bf16, dq's float32 accumulator; with periodic axes,
        # dk and dv on the virtual key grid (each copy of a real key has its own row, so the key pass
        # needs no atomics; the kernel's last phase sums the copies into dk, dv: dkf, dvf).
        names = (("qt", "dot", "qp", "dop") + (() if plan else ("kt", "vt", "kp"))) if bf16 else ()
        nside = 2 * (lse3.numel() + 8)
        ndq = q3.numel() if bf16 else 0
        grid = (p.batch, *(1,) * (3 - p.spec.rank), *key_grid(p.spec), k3.shape[4])
        periodic = any(p.spec.periodic)
        # element counts of the virtual dk, dv in float32 units (bf16: half), rounded to 64 bytes
        nfold = [-(-math.prod(grid) * n * k3.element_size() // 64) * 16 if periodic else 0
                 for n in (k3.shape[5], v3.shape[5])]
        copies, floats = _copies(p, names, q3, k3, v3, extra_floats=nside + ndq + 16 + sum(nfold))
        side = floats[:nside].view(2, -1)
        side[:, -8:] = 0
        # dq accumulated in float32 (zeroed by the kernel); bf16: converted into dq_out at the end
        dq = floats[nside:nside + ndq].view(q3.shape) if bf16 else torch.empty(q3.shape, dtype=torch.float32)
        dq_out = torch.empty_like(q3) if bf16 else None
        dk, dv_ = torch.empty_like(k3), torch.empty_like(v3)
        folded = {}
        if periodic:
            at = nside + ndq + 15 - (nside + ndq + 15) % 16  # 64-byte aligned (the workspace is)
            folded = {"dkf": dk, "dvf": dv_}
            dk, dv_ = (floats[at0: at0 + n].view(k3.dtype)[: math.prod(grid) * dim].view(*grid, dim)
                       for at0, n, dim in ((at, nfold[0], k3.shape[5]), (at + nfold[0], nfold[1], v3.shape[5])))
        # One bias-gradient slice per thread (no races, deterministic for a given thread count).
        drpb = torch.zeros(_threads(), *rpb.shape, dtype=torch.float32) if rpb is not None else None
        dab = (torch.empty(*extras.attn_bias.shape, dtype=torch.float32)  # rows zeroed by the kernel
               if extras.attn_bias is not None else None)
        args = _args(q3, k3, v3, rpb, p.spec, p.scale, plan[:2] if plan else (0, 0), out=out3, lse=lse3, dout=dout3,
                     dlse=dlse3, dq=dq, dk=dk, dv=dv_, dq_out=dq_out, drpb=drpb, nlse_t=side[0], delta_t=side[1],
                     ab=_attn_bias_view(extras.attn_bias, p), kpm=_mask_view(extras.key_padding_mask), dattn=dattn3,
                     dab=dab, **folded, **copies)
        build.run(args, build.BACKWARD)
        shape = (p.batch, *p.spec.spatial)
        dq = dq_out if bf16 else dq
        dk, dv_ = folded.get("dkf", dk), folded.get("dvf", dv_)
        return Grads(
            dq=dq[..., : p.dim].reshape(*shape, p.heads, p.dim).to(q.dtype),
            dk=dk[..., : p.dim].reshape(p.batch, *p.spec.key_spatial, k.shape[-2], p.dim).to(k.dtype),
            dv=dv_[..., : p.dim_v].reshape(p.batch, *p.spec.key_spatial, v.shape[-2], p.dim_v).to(v.dtype),
            drpb=drpb.sum(0).reshape(extras.rpb.shape).to(extras.rpb.dtype) if drpb is not None else None,
            dattn_bias=dab.to(extras.attn_bias.dtype) if dab is not None else None,
        )
