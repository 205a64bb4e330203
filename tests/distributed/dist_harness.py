"""Run a function on every rank of a fresh gloo process group on localhost, with a timeout.

Ranks are forked from a forkserver that has imported torch and visattn once, so a group of four
starts in a fraction of a second rather than re-importing torch per rank. Each rank runs
``fn(rank, world, *args)`` after ``init_process_group("gloo")`` on 127.0.0.1; the return values come
back in rank order. A rank that raises makes :func:`run` raise with its traceback; a group that has
not finished within ``timeout`` seconds is killed and :func:`run` raises ``TimeoutError``.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import sys
import traceback
from typing import Any, Callable

_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor", "visattn",
                                        "visattn.distributed", "dist_cases"])
    return _CONTEXT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, world: int, port: int, timeout: float, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    if sys.platform.startswith("linux"):  # keep gloo's connections on the loopback interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            results.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (reported to the parent, which raises)
        results.put((rank, "error", traceback.format_exc()))


def run(world: int, fn: Callable, *args: Any, timeout: float = 60.0) -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each on its own rank."""
    ctx = _context()
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, timeout / 2, args, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, Any]] = {}
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(got) < world:
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, status, value = results.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(got))} of {world} did not finish within "
                                   f"{timeout} s") from None
            got[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                os.kill(p.pid, 9)
                p.join()
    errors = [f"rank {r}:\n{v}" for r, (s, v) in sorted(got.items()) if s == "error"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [got[r][1] for r in range(world)]
