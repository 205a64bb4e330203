"""A DiNAT-style stack of 3-D neighborhood-attention blocks over a video, its frames split across processes.

Run on CPU with gloo, any number of processes (more than the frames leaves some ranks empty):

    torchrun --nproc_per_node=2 benchmarks/distributed_demo.py
    torchrun --nproc_per_node=4 benchmarks/distributed_demo.py --frames 16 --size 32 --dtype float64

Each rank holds ``torch.tensor_split(video, world_size, dim=1)[rank]``, frames ``[start, stop)`` of a
``[B, T, H, W, C]`` volume, and runs the same blocks on them: pre-norm ``x + NA(LN(x))``,
``x + MLP(LN(x))``, the attention alternating plain NA and DiNA (DiNAT's rule: dilation
``size // kernel`` per axis) with relative positional bias. The attention layers are
:class:`visattn.distributed.NeighborhoodAttention3D`, which exchange only the key/value frames their
windows need. The ranks then sum their parameter gradients (what DDP does over the group), and each
rank checks its output frames and the summed gradients against the same model run in one process on
the whole video, and prints what it sent.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn

import visattn
import visattn.distributed as vd
from visattn.nn.layers import Mlp


class Block(nn.Module):
    """Pre-norm transformer block on channels-last ``[B, T, H, W, C]``, attention class chosen by the caller."""

    def __init__(self, attention: type, dim: int, heads: int, kernel: tuple, dilation: tuple) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attention(dim, heads, kernel, dilation=dilation, rel_pos_bias=True)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def build(attention: type, args: argparse.Namespace) -> nn.Sequential:
    kernel = (3, 7, 7)
    dinat = tuple(max(1, n // k) for n, k in zip((args.frames, args.size, args.size), kernel))
    torch.manual_seed(0)  # every rank and the single-process check build the same weights
    return nn.Sequential(*(Block(attention, args.dim, args.heads, kernel, (1, 1, 1) if i % 2 == 0 else dinat)
                           for i in range(args.depth))).to(getattr(torch, args.dtype))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    if not want.numel():
        return 0.0
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="height and width")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--no-check", action="store_true", help="skip the single-process comparison")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun provides the rank, world size and rendezvous
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    video = torch.randn(1, args.frames, args.size, args.size, args.dim, dtype=dtype,
                        generator=torch.Generator().manual_seed(1))
    frames = torch.tensor_split(torch.arange(args.frames), world)[rank]
    x = torch.tensor_split(video, world, dim=1)[rank].clone().requires_grad_()

    model = build(vd.NeighborhoodAttention3D, args)
    for step in range(2):  # the first step warms up (the CPU kernels compile on first use); the second is timed
        x.grad = None
        model.zero_grad()
        with vd.count_traffic() as sent:
            t0 = time.perf_counter()
            y = model(x)
            t1 = time.perf_counter()
            y.square().sum().backward()
            t2 = time.perf_counter()
    for p in model.parameters():  # the ranks' contributions sum to the gradient of the whole video's loss
        dist.all_reduce(p.grad)

    span = f"frames [{int(frames[0])}, {int(frames[-1]) + 1})" if len(frames) else "no frames"
    line = (f"rank {rank}/{world}: {span} of {args.frames}, forward {1e3 * (t1 - t0):.0f} ms, backward "
            f"{1e3 * (t2 - t1):.0f} ms, sent {sent['forward'] / 2**10:.0f} KiB forward + "
            f"{sent['backward'] / 2**10:.0f} KiB backward in {sent['messages']} messages")
    if not args.no_check:
        single = build(visattn.NeighborhoodAttention3D, args)
        whole = video.clone().requires_grad_()
        out = single(whole)
        out.square().sum().backward()
        errors = [_relative(y, torch.tensor_split(out, world, dim=1)[rank]),
                  _relative(x.grad, torch.tensor_split(whole.grad, world, dim=1)[rank]),
                  max(_relative(p.grad, q.grad) for p, q in zip(model.parameters(), single.parameters()))]
        line += ("; vs one process (max abs difference / max abs value): output {:.1e}, input grad {:.1e}, "
                 "parameter grads {:.1e}").format(*errors)
    for r in range(world):  # one rank at a time, in order
        if r == rank:
            print(line, flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
