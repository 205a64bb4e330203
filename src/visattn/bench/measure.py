"""Timing, memory and machine measurements shared by ``visattn bench`` and ``visattn bench --zoo``.

* :func:`time_call`: warm up, then the median of as many calls as fit a time budget;
  :func:`time_interleaved` does it for several implementations in alternating rounds.
* :func:`peak_extra_bytes`: the peak of memory allocated *during* one call, above what was live before
  it (inputs excluded, outputs and temporaries included). On CUDA from the caching allocator's
  statistics; on CPU from ``torch.profiler``'s allocation events (torch's CPU allocator keeps no
  statistics and ``tracemalloc`` does not see it). Memory that a kernel allocates outside torch
  (e.g. a C kernel's own scratch buffers) is not seen on CPU;
* :func:`peak_rss_extra_bytes`: the process's resident-memory high-water mark during one call above
  its level before (Linux): it sees every allocation, native scratch included, but also whatever
  else the process does meanwhile and pages the allocator keeps from earlier calls.
* :func:`matmul_peak_gflops`: this machine's measured GEMM throughput, the ceiling to compare against.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import sys
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Timing", "machine_info", "matmul_peak_gflops", "peak_extra_bytes", "peak_rss_extra_bytes", "synchronize",
           "time_call", "time_interleaved"]


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work so wall-clock time covers it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall-clock seconds of the timed calls (warm-up excluded)."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """Relative spread ``(max - min) / median``: how noisy this machine was during the timing."""
        return (max(self.times) - min(self.times)) / self.median if self.times else 0.0


def _warm(fn: Callable[[], object], device: str | torch.device, budget_s: float, max_reps: int,
          first_call_s: Optional[float]) -> tuple[float, int]:
    """Warm ``fn`` up; returns one warm call's seconds and how many calls fit ``budget_s`` (at least 3
    when each call is cheap, a single one when one call alone exceeds twice the budget)."""
    if first_call_s is None:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        first_call_s = time.perf_counter() - t0
    if first_call_s < budget_s / 10:
        # A second warm-up: the first call also paid for allocator growth and lazy initialization.
        fn()
        synchronize(device)
    # Estimate one call from a warm one, not from the first (which may include compilation).
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    one = time.perf_counter() - t0
    min_reps = max(1, min(3, int(2 * budget_s / max(one, 1e-9))))
    return one, min(max_reps, max(min_reps, int(budget_s / max(one, 1e-9)) - 1))


def time_interleaved(fns: Sequence[Callable[[], object]], device: str | torch.device, budget_s: float = 2.0,
                     max_reps: int = 50, first_call_s: Optional[Sequence[Optional[float]]] = None,
                     rounds: int = 4, on_round: Optional[Callable[[int], None]] = None) -> list[Timing | Exception]:
    """Timings of several implementations taken *together*: each gets as many calls as fit its own
    ``budget_s`` (see :func:`time_call`), spread over ``rounds`` rounds that visit every
    implementation in turn (each turn of two or more calls starts with an untimed one). On a shared machine whose load changes over seconds, each one's
    median then covers the same periods as the others', so their ratios stay meaningful (timed one
    after another, a busy spell during one implementation's turn skews the ratio).

    Returns a :class:`Timing` per function, or the exception it raised (it is then called no more).
    ``on_round(r)`` is called after each round ``r`` (progress reporting).
    """
    firsts = list(first_call_s) if first_call_s is not None else [None] * len(fns)
    results: list[Timing | Exception] = []
    reps = []
    for fn, first in zip(fns, firsts):
        try:
            one, n = _warm(fn, device, budget_s, max_reps, first)
            results.append(Timing([one]))
            reps.append(n - 1)  # the warm estimate counts as one timed call
        except Exception as e:  # noqa: BLE001 - reported per implementation
            results.append(e)
            reps.append(0)
    for r in range(rounds):
        for i, fn in enumerate(fns):
            timing = results[i]
            if not isinstance(timing, Timing):
                continue
            try:
                calls = reps[i] * (r + 1) // rounds - reps[i] * r // rounds
                if calls >= 2 and len(fns) > 1:
                    # One untimed call after switching implementations: the first call after another
                    # one pays for refilling caches and waking its own threads (measured: up to 1.2x
                    # on a 1 ms kernel), which timing one implementation alone never included.
                    fn()
                    synchronize(device)
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn()
                    synchronize(device)
                    timing.times.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                results[i] = e
        if on_round is not None:
            on_round(r)
    return results


def time_call(fn: Callable[[], object], device: str | torch.device, budget_s: float = 2.0,
              max_reps: int = 50, first_call_s: Optional[float] = None) -> Timing:
    """Median-able timings of ``fn()``: as many calls as fit in ``budget_s``, at least 3 when each
    call is cheap, a single one when one call alone exceeds twice the budget.

    ``first_call_s`` is the duration of a call already made (the correctness call, which also
    warms caches and compiles); without it one warm-up call is made here.
    """
    result = time_interleaved([fn], device, budget_s, max_reps, [first_call_s], rounds=1)[0]
    if isinstance(result, Exception):
        raise result
    return result


@contextlib.contextmanager
def _native_stderr_silenced():
    """Silence file descriptor 2 (the profiler's native "USDT ... profiler_start/stop" lines, which
    no setting turns off); Python exceptions raised inside still propagate and print after it."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], object], device: str | torch.device) -> Optional[int]:
    """Peak bytes allocated during one ``fn()`` above what was allocated before it; ``None`` if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        # One "[memory]" event per allocation (+bytes) and free (-bytes), on every thread; the
        # running sum in time order is the live memory allocated since the call began.
        events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except (AttributeError, RuntimeError):  # a torch without these profiler internals
        return None
    return max(itertools.accumulate((b for _, b in deltas), initial=0))


def peak_rss_extra_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak resident memory of this process during one ``fn()`` above the level before it; ``None``
    where it cannot be measured (not Linux, or no permission to reset the high-water mark)."""
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024  # kB

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak, to the current resident size (Linux >= 4.0)
        before = status("VmRSS:")
    except (OSError, StopIteration):
        return None
    fn()
    return status("VmHWM:") - before


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       n: int = 1024, budget_s: float = 1.0) -> float:
    """Best GFLOP/s of ``n x n`` GEMMs in ``dtype`` within ``budget_s`` (``2 n^3`` FLOPs each).

    The best rather than the median: this is the machine's ceiling, and other processes sharing the
    cores only ever slow a run down.
    """
    device = torch.device(device)
    if device.type == "cuda":
        n = max(n, 4096)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    best, spent = float("inf"), 0.0
    torch.mm(a, b)  # warm-up: thread pool and packing buffers
    synchronize(device)
    reps = 0
    while reps < 3 or (spent < budget_s and reps < 200):
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2 * n**3 / best / 1e9


def machine_info(device: str | torch.device = "cpu") -> dict:
    """CPU/GPU name, torch threads and versions, for the report header."""
    device = torch.device(device)
    info = dict(cpu=_cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        from .. import __version__
        info["visattn"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
