"""``visattn bench``: is every implementation right, and how fast is it on this machine?

Default problem: 2-D NA at NAT-Tiny's first stage (B=1, 56x56, 4 heads, head dim 32, kernel 7),
float32, forward. ``--zoo`` instead measures every registered attention module.
"""

from __future__ import annotations

import argparse
import sys

import torch

_DESCRIPTION = """\
Check every neighborhood-attention implementation (visattn's backends, NATTEN, FlexAttention eager
and compiled, dense SDPA, a plain gather) against a float64 oracle, then time it on this machine.

Default problem: 2-D NA at NAT-Tiny's first stage (B=1, 56x56, 4 heads, head dim 32, kernel 7),
float32, forward. --zoo instead measures every registered attention module."""

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="check and time every NA implementation (ours and peers) on one problem",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("problem")
    g.add_argument("--rank", type=int, choices=(1, 2, 3), help="spatial axes (default: len(--shape), else 2)")
    g.add_argument("--shape", type=int, nargs="+", metavar="N",
                   help="spatial sizes (default 56 56; rank 1: 3136; rank 3: 4 28 28)")
    g.add_argument("--batch", type=int, default=1, help="(default 1)")
    g.add_argument("--heads", type=int, default=4, help="(default 4)")
    g.add_argument("--head-dim", type=int, default=32, help="(default 32)")
    g.add_argument("--kernel", type=int, nargs="+", default=[7], metavar="K",
                   help="one value or one per axis (default 7)")
    g.add_argument("--stride", type=int, nargs="+", default=[1], metavar="S", help="(default 1)")
    g.add_argument("--dilation", type=int, nargs="+", default=[1], metavar="D", help="(default 1)")
    g.add_argument("--causal", type=int, nargs="*", metavar="0|1",
                   help="causal masking: bare flag = every axis, or one 0/1 per axis")
    g.add_argument("--dtype", choices=tuple(_DTYPES), default="float32", help="(default float32)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="(default: cuda when available, else cpu)")
    g.add_argument("--backward", action="store_true", help="time forward + backward (and check gradients)")
    r = p.add_argument_group("run and output")
    r.add_argument("--only", nargs="+", metavar="NAME",
                   help="only implementations (or --zoo modules) whose name contains one of these")
    r.add_argument("--budget", type=float, default=2.0, metavar="S",
                   help="seconds of timed calls per implementation (default 2; --zoo: half this per timing)")
    r.add_argument("--max-gb", type=float, default=4.0,
                   help="refuse implementations estimated to need more memory than this (default 4)")
    r.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    r.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write JSON to PATH, or to stdout instead of the table when no PATH is given")
    r.add_argument("--plot", metavar="PATH", help="write a bar chart (PNG) to PATH (needs matplotlib)")
    r.add_argument("--zoo", action="store_true",
                   help="measure every registered attention module (mixers at 1x56x56x96, plug-ins at 1x64x56x56)")
    p.set_defaults(func=run, _parser=p)  # run() reports bad flag combinations through it
    return p


def _one_or_per_axis(parser: argparse.ArgumentParser, flag: str, values: list[int], rank: int):
    if len(values) == 1:
        return values[0]
    if len(values) != rank:
        parser.error(f"{flag} got {len(values)} values {values} but the problem has {rank} axes; "
                     f"pass one value or {rank}.")
    return tuple(values)


def problem_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The :class:`~visattn.bench.BenchProblem` the flags describe; ``parser.error`` on inconsistent flags."""
    from ..bench import BenchProblem, default_shape

    if args.shape and args.rank and len(args.shape) != args.rank:
        parser.error(f"--rank {args.rank} but --shape {' '.join(map(str, args.shape))} has {len(args.shape)} "
                     f"axes; give {args.rank} sizes or drop --rank.")
    rank = len(args.shape) if args.shape else (args.rank or 2)
    shape = tuple(args.shape) if args.shape else default_shape(rank)
    if args.causal is None:
        causal = False
    elif not args.causal:
        causal = True
    elif any(c not in (0, 1) for c in args.causal):
        parser.error(f"--causal takes 0/1 per axis, got {args.causal}.")
    else:
        causal = _one_or_per_axis(parser, "--causal", [bool(c) for c in args.causal], rank)
    try:
        return BenchProblem(
            shape=shape, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
            kernel_size=_one_or_per_axis(parser, "--kernel", args.kernel, rank),
            stride=_one_or_per_axis(parser, "--stride", args.stride, rank),
            dilation=_one_or_per_axis(parser, "--dilation", args.dilation, rank),
            is_causal=causal, dtype=_DTYPES[args.dtype], device=args.device, backward=args.backward)
    except (TypeError, ValueError) as e:
        parser.error(str(e))


def _selected(names: list[str], only) -> list[int]:
    if not only:
        return list(range(len(names)))
    return [i for i, n in enumerate(names) if any(o.lower() in n.lower() for o in only)]


def run(args: argparse.Namespace) -> int:
    from ..bench import report

    parser: argparse.ArgumentParser = args._parser
    if args.zoo:
        return _run_zoo(args)
    from ..bench import default_peers, run_bench

    problem = problem_from_args(args, parser)
    # Naming the oracle in --only is asking for it to be timed.
    peers = default_peers(time_reference=any("reference" in o.lower() for o in args.only or ()))
    keep = _selected([p.name for p in peers], args.only)
    if not keep:
        parser.error(f"--only {args.only} matches none of: {', '.join(p.name for p in peers)}.")
    result = run_bench(problem, [peers[i] for i in keep], budget_s=args.budget, max_bytes=args.max_gb * 2**30,
                       measure_memory=not args.no_memory)
    _emit(args, report.format_table(result), report.to_json(result), lambda path: report.plot(result, path))
    return 0


def _run_zoo(args: argparse.Namespace) -> int:
    from ..bench import report, run_zoo
    from ..bench.measure import machine_info
    from ..nn import list_attn

    names = [list_attn()[i] for i in _selected(list_attn(), args.only)]
    if not names:
        args._parser.error(f"--only {args.only} matches no registered module: {', '.join(list_attn())}.")
    rows = run_zoo(names, device=args.device, budget_s=args.budget / 2, measure_memory=not args.no_memory)
    machine = machine_info(args.device)
    _emit(args, report.format_zoo_table(rows, machine), report.zoo_to_json(rows, machine),
          lambda path: report.plot_zoo(rows, path))
    return 0


def _emit(args: argparse.Namespace, table: str, doc: str, plot) -> None:
    if args.json == "-":
        print(doc)
    else:
        print(table)
        if args.json:
            with open(args.json, "w") as f:
                f.write(doc + "\n")
            print(f"\nJSON written to {args.json}", file=sys.stderr)
    if args.plot:
        plot(args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
