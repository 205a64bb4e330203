"""``visattn show``: pictures (PNG) of neighbourhoods and of attention maps.

* ``visattn show neighborhood --shape 12 16 --kernel-size 5 --dilation 2 --out nb.png``: which keys
  the corner, edge and centre queries (or ``--query r,c``) attend to;
* ``visattn show attention --image photo.png --kernel-size 7 --query 6,9 --out attn.png``: a
  NeighborhoodAttention2D's weights for one query token, per head, over the image (random weights
  unless ``--weights`` names a saved ``state_dict``; a synthetic image without ``--image``).
"""

from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or comma-separated ints like 5 or 5,3, got {text!r}")


def _bools(text: str) -> tuple[bool, ...]:
    table = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    try:
        return tuple(table[v.strip().lower()] for v in text.split(","))
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected 0/1/true/false per axis like 0 or 1,0, got {text!r}")


def _per_axis(values: tuple):
    return values[0] if len(values) == 1 else values


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("show", help="draw neighbourhoods or attention maps (PNG)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)

    def window_args(q: argparse.ArgumentParser, kernel: str) -> None:
        q.add_argument("--kernel-size", type=_ints, default=_ints(kernel),
                       help=f"per axis, e.g. 5 or 5,3 (default {kernel})")
        q.add_argument("--stride", type=_ints, default=(1,), help="per axis (default 1)")
        q.add_argument("--dilation", type=_ints, default=(1,), help="per axis (default 1)")
        q.add_argument("--causal", type=_bools, default=(False,), help="per axis, e.g. 0 or 1,0 (default 0)")

    nb = kinds.add_parser("neighborhood", help="which keys chosen queries attend to")
    nb.add_argument("--shape", type=int, nargs="+", default=[12, 16], help="grid size, 1 or 2 axes (default 12 16)")
    window_args(nb, "5")
    nb.add_argument("--query", type=_ints, action="append", help="a query coordinate r,c (repeatable; default: "
                    "corner, edge and centre)")
    nb.add_argument("--out", default="neighborhood.png", help="output PNG (default neighborhood.png)")
    nb.set_defaults(func=run_neighborhood)

    at = kinds.add_parser("attention", help="attention maps of a NeighborhoodAttention2D over an image")
    at.add_argument("--image", help="an image file (PNG; other formats need Pillow); default: a synthetic picture")
    window_args(at, "7")
    at.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    at.add_argument("--dim", type=int, default=64, help="embedding dim (default 64)")
    at.add_argument("--patch", type=int, default=8, help="pixels per token side (default 8)")
    at.add_argument("--rpb", action="store_true", help="use a relative positional bias")
    at.add_argument("--weights", help="a state_dict (torch.save) for NeighborhoodAttention2D with these arguments")
    at.add_argument("--seed", type=int, default=0, help="seed of the random weights and patch embedding")
    at.add_argument("--query", type=_ints, help="query token r,c (default: the centre token)")
    at.add_argument("--out", default="attention.png", help="output PNG (default attention.png)")
    at.set_defaults(func=run_attention)
    return p


def _user_errors(run):
    """Bad arguments (a ValueError from the library, naming the fix) print one line, exit code 2."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"visattn show {args.kind}: error: {e}", file=sys.stderr)
            return 2

    wrapped.__name__ = run.__name__
    return wrapped


@_user_errors
def run_neighborhood(args: argparse.Namespace) -> int:
    from ..viz import plot_neighborhoods

    out = plot_neighborhoods(args.shape, _per_axis(args.kernel_size), _per_axis(args.stride),
                             _per_axis(args.dilation), _per_axis(args.causal), args.query, args.out)
    print(f"wrote {out}")
    return 0


def _read_image(path: str):
    import matplotlib.image
    import torch

    img = torch.from_numpy(matplotlib.image.imread(path)).float()
    if img.dim() == 2:  # greyscale
        img = img[..., None].expand(*img.shape, 3)
    if img.max() > 1.0:  # 8-bit formats read through Pillow
        img = img / 255.0
    return img[..., :3]


@_user_errors
def run_attention(args: argparse.Namespace) -> int:
    import torch

    from ..nn import NeighborhoodAttention2D
    from ..viz import plot_attention_map, synthetic_image

    image = _read_image(args.image) if args.image else synthetic_image()
    torch.manual_seed(args.seed)
    module = NeighborhoodAttention2D(args.dim, args.heads, _per_axis(args.kernel_size), _per_axis(args.stride),
                                     _per_axis(args.dilation), _per_axis(args.causal), rel_pos_bias=args.rpb).eval()
    if args.weights:
        module.load_state_dict(torch.load(args.weights, map_location="cpu"))
    grid = (image.shape[0] // args.patch, image.shape[1] // args.patch)
    query = args.query or (grid[0] // 2, grid[1] // 2)
    out = plot_attention_map(image, module, query, args.patch, args.out)
    print(f"wrote {out}")
    return 0
