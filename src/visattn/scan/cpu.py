"""The fused CPU selective scan: ``selective_scan.c``, compiled on the first call it serves.

Same layouts and results as :mod:`.chunked` (float32): the kernel vectorizes 8 channels per
register and walks the tokens sequentially, so it does ``L * N`` exponentials per channel and no
extra work, where the chunked scan does ``log2(chunk)`` times more. Probing (:func:`why_not`) compiles
nothing; the library is built by the first call (:func:`load`) and cached on disk like the
neighborhood-attention kernel (:mod:`visattn.backends.cpu.build`).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from ..backends.cpu import build

__all__ = ["backward", "forward", "load", "why_not"]

#: Blocks of 8 channels per backward work item: each item reduces its blocks' dB, dC once per chunk.
_SLICE = 4


class _Args(ctypes.Structure):
    """Mirror of ``ss_args`` in ``selective_scan.c`` (same order, same types)."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("u", "delta", "z", "bias", "Dskip", "A", "Bm", "Cm")]
                + [("sB", ctypes.c_int64 * 4), ("sC", ctypes.c_int64 * 4)]
                + [(n, ctypes.c_void_p) for n in ("out", "last", "states", "dout", "dlast", "du", "ddelta", "dz", "dA",
                                                  "dDskip", "dbias", "dB", "dC")]
                + [(n, ctypes.c_int64) for n in ("batch", "L", "D", "N", "G", "chunk", "slice")]
                + [(n, ctypes.c_int) for n in ("softplus", "nthreads")])


def _declare(lib: ctypes.CDLL) -> None:
    lib.ss_run.argtypes = [ctypes.POINTER(_Args), ctypes.c_int]
    lib.ss_run.restype = ctypes.c_int


_KERNEL = build.Kernel(Path(__file__).with_name("selective_scan.c"), _declare,
                       "selective scans use the portable torch path")


def why_not() -> Optional[str]:
    """Why the kernel cannot be used here, without building anything; ``None`` if it looks usable."""
    return _KERNEL.status()


def load() -> Optional[str]:
    """Build or load the kernel now; ``None`` on success, else why it failed (recorded for :func:`why_not`)."""
    return _KERNEL.library()[1]


def _dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """float32 with contiguous memory (``[batch, L, dim]`` views of channels-last memory need no copy)."""
    return None if t is None else t.float().contiguous()


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _args(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bg: torch.Tensor, Cg: torch.Tensor,
          D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], softplus: bool,
          chunk: int, **outputs: Optional[torch.Tensor]) -> tuple[_Args, list[torch.Tensor]]:
    """The kernel's argument struct, and the converted inputs it points into (keep them alive)."""
    u, delta, z, delta_bias, D = (_dense(t) for t in (u, delta, z, delta_bias, D))
    A_t, Bg, Cg = A.float().t().contiguous(), Bg.float(), Cg.float()  # A as [N, dim]; B, C: any strides
    batch, length, dim = u.shape
    args = _Args(*[_ptr(t) for t in (u, delta, z, delta_bias, D, A_t, Bg, Cg)],
                 (ctypes.c_int64 * 4)(*Bg.stride()), (ctypes.c_int64 * 4)(*Cg.stride()),
                 *[_ptr(outputs.get(n)) for n in ("out", "last", "states", "dout", "dlast", "du", "ddelta", "dz", "dA",
                                                   "dDskip", "dbias", "dB", "dC")],
                 batch, length, dim, A_t.shape[0], Bg.shape[1], chunk, _SLICE, int(softplus),
                 max(1, torch.get_num_threads()))
    return args, [u, delta, z, delta_bias, D, A_t, Bg, Cg]


def _run(args: _Args, pass_: int) -> None:
    lib = _KERNEL.lib
    assert lib is not None, "selective scan: the CPU kernel ran before it was loaded"
    code = lib.ss_run(ctypes.byref(args), pass_)
    if code == 1:
        raise MemoryError("selective scan: the CPU kernel could not allocate its per-thread scratch memory")
    assert code == 0, f"selective scan: ss_run(pass={pass_}) returned {code}"


def forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bg: torch.Tensor, Cg: torch.Tensor,
            D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], softplus: bool,
            chunk: int, save_states: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """:func:`visattn.scan.chunked.forward` on the kernel (float32)."""
    batch, length, dim = u.shape
    state = A.shape[1]
    out = u.new_empty(batch, length, dim, dtype=torch.float32)
    last = out.new_empty(batch, state, dim)
    states = out.new_empty(batch, -(-length // chunk), state, dim) if save_states else None
    args, _keep = _args(u, delta, A, Bg, Cg, D, z, delta_bias, softplus, chunk, out=out, last=last, states=states)
    _run(args, 0)
    return out, last, states


def backward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bg: torch.Tensor, Cg: torch.Tensor,
             D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], softplus: bool,
             states: torch.Tensor, dout: torch.Tensor, dlast: Optional[torch.Tensor], chunk: int
             ) -> tuple[Optional[torch.Tensor], ...]:
    """:func:`visattn.scan.chunked.backward` on the kernel (float32)."""
    batch, length, dim = u.shape
    groups, state = Bg.shape[1], A.shape[1]
    blocks = -(-(dim // groups) // 8)  # vectors of 8 channels per group
    slices = -(-blocks // _SLICE)
    rows = lambda: u.new_empty(batch, length, dim, dtype=torch.float32)  # noqa: E731
    du, ddelta = rows(), rows()
    dz = rows() if z is not None else None
    dA = du.new_empty(batch, state, dim)
    dD = du.new_empty(batch, dim) if D is not None else None
    dbias = du.new_empty(batch, dim) if delta_bias is not None else None
    dB = du.new_empty(slices, batch, groups, length, state)
    dC = torch.empty_like(dB)
    states, dout, dlast = _dense(states), _dense(dout), _dense(dlast)  # named: alive while the kernel runs
    args, _keep = _args(u, delta, A, Bg, Cg, D, z, delta_bias, softplus, chunk, states=states, dout=dout, dlast=dlast,
                        du=du, ddelta=ddelta, dz=dz, dA=dA, dDskip=dD, dbias=dbias, dB=dB, dC=dC)
    _run(args, 1)
    total = lambda t: t.sum(0) if t is not None else None  # noqa: E731 (per-batch partials)
    return (du, ddelta, dA.sum(0).t(), dB.sum(0).transpose(-1, -2), dC.sum(0).transpose(-1, -2), total(dD), dz,
            total(dbias))
