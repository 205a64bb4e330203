"""Before any halo moves, the ranks agree on the call, or all of them raise.

Each rank contributes one small int64 row to an all-gather per sharding group: whether its own
argument checks passed, the length of its shard, and a fingerprint of everything that must be equal
across ranks (shapes off the sharded axis, dtype, window arguments, which extras are present, which
inputs need a gradient, ...). Every rank then takes the same decision from the same gathered rows, so
a bad call raises on every rank instead of leaving some of them waiting in a halo exchange. With
several sharded axes (a process grid), a problem seen in one group is spread to the whole grid with
one small all-reduce per axis.
"""

from __future__ import annotations

import struct
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .plan import split_sizes

__all__ = ["Fingerprint", "agree", "group_device"]

#: Entries of the fingerprint and how many ints each takes (per-axis entries are padded to 3 axes).
_SCHEMA: tuple[tuple[str, int], ...] = (
    ("number of spatial axes", 1),
    ("batch size", 1),
    ("query heads", 1),
    ("key/value heads", 1),
    ("head_dim", 1),
    ("value head_dim", 1),
    ("dtype", 1),
    ("spatial shape off the sharded axis", 3),
    ("kernel_size", 3),
    ("stride", 3),
    ("dilation", 3),
    ("is_causal", 3),
    ("periodic", 3),
    ("shard_axis", 3),
    ("shard index in the other sharding groups", 3),
    ("scale", 1),
    ("rpb (present)", 1),
    ("attn_bias (last dim)", 1),
    ("key_padding_mask (present)", 1),
    ("additional_keys (number of tokens)", 1),
    ("return_lse", 1),
    ("return_attn", 1),
    ("requires_grad of query, key, value", 3),
    ("grad mode", 1),
)
_WIDTH = sum(w for _, w in _SCHEMA)
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

#: Field name -> its ints (before padding); entries may be absent when a rank's checks failed.
Fingerprint = dict[str, tuple[int, ...]]


def scale_bits(scale: Optional[float]) -> int:
    """An exact int for a float scale (``None``: the default, -1)."""
    return -1 if scale is None else struct.unpack("<q", struct.pack("<d", float(scale)))[0]


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _encode(fp: Fingerprint, axis: int, positions: Sequence[int]) -> list[int]:
    row = []
    for name, width in _SCHEMA:
        if name == "shard index in the other sharding groups":
            values = tuple(positions)
        else:
            values = fp.get(name, ())
            if name == "spatial shape off the sharded axis":
                values = tuple(-1 if i == axis else v for i, v in enumerate(values))
        row += list(values[:width]) + [-1] * (width - len(values))
    return row


def _decode(row: Sequence[int]) -> dict[str, tuple[int, ...]]:
    out, i = {}, 0
    for name, width in _SCHEMA:
        out[name] = tuple(v for v in row[i: i + width] if v != -1) if width > 1 else (row[i],)
        i += width
    return out


def group_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """Where this group's collectives take their tensors: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe(name: str, rows: list[dict[str, tuple[int, ...]]], members: Sequence[int]) -> str:
    values = [r[name] for r in rows]
    if name == "dtype":
        values = [str(_DTYPES[v[0]]) if v[0] < len(_DTYPES) else "another dtype" for v in values]
    elif name == "scale":
        values = ["default" if v[0] == -1 else repr(struct.unpack("<d", struct.pack("<q", v[0]))[0]) for v in values]
    return ", ".join(f"rank {m}: {v}" for m, v in zip(members, values))


def agree(fn: str, axes: Sequence[int], groups: Sequence[Optional[dist.ProcessGroup]], fingerprint: Fingerprint,
          local_sizes: Sequence[int], error: Optional[Exception], split: str) -> tuple[tuple[int, ...], ...]:
    """Gather and check every group's rows; return the shard lengths along each sharded axis.

    ``axes[i]`` is sharded over ``groups[i]``; ``local_sizes[i]`` is this rank's length along it;
    ``fingerprint`` must be equal across ranks; ``error`` is this rank's own argument error, if any
    (then ``fingerprint`` may be empty). ``split``: the rule the shard lengths must follow
    (:func:`~visattn.distributed.plan.split_sizes`). Raises on every rank, or on none: ``error``
    itself on the rank that had it, ``ValueError`` describing the disagreement or the bad shard
    lengths, or ``RuntimeError`` on ranks that only learnt that another rank failed.
    """
    positions = [dist.get_rank(g) for g in groups]
    message: Optional[str] = None
    seen = 0
    sizes: list[tuple[int, ...]] = []
    for i, (axis, group) in enumerate(zip(axes, groups)):
        others = [-1 if j == i else p for j, p in enumerate(positions)]
        row = [int(error is None), seen, int(local_sizes[i]) if error is None else 0,
               *_encode(fingerprint, axis, others)]
        mine = torch.tensor(row, dtype=torch.int64, device=group_device(group))
        world = dist.get_world_size(group)
        rows = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(rows, mine, group=group)
        table = torch.stack(rows).cpu().tolist()
        members = [dist.get_global_rank(group if group is not None else dist.group.WORLD, r) for r in range(world)]
        sizes.append(tuple(r[2] for r in table))
        if message is None and not seen:
            message = _check_rows(fn, axis, table, members, split)
        seen = int(seen or message is not None or any(r[1] for r in table))
    if len(groups) > 1:  # spread the verdict along every axis of the grid
        flag = torch.tensor([seen], dtype=torch.int64, device=group_device(groups[0]))
        for group in groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        seen = int(flag.item())
    if error is not None:
        raise error
    if message is not None:
        raise ValueError(message)
    if seen:
        raise RuntimeError(f"{fn}: another rank of the process grid rejected this call (its error says why); every "
                           f"rank stops here instead of waiting for it in the halo exchange.")
    return tuple(sizes)


def _check_rows(fn: str, axis: int, table: list[list[int]], members: Sequence[int], split: str) -> Optional[str]:
    """The problem the gathered rows of one group show, if any (the same text on every rank)."""
    failed = [m for m, r in zip(members, table) if not r[0]]
    if failed:
        return (f"{fn}: rank(s) {failed} rejected their arguments (their error says why); every rank stops here "
                f"instead of waiting for them in the halo exchange.")
    rows = [_decode(r[3:]) for r in table]
    differ = [name for name, _ in _SCHEMA if any(r[name] != rows[0][name] for r in rows)]
    if differ:
        details = "; ".join(f"{name}: {_describe(name, rows, members)}" for name in differ)
        return (f"{fn}: the ranks sharing spatial axis {axis} disagree on the call ({details}). Every rank must "
                f"pass the same arguments and shards of one global tensor (only the length along the sharded axis "
                f"differs).")
    sizes = tuple(r[2] for r in table)
    expected = split_sizes(sum(sizes), len(sizes), split)
    if sizes != expected:
        bad = [m for m, s, e in zip(members, sizes, expected) if s != e]
        how = ("torch.tensor_split(x, {w}, dim={d})[rank]" if split == "tensor_split" else
               "torch.chunk(x, {w}, dim={d})[rank] (DTensor's Shard rule)").format(w=len(sizes), d=axis + 1)
        return (f"{fn}: the shards along spatial axis {axis} (tensor dim {axis + 1}) have lengths {list(sizes)} on "
                f"ranks {list(members)}, but splitting the global length {sum(sizes)} into {len(sizes)} gives "
                f"{list(expected)}: rank(s) {bad} hold a shard of the wrong size. Give each rank "
                f"{how} of the global tensor.")
    return None
