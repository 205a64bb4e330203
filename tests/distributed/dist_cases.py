"""What the ranks of a test process group run: sharded calls compared with the single-process call.

Every rank builds the same global float64 tensors (seeded), computes the single-process result and
gradients itself, runs the sharded call on its shard, and reports every mismatch as text (an empty
list means every output and gradient matched). One process group runs many cases.
"""

from __future__ import annotations

from typing import Optional

import random

import torch
import torch.distributed as dist

import visattn
import visattn.distributed as vd

TOL = 1e-10


def grid_groups(grid: tuple[int, ...]) -> tuple[tuple[int, ...], list]:
    """This rank's coordinates on a row-major process grid of shape ``grid`` and one group per grid axis
    (the ranks that differ only along it). Every rank must call it, in the same order."""
    rank, coords = dist.get_rank(), []
    rest = rank
    for g in reversed(grid):
        coords.append(rest % g)
        rest //= g
    coords = tuple(reversed(coords))
    groups = []
    for i, g in enumerate(grid):
        mine = None
        # new_group is collective over the world: create every group of this axis, keep our own
        for other in _product([range(n) if j != i else [0] for j, n in enumerate(grid)]):
            members = [_flat(tuple(other[:i]) + (t,) + tuple(other[i + 1:]), grid) for t in range(g)]
            pg = dist.new_group(members)
            if rank in members:
                mine = pg
        groups.append(mine)
    return coords, groups


def _product(ranges):
    out = [()]
    for r in ranges:
        out = [o + (x,) for o in out for x in r]
    return out


def _flat(coords, grid) -> int:
    idx = 0
    for c, g in zip(coords, grid):
        idx = idx * g + c
    return idx


def _shard(t: torch.Tensor, axes, grid, coords) -> torch.Tensor:
    for a, g, c in zip(axes, grid, coords):
        t = torch.tensor_split(t, g, dim=1 + a)[c]
    return t


def _global_inputs(case: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    S, B, H, Hkv, D, Dv = case["shape"], case.get("batch", 1), case.get("heads", 2), case.get("kv_heads", 2), \
        case.get("dim", 4), case.get("dim_v", 4)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = {"query": rnd(B, *S, H, D), "key": rnd(B, *S, Hkv, D), "value": rnd(B, *S, Hkv, Dv)}
    spec = visattn.spec.make_spec("t", S, case["kernel"], case.get("stride", 1), case.get("dilation", 1),
                                  case.get("causal", False))
    if case.get("rpb"):
        x["rpb"] = rnd(H, *(2 * k - 1 for k in spec.requested_kernel_size))
    if case.get("extra"):
        x["additional_keys"], x["additional_values"] = rnd(B, case["extra"], Hkv, D), rnd(B, case["extra"], Hkv, Dv)
    if case.get("attn_bias"):
        x["attn_bias"] = rnd(B, *S, H, spec.window_size)
    if case.get("mask"):
        x["key_padding_mask"] = torch.rand(B, *S, generator=g) < 0.2
    x["grad_out"] = rnd(B, *S, H, Dv)
    x["grad_lse"] = rnd(B, *S, H)
    return x


_SHARDED = ("query", "key", "value", "attn_bias", "key_padding_mask", "grad_out", "grad_lse")
_REPLICATED = ("rpb", "additional_keys", "additional_values")


def _loss(res, x, lse: bool) -> torch.Tensor:
    out = res[0] if isinstance(res, tuple) else res
    loss = (out * x["grad_out"]).sum()
    if lse:
        loss = loss + (res[1] * x["grad_lse"]).sum()
    return loss


def _compare(name: str, got: Optional[torch.Tensor], want: Optional[torch.Tensor], case: dict, rank: int) -> list[str]:
    if got is None or want is None:
        return [] if got is None and want is None else [f"{case} rank {rank}: {name} is None on one side only"]
    if got.shape != want.shape:
        return [f"{case} rank {rank}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}"]
    diff = torch.where(got == want, 0.0, (got - want).abs())  # a query with every key masked has LSE -inf on both
    err = diff.max().item() if got.numel() else 0.0
    return [] if err <= TOL else [f"{case} rank {rank}: {name} differs by {err:.3g}"]


def run_case(case: dict, coords, groups, seed: int) -> list[str]:
    """Sharded vs single-process call for one case on this rank; the mismatches as text."""
    axes, grid = case.get("axes", (0,)), case.get("grid", (dist.get_world_size(),))
    x = _global_inputs(case, seed)
    args = dict(kernel_size=case["kernel"], stride=case.get("stride", 1), dilation=case.get("dilation", 1),
                is_causal=case.get("causal", False), return_lse=case.get("lse", False),
                return_attn=case.get("attn", False), periodic=case.get("periodic", False))
    lse = args["return_lse"]
    # single process
    ref_in = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in x.items() if not k.startswith("grad")}
    ref = visattn.neighborhood_attention(**ref_in, **args)
    _loss(ref, x, lse).backward()
    # sharded
    mine = {k: (_shard(v, axes, grid, coords) if k in _SHARDED else v).clone() for k, v in x.items()}
    loc_in = {k: v.requires_grad_(v.is_floating_point()) for k, v in mine.items() if not k.startswith("grad")}
    res = vd.neighborhood_attention(**loc_in, **args, shard_axis=axes if len(axes) > 1 else axes[0],
                                    group=tuple(groups) if len(axes) > 1 else groups[0])
    _loss(res, mine, lse).backward()

    rank = dist.get_rank()
    refs = ref if isinstance(ref, tuple) else (ref,)
    outs = res if isinstance(res, tuple) else (res,)
    errors = []
    for i, (o, r) in enumerate(zip(outs, refs)):
        errors += _compare(f"output {i}", o, _shard(r.detach(), axes, grid, coords), case, rank)
    for k, v in loc_in.items():
        if not v.is_floating_point():
            continue
        want = ref_in[k].grad
        got = v.grad
        if k in _REPLICATED:  # this rank's share; the group's sum is the full gradient
            got = got.clone()
            dist.all_reduce(got)
        else:
            want = _shard(want, axes, grid, coords)
        errors += _compare(f"grad {k}", got, want, case, rank)
    return errors


