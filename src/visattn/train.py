"""A complete, small training run: a DiNAT on scikit-learn's digits, single-process or DDP.

Everything ships offline: the 1,797 8x8 digit images come with scikit-learn and are upsampled to
``img_size`` (32 by default), so ``visattn train`` needs no download. The same code trains
data-parallel under ``torchrun --nproc_per_node=N`` (gloo on CPU, NCCL on CUDA): each rank sees
its shard, gradients are averaged by DDP, validation counts are summed over ranks, and rank 0
writes the checkpoint and the curve.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .console import ProgressBar
from .models import NAT, create_model, dinat_dilations

__all__ = ["DistInfo", "TrainConfig", "build_demo_model", "digits_dataset", "init_distributed", "train"]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def digits_dataset(img_size: int = 32, val_fraction: float = 0.2, seed: int = 0
                   ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits as ``((x_train, y_train), (x_val, y_val))``, a stratified split.

    ``x: [N, 1, img_size, img_size]`` float32, standardized; ``y: [N]`` int64 in 0..9. The split
    is the same for every ``seed`` on every machine (it depends on ``seed`` only).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("visattn train: the digits data set comes with scikit-learn; "
                          "`pip install scikit-learn` (or `pip install visattn[train]`).") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    gen = torch.Generator().manual_seed(seed)
    val_idx = []
    for c in range(10):  # stratified: the same fraction of every class goes to validation
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        val_idx.append(idx[: round(len(idx) * val_fraction)])
    val_mask = torch.zeros(len(y), dtype=torch.bool)
    val_mask[torch.cat(val_idx)] = True
    return (x[~val_mask], y[~val_mask]), (x[val_mask], y[val_mask])


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels per image (pad with the background, crop)."""
    B, _, H, W = x.shape
    background = x.amin()
    padded = F.pad(x, (max_shift,) * 4, value=float(background))
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (B,), generator=gen) for _ in range(2))
    rows = (dy[:, None] + torch.arange(H)[None, :])[:, None, :, None].expand(B, x.shape[1], H, W + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(W)[None, :])[:, None, None, :].expand(B, x.shape[1], H, W)
    return out.gather(3, cols)


# --------------------------------------------------------------------------------------------------
# Model, distributed setup
# --------------------------------------------------------------------------------------------------

