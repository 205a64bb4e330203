"""Run every implementation on one :class:`BenchProblem`: check it against the oracle, time it, measure it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..console import ProgressBar
from .measure import machine_info, matmul_peak_gflops, peak_extra_bytes, time_interleaved
from .peers import Peer, default_peers
from .problem import BenchProblem, Oracle, compare

__all__ = ["Row", "BenchResult", "run_bench"]

#: receives the progress lines of a run (by default they go to stderr, so ``--json`` on stdout stays parseable)
Progress = Callable[[str], None]
#: rounds of :func:`~.measure.time_interleaved`, one progress step each
TIMING_ROUNDS = 4


@dataclass
class Row:
    """One implementation's outcome. ``status``: ``ok``, ``refused`` (cannot run this problem),
    ``unavailable`` (cannot run here at all), ``failed`` (raised while running) or ``skipped``
    (listed but not run, with the reason)."""

    name: str
    kind: str
    status: str
    reason: str = ""
    checked: bool = True
    correct: Optional[bool] = None
    max_err: Optional[float] = None
    times_s: list[float] = field(default_factory=list)
    median_ms: Optional[float] = None
    gflops: Optional[float] = None
    pct_peak: Optional[float] = None
    peak_extra_mb: Optional[float] = None
    setup_s: float = 0.0
    compile_s: Optional[float] = None
    compiles: bool = False
    speedup_vs: dict[str, float] = field(default_factory=dict)

    @property
    def timed(self) -> bool:
        return self.median_ms is not None


@dataclass
class BenchResult:
    problem: BenchProblem
    machine: dict
    matmul_peak_gflops: float
    oracle_s: float
    oracle_skipped: Optional[str]
    rows: list[Row]
    budget_s: float

    def best_visattn(self) -> Optional[Row]:
        """Our fastest backend among those that ran and were not found wrong."""
        ours = [r for r in self.rows if r.kind == "visattn" and r.timed and r.correct is not False]
        return min(ours, key=lambda r: r.median_ms) if ours else None


def error_text(e: BaseException) -> str:
    """``"Type: first line of the message"``, at most 200 characters, for a table cell."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:200]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def run_bench(problem: BenchProblem, peers: Optional[Sequence[Peer]] = None, *, budget_s: float = 2.0,
              max_bytes: float = 4 * 2**30, measure_memory: bool = True, peak_gflops: Optional[float] = None,
              progress: Optional[Progress] = None) -> BenchResult:
    """Check, time and measure every peer on ``problem``; never raises for a peer that cannot run it.

    ``budget_s`` bounds the timed calls of one implementation (a slow one still gets one call);
    ``max_bytes`` is the memory an implementation may be estimated to need before it is refused
    rather than risking the machine; ``peak_gflops`` skips the matmul measurement when given.
    Progress lines go to ``progress`` when given, else to stderr under a progress bar
    (:class:`~visattn.console.ProgressBar`: drawn on a terminal, plain lines otherwise).
    """
    peers = list(default_peers() if peers is None else peers)
    # Steps: the matmul peak, the oracle, one check per implementation, the timing rounds, memory.
    steps = int(peak_gflops is None) + 1 + len(peers) + TIMING_ROUNDS + int(measure_memory)
    with ProgressBar(steps, "visattn bench", log=progress, transient=True) as bar:
        return _run(problem, peers, budget_s, max_bytes, measure_memory, peak_gflops, bar)


