"""``visattn train``: train a small DiNAT on scikit-learn's digits (offline), on CPU or GPU, 1..N processes.

Single process: ``visattn train``. Data-parallel: ``torchrun --nproc_per_node=2 -m visattn.cli.train``
(gloo on CPU, NCCL on GPU). Writes ``<out>/checkpoint.pt`` and ``<out>/curves.png``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Optional, Sequence


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a small DiNAT on the digits data set (offline, CPU ok)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train import TrainConfig

    d = TrainConfig()
    p.add_argument("--model", default=d.model,
                   help="'demo' (a 0.45M-parameter DiNAT for 32x32) or a registered model, e.g. dinat_mini "
                        "(default: %(default)s)")
    p.add_argument("--img-size", type=int, default=d.img_size,
                   help="digits are upsampled from 8x8 to this size (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch size, split over the processes (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="(default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="(default: %(default)s)")
    p.add_argument("--max-shift", type=int, default=d.max_shift,
                   help="augmentation: random translation in pixels, 0 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--out", dest="out_dir", default=d.out_dir, help="output folder (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device,
                   help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per process")
    p.add_argument("--limit-train", type=int, default=d.limit_train,
                   help="use only the first N training images (quick checks)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write curves.png")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    result = train(cfg)
    return 0 if result["history"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m visattn.cli.train`` (what torchrun launches)."""
    p = argparse.ArgumentParser(prog="visattn train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
