"""Time the fused CPU backends against the portable ``torch`` backend on five NA cases, forward and
forward + backward, plus optional peers (compiled FlexAttention, NATTEN), memory, model-level and
compile-cost checks.

Usage: ``python benchmarks/cpu_cases.py [--flex] [--natten] [--compile] [--memory] [--model] [--all]
[--threads N] [--budget S] [--backends NAME ...]``

The fused backends are every registered backend except ``reference`` (the oracle) and ``torch``
(the baseline) that can run on this CPU, unless ``--backends`` names some. Each case is one
:func:`visattn.bench.run_bench` run: every implementation is checked against the float64 oracle,
then all are timed together in alternating rounds (the machine may be shared: compare ratios within
a run). GFLOP/s use :func:`visattn.spec.na_flops` (backward counted as 2x forward).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import replace

import torch

from visattn import NeighborhoodAttention2D, neighborhood_attention
from visattn.backends import list_backends, select_backend, why_not
from visattn.bench import BenchProblem, BenchResult, Peer, run_bench
from visattn.bench.measure import (machine_info, matmul_peak_gflops, peak_extra_bytes, peak_rss_extra_bytes,
                                   time_interleaved)
from visattn.bench.peers import FlexAttention, Natten, VisattnBackend
from visattn.console import render_table

#: name -> problem; the first is ``visattn bench``'s default (NAT-Tiny's first stage)
CASES: dict[str, BenchProblem] = {
    "2-D 56x56 h4 d32 k7 (default)": BenchProblem(shape=(56, 56), heads=4, head_dim=32, kernel_size=7),
    "1-D L4096 h4 d64 k63": BenchProblem(shape=(4096,), heads=4, head_dim=64, kernel_size=63),
    "2-D 56x56 k7 dilation 4": BenchProblem(shape=(56, 56), heads=4, head_dim=32, kernel_size=7, dilation=4),
    "3-D 16x32x32 h4 d32 k5": BenchProblem(shape=(16, 32, 32), heads=4, head_dim=32, kernel_size=5),
    "2-D 56x56 k7 causal": BenchProblem(shape=(56, 56), heads=4, head_dim=32, kernel_size=7, is_causal=True),
}
BASELINE = "torch"


def fused_backends(requested: list[str] | None) -> list[str]:
    """The backends to time: ``requested``, or every registered one but the oracle and the baseline;
    those that cannot run a CPU problem here are dropped with the reason."""
    names = requested or [b for b in list_backends() if b not in ("reference", BASELINE)]
    probe = next(iter(CASES.values())).backend_problem()
    usable = []
    for name in names:
        reason = why_not(name, probe)
        if reason is None:
            usable.append(name)
        else:
            print(f"skipping {name}: {reason}")
    return usable


def run_case(problem: BenchProblem, backends: list[str], extra: list[Peer], budget: float, peak: float) -> BenchResult:
    peers = [VisattnBackend(BASELINE), *(VisattnBackend(b) for b in backends), *extra]
    return run_bench(problem, peers, budget_s=budget, peak_gflops=peak, measure_memory=False)


def case_table(results: dict[str, tuple[BenchResult, BenchResult]], backends: list[str]) -> str:
    """One line per (case, fused backend): forward and forward+backward ms, GFLOP/s, speed-up over torch."""
    def cells(result: BenchResult, name: str) -> list[str]:
        rows = {r.name: r for r in result.rows}
        row, base = rows[f"visattn {name}"], rows[f"visattn {BASELINE}"]
        if not row.timed:
            return ["-", "-", "-", f"{row.status}: {row.reason}"]
        speedup = f"{base.median_ms / row.median_ms:.1f}x" if base.timed else "-"
        wrong = "" if row.correct is not False else "WRONG vs oracle"
        return [f"{row.median_ms:.2f}", f"{row.gflops:.1f}", speedup, wrong]

    lines = []
    for case, (fwd, both) in results.items():
        for name in backends:
            f, b = cells(fwd, name), cells(both, name)
            lines.append([case, name, *f[:3], *b[:3], "; ".join(n for n in (f[3], b[3]) if n)])
    columns = ("case", "backend", "fwd ms", "GFLOP/s", f"x {BASELINE}", "f+b ms", "GFLOP/s", f"x {BASELINE}", "notes")
    return render_table(columns, lines, right={2, 3, 4, 5, 6, 7})


def peers_line(result: BenchResult, backends: list[str]) -> str:
    """How the fused backends compare with the outside peers of a run (FlexAttention, NATTEN)."""
    rows = {r.name: r for r in result.rows}
    out = []
    for peer in (r for r in result.rows if r.kind == "peer"):
        if not peer.timed:
            out.append(f"{peer.name}: {peer.status} ({peer.reason})")
            continue
        faster = ", ".join(f"{b} is {peer.median_ms / rows[f'visattn {b}'].median_ms:.1f}x faster"
                           for b in backends if rows[f"visattn {b}"].timed)
        out.append(f"{peer.name}: {peer.median_ms:.2f} ms" + (f", {faster}" if faster else ""))
    return "\n".join(out)


def memory_check(backend: str) -> None:
    """Peak extra memory of one call at 256x256: torch's allocations (what the tensors cost) and the
    process's resident memory (which also sees a kernel's native scratch)."""
    problem = BenchProblem(shape=(256, 256), heads=4, head_dim=32, kernel_size=7)
    q, k, v, grad_out = (t.requires_grad_(i < 3) for i, t in enumerate(problem.inputs()))
    kw = problem.na_kwargs()

    def forward():
        with torch.no_grad():
            return neighborhood_attention(q, k, v, **kw, backend=backend)

    def forward_backward():
        # gradients returned, not accumulated: a call's memory never nets out an earlier call's
        out = neighborhood_attention(q, k, v, **kw, backend=backend)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    forward_backward()  # warm-up: compilation, thread pools, allocator growth
    qkvo_mb = 4 * q.numel() * q.element_size() / 2**20

    def mb(nbytes):
        return "?" if nbytes is None else f"{nbytes / 2**20:.0f} MiB"

    print(f"\nmemory, {backend}, 2-D 256x256 h4 d32 k7: Q+K+V+O = {qkvo_mb:.0f} MiB; peak extra, torch allocations "
          f"(incl. the outputs/grads returned): forward {mb(peak_extra_bytes(forward, 'cpu'))}, forward+backward "
          f"{mb(peak_extra_bytes(forward_backward, 'cpu'))} (grads alone: {3 * qkvo_mb / 4:.0f} MiB); process "
          f"resident memory: forward {mb(peak_rss_extra_bytes(forward))}, forward+backward "
          f"{mb(peak_rss_extra_bytes(forward_backward))}")


def model_check(budget: float) -> None:
    """NeighborhoodAttention2D (k=7) vs Swin-style window attention with SDPA on 7x7 windows."""
    torch.manual_seed(0)
    dim, heads, size, win = 128, 4, 56, 7
    na = NeighborhoodAttention2D(dim, heads, kernel_size=win).eval()
    qkv, proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def swin(x):
        B, H, W, C = x.shape
        t = qkv(x).reshape(B, H // win, win, W // win, win, 3, heads, C // heads)
        t = t.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, -1, heads, win * win, C // heads)
        o = torch.nn.functional.scaled_dot_product_attention(t[0], t[1], t[2])
        o = o.reshape(B, H // win, W // win, heads, win, win, C // heads).permute(0, 1, 4, 2, 5, 3, 6)
        return proj(o.reshape(B, H, W, C))

    x = torch.randn(1, size, size, dim)
    chosen = select_backend(BenchProblem(shape=(size, size), heads=heads, head_dim=dim // heads,
                                         kernel_size=win).backend_problem()).name
    with torch.no_grad():
        timings = time_interleaved([lambda: na(x), lambda: swin(x)], "cpu", budget)
    for t in timings:
        if isinstance(t, Exception):
            raise t
    t_na, t_swin = (t.median for t in timings)
    print(f"\nmodel, 56x56x128 (4 heads), forward: NeighborhoodAttention2D k7 ({chosen}) {t_na * 1e3:.2f} ms, "
          f"Swin 7x7 windows + SDPA {t_swin * 1e3:.2f} ms, ratio {t_na / t_swin:.2f}x (target <= 1.3x)")


def compile_cost(backend: str) -> None:
    """First call in a fresh process with an empty kernel cache vs a filled one."""
    code = textwrap.dedent(f"""
        import time, torch
        t0 = time.perf_counter()
        from visattn import na2d
        q = torch.randn(1, 8, 8, 2, 8, requires_grad=True)
        na2d(q, q, q, 3, backend="{backend}").sum().backward()
        t1 = time.perf_counter()
        na2d(q, q, q, 3, backend="{backend}").sum().backward()
        print(f"{{t1 - t0:.2f}} {{time.perf_counter() - t1:.4f}}")
    """)
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "VISATTN_CACHE_DIR": d}  # where compiled CPU kernels are cached
        for label in ("cold cache", "warm cache"):
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            first, second = r.stdout.split() if r.returncode == 0 else ("?", "?")
            print(f"compile, {backend}, float32 forward+backward, {label}: first call {first} s (incl. imports), "
                  f"next call {second} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("flex", "natten", "compile", "memory", "model", "all"):
        ap.add_argument(f"--{flag}", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (the kernels follow them)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per implementation and case")
    ap.add_argument("--backends", nargs="+", default=None,
                    help="fused backends to time (default: every registered one but reference and torch)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = fused_backends(args.backends)
    peak = matmul_peak_gflops(torch.float32, "cpu")
    m = machine_info("cpu")
    print(f"{m['cpu']}, {m['threads']} torch threads, torch {m['torch']}; fp32 matmul peak {peak:.0f} GFLOP/s "
          f"(measured now)")
    extra: list[Peer] = []
    if args.flex or args.all:
        extra.append(FlexAttention(compiled=True))
    if args.natten or args.all:
        extra.append(Natten())
    results, default = {}, None
    for i, (name, problem) in enumerate(CASES.items()):
        # The outside peers run the default case's forward only (none has a CPU backward).
        fwd = run_case(problem, backends, extra if i == 0 else [], args.budget, peak)
        both = run_case(replace(problem, backward=True), backends, [], args.budget, peak)
        results[name] = (fwd, both)
        default = default or fwd
    print()
    print(case_table(results, backends))
    if extra:
        print("\ndefault case, forward: " + peers_line(default, backends))
    for b in backends:
        if args.memory or args.all:
            memory_check(b)
        if args.compile or args.all:
            compile_cost(b)
    if args.model or args.all:
        model_check(args.budget)


if __name__ == "__main__":
    main()
