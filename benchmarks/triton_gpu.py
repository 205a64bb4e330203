"""Check and time the Triton backend against its GPU peers, in one run; prints a table.

Usage (on a machine with a CUDA GPU)::

    python benchmarks/triton_gpu.py            # the target shapes below
    python benchmarks/triton_gpu.py --quick    # smaller shapes, a smoke run
    python benchmarks/triton_gpu.py --only 2d_na_k13 --dtypes float16

The first run of each shape autotunes (3 tiles x 2 warp counts per kernel, three kernels: a few
minutes for all problems on a 16-core host); Triton caches compiled kernels and tuning results on
disk, so split a first run with ``--only`` if a time limit applies, or set
``VISATTN_TRITON_AUTOTUNE=0`` for a quick untuned run.

For each problem (2-D NA 128x128 k=13, 3-D NA 16x32x32 k=7, the blocked case stride = kernel, and
DiNA k=7 dilation 4) and dtype (fp16, bf16) it

1. checks ``backend="triton"`` against ``backend="torch"`` in float32 (itself tested against the
   oracle): output, LSE and dQ/dK/dV with a gradient flowing into the LSE, reporting the max error;
2. runs :func:`visattn.bench.run_bench` forward and forward+backward on the Triton backend,
   ``torch.compile``'d FlexAttention with the exact NA block mask (:mod:`visattn.bench.peers`) and
   dense SDPA over all tokens (the FLOP/s ceiling: FlashAttention on H100): outputs and gradients
   checked against the float64 oracle when it fits ``--max-gb``, all timed together in alternating
   rounds;
3. prints ms, effective TFLOP/s (NA FLOPs = 4 * tokens * prod(kernel) * D * H, backward counted
   2x, the same numerator for every row) and Triton's speed-up over FlexAttention.

Targets: fwd and fwd+bwd >= 1.5x FlexAttention on the 2-D and 3-D cases; forward TFLOP/s >= 50 % of
SDPA's on the blocked case (SDPA's dense FLOPs, N / prod(kernel) times the NA numerator).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from visattn import neighborhood_attention
from visattn.bench import BenchProblem, BenchResult, run_bench
from visattn.bench.measure import machine_info
from visattn.bench.peers import DenseSDPA, FlexAttention, VisattnBackend
from visattn.console import render_table

BATCH, HEADS, DIM = 1, 8, 64
PROBLEMS = {
    "2d_na_k13": dict(shape=(128, 128), kernel_size=13),
    "3d_na_k7": dict(shape=(16, 32, 32), kernel_size=7),
    "2d_blocked_k16": dict(shape=(128, 128), kernel_size=16, stride=16),
    "2d_dina_k7_d4": dict(shape=(128, 128), kernel_size=7, dilation=4),
}
QUICK = {
    "2d_na_k7": dict(shape=(32, 32), kernel_size=7),
    "3d_na_k3": dict(shape=(8, 8, 8), kernel_size=3),
}

# Error allowed against the fp32 result (max abs error / max(1, max |reference|), inputs ~N(0, 1)):
# half-precision rounding of the inputs, of P before the PV product, and of the outputs.
CHECK_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 1e-4}


def check(problem: BenchProblem) -> dict:
    """Error of Triton (``problem.dtype``) vs the torch backend (float32): out, LSE, dQ/dK/dV."""
    kw = problem.na_kwargs()
    q, k, v = (t.requires_grad_() for t in problem.inputs()[:3])
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out, lse = neighborhood_attention(q, k, v, **kw, backend="triton", return_lse=True)
    r_out, r_lse = neighborhood_attention(*ref, **kw, backend="torch", return_lse=True)
    d_out = torch.randn_like(r_out)
    grads = torch.autograd.grad((out.float() * d_out).sum() + lse.sum(), (q, k, v))
    r_grads = torch.autograd.grad((r_out * d_out).sum() + r_lse.sum(), ref)

    def err(a, b):  # max abs error, relative to the largest reference value when that exceeds 1
        return ((a.float() - b).abs().max() / b.abs().max().clamp(min=1)).item()

    errs = {"out": err(out, r_out), "lse": err(lse, r_lse)}
    for name, a, b in zip(("dq", "dk", "dv"), grads, r_grads):
        errs[name] = err(a, b)
    return errs


def rows_of(name: str, fwd: BenchResult, both: BenchResult) -> list[list[str]]:
    """Table lines of one problem and dtype: one per implementation, forward and forward+backward."""
    dtype = str(fwd.problem.dtype).replace("torch.", "")
    by_name = [{r.name: r for r in result.rows} for result in (fwd, both)]
    flex = [rows.get("flex compiled") for rows in by_name]
    out = []
    for impl in by_name[0]:
        cells, notes = [name, dtype, impl], []
        for rows, fl in zip(by_name, flex):
            r = rows[impl]
            if not r.timed:
                cells += ["-", "-", "-"]
                notes.append(f"{r.status}: {r.reason}")
                continue
            vs_flex = f"{fl.median_ms / r.median_ms:.2f}" if fl is not None and fl.timed else "-"
            cells += [f"{r.median_ms:.3f}", f"{r.gflops / 1e3:.1f}", vs_flex]
            if r.correct is False:
                notes.append("WRONG vs the float64 oracle")
        forward = by_name[0][impl]
        if forward.kind == "dense" and forward.timed:  # the blocked-case target compares SDPA's dense work
            spec = fwd.problem.spec
            notes.append(f"dense work: {forward.gflops * spec.num_tokens / spec.window_size / 1e3:.1f} TF/s fwd")
        out.append(cells + ["; ".join(dict.fromkeys(notes))])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per implementation")
    ap.add_argument("--max-gb", type=float, default=16.0,
                    help="memory an implementation (or the float64 oracle, per head) may need before it is skipped")
    ap.add_argument("--only", nargs="*", help=f"problem names to run ({', '.join([*PROBLEMS, *QUICK])})")
    ap.add_argument("--dtypes", nargs="*", default=["float16", "bfloat16"], choices=["float16", "bfloat16", "float32"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_gpu.py: no CUDA GPU here; nothing to time.")
        return 1
    problems = QUICK if args.quick else PROBLEMS
    if args.only:
        problems = {k: v for k, v in problems.items() if k in args.only}
    m = machine_info("cuda")
    print(f"device: {m['gpu']}  torch {m['torch']}  B={BATCH} H={HEADS} D={DIM}")
    peers = [VisattnBackend("triton"), FlexAttention(compiled=True), DenseSDPA()]
    table = []
    for name, window in problems.items():
        for dtype in (getattr(torch, d) for d in args.dtypes):
            problem = BenchProblem(**window, batch=BATCH, heads=HEADS, head_dim=DIM, dtype=dtype, device="cuda")
            errs = check(problem)
            verdict = "ok" if max(errs.values()) <= CHECK_TOL[dtype] else "MISMATCH"
            print(f"check {name:<16} {str(dtype).split('.')[-1]:<9} {verdict:<8} err vs torch fp32: "
                  + " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
            fwd, both = (run_bench(replace(problem, backward=backward), peers, budget_s=args.budget,
                                   max_bytes=args.max_gb * 2**30) for backward in (False, True))
            table += rows_of(name, fwd, both)
    print()
    print(render_table(("problem", "dtype", "impl", "fwd ms", "fwd TF/s", "fwd x flex", "f+b ms", "f+b TF/s",
                        "f+b x flex", "notes"), table, right={3, 4, 5, 6, 7, 8}))
    from visattn.backends import triton_na

    for key, tuner in triton_na._AUTOTUNED.items():
        best = getattr(tuner, "best_config", None)
        print(f"autotune {key}: last best {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
