"""Build, check and time the Triton backend against its GPU peers, in one run; prints a table.

Usage (on a machine with a CUDA GPU)::

    PYTHONPATH=src python benchmarks/triton_gpu.py            # the issue's target shapes
    PYTHONPATH=src python benchmarks/triton_gpu.py --quick    # smaller shapes, a smoke run
    PYTHONPATH=src python benchmarks/triton_gpu.py --only 2d_na_k13 --dtypes float16

The first run of each shape autotunes (3 tiles x 2 warp counts per kernel, three kernels: a few
minutes for all problems on a 16-core host); Triton caches compiled kernels and tuning results on
disk, so split a first run with ``--only`` if a time limit applies, or set
``VISATTN_TRITON_AUTOTUNE=0`` for a quick untuned run.

For each problem (the issue's targets: 2-D NA 128x128 k=13, 3-D NA 16x32x32 k=7, and the blocked
case stride = kernel) and dtype (fp16, bf16) it

1. checks ``backend="triton"`` against ``backend="torch"`` in float32 (itself tested against the
   oracle): output, LSE and dQ/dK/dV, reporting the max abs error;
2. times forward and forward+backward (median of CUDA-event timings) of: the Triton backend,
   ``torch.compile``'d FlexAttention with a NATTEN ``mask_mod`` built from the same window rules,
   and dense SDPA over all tokens (the FLOP/s ceiling: FlashAttention on H100);
3. prints ms, effective TFLOP/s (NA FLOPs = 4 * tokens * prod(kernel) * D * H, backward counted
   2x; SDPA counts its dense FLOPs) and Triton's speed-up over FlexAttention.

Targets from the issue: fwd and fwd+bwd >= 1.5x FlexAttention on the 2-D and 3-D cases; forward
TFLOP/s >= 50 % of SDPA's on the blocked case.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
import torch.nn.functional as F

from visattn import neighborhood_attention
from visattn.spec import make_spec, na_flops, spec_windows

PROBLEMS = {
    "2d_na_k13": dict(spatial=(128, 128), kernel_size=(13, 13), stride=(1, 1), dilation=(1, 1)),
    "3d_na_k7": dict(spatial=(16, 32, 32), kernel_size=(7, 7, 7), stride=(1, 1, 1), dilation=(1, 1, 1)),
    "2d_blocked_k16": dict(spatial=(128, 128), kernel_size=(16, 16), stride=(16, 16), dilation=(1, 1)),
    "2d_dina_k7_d4": dict(spatial=(128, 128), kernel_size=(7, 7), stride=(1, 1), dilation=(4, 4)),
}
QUICK = {
    "2d_na_k7": dict(spatial=(32, 32), kernel_size=(7, 7), stride=(1, 1), dilation=(1, 1)),
    "3d_na_k3": dict(spatial=(8, 8, 8), kernel_size=(3, 3, 3), stride=(1, 1, 1), dilation=(1, 1, 1)),
}
BATCH, HEADS, DIM = 1, 8, 64


def cuda_time(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` CUDA-event-timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def natten_mask_mod(problem: dict, device: torch.device):
    """A FlexAttention ``mask_mod`` that allows exactly the neighbourhoods of :mod:`visattn.spec`."""
    spec = make_spec("bench", problem["spatial"], problem["kernel_size"], problem["stride"], problem["dilation"])
    wins = spec_windows(spec)
    lo = [w.lo.to(device) for w in wins]
    hi = [w.hi.to(device) for w in wins]
    dil = spec.dilation
    sizes = spec.spatial
    strides = [math.prod(sizes[a + 1:]) for a in range(len(sizes))]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        for a in range(len(sizes)):
            xq = (q_idx // strides[a]) % sizes[a]
            xk = (kv_idx // strides[a]) % sizes[a]
            t = xk // dil[a]
            inside = (xq % dil[a] == xk % dil[a]) & (t >= lo[a][xq]) & (t <= hi[a][xq])
            ok = inside if ok is None else ok & inside
        return ok

    return mask_mod, spec


def make_inputs(problem: dict, dtype: torch.dtype, device: str = "cuda"):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (BATCH, *problem["spatial"], HEADS, DIM)
    return [torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]


# Error allowed against the fp32 result (max abs error / max(1, max |reference|), inputs ~N(0, 1)):
# half-precision rounding of the inputs, of P before the PV product, and of the outputs.
CHECK_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 1e-4}


def check(problem: dict, dtype: torch.dtype) -> dict:
    """Error of Triton (``dtype``) vs the torch backend (float32): out, LSE, dQ/dK/dV."""
    kw = {k: problem[k] for k in ("kernel_size", "stride", "dilation")}
    q, k, v = make_inputs(problem, dtype)
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


def bench(name: str, problem: dict, dtype: torch.dtype, reps: int) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kw = {k: problem[k] for k in ("kernel_size", "stride", "dilation")}
    q, k, v = make_inputs(problem, dtype)
    spec = make_spec("bench", problem["spatial"], **kw)
    flops = na_flops(spec, BATCH, HEADS, DIM)
    N = spec.num_tokens
    rows = []

    def record(impl, fwd, fwdbwd, fwd_flops):
        t_f = cuda_time(fwd, reps)
        t_fb = cuda_time(fwdbwd, reps) if fwdbwd is not None else float("nan")
        rows.append(dict(problem=name, dtype=str(dtype).split(".")[-1], impl=impl, fwd_ms=t_f, fwdbwd_ms=t_fb,
                         fwd_tflops=fwd_flops / t_f / 1e9, fwdbwd_tflops=3 * fwd_flops / t_fb / 1e9))

    def triton_fwd():
        return neighborhood_attention(q, k, v, **kw, backend="triton")

    def triton_fwdbwd():
        neighborhood_attention(q, k, v, **kw, backend="triton").sum().backward()

    triton_fwdbwd()  # compiles and autotunes the three kernels outside the timed region
    record("triton", torch.no_grad()(triton_fwd), triton_fwdbwd, flops)

    mask_mod, _ = natten_mask_mod(problem, q.device)
    block_mask = create_block_mask(mask_mod, None, None, N, N, device="cuda")
    flex = torch.compile(flex_attention)
    # FlexAttention's layout is [B, H, N, D].
    fq, fk, fv = (t.detach().reshape(BATCH, N, HEADS, DIM).transpose(1, 2).contiguous().requires_grad_()
                  for t in (q, k, v))

    def flex_fwd():
        with torch.no_grad():
            return flex(fq, fk, fv, block_mask=block_mask)

    def flex_fwdbwd():
        flex(fq, fk, fv, block_mask=block_mask).sum().backward()

    try:
        record("flex(compiled)", flex_fwd, flex_fwdbwd, flops)
        ref = flex(fq, fk, fv, block_mask=block_mask).transpose(1, 2).reshape(triton_fwd().shape)
        rows[-1]["max_err_vs_triton"] = (ref.float() - triton_fwd().float()).abs().max().item()
    except Exception as e:  # a peer that cannot run is reported, not hidden
        rows.append(dict(problem=name, dtype=str(dtype).split(".")[-1], impl="flex(compiled)", error=repr(e)[:120]))

    def sdpa_fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(fq, fk, fv)

    def sdpa_fwdbwd():
        F.scaled_dot_product_attention(fq, fk, fv).sum().backward()

    record("sdpa(dense)", sdpa_fwd, sdpa_fwdbwd, 4 * BATCH * HEADS * N * N * DIM)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", nargs="*", help=f"problem names to run ({', '.join([*PROBLEMS, *QUICK])})")
    ap.add_argument("--dtypes", nargs="*", default=["float16", "bfloat16"], choices=["float16", "bfloat16", "float32"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_gpu.py: no CUDA GPU here; nothing to time.")
        return 1
    problems = QUICK if args.quick else PROBLEMS
    if args.only:
        problems = {k: v for k, v in problems.items() if k in args.only}
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  B={BATCH} H={HEADS} D={DIM}")
    rows = []
    for name, problem in problems.items():
        for dtype in (getattr(torch, d) for d in args.dtypes):
            errs = check(problem, dtype)
            verdict = "ok" if max(errs.values()) <= CHECK_TOL[dtype] else "MISMATCH"
            print(f"check {name:<16} {str(dtype).split('.')[-1]:<9} {verdict:<8} err vs torch fp32: "
                  + " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
            rows += bench(name, problem, dtype, args.reps)
    print()
    print(f"{'problem':<16} {'dtype':<9} {'impl':<15} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} "
          f"{'f+b TF/s':>9} {'fwd x flex':>10} {'f+b x flex':>10}")
    by_key = {(r["problem"], r["dtype"], r["impl"]): r for r in rows}
    for r in rows:
        if "error" in r:
            print(f"{r['problem']:<16} {r['dtype']:<9} {r['impl']:<15} failed: {r['error']}")
            continue
        flex = by_key.get((r["problem"], r["dtype"], "flex(compiled)"), {})
        sf = flex.get("fwd_ms", float("nan")) / r["fwd_ms"]
        sfb = flex.get("fwdbwd_ms", float("nan")) / r["fwdbwd_ms"]
        print(f"{r['problem']:<16} {r['dtype']:<9} {r['impl']:<15} {r['fwd_ms']:8.3f} {r['fwd_tflops']:9.1f} "
              f"{r['fwdbwd_ms']:8.3f} {r['fwdbwd_tflops']:9.1f} {sf:10.2f} {sfb:10.2f}")
    from visattn.backends import triton_na

    for key, tuner in triton_na._AUTOTUNED.items():
        best = getattr(tuner, "best_config", None)
        print(f"autotune {key}: last best {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
