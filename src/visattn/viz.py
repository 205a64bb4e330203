"""Pictures of neighbourhoods and attention maps (``visattn show``); matplotlib is imported lazily.

Two kinds of figure:

* :func:`plot_neighborhoods`: for a 1-D or 2-D shape and per-axis kernel/stride/dilation/causal, the
  keys chosen queries attend to (each key labelled with its neighbourhood slot), the query's
  dilation group and its stride group, so border shifting, dilation and stride are visible at once;
* :func:`plot_attention_map`: the attention weights of a :class:`~visattn.nn.NeighborhoodAttention2D`
  for one query token of an image, per head, overlaid on the image.

The data functions (:func:`neighborhood_layers`, :func:`attention_map`) return tensors and are what
the tests check; the ``plot_*`` functions only draw them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .functional import neighborhood_attention
from .spec import BoolOrTuple, IntOrTuple, make_spec, neighbor_table

__all__ = ["NeighborhoodLayers", "neighborhood_layers", "default_queries", "plot_neighborhoods",
           "synthetic_image", "image_tokens", "attention_map", "plot_attention_map"]


@dataclass
class NeighborhoodLayers:
    """What one query sees, as ``[*shape]`` grids: ``slot`` (neighbourhood slot of each attended
    key, -1 elsewhere), ``same_dilation_group`` and ``same_stride_group`` (queries that share this
    query's window position: same dilation group and same stride block on every axis)."""

    query: tuple[int, ...]
    slot: torch.Tensor
    same_dilation_group: torch.Tensor
    same_stride_group: torch.Tensor

    @property
    def attended(self) -> torch.Tensor:
        return self.slot >= 0


def neighborhood_layers(shape: Sequence[int], query: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                        dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False) -> NeighborhoodLayers:
    """The keys ``query`` attends to, with their slots, from the library's window rules (after the
    variable-resolution rule), plus the query's dilation and stride groups."""
    shape, query = tuple(int(s) for s in shape), tuple(int(c) for c in query)
    if len(query) != len(shape) or any(not 0 <= c < s for c, s in zip(query, shape)):
        raise ValueError(f"neighborhood_layers: query={query} is not a coordinate of shape {shape}.")
    spec = make_spec("neighborhood_layers", shape, kernel_size, stride, dilation, is_causal)
    index, valid, _ = neighbor_table(spec)
    flat_q = 0
    for c, s in zip(query, shape):
        flat_q = flat_q * s + c
    slot = torch.full((spec.num_tokens,), -1, dtype=torch.int64)
    ok = valid[flat_q]
    slot[index[flat_q][ok]] = torch.arange(spec.window_size)[ok]
    same_d = torch.ones(shape, dtype=torch.bool)
    same_s = torch.ones(shape, dtype=torch.bool)
    for a, (L, _, s, d, _) in enumerate(spec.axes()):
        x = torch.arange(L)
        view = [1] * len(shape)
        view[a] = L
        in_group = (x % d == query[a] % d).reshape(view)
        same_d &= in_group
        same_s &= in_group & ((x // d) // s == (query[a] // d) // s).reshape(view)
    return NeighborhoodLayers(query, slot.reshape(shape), same_d, same_s)


def default_queries(shape: Sequence[int]) -> list[tuple[tuple[int, ...], str]]:
    """Corner, edge and centre queries of ``shape`` (1-D: start, near start, centre), labelled."""
    if len(shape) == 1:
        L = shape[0]
        picks = [((0,), "start"), ((min(1, L - 1),), "next to start"), ((L // 2,), "centre")]
    else:
        H, W = shape
        picks = [((0, 0), "corner"), ((0, W // 2), "edge"), ((H // 2, W // 2), "centre")]
    seen, out = set(), []
    for q, name in picks:
        if q not in seen:
            seen.add(q)
            out.append((q, name))
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("visattn show needs matplotlib: pip install 'visattn[plot]'") from e
    return plt


def _fmt(values: tuple) -> str:
    return str(values[0]) if len(set(values)) == 1 else "(" + ", ".join(map(str, values)) + ")"


def plot_neighborhoods(shape: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                       dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
                       queries: Optional[Sequence[Sequence[int]]] = None, out: str = "neighborhood.png") -> str:
    """Draw the neighbourhoods of ``queries`` (default: corner, edge, centre) on a ``shape`` grid.

    1-D shapes are drawn as one row. Returns the path written.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch, Rectangle

    shape = tuple(int(s) for s in shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"plot_neighborhoods: shape={shape}; only 1-D and 2-D grids can be drawn.")
    labelled = ([(tuple(q), "") for q in queries] if queries else default_queries(shape))
    spec = make_spec("plot_neighborhoods", shape, kernel_size, stride, dilation, is_causal)
    grid = shape if len(shape) == 2 else (1, shape[0])
    n = len(labelled)
    cell = 0.42 if max(grid) <= 24 else 9.0 / max(grid)
    if len(shape) == 1:  # one long row per query, stacked
        fig, axes = plt.subplots(n, 1, figsize=(max(4.0, grid[1] * cell) + 0.6, 1.3 * n + 1.2), squeeze=False)
        axes = axes.T
    else:
        fig, axes = plt.subplots(1, n, figsize=(max(3.2, grid[1] * cell) * n + 0.6, grid[0] * cell + 1.9),
                                 squeeze=False)
    colors = dict(key="#1f77b4", dil="#d9ead3", stride="#ff7f0e", query="#d62728", empty="#ffffff")
    dilated = any(d > 1 for d in spec.dilation)  # with dilation 1 every cell is in the query's group
    for ax, (q, name) in zip(axes[0], labelled):
        lay = neighborhood_layers(shape, q, kernel_size, stride, dilation, is_causal)
        slot = lay.slot.reshape(grid)
        same_d = lay.same_dilation_group.reshape(grid)
        same_s = lay.same_stride_group.reshape(grid)
        qr, qc = (0, q[0]) if len(shape) == 1 else q
        for r in range(grid[0]):
            for c in range(grid[1]):
                if slot[r, c] >= 0:
                    face = colors["key"]
                else:
                    face = colors["dil"] if same_d[r, c] and dilated else colors["empty"]
                ax.add_patch(Rectangle((c, r), 1, 1, facecolor=face, edgecolor="#bbbbbb", lw=0.5))
                if slot[r, c] >= 0 and max(grid) <= 24:
                    ax.text(c + 0.5, r + 0.5, str(int(slot[r, c])), ha="center", va="center", fontsize=6,
                            color="white")
                if same_s[r, c] and (r, c) != (qr, qc):
                    ax.add_patch(Rectangle((c + 0.12, r + 0.12), 0.76, 0.76, fill=False, edgecolor=colors["stride"],
                                           lw=1.2, ls="--"))
        ax.add_patch(Rectangle((qc, qr), 1, 1, fill=False, edgecolor=colors["query"], lw=2.5))
        ax.set_xlim(0, grid[1])
        ax.set_ylim(grid[0], 0)
        ax.set_aspect("equal")
        xt = range(0, grid[1], max(1, grid[1] // 8))
        yt = range(0, grid[0], max(1, grid[0] // 8)) if len(shape) == 2 else []
        ax.set_xticks([t + 0.5 for t in xt], [str(t) for t in xt])
        ax.set_yticks([t + 0.5 for t in yt], [str(t) for t in yt])
        ax.tick_params(labelsize=7)
        n_keys = int((slot >= 0).sum())
        ax.set_title(f"query {q}{' (' + name + ')' if name else ''}\n{n_keys} key{'s' * (n_keys != 1)}", fontsize=9)
    handles = [Patch(facecolor=colors["key"], label="attended key (number = slot)"),
               Patch(facecolor="white", edgecolor=colors["query"], lw=2, label="query")]
    if dilated:
        handles.append(Patch(facecolor=colors["dil"], label="same dilation group, not attended"))
    if any(s > 1 for s in spec.stride):
        handles.append(Patch(facecolor="white", edgecolor=colors["stride"], ls="--",
                             label="same stride group (same window)"))
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fitted = "" if spec.kernel_size == spec.requested_kernel_size else f" (fitted kernel {_fmt(spec.kernel_size)})"
    fig.suptitle(f"shape {shape}: kernel {_fmt(spec.requested_kernel_size)}, stride {_fmt(spec.stride)}, "
                 f"dilation {_fmt(spec.dilation)}, causal {_fmt(spec.is_causal)}{fitted}", fontsize=10)
    fig.tight_layout(rect=(0, 0.12 if len(shape) == 2 else 0.18, 1, 0.95))
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def synthetic_image(height: int = 128, width: int = 160) -> torch.Tensor:
    """A test picture ``[H, W, 3]`` in [0, 1]: a colour gradient with a disc, a square and stripes."""
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    img = torch.stack([0.25 + 0.5 * x, 0.3 + 0.4 * y, 0.6 - 0.3 * x * y], dim=-1)
    disc = ((x - 0.3) ** 2 * (width / height) ** 2 + (y - 0.4) ** 2) < 0.05
    img[disc] = torch.tensor([0.95, 0.8, 0.1])
    square = (x > 0.6) & (x < 0.85) & (y > 0.55) & (y < 0.85)
    img[square] = torch.tensor([0.1, 0.2, 0.7])
    stripes = (y < 0.2) & ((x * 12).floor() % 2 == 0)
    img[stripes] = 0.9
    return img


def image_tokens(image: torch.Tensor, patch: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Patch embedding of ``image [H, W, 3]``: ``[1, H // patch, W // patch, dim]`` tokens made by a
    fixed random projection of each patch's pixels (what a ViT stem does, untrained)."""
    H, W = image.shape[0] // patch * patch, image.shape[1] // patch * patch
    if H == 0 or W == 0:
        raise ValueError(f"image_tokens: image {tuple(image.shape[:2])} is smaller than one {patch}x{patch} patch.")
    p = image[:H, :W, :3].reshape(H // patch, patch, W // patch, patch, 3).permute(0, 2, 1, 3, 4)
    p = p.reshape(H // patch, W // patch, -1)
    p = (p - p.mean((0, 1))) / (p.std((0, 1)) + 1e-6)
    proj = torch.randn(p.shape[-1], dim, generator=torch.Generator().manual_seed(seed)) / p.shape[-1] ** 0.5
    return (p @ proj)[None]


def attention_map(module, tokens: torch.Tensor, query: Sequence[int]) -> torch.Tensor:
    """The weights of one query of a NeighborhoodAttention2D on ``tokens [1, Hg, Wg, C]``, scattered
    onto the token grid: ``[heads, Hg, Wg]``, each head summing to 1."""
    B, Hg, Wg, _ = tokens.shape
    r, c = (int(v) for v in query)
    if not (0 <= r < Hg and 0 <= c < Wg):
        raise ValueError(f"attention_map: query={tuple(query)} is outside the {Hg}x{Wg} token grid.")
    with torch.no_grad():
        q, k, v = module.qkv(tokens).reshape(B, Hg, Wg, 3, module.num_heads, module.head_dim).unbind(-3)
        _, attn = neighborhood_attention(q, k, v, **module._na_args(), scale=module.scale, rpb=module.rpb,
                                         return_attn=True, backend=module.backend)
    spec = make_spec("attention_map", (Hg, Wg), module.kernel_size, module.stride, module.dilation, module.is_causal)
    index, valid, _ = neighbor_table(spec)
    w = attn[0, r, c] * valid[r * Wg + c]  # [heads, K]
    maps = torch.zeros(module.num_heads, Hg * Wg, dtype=w.dtype)
    maps.scatter_add_(1, index[r * Wg + c].expand(module.num_heads, -1), w)
    return maps.reshape(module.num_heads, Hg, Wg)


def plot_attention_map(image: torch.Tensor, module, query: Sequence[int], patch: int, out: str = "attention.png",
                       title: str = "") -> str:
    """The original image with the query patch marked, then one panel per head with that query's
    attention weights overlaid on the image. Returns the path written."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    tokens = image_tokens(image, patch, module.embed_dim)
    maps = attention_map(module, tokens, query)
    Hg, Wg = maps.shape[1:]
    img = image[: Hg * patch, : Wg * patch, :3].clamp(0, 1).numpy()
    heads = maps.shape[0]
    fig, axes = plt.subplots(1, heads + 1, figsize=(3.2 * (heads + 1) + 0.8, 3.4 * Hg / Wg + 1.0), squeeze=False)
    r, c = query
    marker = lambda: Rectangle((c * patch - 0.5, r * patch - 0.5), patch, patch, fill=False, edgecolor="cyan", lw=2)  # noqa: E731
    grey = img.mean(-1)  # the weights carry the colour; the picture stays grey underneath
    axes[0, 0].imshow(img)
    axes[0, 0].add_patch(marker())
    axes[0, 0].set_title(f"image, query token ({r}, {c})", fontsize=9)
    vmax = float(maps.max())
    for h in range(heads):
        ax = axes[0, h + 1]
        up = maps[h].repeat_interleave(patch, 0).repeat_interleave(patch, 1).numpy()
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1.6)
        shown = ax.imshow(up, cmap="inferno", alpha=(up > 0) * 0.8, vmin=0, vmax=vmax)
        ax.add_patch(marker())
        ax.set_title(f"head {h}: max weight {float(maps[h].max()):.2f}", fontsize=9)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=list(axes[0, 1:]), fraction=0.025, pad=0.02, label="attention weight")
    fig.suptitle(title or f"{type(module).__name__}(kernel {_fmt(module.kernel_size)}, "
                          f"dilation {_fmt(module.dilation)}, stride {_fmt(module.stride)}), "
                          f"{Hg}x{Wg} tokens of {patch}x{patch} px", fontsize=10)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
