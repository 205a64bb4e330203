"""CPU throughput of every visattn model next to timm's implementation of the same model.

    python benchmarks/models_timm_speed.py [--models swin_tiny ...] [--batch-sizes 1 8] [--threads 2]
                                           [--budget 8] [--max-reps 20] [--json out.json]

Needs timm (run it in the timm environment, with ``PYTHONPATH=src``). For each model and batch
size it times ``model(x)`` (eval, ``torch.no_grad``, fp32, random weights, 224x224; HaloNet at
256, the smallest size timm's runs) for visattn's model and timm's counterpart *together*
(:func:`visattn.bench.measure.time_interleaved`: alternating rounds, so machine load hits both
alike). Models timm lacks (NAT, DiNAT) are timed next to timm's Swin-T and ConvNeXt-T, the
references of the NAT paper. The table reports images/s from the median call and the ratio
visattn / timm measured in the same run; on a shared machine the ratio is the number to read.
"""

from __future__ import annotations

import argparse
import json

import torch

from visattn.bench.measure import machine_info, time_interleaved
from visattn.console import render_table
from visattn.models import create_model, list_models, model_info

# timm models a visattn-only model is compared with (the NAT paper's baselines).
REFERENCES = {"nat": ["swin_tiny_patch4_window7_224", "convnext_tiny"],
              "dinat": ["swin_tiny_patch4_window7_224", "convnext_tiny"]}
SIZE = {"halonet26t": 256}


def _default_models() -> list[str]:
    with_timm = [n for n in list_models() if model_info(n).get("from_timm") is not None]
    return with_timm + ["nat_tiny", "dinat_tiny"]


def bench(name: str, batch: int, budget: float, max_reps: int) -> list[dict]:
    import timm

    size = SIZE.get(name, 224)
    torch.manual_seed(0)
    ours = create_model(name).eval()
    peers = [model_info(name)["timm_name"]] if model_info(name).get("timm_name") else REFERENCES[name.split("_")[0]]
    theirs = [timm.create_model(p).eval() for p in peers]
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        timings = time_interleaved([lambda m=m: m(x) for m in [ours, *theirs]], "cpu", budget, max_reps=max_reps)
    for t in timings:
        if isinstance(t, Exception):
            raise t
    ours_ips = batch / timings[0].median
    return [dict(model=name, timm=peer, batch=batch, size=size, visattn_img_s=ours_ips, timm_img_s=batch / t.median,
                 ratio=ours_ips / (batch / t.median), calls=(len(timings[0].times), len(t.times)))
            for peer, t in zip(peers, timings[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="visattn model names (default: every family)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timed calls per model (default 8)")
    p.add_argument("--max-reps", type=int, default=20, help="at most this many timed calls per model")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    m = machine_info("cpu")
    print(f"{m['cpu']}, {m['threads']} torch threads, torch {m['torch']}, fp32, eval, images/s from the median call")
    rows = []
    for name in args.models or _default_models():
        for batch in args.batch_sizes:
            for row in bench(name, batch, args.budget, args.max_reps):
                rows.append(row)
                print(f"  {row['model']} vs {row['timm']} batch {batch}: {row['visattn_img_s']:.2f} vs "
                      f"{row['timm_img_s']:.2f} img/s ({row['ratio']:.2f}x)", flush=True)
    cells = [[r["model"], r["timm"], str(r["batch"]), f"{r['visattn_img_s']:.2f}", f"{r['timm_img_s']:.2f}",
              f"{r['ratio']:.2f}x", f"{r['calls'][0]} / {r['calls'][1]}"] for r in rows]
    print(render_table(("visattn model", "timm model", "batch", "visattn img/s", "timm img/s", "visattn / timm",
                        "calls"), cells, right={2, 3, 4, 5}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