def _run(problem: BenchProblem, peers: list[Peer], budget_s: float, max_bytes: float, measure_memory: bool,
         peak_gflops: Optional[float], bar: ProgressBar) -> BenchResult:
    """:func:`run_bench`'s work, reporting lines and steps to ``bar``."""
    device = problem.device
    if peak_gflops is None:
        bar.describe("matmul peak")
        peak_gflops = _matmul_peak(problem, bar)
        bar.advance()
    q, k, v, dout = problem.inputs()
    bar.describe("oracle")
    bar("computing the float64 oracle (reference backend)...")
    oracle = Oracle.compute(problem, q, k, v, dout, max_bytes)
    if oracle.skipped:
        bar(f"  oracle skipped: {oracle.skipped}; correctness is not checked")
    bar.advance()

    if problem.backward:
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

        def run(fn):
            # Gradients returned, not accumulated into .grad: nothing outlives a call, so one call's
            # memory (and time) never includes freeing the previous call's gradients.
            out = fn(*leaves)
            return out, torch.autograd.grad(out, leaves, dout, allow_unused=True)
    else:
        leaves = [q, k, v]

        def run(fn):
            with torch.no_grad():
                return fn(*leaves), None

    rows, ready = [], []  # ready: (row, its call, first call's seconds, progress tag)
    for i, peer in enumerate(peers, 1):
        tag = f"[{i}/{len(peers)}] {peer.name}"
        bar.describe(tag)
        row, call, first = _check_one(peer, problem, oracle, run, max_bytes, tag, bar)
        rows.append(row)
        if call is not None:
            ready.append((row, call, first, tag))
        bar.advance()
    if ready:
        bar(f"timing {len(ready)} implementations together, in alternating rounds "
            f"(up to {budget_s:g} s each)...")
    bar.describe("timing")
    timings = time_interleaved([call for _, call, _, _ in ready], device, budget_s,
                               first_call_s=[first for _, _, first, _ in ready], rounds=TIMING_ROUNDS,
                               on_round=lambda r: bar.advance())
    if measure_memory:
        bar.describe("memory")
    for (row, call, first, tag), timing in zip(ready, timings):
        if isinstance(timing, Exception):
            status = "refused" if isinstance(timing, (NotImplementedError, ValueError)) else "failed"
            bar(f"{tag}: {status} while timed ({error_text(timing)})")
            _set(row, status, "out of memory" if _is_oom(timing) else error_text(timing))
            continue
        row.times_s = timing.times
        row.median_ms = timing.median * 1e3
        if row.compiles:
            row.compile_s = max(0.0, first - timing.median)
        if measure_memory:
            nbytes = peak_extra_bytes(call, device)
            row.peak_extra_mb = None if nbytes is None else nbytes / 2**20
        verdict = {True: "correct", False: "WRONG", None: "unchecked"}[row.correct] if row.checked else "not NA"
        bar(f"{tag}: {row.median_ms:.2f} ms median of {len(timing.times)}, {verdict}")
        row.gflops = problem.flops / (row.median_ms / 1e3) / 1e9
        row.pct_peak = 100 * row.gflops / peak_gflops
    bar.advance(int(measure_memory))
    for row in rows:
        row.speedup_vs = {o.name: o.median_ms / row.median_ms for o in rows
                          if o is not row and o.timed and row.timed}
    return BenchResult(problem, machine_info(device), peak_gflops, oracle.seconds, oracle.skipped, rows, budget_s)


def _matmul_peak(problem: BenchProblem, progress: Progress) -> float:
    """The fastest GEMM this machine offers for these inputs: in their dtype, or in float32 (an
    implementation may always compute half inputs in float32, and CPUs often do that faster)."""
    dtypes = [problem.dtype] if problem.dtype in (torch.float32, torch.float64) else [problem.dtype, torch.float32]
    progress(f"measuring the matmul peak ({', '.join(str(d).replace('torch.', '') for d in dtypes)}) on "
             f"{problem.device}...")
    return max(matmul_peak_gflops(d, problem.device) for d in dtypes)


def _check_one(peer: Peer, problem: BenchProblem, oracle: Oracle, run, max_bytes: float, tag: str,
               progress: Progress) -> tuple[Row, Optional[Callable[[], object]], float]:
    """Build ``peer``, make its first call and check it against the oracle. Returns its row and,
    when it ran, the call to time and the first call's seconds (compilation included)."""
    row = Row(peer.name, peer.kind, "ok", checked=peer.checked, compiles=peer.compiles)
    if peer.skip:
        progress(f"{tag}: skipped ({peer.skip})")
        return _set(row, "skipped", peer.skip), None, 0.0
    reason = peer.unavailable()
    if reason:
        progress(f"{tag}: unavailable ({reason})")
        return _set(row, "unavailable", reason), None, 0.0
    reason = peer.refuse(problem, max_bytes)
    if reason:
        progress(f"{tag}: refused ({reason})")
        return _set(row, "refused", reason), None, 0.0
    try:
        built = peer.build(problem)
        row.setup_s = built.setup_s
        progress(f"{tag}: {'compiling and checking' if peer.compiles else 'checking'}...")
        t0 = time.perf_counter()
        out, grads = run(built.fn)
        first = time.perf_counter() - t0
        if peer.checked:
            row.correct, row.max_err = compare(problem, oracle, out, grads)
        del out, grads
    except Exception as e:  # a peer's own refusal (NotImplementedError, ValueError) or a crash: report it
        status = "refused" if isinstance(e, (NotImplementedError, ValueError)) else "failed"
        reason = "out of memory" if _is_oom(e) else error_text(e)
        progress(f"{tag}: {status} ({reason})")
        return _set(row, status, reason), None, 0.0
    progress(f"{tag}: first call {first:.2f} s")
    return row, (lambda: run(built.fn)), first


def _set(row: Row, status: str, reason: str) -> Row:
    row.status, row.reason = status, reason
    return row
