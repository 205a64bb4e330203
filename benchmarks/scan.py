"""Time :func:`visattn.selective_scan` against the sequential reference and ``mambapy``'s parallel scan,
forward and forward + backward, in one process.

Usage: ``python benchmarks/scan.py [--lengths 3136 12544] [--dtypes float32 bfloat16] [--batch 2]
[--dim 192] [--state 16] [--budget S] [--threads N] [--no-reference-above L] [--json PATH]``

Problem: ``u, delta [batch, dim, L]`` channels-last in memory (a mixer's layout),
``A [dim, N] < 0``, ``B, C [batch, N, L]``, ``D`` and ``delta_bias [dim]``, ``delta_softplus=True``, no
``z`` (``mambapy``'s scan has no gate). Every implementation computes ``softplus(delta + bias)`` and the
``D`` skip inside its timed call. Rows:

* ``visattn cpu``: the fused C kernel; ``visattn torch``: the portable chunked scan;
* ``sequential``: :func:`visattn.scan.selective_scan_reference`, one step per token (autograd for the
  backward) -- what a CPU user of ``mamba-ssm`` falls back to;
* ``mambapy``: ``mambapy.pscan`` (Blelloch scan over ``[batch, L, dim, N]``, sequence padded to a power
  of two), wrapped as ``mambapy.mamba.MambaBlock.selective_scan`` does; ``pip install mambapy``.

Each row is checked against the sequential reference run in float64 (max abs error of the output), then
all rows are timed together in alternating rounds (the machine may be shared: compare ratios within a
run), then their peak extra memory is measured (torch allocations; the C kernel's per-thread scratch,
O(chunk * N) vectors, is not seen).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from visattn import selective_scan
from visattn.bench.measure import machine_info, peak_extra_bytes, time_interleaved
from visattn.console import render_table
from visattn.scan import selective_scan_reference
from visattn.scan.ops import why_not


def make_problem(batch: int, dim: int, state: int, length: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = lambda: torch.randn(batch, length, dim, generator=g).to(dtype).transpose(1, 2)  # noqa: E731
    return dict(u=rows(), delta=rows() * 0.5 - 1.0, A=-torch.rand(dim, state, generator=g) * 4 - 0.1,
                B=torch.randn(batch, state, length, generator=g).to(dtype),
                C=torch.randn(batch, state, length, generator=g).to(dtype), D=torch.randn(dim, generator=g),
                delta_bias=torch.randn(dim, generator=g) * 0.1)


def mambapy_scan() -> Optional[Callable]:
    """``mambapy``'s selective scan with this benchmark's arguments, or ``None`` if not installed."""
    try:
        from mambapy.mamba import MambaBlock
    except ImportError:
        return None

    def run(u, delta, A, B, C, D, delta_bias):
        # all in the input dtype (mambapy has no mixed precision); softplus as its block applies it
        dt = F.softplus(delta + delta_bias.to(delta.dtype)[:, None])
        # MambaBlock.selective_scan uses nothing of the block: it is called with its own layouts
        y = MambaBlock.selective_scan(None, u.transpose(1, 2), dt.transpose(1, 2), A.to(u.dtype), B.transpose(1, 2),
                                      C.transpose(1, 2), D.to(u.dtype))
        return y.transpose(1, 2)

    return run


def implementations() -> dict[str, Callable]:
    impls = {}
    for backend in ("cpu", "torch"):
        reason = why_not(backend, torch.device("cpu"), torch.float32)
        if reason is None:
            impls[f"visattn {backend}"] = functools.partial(selective_scan, delta_softplus=True, backend=backend)
        else:
            print(f"skipping visattn {backend}: {reason}", file=sys.stderr)
    impls["sequential"] = lambda **a: selective_scan_reference(**a, delta_softplus=True)
    peer = mambapy_scan()
    if peer is None:
        print("skipping mambapy: not installed (pip install mambapy)", file=sys.stderr)
    else:
        impls["mambapy"] = lambda **a: peer(**a)
    return impls


def call(fn: Callable, args: dict, backward: bool) -> Callable[[], object]:
    if not backward:
        def forward():
            with torch.no_grad():
                return fn(**args)
        return forward
    leaves = {k: v.detach().requires_grad_() for k, v in args.items()}
    names = [k for k in ("u", "delta", "B", "C") if k in leaves]

    def forward_backward():
        out = fn(**leaves)
        return torch.autograd.grad(out.float().sum(), [leaves[k] for k in names])
    return forward_backward


def run_case(length: int, dtype: torch.dtype, backward: bool, opts) -> list[dict]:
    args = make_problem(opts.batch, opts.dim, opts.state, length, dtype)
    impls = implementations()
    if opts.no_reference_above and length > opts.no_reference_above:
        impls.pop("sequential")
    want = selective_scan_reference(**{k: v.double() for k, v in args.items()}, delta_softplus=True)
    rows, fns = [], []
    for name, fn in impls.items():
        with torch.no_grad():
            err = (fn(**args).double() - want).abs().max().item()
        rows.append(dict(impl=name, L=length, dtype=str(dtype).replace("torch.", ""),
                         mode="fwd+bwd" if backward else "fwd", max_err=err))
        fns.append(call(fn, args, backward))
    timings = time_interleaved(fns, "cpu", opts.budget)
    for row, timing, fn in zip(rows, timings, fns):
        if isinstance(timing, Exception):
            row["ms"] = None
            row["note"] = f"{type(timing).__name__}: {timing}"
            continue
        row["ms"] = timing.median * 1e3
        peak = peak_extra_bytes(fn, "cpu")
        row["peak_mb"] = None if peak is None else peak / 2**20
    fastest_visattn = min((r["ms"] for r in rows if r["impl"].startswith("visattn") and r["ms"]), default=None)
    for row in rows:
        row["visattn_x"] = fastest_visattn and row["ms"] and row["ms"] / fastest_visattn
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[56 * 56, 112 * 112])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per implementation")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-reference-above", type=int, default=None, help="skip the sequential loop above this L")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--json", default=None)
    opts = p.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    print(machine_info("cpu"))
    print(f"batch {opts.batch}, dim {opts.dim}, N {opts.state}, softplus + delta_bias + D, no z")
    results = []
    for length in opts.lengths:
        for dtype in opts.dtypes:
            for mode in opts.modes:
                rows = run_case(length, getattr(torch, dtype), mode == "fwd+bwd", opts)
                results += rows
                print(render_table(
                    ["impl", "L", "dtype", "mode", "max err vs fp64", "ms", "x visattn", "peak MB"],
                    [[r["impl"], str(r["L"]), r["dtype"], r["mode"], f"{r['max_err']:.1e}",
                      f"{r['ms']:.1f}" if r.get("ms") else r.get("note", "-"),
                      f"{r['visattn_x']:.1f}" if r.get("visattn_x") else "-",
                      f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else "-"] for r in rows],
                    right=range(1, 8)), flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(machine=machine_info("cpu"), rows=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
