"""Time the fused CPU backends (``cpu_c`` in C, ``cpu`` in numba) against the portable ``torch``
backend (and, optionally, compiled FlexAttention and NATTEN) on the cases of issue 3, plus memory,
model-level and compile-cost checks.

Usage: ``python benchmarks/cpu_cases.py [--flex] [--natten] [--compile] [--memory] [--model] [--all]
[--threads N] [--backends cpu_c cpu]``

Every ratio is measured in the same run (the machine may be shared: medians of repeated runs).
Effective GFLOP/s use :func:`visattn.spec.na_flops` (backward counted as 2x forward).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from visattn import NeighborhoodAttention2D, neighborhood_attention
from visattn.spec import make_spec, na_flops, neighbor_table


@dataclass
class Bench:
    name: str
    spatial: tuple
    heads: int
    dim: int
    kernel: tuple
    dilation: tuple = ()
    causal: tuple = ()

    def kwargs(self) -> dict:
        r = len(self.spatial)
        return dict(kernel_size=self.kernel, dilation=self.dilation or (1,) * r, is_causal=self.causal or (False,) * r)

    def flops(self) -> int:
        kw = self.kwargs()
        return na_flops(make_spec("bench", self.spatial, kw["kernel_size"], 1, kw["dilation"], kw["is_causal"]),
                        1, self.heads, self.dim)


CASES = [
    Bench("2-D 56x56 h4 d32 k7 (default)", (56, 56), 4, 32, (7, 7)),
    Bench("1-D L4096 h4 d64 k63", (4096,), 4, 64, (63,)),
    Bench("2-D 56x56 k7 dilation 4", (56, 56), 4, 32, (7, 7), (4, 4)),
    Bench("3-D 16x32x32 h4 d32 k5", (16, 32, 32), 4, 32, (5, 5, 5)),
    Bench("2-D 56x56 k7 causal", (56, 56), 4, 32, (7, 7), (), (True, True)),
]


def timeit(fn: Callable[[], object], min_runs: int = 5, budget_s: float = 2.0) -> float:
    """Median seconds of ``fn`` after one warm-up, at least ``min_runs`` runs or ``budget_s``."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def matmul_peak() -> float:
    """Measured fp32 GEMM GFLOP/s on this machine (1024^3, torch's threads)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024 ** 3 / timeit(lambda: a @ b, 10, 1.0) / 1e9


def inputs(c: Bench, grad: bool):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, *c.spatial, c.heads, c.dim, generator=g).requires_grad_(grad) for _ in range(3)]


def run_na(c: Bench, backend: str, backward: bool) -> float:
    q, k, v = inputs(c, backward)
    grad_out = torch.randn_like(q)

    def step():
        out = neighborhood_attention(q, k, v, **c.kwargs(), backend=backend)
        if backward:
            # autograd.grad with a ready gradient: no .sum() backward copy, no accumulation into
            # .grad, so only the operator's own work is timed.
            torch.autograd.grad(out, (q, k, v), grad_out)

    return timeit(step)


def flex_forward(c: Bench) -> Optional[float]:
    """Compiled FlexAttention with a NATTEN-style mask built from the same neighbour table."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    kw = c.kwargs()
    spec = make_spec("flex", c.spatial, kw["kernel_size"], 1, kw["dilation"], kw["is_causal"])
    index, valid, _ = neighbor_table(spec)
    n = spec.num_tokens
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[torch.arange(n)[:, None].expand_as(index)[valid], index[valid]] = True

    def mask_mod(b, h, qi, ki):
        return allowed[qi, ki]

    block = create_block_mask(mask_mod, None, None, n, n, device="cpu")
    fn = torch.compile(flex_attention)
    q, k, v = (t.reshape(1, n, c.heads, c.dim).transpose(1, 2).contiguous() for t in inputs(c, False))
    return timeit(lambda: fn(q, k, v, block_mask=block))


def natten_forward(c: Bench) -> Optional[float]:
    try:
        import natten
    except ImportError:
        return None
    q, k, v = inputs(c, False)
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(c.spatial)]
    kw = c.kwargs()
    return timeit(lambda: fn(q, k, v, kernel_size=kw["kernel_size"], dilation=kw["dilation"],
                             is_causal=kw["is_causal"]), min_runs=3, budget_s=1.0)


