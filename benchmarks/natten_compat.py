"""Hugging Face's DiNAT through the NATTEN stand-in against visattn's own ``dinat_tiny``, same weights.

    python benchmarks/natten_compat.py [--size 224] [--batch 1] [--threads N] [--budget 10] [--max-reps 20]
                                       [--json out.json]

Times ``DinatForImageClassification`` (DiNAT-Tiny config: 64 channels, depths 3-4-18-5, heads
2-4-8-16, kernel 7, dilations filling the map at 224) with ``natten`` resolved to
:mod:`visattn.compat.natten`, whose unfused ``natten2dqkrpb`` -> softmax -> ``natten2dav`` it calls, and
``visattn.create_model("dinat_tiny")`` with the same weights (fused attention: the C kernels on CPU),
forward (eval, no grad) and forward + backward (train mode, no dropout or stochastic depth), fp32,
CPU. Then the attention alone at each DiNAT-Tiny layer shape: the legacy path against
:func:`visattn.na2d`. Every pair is timed in alternating rounds by
:func:`visattn.bench.measure.time_interleaved` in one process, so machine load hits both alike;
ratios are legacy / fused, from the medians and from the fastest calls (on a shared machine the
fastest call is the better estimate of what the hardware does). transformers 4.54+ needs its DiNAT layout restored
(:func:`visattn.compat.hf_dinat.fix_transformers_dinat`), which this script applies.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch

from visattn import create_model, na2d
from visattn.bench.measure import machine_info, time_interleaved
from visattn.compat import install_natten, real_natten
from visattn.console import render_table
from visattn.models.nat import dinat_dilations

DEPTHS, HEADS, KERNEL = (3, 4, 18, 5), (2, 4, 8, 16), 7


def _models(size: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # replacing an installed NATTEN for this process is announced
        install_natten(replace=real_natten() is not None)
    from transformers import DinatConfig, DinatForImageClassification

    from visattn.compat.hf_dinat import convert_hf_dinat_state_dict, fix_transformers_dinat

    fix_transformers_dinat()
    torch.manual_seed(0)
    config = DinatConfig(embed_dim=64, depths=list(DEPTHS), num_heads=list(HEADS), kernel_size=KERNEL, mlp_ratio=3.0,
                         dilations=dinat_dilations(DEPTHS, KERNEL, size), layer_scale_init_value=0.0,
                         drop_path_rate=0.0, num_labels=1000)
    hf = DinatForImageClassification(config)
    ours = create_model("dinat_tiny", img_size=size, drop_path_rate=0.0)
    ours.load_state_dict(convert_hf_dinat_state_dict(hf.state_dict()))
    return hf, ours


def _pair(fns, budget: float, max_reps: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """``((legacy median, fused median), (legacy best, fused best))`` in ms."""
    timings = time_interleaved(fns, "cpu", budget, max_reps=max_reps)
    for t in timings:
        if isinstance(t, Exception):
            raise t
    return tuple(1e3 * t.median for t in timings), tuple(1e3 * min(t.times) for t in timings)  # type: ignore


def _row(what: str, timed) -> dict:
    (a, b), (best_a, best_b) = timed
    return dict(what=what, legacy_ms=a, fused_ms=b, ratio=a / b, legacy_best_ms=best_a, fused_best_ms=best_b,
                best_ratio=best_a / best_b)


def model_rows(size: int, batch: int, budget: float, max_reps: int) -> list[dict]:
    hf, ours = _models(size)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        hf.eval(), ours.eval()
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=1e-4)
        fwd = _pair([lambda: hf(x).logits, lambda: ours(x)], budget, max_reps)
    hf.train(), ours.train()
    both = _pair([lambda: hf(x).logits.sum().backward(), lambda: ours(x).sum().backward()], budget, max_reps)
    return [_row(f"model {batch}x3x{size}x{size}, {name}", timed) for name, timed in
            (("forward", fwd), ("forward+backward", both))]


def attention_rows(size: int, budget: float, max_reps: int) -> list[dict]:
    """The attention of every distinct DiNAT-Tiny layer shape: the legacy unfused path of Hugging Face's
    DiNAT (heads-first, ``natten2dqkrpb`` -> softmax -> ``natten2dav``) against the fused operator."""
    import natten.functional as nf

    rows, side = [], -(-size // 4)
    for stage, (heads, dilations) in enumerate(zip(HEADS, dinat_dilations(DEPTHS, KERNEL, size))):
        for d in sorted(set(dilations)):
            q, k, v = (torch.randn(1, heads, side, side, 32, requires_grad=True) for _ in range(3))
            rpb = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, requires_grad=True)

            def legacy():
                attn = nf.natten2dqkrpb(q * 32 ** -0.5, k, rpb, KERNEL, d).softmax(-1)
                return nf.natten2dav(attn, v, KERNEL, d)

            def fused():
                return na2d(*(t.movedim(1, -2) for t in (q, k, v)), KERNEL, dilation=d, rpb=rpb)

            with torch.no_grad():
                fwd = _pair([legacy, fused], budget / 4, max_reps)
            both = _pair([lambda: legacy().sum().backward(), lambda: fused().sum().backward()], budget / 4, max_reps)
            for name, timed in (("forward", fwd), ("forward+backward", both)):
                rows.append(_row(f"attention stage {stage + 1}: {side}x{side}, {heads} heads, dilation {d}, {name}",
                                 timed))
        side = -(-side // 2)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--budget", type=float, default=10.0, help="seconds of timed calls per model variant (default 10)")
    p.add_argument("--max-reps", type=int, default=20, help="at most this many timed calls per variant")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m = machine_info("cpu")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{m['cpu']}, {m['threads']} torch threads, torch {m['torch']}, fp32; load average before: {load}")
    rows = model_rows(args.size, args.batch, args.budget, args.max_reps) + \
        attention_rows(args.size, args.budget, args.max_reps)
    print("ms: median | fastest call; legacy = Hugging Face DiNAT through the stand-in (unfused "
          "natten2dqkrpb -> softmax -> natten2dav), fused = visattn dinat_tiny / visattn.na2d")
    print(render_table(("what", "legacy ms", "fused ms", "legacy / fused"),
                       [[r["what"], f"{r['legacy_ms']:.1f} | {r['legacy_best_ms']:.1f}",
                         f"{r['fused_ms']:.1f} | {r['fused_best_ms']:.1f}",
                         f"{r['ratio']:.2f}x | {r['best_ratio']:.2f}x"] for r in rows], right={1, 2, 3}))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
