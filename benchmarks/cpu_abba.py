"""The fused CPU backend's measurements of docs/cpu.md ("Speed"), every configuration alternated in the
same process (ABBA rounds: the order reverses every round, each turn starts with an untimed call),
medians per round, ratios as per-round medians with their range, the matmul peak of each dtype
measured in the same rounds.

Parts (``--part``, default all):

* ``kernels``: default 2-D case, 3-D, dilation, causal, 1-D k=63, in float32 and bfloat16, forward and
  forward+backward, plus the masked calls (key padding mask, attn_bias, return_attn) of the default
  shape; GFLOP/s by :func:`visattn.spec.na_flops` (forward+backward counted 3x the forward) and % of
  the same dtype's matmul peak.
* ``zoo``: the zoo modules na2d, swin, swin_shifted and halo at 1x56x56x96 (``visattn bench --zoo``'s
  setup), forward and forward+backward.
* ``models``: NAT-Tiny and DiNAT-Tiny at 224, float32 and under ``torch.autocast("cpu", bfloat16)``,
  batch 1 and 8, images/s, against timm's Swin-T under the same autocast when timm is importable.

``--clock cpu`` times with the calling thread's CPU time (``time.thread_time``), meaningful with
``--threads 1`` only (the kernels then run on the calling thread), which excludes time spent
descheduled on a shared machine; ``--clock wall`` (default) is wall-clock time.

Usage: ``python benchmarks/cpu_abba.py [--threads N] [--clock wall|cpu] [--rounds R] [--part ...]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from visattn import na2d, neighborhood_attention
from visattn.spec import make_spec, na_flops

Key = tuple[str, str, str]


def abba(fns: dict[Key, Callable[[], object]], rounds: int, reps: Callable[[Key], int],
         clock: Callable[[], float]) -> dict[Key, list[float]]:
    """Per-round medians of every configuration, the order of the configurations reversed every round."""
    keys = list(fns)
    for key in keys:
        for _ in range(2):
            fns[key]()
    times: dict[Key, list[float]] = {key: [] for key in keys}
    for r in range(rounds):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            fns[key]()  # untimed: the first call after another configuration refills caches
            ts = []
            for _ in range(reps(key)):
                t0 = clock()
                fns[key]()
                ts.append(clock() - t0)
            times[key].append(statistics.median(ts))
    return times


def ratio(a: list[float], b: list[float]) -> str:
    r = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"


def spread(t: list[float]) -> float:
    return (max(t) - min(t)) / statistics.median(t)


def kernels(rounds: int, clock: Callable[[], float]) -> None:
    cases = {
        "default 2-D 56x56 h4 d32 k7": ((56, 56), 4, 32, dict(kernel_size=7)),
        "3-D 16x32x32 h4 d32 k5": ((16, 32, 32), 4, 32, dict(kernel_size=5)),
        "2-D 56x56 k7 dilation 4": ((56, 56), 4, 32, dict(kernel_size=7, dilation=4)),
        "2-D 56x56 k7 causal": ((56, 56), 4, 32, dict(kernel_size=7, is_causal=True)),
        "1-D L4096 h4 d64 k63": ((4096,), 4, 64, dict(kernel_size=63)),
    }
    fns: dict[Key, Callable[[], object]] = {}
    flops: dict[Key, int] = {}
    for name, (spatial, heads, dim, kw) in cases.items():
        spec = make_spec("bench", spatial, kw["kernel_size"], 1, kw.get("dilation", 1), kw.get("is_causal", False))
        f = na_flops(spec, 1, heads, dim)
        for dt, tdt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            q, k, v = (torch.randn(1, *spatial, heads, dim).to(tdt) for _ in range(3))
            grad = torch.randn(1, *spatial, heads, dim).to(tdt)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]

            def fwd(q=q, k=k, v=v, kw=kw):
                with torch.no_grad():
                    neighborhood_attention(q, k, v, **kw)

            def fwd_bwd(leaves=leaves, kw=kw, grad=grad):
                out = neighborhood_attention(*leaves, **kw)
                torch.autograd.grad(out, leaves, grad)

            fns[(name, dt, "fwd")], flops[(name, dt, "fwd")] = fwd, f
            fns[(name, dt, "fwd+bwd")], flops[(name, dt, "fwd+bwd")] = fwd_bwd, 3 * f
    q, k, v = (torch.randn(1, 56, 56, 4, 32) for _ in range(3))
    mask = torch.rand(1, 56, 56) < 0.2
    bias = torch.randn(1, 56, 56, 4, 49)
    for dt, tdt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        qq, kk, vv = (t.to(tdt) for t in (q, k, v))
        for tag, extra in (("unmasked", {}), ("key_padding_mask 20%", dict(key_padding_mask=mask)),
                           ("attn_bias", dict(attn_bias=bias.to(tdt))), ("return_attn", dict(return_attn=True))):
            def masked(extra=extra, qq=qq, kk=kk, vv=vv):
                with torch.no_grad():
                    na2d(qq, kk, vv, 7, **extra)
            fns[("mask " + tag, dt, "fwd")] = masked
            flops[("mask " + tag, dt, "fwd")] = na_flops(make_spec("bench", (56, 56), 7), 1, 4, 32)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    ab, bb = a.bfloat16(), b.bfloat16()
    fns[("matmul 1024", "f32", "peak")] = lambda: torch.mm(a, b)
    fns[("matmul 1024", "bf16", "peak")] = lambda: torch.mm(ab, bb)
    flops[("matmul 1024", "f32", "peak")] = flops[("matmul 1024", "bf16", "peak")] = 2 * 1024 ** 3

    times = abba(fns, rounds, lambda key: 3 if ("3-D" in key[0] or "1-D" in key[0]) else 5, clock)
    peak = {dt: max(flops[("matmul 1024", dt, "peak")] / t for t in times[("matmul 1024", dt, "peak")]) / 1e9
            for dt in ("f32", "bf16")}
    print(f"matmul peak (best of the rounds): f32 {peak['f32']:.1f}, bf16 {peak['bf16']:.1f} GFLOP/s")
    print(f"{'case':30s} {'dtype':5s} {'pass':8s} {'median ms':>10s} {'spread':>7s} {'GFLOP/s':>8s} {'%peak':>6s}  ratio")
    for key, t in times.items():
        name, dt, kind = key
        if kind == "peak":
            continue
        med = statistics.median(t)
        gf = flops[key] / med / 1e9
        extra = ""
        if dt == "bf16" and (name, "f32", kind) in times:
            extra = "bf16 speed-up " + ratio(times[(name, "f32", kind)], t)
        if name.startswith("mask ") and "unmasked" not in name:
            extra = "vs unmasked " + ratio(t, times[("mask unmasked", dt, "fwd")])
        print(f"{name:30s} {dt:5s} {kind:8s} {med * 1e3:10.3f} {spread(t) * 100:6.0f}% {gf:8.1f} "
              f"{100 * gf / peak[dt]:5.1f}%  {extra}")


def zoo(rounds: int, clock: Callable[[], float]) -> None:
    from visattn.bench.zoo import _count_flops, zoo_setup
    from visattn.nn import registry

    names = ["na2d", "swin", "swin_shifted", "halo"]
    fns: dict[Key, Callable[[], object]] = {}
    flops = {}
    for name in names:
        info = registry.attn_info(name)
        kwargs, shape = zoo_setup(name, info)
        module = info["cls"](shape[-1], **kwargs).eval()
        x = torch.randn(shape)
        flops[name] = _count_flops(module, x)
        xg = x.clone().requires_grad_()

        def fwd(module=module, x=x):
            with torch.no_grad():
                module(x)

        def fwd_bwd(module=module, xg=xg):
            torch.autograd.grad(module(xg).sum(), [xg, *module.parameters()], allow_unused=True)

        fns[(name, "f32", "fwd")] = fwd
        fns[(name, "f32", "fwd+bwd")] = fwd_bwd
    times = abba(fns, rounds, lambda key: 5, clock)
    for kind in ("fwd", "fwd+bwd"):
        mult = 1 if kind == "fwd" else 3
        for name in names:
            t = times[(name, "f32", kind)]
            gf = mult * flops[name] / statistics.median(t) / 1e9
            print(f"{name:14s} {kind:8s} {statistics.median(t) * 1e3:9.3f} ms  {gf:6.1f} GFLOP/s  spread "
                  f"{spread(t) * 100:4.0f}%  vs na2d {ratio(t, times[('na2d', 'f32', kind)])}  vs swin "
                  f"{ratio(t, times[('swin', 'f32', kind)])}")


def models(rounds: int, clock: Callable[[], float]) -> None:
    from visattn.models import create_model

    nets = {"nat_tiny": create_model("nat_tiny").eval(), "dinat_tiny": create_model("dinat_tiny").eval()}
    try:
        import timm

        nets["timm swin_tiny"] = timm.create_model("swin_tiny_patch4_window7_224").eval()
        note = f"timm {timm.__version__}"
    except ImportError as e:
        note = f"timm not importable ({e}): Swin-T not measured"
    print(f"torch {torch.__version__}; {note}")
    batches = (1, 8)
    fns: dict = {}
    for b in batches:
        x = torch.randn(b, 3, 224, 224)
        for name, net in nets.items():
            for dt in ("fp32", "bf16"):
                def f(net=net, x=x, dt=dt):
                    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == "bf16"):
                        net(x)
                fns[(name, dt, b)] = f
    times = abba(fns, rounds, lambda key: 3 if key[2] == 1 else 2, clock)
    for b in batches:
        for name in nets:
            t32, t16 = times[(name, "fp32", b)], times[(name, "bf16", b)]
            line = (f"{name:16s} batch {b}: fp32 {b / statistics.median(t32):7.2f} img/s, bf16 autocast "
                    f"{b / statistics.median(t16):7.2f} img/s, bf16/fp32 {ratio(t32, t16)}")
            if "timm swin_tiny" in nets and name != "timm swin_tiny":
                line += (f"; vs Swin-T fp32 {ratio(times[('timm swin_tiny', 'fp32', b)], t32)}, "
                         f"bf16 {ratio(times[('timm swin_tiny', 'bf16', b)], t16)}")
            print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--part", nargs="+", choices=("kernels", "zoo", "models"), default=["kernels", "zoo", "models"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        ap.error("--clock cpu measures the calling thread only: use it with --threads 1")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, clock {args.clock}, {args.rounds} rounds")
    for part in args.part:
        print(f"\n== {part}")
        {"kernels": kernels, "zoo": zoo, "models": models}[part](args.rounds, clock)


if __name__ == "__main__":
    main()
