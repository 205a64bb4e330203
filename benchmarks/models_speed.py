"""Inference throughput of NAT/DiNAT against the same networks with dense global attention.

    python benchmarks/models_speed.py [--models nat_tiny dinat_tiny] [--batch-sizes 1 8] [--size 224]
                                      [--budget 10] [--max-reps 20] [--backend NAME] [--json out.json]

For each model and batch size it times ``model(x)`` (eval, ``torch.no_grad``, fp32, random weights)
with neighborhood attention (``attn_type="na"``, the paper) and with every attention layer replaced
by dense SDPA over all tokens (``attn_type="global"``, same weights otherwise). The two variants are
timed together by :func:`visattn.bench.measure.time_interleaved` (alternating rounds, so machine load
hits both alike, each getting the calls that fit ``--budget`` seconds); the table reports images/s
from the median and from the fastest call (on a shared machine the fastest call is the better
estimate of what the hardware does) and the NA/global ratio of each. GMACs are from
:func:`visattn.count_flops`.
"""

from __future__ import annotations

import argparse
import json

import torch

from visattn import count_flops, create_model
from visattn.bench.measure import machine_info, time_interleaved
from visattn.console import render_table

KINDS = ("na", "global")


def bench(name: str, batch: int, size: int, budget: float, max_reps: int, backend: str | None) -> dict:
    torch.manual_seed(0)
    models = {kind: create_model(name, attn_type=kind, **({"backend": backend} if backend and kind == "na" else {}))
              .eval() for kind in KINDS}
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        timings = time_interleaved([lambda m=m: m(x) for m in models.values()], "cpu", budget, max_reps=max_reps)
    row = dict(model=name, batch=batch, size=size)
    for (kind, m), timing in zip(models.items(), timings):
        if isinstance(timing, Exception):
            raise timing
        row[f"{kind}_img_s"] = batch / timing.median
        row[f"{kind}_best_img_s"] = batch / min(timing.times)
        row[f"{kind}_ms"] = 1e3 * timing.median
        row[f"{kind}_calls"] = len(timing.times)
        row[f"{kind}_gmacs"] = count_flops(m, x[:1]) / 1e9
    row["speedup"] = row["na_img_s"] / row["global_img_s"]
    row["best_speedup"] = row["na_best_img_s"] / row["global_best_img_s"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["nat_tiny", "dinat_tiny"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--budget", type=float, default=10.0, help="seconds of timed calls per variant (default 10)")
    p.add_argument("--max-reps", type=int, default=20, help="at most this many timed calls per variant")
    p.add_argument("--backend", default=None, help="force a visattn backend for the NA layers")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()

    m = machine_info("cpu")
    print(f"{m['cpu']}, {m['threads']} torch threads, torch {m['torch']}, fp32, {args.size}x{args.size}, "
          f"images/s from the median | the fastest call")
    rows = []
    for name in args.models:
        for batch in args.batch_sizes:
            rows.append(bench(name, batch, args.size, args.budget, args.max_reps, args.backend))
    cells = [[r["model"], str(r["batch"]), f"{r['na_img_s']:.2f} | {r['na_best_img_s']:.2f}",
              f"{r['global_img_s']:.2f} | {r['global_best_img_s']:.2f}",
              f"{r['speedup']:.2f}x | {r['best_speedup']:.2f}x", f"{r['na_gmacs']:.2f}", f"{r['global_gmacs']:.2f}",
              f"{r['na_calls']} / {r['global_calls']}"] for r in rows]
    print(render_table(("model", "batch", "NA img/s", "global img/s", "NA/global", "NA GMACs", "global GMACs",
                        "calls NA / global"), cells, right={1, 2, 3, 4, 5, 6}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
