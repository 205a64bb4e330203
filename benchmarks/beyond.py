"""What the capabilities beyond NATTEN cost: periodic axes, cross-grid keys, variable-size batches, jvp.

Each row times two calls in one process, alternating (:func:`visattn.bench.measure.time_interleaved`),
and prints their ratio; the backend each call ran on (``visattn.explain``-style choice) is printed too,
so a row served by the portable torch backend is not mistaken for a fused-kernel result.

* periodic 2-D vs plain NA: 2x56x56, 4 heads, head dim 32, kernel 7 (forward; forward + backward);
* cross-grid: queries 112x112 on keys 56x56 vs same-grid NA at 112x112, kernel 7;
* ``na_varlen`` on 32 images of sizes drawn between 8x8 and 40x40 vs a Python loop of ``na2d`` calls
  (float32 and bfloat16, no gradient: the varlen call is one kernel launch on the cpu backend);
* ``torch.func.jvp`` through ``na2d`` vs the forward alone.

Usage: ``python benchmarks/beyond.py [--budget 2] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable
from unittest import mock

import torch

import visattn
import visattn.dispatch
from visattn.bench.measure import Timing, machine_info, time_interleaved

HEADS, DIM, KERNEL = 4, 32, 7


def _qkv(gen: torch.Generator, *shape: int, grad: bool = False) -> list[torch.Tensor]:
    return [torch.randn(*shape, HEADS, DIM, generator=gen, requires_grad=grad) for _ in range(3)]


def _fwd_bwd(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        out = fn(*tensors)
        torch.autograd.grad(out.square().mean(), tensors)
    return run


def _backend_of(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor]) -> str:
    """The backend(s) the dispatcher picks for this call, recorded by wrapping the selector."""
    seen: list[str] = []
    select = visattn.dispatch.select_backend

    def recording(*args, **kwargs):
        impl = select(*args, **kwargs)
        seen.append(impl.name)
        return impl

    with mock.patch.object(visattn.dispatch, "select_backend", recording), torch.no_grad():
        fn(*[t.detach() for t in tensors])
    return ",".join(sorted(set(seen))) or "?"


def _pairs(gen: torch.Generator) -> dict[str, tuple[Callable[[], object], Callable[[], object], str, str]]:
    pairs = {}
    q, k, v = _qkv(gen, 2, 56, 56)
    plain = lambda q, k, v: visattn.na2d(q, k, v, KERNEL)  # noqa: E731
    periodic = lambda q, k, v: visattn.na2d(q, k, v, KERNEL, periodic=True)  # noqa: E731
    with torch.no_grad():
        pairs["periodic / plain, fwd, 2x56x56 k7"] = (lambda: periodic(q, k, v), lambda: plain(q, k, v),
                                                     _backend_of(periodic, [q, k, v]), _backend_of(plain, [q, k, v]))
    qg, kg, vg = _qkv(gen, 2, 56, 56, grad=True)
    pairs["periodic / plain, fwd+bwd, 2x56x56 k7"] = (_fwd_bwd(periodic, [qg, kg, vg]), _fwd_bwd(plain, [qg, kg, vg]),
                                                     "", "")

    q112, k112, v112 = _qkv(gen, 2, 112, 112)
    pairs["cross-grid 112 on 56 / same-grid 112, fwd, k7"] = (
        lambda: plain(q112, k, v), lambda: plain(q112, k112, v112),
        _backend_of(plain, [q112, k, v]), _backend_of(plain, [q112, k112, v112]))

    sizes = [tuple(int(s) for s in torch.randint(8, 41, (2,), generator=gen)) for _ in range(32)]
    total = sum(h * w for h, w in sizes)
    packed = [torch.randn(total, HEADS, DIM, generator=gen) for _ in range(3)]
    for dtype in (torch.float32, torch.bfloat16):
        qv, kv, vv = (t.to(dtype) for t in packed)
        views = []
        offset = 0
        for h, w in sizes:
            views.append(tuple(t[offset:offset + h * w].view(1, h, w, HEADS, DIM) for t in (qv, kv, vv)))
            offset += h * w

        def loop(views=views) -> list[torch.Tensor]:
            return [visattn.na2d(a, b, c, KERNEL) for a, b, c in views]

        varlen = lambda qv=qv, kv=kv, vv=vv: visattn.na_varlen(qv, kv, vv, sizes, KERNEL)  # noqa: E731
        dt = str(dtype).removeprefix("torch.")
        pairs[f"na_varlen / loop of na2d, fwd, {dt}, 32 images 8..40 ({total} tokens)"] = (varlen, loop, "", "")

    def jvp() -> object:
        return torch.func.jvp(lambda q, k, v: plain(q, k, v), (q, k, v), (q, k, v))

    pairs["jvp / forward, 2x56x56 k7"] = (jvp, lambda: plain(q, k, v), "", "")
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per implementation")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['threads']} torch threads, torch {info['torch']}, "
          f"visattn {visattn.__version__}")
    print(f"{'case':<76} {'A ms':>8} {'B ms':>8} {'A/B':>6}  backends (A; B)")
    results = {}
    for name, (a, b, backend_a, backend_b) in _pairs(torch.Generator().manual_seed(0)).items():
        with torch.no_grad() if "bwd" not in name else torch.enable_grad():
            ta, tb = time_interleaved([a, b], "cpu", budget_s=args.budget, rounds=6)
        if not (isinstance(ta, Timing) and isinstance(tb, Timing)):
            print(f"{name:<76} failed: {ta if not isinstance(ta, Timing) else tb}")
            continue
        ratio = ta.median / tb.median
        results[name] = dict(a_ms=ta.median * 1e3, b_ms=tb.median * 1e3, ratio=ratio, backends=[backend_a, backend_b])
        chosen = f"{backend_a}; {backend_b}" if backend_a else ""
        print(f"{name:<76} {ta.median * 1e3:>8.2f} {tb.median * 1e3:>8.2f} {ratio:>6.2f}  {chosen}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, results=results), f, indent=2)


if __name__ == "__main__":
    main()