def peak_extra_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory above the level before ``fn`` (Linux: resets the high-water mark)."""
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    fn()
    return (status("VmHWM:") - before) / 2 ** 20


def memory_check(backend: str) -> None:
    c = Bench("2-D 256x256 h4 d32 k7", (256, 256), 4, 32, (7, 7))
    q, k, v = inputs(c, True)
    neighborhood_attention(q, k, v, **c.kwargs(), backend=backend).sum().backward()  # warm
    q.grad = k.grad = v.grad = None
    out_mb = 4 * q.numel() * q.element_size() / 2 ** 20
    fwd = peak_extra_mb(lambda: neighborhood_attention(q, k, v, **c.kwargs(), backend=backend))
    grad_out = torch.randn(q.shape)

    def fwd_bwd():
        neighborhood_attention(q, k, v, **c.kwargs(), backend=backend).backward(grad_out)

    both = peak_extra_mb(fwd_bwd)
    print(f"\nmemory, {backend}, {c.name}: Q+K+V+O = {out_mb:.0f} MiB; peak extra (incl. the outputs/grads it "
          f"returns): forward {fwd:.0f} MiB, forward+backward {both:.0f} MiB (grads alone: {3 * out_mb / 4:.0f} MiB)")


def model_check() -> None:
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
    from visattn.backends import Problem, select_backend

    chosen = select_backend(Problem(spec=make_spec("na2d", (size, size), win), batch=1, heads=heads, heads_kv=heads,
                                    dim=dim // heads, dim_v=dim // heads, dtype=x.dtype, device=x.device,
                                    scale=1.0)).name
    with torch.no_grad():
        t_na, t_swin = timeit(lambda: na(x)), timeit(lambda: swin(x))
        t_na = min(t_na, timeit(lambda: na(x)))
    print(f"\nmodel, 56x56x128 (4 heads), forward: NeighborhoodAttention2D k7 ({chosen}) {t_na * 1e3:.2f} ms, "
          f"Swin 7x7 windows + SDPA {t_swin * 1e3:.2f} ms, ratio {t_na / t_swin:.2f}x (target <= 1.3x)")


def compile_cost(backend: str) -> None:
    """First call in a fresh process with an empty kernel cache vs a filled one."""
    import tempfile

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
        env = {**os.environ, "NUMBA_CACHE_DIR": d, "VISATTN_CACHE_DIR": d}
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
    ap.add_argument("--backends", nargs="+", default=["cpu_c", "cpu"], help="fused backends to time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from visattn.backends import why_not

    fused = [b for b in args.backends if why_not(b) is None]
    for b in set(args.backends) - set(fused):
        print(f"skipping {b}: {why_not(b)}")
    peak = matmul_peak()
    print(f"torch threads {torch.get_num_threads()}, fp32 matmul peak {peak:.0f} GFLOP/s (measured now)")
    print(f"{'case':<32}{'backend':>8}{'fwd':>10}{'GF/s':>7}{'torch fwd':>11}{'x':>6}{'f+b':>10}{'GF/s':>7}"
          f"{'torch f+b':>11}{'x':>6}")
    default_fwd = {}
    for c in CASES:
        f = c.flops()
        tf, tb = run_na(c, "torch", False), run_na(c, "torch", True)
        for b in fused:
            cf, cb = run_na(c, b, False), run_na(c, b, True)
            print(f"{c.name:<32}{b:>8}{cf * 1e3:>8.2f}ms{f / cf / 1e9:>7.1f}{tf * 1e3:>9.2f}ms{tf / cf:>6.1f}"
                  f"{cb * 1e3:>8.2f}ms{3 * f / cb / 1e9:>7.1f}{tb * 1e3:>9.2f}ms{tb / cb:>6.1f}")
            if c is CASES[0]:
                default_fwd[b] = cf

    def ours(t: float) -> str:
        return ", ".join(f"{b} is {t / x:.1f}x faster" for b, x in default_fwd.items())

    if args.flex or args.all:
        t = flex_forward(CASES[0])
        print("\ncompiled FlexAttention, default case: " + ("unavailable" if t is None else
              f"{t * 1e3:.2f} ms, " + ours(t)))
    if args.natten or args.all:
        t = natten_forward(CASES[0])
        print("NATTEN, default case: " + ("not installed" if t is None else
              f"{t * 1e3:.1f} ms, " + ours(t)))
    for b in fused:
        if args.memory or args.all:
            memory_check(b)
        if args.compile or args.all:
            compile_cost(b)
    if args.model or args.all:
        model_check()


if __name__ == "__main__":
    main()
