"""Compiled vs eager training steps (forward + backward) on CPU, and the cold first call.

Cases (same process, eager and ``torch.compile``d timed in alternating rounds by
:func:`visattn.bench.measure.time_interleaved`; compile time reported apart):

* the ``na2d`` op alone: 2x56x56, 4 heads, head dim 32, kernel 7;
* ``NeighborhoodAttention2D(128, 4, 7)`` at 2x56x56;
* NAT-Mini at 1x3x224x224.

Plus the cold first call: a fresh process with an empty kernel cache, ``import visattn`` and the
first ``na2d`` call (which compiles the C kernels), timed from the outside.

Usage: ``python benchmarks/compile_vs_eager.py [--budget 3] [--cases op module nat_mini] [--json out.json]``.
Only public API is used, so the same script measures an older checkout (``PYTHONPATH=old/src``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Callable

# A private inductor cache: compile times are then cold, and a run against another checkout never
# reuses graphs compiled against this one's operator schemas.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="visattn-cve-inductor-"))

import torch  # noqa: E402

import visattn  # noqa: E402
from visattn.bench.measure import Timing, machine_info, time_interleaved


def _step(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], params: list[torch.Tensor]):
    """One training step without the optimizer: forward, a scalar loss, gradients of every leaf."""
    leaves = [t for t in inputs if t.requires_grad] + params

    def run() -> None:
        out = fn(*inputs)
        torch.autograd.grad(out.float().square().mean(), leaves)

    return run


def _cases(names: list[str]) -> dict[str, tuple[Callable, list[torch.Tensor], list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    cases = {}
    if "op" in names:
        q, k, v = (torch.randn(2, 56, 56, 4, 32, generator=gen, requires_grad=True) for _ in range(3))
        cases["na2d op 2x56x56 h4 d32 k7"] = (lambda q, k, v: visattn.na2d(q, k, v, 7), [q, k, v], [])
    if "module" in names:
        layer = visattn.NeighborhoodAttention2D(128, 4, 7)
        x = torch.randn(2, 56, 56, 128, generator=gen)
        cases["NeighborhoodAttention2D(128, 4, 7) 2x56x56"] = (layer, [x], list(layer.parameters()))
    if "nat_mini" in names:
        model = visattn.create_model("nat_mini").train()
        x = torch.randn(1, 3, 224, 224, generator=gen)
        cases["NAT-Mini 1x224x224"] = (model, [x], list(model.parameters()))
    return cases


def cold_first_call() -> dict:
    """Seconds of ``import visattn`` and of the first ``na2d`` call in a fresh process, empty cache."""
    script = textwrap.dedent("""
        import time, json
        t0 = time.perf_counter()
        import torch, visattn
        t1 = time.perf_counter()
        q = torch.randn(1, 56, 56, 4, 32)
        visattn.na2d(q, q, q, 7)
        t2 = time.perf_counter()
        visattn.na2d(q, q, q, 7)
        t3 = time.perf_counter()
        print(json.dumps(dict(import_s=t1 - t0, first_call_s=t2 - t1, second_call_s=t3 - t2)))
    """)
    with tempfile.TemporaryDirectory() as cache:
        # NUMBA_CACHE_DIR: an older checkout measured with this script (PYTHONPATH) still had numba kernels
        env = {**os.environ, "VISATTN_CACHE_DIR": cache, "NUMBA_CACHE_DIR": cache}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return dict(error=done.stderr.strip()[-500:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed calls per variant and case")
    parser.add_argument("--cases", nargs="+", default=["op", "module", "nat_mini"], choices=["op", "module", "nat_mini"])
    parser.add_argument("--no-cold", action="store_true", help="skip the cold first-call measurement")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    info = machine_info()
    print(f"machine: {info['cpu']}, {info['threads']} torch threads, torch {info['torch']}, "
          f"visattn {visattn.__version__} ({os.path.dirname(visattn.__file__)})")
    results = {}
    print(f"{'case':<46} {'eager ms':>9} {'compiled ms':>12} {'compiled/eager':>15} {'compile s':>10}")
    for name, (fn, inputs, params) in _cases(args.cases).items():
        eager = _step(fn, inputs, params)
        compiled_fn = torch.compile(fn)
        compiled = _step(compiled_fn, inputs, params)
        t0 = time.perf_counter()
        compiled()  # compiles forward and backward graphs
        compile_s = time.perf_counter() - t0
        timings = time_interleaved([eager, compiled], "cpu", budget_s=args.budget, rounds=6)
        row = {}
        for label, t in zip(("eager", "compiled"), timings):
            row[label] = t.median * 1e3 if isinstance(t, Timing) else f"failed: {t}"
        ok = all(isinstance(t, Timing) for t in timings)
        ratio = row["compiled"] / row["eager"] if ok else float("nan")
        row.update(ratio=ratio, compile_s=compile_s,
                   spread=[t.spread for t in timings if isinstance(t, Timing)])
        results[name] = row
        fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
        print(f"{name:<46} {fmt(row['eager']):>9} {fmt(row['compiled']):>12} {ratio:>15.2f} {compile_s:>10.1f}")
    if not args.no_cold:
        cold = cold_first_call()
        results["cold first call"] = cold
        print("cold first call (fresh process, empty cache): " +
              ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in cold.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, results=results), f, indent=2)


if __name__ == "__main__":
    main()
