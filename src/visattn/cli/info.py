"""``visattn info``: versions, devices, and which backends work here (and why the others do not)."""

from __future__ import annotations

import argparse
import platform

import torch


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="versions, devices and usable backends")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..backends import get_backend, list_backends, why_not

    print(f"visattn {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"cpu: {platform.machine()}, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("cuda: not available")
    print("backends:")
    for name in list_backends():
        reason = why_not(name)
        status = "usable" if reason is None else f"unavailable: {reason}"
        desc = get_backend(name).description if reason is None else ""
        print(f"  {name:<10} {status}" + (f"  ({desc})" if desc else ""))
    from ..scan.ops import why_not as scan_why_not

    reason = scan_why_not("cpu", torch.device("cpu"), torch.float32)
    print("selective scan (visattn.selective_scan): torch path usable; cpu kernel "
          + ("usable (compiled on the first call it serves)" if reason is None else f"unavailable: {reason}"))
    return 0