def build_demo_model(img_size: int = 32, num_classes: int = 10, in_chans: int = 1, drop_path_rate: float = 0.1,
                     backend: Optional[str] = None) -> NAT:
    """A 3-stage DiNAT sized for 32x32 digits (0.45M parameters).

    Kernel 3 (a 7x7 window would cover the whole 8x8 first map); stage 1 alternates NA and DiNA
    with dilation 2, chosen by the same rule as the paper's (:func:`visattn.models.dinat_dilations`).
    """
    depths, kernel = (2, 2, 2), 3
    return NAT(depths=depths, num_heads=(2, 4, 8), embed_dim=32, mlp_ratio=2.0, kernel_size=kernel,
               dilations=dinat_dilations(depths, kernel, img_size), drop_path_rate=drop_path_rate,
               in_chans=in_chans, num_classes=num_classes, backend=backend)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).

    Without ``WORLD_SIZE`` > 1 this is a single process and nothing is initialized. The backend is
    NCCL when training on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if world <= 1:
        return DistInfo(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return DistInfo(rank, world, local_rank, dev)


# --------------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Options of :func:`train` (the ``visattn train`` flags)."""

    model: str = "demo"            # "demo" (build_demo_model) or a registered name, e.g. "dinat_mini"
    img_size: int = 32
    epochs: int = 8
    batch_size: int = 64           # global batch: split evenly over the ranks
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    max_shift: int = 3             # augmentation: random translation in pixels
    seed: int = 0
    out_dir: str = "visattn-train"
    device: Optional[str] = None   # "cpu" / "cuda"; default: cuda if available
    threads: Optional[int] = None  # torch intra-op threads per process
    limit_train: Optional[int] = None  # use only the first N training images (quick checks)
    plot: bool = True
    progress: bool = True


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, info: DistInfo, batch: int) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole validation set; each rank takes a strided shard."""
    model.eval()
    xs, ys = x[info.rank::info.world_size], y[info.rank::info.world_size]
    stats = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss sum, correct, count
    with torch.no_grad():
        for i in range(0, len(xs), batch):
            xb, yb = xs[i:i + batch].to(info.device), ys[i:i + batch].to(info.device)
            logits = model(xb)
            stats[0] += F.cross_entropy(logits, yb, reduction="sum").double()
            stats[1] += (logits.argmax(-1) == yb).sum()
            stats[2] += len(yb)
    if info.distributed:
        dist.all_reduce(stats)
    return (stats[0] / stats[2]).item(), (stats[1] / stats[2]).item()


def train(cfg: TrainConfig) -> dict:
    """Train, validate each epoch, save ``out_dir/checkpoint.pt`` and ``out_dir/curves.png``.

    Returns ``{"history": [{epoch, train_loss, val_loss, val_acc, seconds}], "val_acc": last,
    "checkpoint": path, "plot": path or None, "world_size": n}`` (on every rank).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    (x_tr, y_tr), (x_val, y_val) = digits_dataset(cfg.img_size, seed=cfg.seed)
    if cfg.limit_train:
        x_tr, y_tr = x_tr[: cfg.limit_train], y_tr[: cfg.limit_train]
    if cfg.model == "demo":
        model = build_demo_model(cfg.img_size)
    else:
        model = create_model(cfg.model, num_classes=10, in_chans=1, img_size=cfg.img_size)
    model = model.to(info.device)
    if cfg.batch_size % info.world_size:
        raise ValueError(f"visattn train: --batch-size {cfg.batch_size} must be divisible by the number of "
                         f"processes ({info.world_size}).")
    local_batch = cfg.batch_size // info.world_size
    net = nn.parallel.DistributedDataParallel(model) if info.distributed else model
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "rpb" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1 or "rpb" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = len(x_tr) // cfg.batch_size  # drop the last partial batch: every rank steps together
    total, warmup = steps_per_epoch * cfg.epochs, int(steps_per_epoch * cfg.warmup_epochs)
    gen = torch.Generator().manual_seed(cfg.seed)  # identical on every rank: one global permutation
    history, step = [], 0
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"visattn train: {cfg.model} ({n_params / 1e6:.2f}M params) on digits {cfg.img_size}x{cfg.img_size}, "
              f"{len(x_tr)} train / {len(x_val)} val, {info.world_size} process(es) on {info.device}, "
              f"batch {cfg.batch_size}", flush=True)
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x_tr), generator=gen)
        running = 0.0
        # Drawn on rank 0's terminal only (rich); the epoch line below is the record in logs.
        with ProgressBar(steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", enabled=cfg.progress and info.is_main,
                         fields="loss {loss:.3f}") as bar:
            for i in range(steps_per_epoch):
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                idx = idx[info.rank * local_batch:(info.rank + 1) * local_batch]
                xb = _augment(x_tr[idx], gen, cfg.max_shift) if cfg.max_shift else x_tr[idx]
                xb, yb = xb.to(info.device), y_tr[idx].to(info.device)
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, total, warmup, cfg.lr)
                loss = F.cross_entropy(net(xb), yb, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                running += loss.item()
                bar.advance(loss=running / (i + 1))
        val_loss, val_acc = _evaluate(model, x_val, y_val, info, 256)
        record = dict(epoch=epoch, train_loss=running / max(steps_per_epoch, 1), val_loss=val_loss, val_acc=val_acc,
                      seconds=time.perf_counter() - t0)
        history.append(record)
        if info.is_main:
            print(f"epoch {epoch}: train loss {record['train_loss']:.4f}  val loss {val_loss:.4f}  "
                  f"val acc {100 * val_acc:.2f}%  ({record['seconds']:.1f}s)", flush=True)
    ckpt = os.path.join(cfg.out_dir, "checkpoint.pt")
    plot = None
    if info.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        torch.save({"model": model.state_dict(), "config": asdict(cfg), "history": history}, ckpt)
        if cfg.plot:
            plot = _plot(history, os.path.join(cfg.out_dir, "curves.png"))
        print(f"saved {ckpt}" + (f" and {plot}" if plot else ""), flush=True)
    if info.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return dict(history=history, val_acc=history[-1]["val_acc"] if history else float("nan"), checkpoint=ckpt,
                plot=plot, world_size=info.world_size)


def _plot(history: list[dict], path: str) -> Optional[str]:
    """Loss and accuracy per epoch as a PNG; ``None`` (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("visattn train: matplotlib is not installed; skipping the curve plot (`pip install matplotlib`).")
        return None
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax1.legend()
    ax2.plot(epochs, [100 * h["val_acc"] for h in history], "o-", color="C2")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
