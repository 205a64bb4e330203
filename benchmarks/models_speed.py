"""Inference throughput of NAT/DiNAT against the same networks with dense global attention.

    PYTHONPATH=src python benchmarks/models_speed.py [--models nat_tiny dinat_tiny] [--batch-sizes 1 8]
                                                     [--size 224] [--repeats 5] [--backend NAME] [--json out.json]

For each model and batch size it times ``model(x)`` (eval, ``torch.no_grad``, fp32, random weights)
with neighborhood attention (``attn_type="na"``, the paper) and with every attention layer replaced
by dense SDPA over all tokens (``attn_type="global"``, same weights otherwise). The two variants are
timed alternately, so machine load hits both alike; the table reports images/s from the median
and from the fastest run (on a shared machine the fastest run is the better estimate of what the
hardware does) and the NA/global ratio of each. GMACs are from :func:`visattn.count_flops`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from visattn import count_flops, create_model


def _time_once(model: torch.nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0


def bench(name: str, batch: int, size: int, repeats: int, warmup: int, backend: str | None) -> dict:
    torch.manual_seed(0)
    models = {kind: create_model(name, attn_type=kind, **({"backend": backend} if backend and kind == "na" else {}))
              .eval() for kind in ("na", "global")}
    x = torch.randn(batch, 3, size, size)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for _ in range(repeats):
            for kind, m in models.items():  # alternate: load changes hit both variants alike
                times[kind].append(_time_once(m, x))
    row = dict(model=name, batch=batch, size=size)
    for kind, m in models.items():
        med, best = statistics.median(times[kind]), min(times[kind])
        row[f"{kind}_img_s"] = batch / med
        row[f"{kind}_best_img_s"] = batch / best
        row[f"{kind}_ms"] = 1e3 * med
        row[f"{kind}_gmacs"] = count_flops(m, x[:1]) / 1e9
    row["speedup"] = row["na_img_s"] / row["global_img_s"]
    row["best_speedup"] = row["na_best_img_s"] / row["global_best_img_s"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["nat_tiny", "dinat_tiny"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default=None, help="force a visattn backend for the NA layers")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()

    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, fp32, "
          f"{args.size}x{args.size}, {args.repeats} runs each (median | fastest)")
    print(f"{'model':<12}{'batch':>6}{'NA img/s':>16}{'global img/s':>16}{'NA/global':>16}"
          f"{'NA GMACs':>10}{'global GMACs':>14}")
    rows = []
    for name in args.models:
        for batch in args.batch_sizes:
            r = bench(name, batch, args.size, args.repeats, args.warmup, args.backend)
            rows.append(r)
            print(f"{name:<12}{batch:>6}{r['na_img_s']:>9.2f} |{r['na_best_img_s']:>5.2f}"
                  f"{r['global_img_s']:>9.2f} |{r['global_best_img_s']:>5.2f}"
                  f"{r['speedup']:>8.2f}x |{r['best_speedup']:>5.2f}x"
                  f"{r['na_gmacs']:>10.2f}{r['global_gmacs']:>14.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
