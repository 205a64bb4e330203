"""Sharded neighborhood attention: bytes per rank, time and memory per rank, and when communication
would overtake compute.

Usage: ``python benchmarks/distributed_bench.py [--ranks 1 2 4] [--reps 5] [--bytes-only]
[--bandwidth 1.25 12.5 25 450] [--json out.json]``

1. **Bytes** (from the exchange plan, :mod:`visattn.distributed.cost`): what the busiest rank sends per
   forward and per backward for 2-D 256x256 (sharded along its rows) and 3-D 32x64x64 (along its
   frames, and along its rows) with k7, 4 heads of 32, float32, against an all-gather of K/V and against head sharding (all-to-all);
   and how many queries a rank computes per query it owns (its slab over its shard: the zero-padded
   halo queries are computed and discarded).
2. **Time and peak memory per rank** for each ``--ranks`` count: gloo processes on this machine,
   spawned here (the cores are split between them: ``torch.set_num_threads(cores // ranks)``). Each
   rank times forward, and forward + backward alternating with the single-process operator on its
   shard alone ("shard alone": no halo, no communication; the ratio is what the exchange and the
   zero-padded halo queries cost), as medians of ``--reps`` barrier-aligned calls; it measures the
   peak of torch allocations during one forward + backward, and counts the bytes it sent, which must
   equal the plan's prediction (the run fails otherwise).
3. **The model**: from the one-rank time per token (forward + backward) and a stated link bandwidth,
   the rank count at which one rank's exchange time (bytes / bandwidth; no overlap, no latency
   term) would exceed its compute time ``tokens / ranks * time_per_token``.

On a 2-core machine shared with other work, times of 2 and 4 ranks measure mostly contention: the
bytes table is the scaling argument, and the model says where it breaks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import torch

from visattn.bench.measure import machine_info, peak_extra_bytes
from visattn.distributed.cost import allgather_bytes, halo_bytes, halo_plan, head_sharding_bytes

HEADS, DIM, KERNEL, ITEMSIZE = 4, 32, 7, 4
#: name -> (global spatial shape, sharded spatial axis); timed and modelled
PROBLEMS = {"2-D 256x256, rows": ((256, 256), 0), "3-D 32x64x64, frames": ((32, 64, 64), 0)}
#: the bytes table also shows the volume sharded along its longer rows
BYTES_PROBLEMS = {**PROBLEMS, "3-D 32x64x64, rows": ((32, 64, 64), 1)}
MiB = 2**20


def _args(shape: tuple) -> dict:
    r = len(shape)
    return dict(kernel=(KERNEL,) * r, stride=(1,) * r, dilation=(1,) * r, causal=(False,) * r)


def _sizes(shape: tuple) -> dict:
    return dict(batch=1, heads_kv=HEADS, dim=DIM, dim_v=DIM, itemsize=ITEMSIZE)


def bytes_rows(worlds: list[int]) -> list[dict]:
    rows = []
    for name, (shape, axis) in BYTES_PROBLEMS.items():
        a = _args(shape)
        for w in worlds:
            if w > shape[axis]:
                continue
            halo = halo_bytes(shape, a["kernel"], a["stride"], a["dilation"], a["causal"], axis, w, **_sizes(shape))
            gather = allgather_bytes(shape, axis, w, **_sizes(shape))
            heads = head_sharding_bytes(shape, axis, w, heads=HEADS, **_sizes(shape))
            plan = halo_plan(shape, a["kernel"], a["stride"], a["dilation"], a["causal"], axis, w)
            rows.append(dict(problem=name, ranks=w, shard=max(s.stop - s.start for s in plan.shards),
                             halo_rows=max(plan.received(r) for r in range(w)),
                             computed=max(s.slab_length / (s.stop - s.start) for s in plan.shards if s.stop > s.start),
                             halo=(halo.forward, halo.backward), allgather=(gather.forward, gather.backward),
                             heads=(heads.forward, heads.backward), heads_feasible=HEADS % w == 0))
    return rows


# ---------------------------------------------------------------------------------------------------
# Time and memory: one process per rank
# ---------------------------------------------------------------------------------------------------

def _rank_main(rank: int, world: int, port: int, threads: int, reps: int, results) -> None:
    import torch.distributed as dist

    import visattn
    import visattn.distributed as vd

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    out = {}
    for name, (shape, axis) in PROBLEMS.items():
        g = torch.Generator().manual_seed(0)
        full = [torch.randn(1, *shape, HEADS, DIM, generator=g) for _ in range(3)]
        q, k, v = (torch.tensor_split(t, world, dim=1 + axis)[rank].clone().requires_grad_() for t in full)
        del full

        def forward():
            with torch.no_grad():
                return vd.neighborhood_attention(q, k, v, KERNEL, shard_axis=axis)

        def forward_backward():
            o = vd.neighborhood_attention(q, k, v, KERNEL, shard_axis=axis)
            o.backward(torch.ones_like(o))
            q.grad = k.grad = v.grad = None

        def single():  # the single-process operator on the shard alone: no halo, no communication
            o = visattn.na3d(q, k, v, KERNEL) if len(shape) == 3 else visattn.na2d(q, k, v, KERNEL)
            o.backward(torch.ones_like(o))
            q.grad = k.grad = v.grad = None

        def timed(*fns):
            """Median seconds of each fn, called in alternation (a shared machine's load hits both alike)."""
            for fn in fns:
                fn()  # warm-up: the C kernels compile on first use, caches fill
            times = [[] for _ in fns]
            for _ in range(reps):
                for fn, t in zip(fns, times):
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    t.append(time.perf_counter() - t0)
            return [statistics.median(t) for t in times]

        with vd.count_traffic() as traffic:
            forward_backward()
        a = _args(shape)
        predicted = halo_bytes(shape, a["kernel"], a["stride"], a["dilation"], a["causal"], axis, world,
                               rank=rank, **_sizes(shape))
        (fw,) = timed(forward)
        fb, local = timed(forward_backward, single)
        out[name] = dict(forward_s=fw, forward_backward_s=fb, local_compute_s=local,
                         peak_bytes=peak_extra_bytes(forward_backward, "cpu"),
                         shard_bytes=3 * q.numel() * q.element_size(), counted=dict(traffic),
                         predicted=(predicted.forward, predicted.backward), tokens=q[0, ..., 0, 0].numel())
    dist.destroy_process_group()
    results.put((rank, out))


def run_ranks(world: int, reps: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // world)
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, threads, reps, results)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
    return [got[r] for r in range(world)]


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------

def model_row(shape: tuple, axis: int, seconds_per_token: float, bandwidth: float, worlds: list[int]) -> dict:
    """Exchange time over compute time per rank at each rank count (sharding ``axis``), and the
    per-token compute time below which the exchange would take longer than the compute."""
    a, tokens = _args(shape), math.prod(shape)
    ratio, break_even = {}, {}
    for w in worlds:
        if w > shape[axis]:
            continue
        comm = halo_bytes(shape, a["kernel"], a["stride"], a["dilation"], a["causal"], axis, w,
                          **_sizes(shape)).total / bandwidth
        rank_tokens = -(-shape[axis] // w) * (tokens // shape[axis])
        ratio[w] = comm / (rank_tokens * seconds_per_token)
        break_even[w] = comm / rank_tokens
    return dict(ratio=ratio, break_even=break_even)


def _markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _mib(x: float) -> str:
    return f"{x / MiB:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="rank counts of the bytes table")
    parser.add_argument("--bandwidth", type=float, nargs="+", default=[1.25, 12.5, 25.0, 450.0],
                        help="link bandwidths for the model, GB/s per direction")
    parser.add_argument("--bytes-only", action="store_true")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args(argv)
    report: dict = {"machine": machine_info("cpu"), "cores": os.cpu_count(), "load": os.getloadavg(),
                    "problem": f"B=1, {HEADS} heads of {DIM}, k{KERNEL}, float32"}
    print(f"# {report['problem']}; machine: {report['machine']['cpu']}, {report['cores']} cores, "
          f"load {report['load'][0]:.1f}\n")

    rows = bytes_rows(args.worlds)
    report["bytes"] = rows
    print("## Bytes sent per rank (MiB, busiest rank), forward / backward\n")
    print(_markdown(
        ["problem", "ranks", "shard rows", "halo rows", "queries computed / own", "halo exchange", "all-gather K/V",
         "head sharding", "all-gather / halo", "heads / halo"],
        [[r["problem"], str(r["ranks"]), str(r["shard"]), str(r["halo_rows"]), f"{r['computed']:.2f}",
          f"{_mib(r['halo'][0])} / {_mib(r['halo'][1])}", f"{_mib(r['allgather'][0])} / {_mib(r['allgather'][1])}",
          f"{_mib(r['heads'][0])} / {_mib(r['heads'][1])}" + ("" if r["heads_feasible"] else " *"),
          f"{sum(r['allgather']) / sum(r['halo']):.1f}x", f"{sum(r['heads']) / sum(r['halo']):.1f}x"] for r in rows]))
    print(f"\n\\* head sharding needs the ranks to divide the heads ({HEADS} here): shown as if the model had "
          f"enough heads of the same total width.")
    if args.bytes_only:
        return

    runs = {}
    for world in args.ranks:
        print(f"\nrunning {world} rank(s)...", file=sys.stderr, flush=True)
        runs[world] = run_ranks(world, args.reps)
        for rank, res in enumerate(runs[world]):
            for name, m in res.items():
                if (m["counted"]["forward"], m["counted"]["backward"]) != m["predicted"]:
                    raise SystemExit(f"{name}, {world} ranks, rank {rank}: counted {m['counted']} bytes but the plan "
                                     f"predicts {m['predicted']}")
    report["runs"] = {str(w): r for w, r in runs.items()}
    report["load_after"] = os.getloadavg()
    print(f"\n## Time and peak memory per rank (median of {args.reps}; load before {report['load'][0]:.1f}, after "
          f"{report['load_after'][0]:.1f}; counted bytes = plan on every rank)\n")
    table = []
    for name in PROBLEMS:
        for world, res in runs.items():
            fw = max(m[name]["forward_s"] for m in res)
            fb = max(m[name]["forward_backward_s"] for m in res)
            base = runs[min(runs)][0][name]["forward_backward_s"]
            local = max(m[name]["local_compute_s"] for m in res)
            table.append([name, str(world), f"{fw * 1e3:.0f}", f"{fb * 1e3:.0f}", f"{base / fb:.2f}x",
                          f"{local * 1e3:.0f}", f"{fb / local:.2f}",
                          _mib(max(m[name]["peak_bytes"] or 0 for m in res)),
                          _mib(max(m[name]["shard_bytes"] for m in res)),
                          _mib(max(m[name]["counted"]["forward"] for m in res)),
                          _mib(max(m[name]["counted"]["backward"] for m in res))])
    print(_markdown(["problem", "ranks", "forward ms", "fwd+bwd ms", "speed-up", "shard alone ms", "sharded / alone",
                     "peak MiB", "q/k/v shard MiB",
                     "sent fwd MiB", "sent bwd MiB"], table))

    if 1 in runs:
        print("\n## When would communication exceed compute?\n\nPer rank, exchange time = halo bytes (forward + "
              "backward) / link bandwidth, no overlap; compute time = the rank's tokens x the time per token "
              "measured here with 1 rank (forward + backward). Ratio > 1: communication dominates. Break-even: "
              "the per-token compute time below which it would (faster devices move the crossover to fewer "
              "ranks).\n")
        model = []
        worlds = [w for w in args.worlds if w > 1]
        for name, (shape, axis) in PROBLEMS.items():
            m = runs[1][0][name]
            per_token = m["forward_backward_s"] / m["tokens"]
            for bw in args.bandwidth:
                row = model_row(shape, axis, per_token, bw * 1e9, worlds)
                report.setdefault("model", {}).setdefault(name, {})[bw] = dict(row, seconds_per_token=per_token)
                ws = sorted(row["ratio"])
                over = [w for w in ws if row["ratio"][w] > 1]
                model.append([name, f"{per_token * 1e6:.1f}", f"{bw:g}", f"{row['ratio'][ws[0]]:.2g}",
                              f"{row['ratio'][ws[-1]]:.2g}", str(over[0]) if over else f"none up to {ws[-1]}",
                              f"{row['break_even'][ws[0]] * 1e9:.2g}", f"{row['break_even'][ws[-1]] * 1e9:.2g}"])
        w0, w1 = min(worlds), max(worlds)
        print(_markdown(["problem", "measured µs/token", "link GB/s", f"comm/compute at {w0} ranks",
                         f"at {w1} ranks", "ranks where comm > compute", f"break-even ns/token at {w0} ranks",
                         f"at {w1} ranks"], model))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