def random_cases(seed: int, count: int, grid: bool) -> list[dict]:
    """Random sweep cases: ranks 1-3, shapes down to a token per rank, per-axis kernel, stride, dilation,
    causal, GQA, and each feature at random; with ``grid``, some cases shard two axes on a 2x2 grid."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        r = rng.randint(1, 3)
        kernel = tuple(rng.randint(1, 6) for _ in range(r))
        heads = rng.choice([1, 2, 4])
        case = dict(shape=tuple(rng.randint(1, 12 if r < 3 else 7) for _ in range(r)), kernel=kernel,
                    stride=tuple(rng.randint(1, k) for k in kernel), dilation=tuple(rng.randint(1, 3) for _ in range(r)),
                    causal=tuple(rng.random() < 0.3 for _ in range(r)), heads=heads,
                    kv_heads=rng.choice([h for h in (1, 2, 4) if heads % h == 0]), dim=rng.choice([2, 4]),
                    dim_v=rng.choice([2, 3]), batch=rng.choice([1, 1, 2]))
        for name, p in (("rpb", 0.3), ("attn_bias", 0.2), ("mask", 0.2), ("lse", 0.3), ("attn", 0.2)):
            if rng.random() < p:
                case[name] = True
        if rng.random() < 0.3:
            case["extra"] = rng.randint(1, 3)
        if grid and r >= 2 and rng.random() < 0.4:
            case["axes"], case["grid"] = tuple(sorted(rng.sample(range(r), 2))), (2, 2)
        else:
            case["axes"] = (rng.randrange(r),)
        # a periodic axis (stride 1, not causal there); a sharded one needs a kernel no longer than the ring
        ring = [a for a in range(r) if a not in case["axes"] or kernel[a] <= case["shape"][a]]
        if ring and rng.random() < 0.3:
            a = rng.choice(ring)
            case["periodic"] = tuple(i == a for i in range(r))
            case["stride"] = tuple(1 if i == a else s for i, s in enumerate(case["stride"]))
            case["causal"] = tuple(False if i == a else c for i, c in enumerate(case["causal"]))
        cases.append(case)
    return cases


def sweep(rank: int, world: int, cases: list[dict]) -> dict:
    """Run every case on this rank; cases with a ``grid`` use one process-grid layout each."""
    grids: dict[tuple, tuple] = {}
    for case in cases:
        grid = case.get("grid", (world,))
        if grid not in grids:
            grids[grid] = grid_groups(grid) if len(grid) > 1 else ((rank,), [None])
    errors, checked = [], 0
    for i, case in enumerate(cases):
        coords, groups = grids[case.get("grid", (world,))]
        errors += run_case(case, coords, groups, seed=1000 + i)
        checked += 1
    return {"errors": errors, "checked": checked}


def dtensor_sweep(rank: int, world: int, cases: list[dict]) -> dict:
    """The same comparisons with DTensor inputs on a DeviceMesh (chunk-sized shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    errors, meshes = [], {}
    for i, case in enumerate(cases):
        if case["mesh"] not in meshes:
            meshes[case["mesh"]] = init_device_mesh("cpu", case["mesh"])
        mesh = meshes[case["mesh"]]
        placements = [Shard(d) if d is not None else Replicate() for d in case["placements"]]
        x = _global_inputs(case, seed=2000 + i)
        args = dict(kernel_size=case["kernel"], stride=case.get("stride", 1), dilation=case.get("dilation", 1),
                    is_causal=case.get("causal", False), periodic=case.get("periodic", False))
        ref_in = {k: x[k].clone().requires_grad_() for k in ("query", "key", "value")}
        ref = visattn.neighborhood_attention(**ref_in, **args)
        (ref * x["grad_out"]).sum().backward()
        dt = {k: distribute_tensor(x[k], mesh, placements).requires_grad_() for k in ("query", "key", "value")}
        out = vd.neighborhood_attention(**dt, **args)
        if not isinstance(out, torch.distributed.tensor.DTensor) or tuple(out.placements) != tuple(placements):
            errors.append(f"{case}: output is {type(out).__name__} with placements {getattr(out, 'placements', None)}")
            continue
        gout = distribute_tensor(x["grad_out"], mesh, placements)
        (out * gout).sum().backward()
        errors += _compare("output", out.full_tensor(), ref.detach(), case, rank)
        for k, v in dt.items():
            errors += _compare(f"grad {k}", v.grad.full_tensor(), ref_in[k].grad, case, rank)
    return {"errors": errors, "checked": len(cases)}


def module_check(rank: int, world: int, rank3: bool) -> dict:
    """A sharded NeighborhoodAttention layer vs the single-process one with the same weights."""
    torch.manual_seed(0)
    cls, shape = ((visattn.NeighborhoodAttention3D, vd.NeighborhoodAttention3D), (1, 7, 5, 4, 8)) if rank3 else \
        ((visattn.NeighborhoodAttention2D, vd.NeighborhoodAttention2D), (2, 9, 6, 8))
    kw = dict(embed_dim=8, num_heads=2, kernel_size=3, dilation=(2,) + (1,) * (len(shape) - 3), rel_pos_bias=True)
    single = cls[0](**kw).double()
    sharded = cls[1](**kw).double()
    sharded.load_state_dict(single.state_dict())
    x = torch.randn(*shape, dtype=torch.float64)
    gout = torch.randn_like(x)
    (single(x) * gout).sum().backward()
    xl = torch.tensor_split(x, world, dim=1)[rank].clone().requires_grad_()
    out = sharded(xl)
    (out * torch.tensor_split(gout, world, dim=1)[rank]).sum().backward()
    errors = _compare("output", out, torch.tensor_split(single(x).detach(), world, dim=1)[rank], "module", rank)
    for (name, p), q in zip(sharded.named_parameters(), single.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        errors += _compare(f"grad {name}", g, q.grad, "module", rank)
    # the same layer on a DTensor input (torch.chunk shards) gives a DTensor output
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = sharded(distribute_tensor(x, mesh, [Shard(1)]))
    errors += _compare("DTensor output", out.full_tensor(), single(x).detach(), "module", rank)
    return {"errors": errors, "checked": 2}


def _bad_call(rank: int, world: int, what: str) -> str:
    """Make a (bad) sharded call; return the text of the exception this rank raised ('' if none)."""
    x = torch.randn(1, 12, 6, 2, 4, dtype=torch.float64)
    q = torch.tensor_split(x, world, dim=1)[rank]
    kwargs = dict(kernel_size=3)
    if what == "size" and rank == 1:
        q = x[:, :2]  # a slab of the wrong length
    if what == "kernel" and rank == world - 1:
        kwargs["kernel_size"] = 5
    if what == "local" and rank == 0:
        kwargs["stride"] = 4  # > kernel: rank 0's own argument check fails
    if what == "shape" and rank == 0:
        q = torch.randn(1, q.shape[1], 5, 2, 4, dtype=torch.float64)
    if what == "ring":  # the sharded first axis wraps and is 6 long: a kernel of 7 would be the whole ring
        q = torch.tensor_split(x[:, :6], world, dim=1)[rank]
        kwargs.update(kernel_size=7, periodic=(True, False))
    try:
        vd.na2d(q, q, q, **kwargs)
    except Exception as e:  # noqa: BLE001  (the test reads the type and text)
        return f"{type(e).__name__}: {e}"
    return ""


def bad_calls(rank: int, world: int) -> list[str]:
    """Each bad call in turn, then a good one: the texts of what this rank raised."""
    return [_bad_call(rank, world, what) for what in ("size", "kernel", "local", "shape", "ring", "none")]


def not_initialized() -> str:
    """The error without a process group (run in a plain process)."""
    q = torch.randn(1, 8, 8, 2, 4)
    try:
        vd.na2d(q, q, q, kernel_size=3)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return ""


def traffic(rank: int, world: int, shape: tuple, kernel: int, dilation: int, periodic: bool = False) -> dict:
    """Bytes this rank sends in one forward and backward, counted, next to the cost model's prediction
    (``periodic``: every axis wraps)."""
    from visattn.distributed.cost import halo_bytes

    B, H, D = 1, 2, 4
    x = torch.randn(B, *shape, H, D, dtype=torch.float64)
    q = torch.tensor_split(x, world, dim=1)[rank].clone().requires_grad_()
    with vd.count_traffic() as stats:
        out = vd.neighborhood_attention(q, q, q, kernel, dilation=dilation, periodic=periodic)
        out.sum().backward()
    r = len(shape)
    predicted = halo_bytes(shape, (kernel,) * r, (1,) * r, (dilation,) * r, (False,) * r, 0, world, batch=B,
                           heads_kv=H, dim=D, dim_v=D, itemsize=8, rank=rank, periodic=(periodic,) * r)
    return {"counted": dict(stats), "predicted_sent": predicted.forward, "predicted_received": predicted.backward}
