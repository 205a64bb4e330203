"""The halo plan, in one process: needed keys against spec.neighbor_table, and slabs that reproduce
the global windows (the local call on a slab assembled from the global tensor equals the global slice)."""

from __future__ import annotations

import random

import pytest
import torch

import visattn
from visattn.distributed import plan_axis, split_sizes
from visattn.spec import make_spec, neighbor_table


def _random_axes(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        length = rng.randint(1, 40)
        kernel = rng.randint(1, 9)
        yield (length, rng.randint(1, 6), rng.choice(["tensor_split", "chunk"]), kernel, rng.randint(1, kernel),
               rng.randint(1, 5), rng.random() < 0.4)


@pytest.mark.parametrize("length, parts", [(10, 3), (10, 4), (9, 4), (3, 5), (0, 2), (7, 1)])
def test_split_sizes_follow_torch(length: int, parts: int) -> None:
    x = torch.arange(length)
    assert split_sizes(length, parts) == tuple(len(t) for t in torch.tensor_split(x, parts))
    chunks = [len(t) for t in torch.chunk(x, parts)] if length else []
    assert split_sizes(length, parts, "chunk") == tuple(chunks + [0] * (parts - len(chunks)))


def test_needed_keys_are_the_union_of_the_shards_windows() -> None:
    """Against spec.neighbor_table of the global axis: shards narrower than the halo, uneven shards,
    dilation, stride, causal, and k * d > L (fit_axis on the global length)."""
    for length, parts, rule, k, s, d, causal in _random_axes(0, 300):
        plan = plan_axis(split_sizes(length, parts, rule), k, s, d, causal)
        index, valid, _ = neighbor_table(make_spec("t", (length,), k, s, d, causal))
        for r, shard in enumerate(plan.shards):
            rows = slice(shard.start, shard.stop)
            want = torch.unique(index[rows][valid[rows]])
            assert torch.equal(shard.needed, want), (length, parts, k, s, d, causal, shard)
            received = torch.cat([plan.recv_index(r, p) for p in range(plan.world)])
            own = (want >= shard.start) & (want < shard.stop)
            assert torch.equal(torch.sort(received).values, want[~own])
            assert shard.slab_start <= shard.start <= shard.stop <= shard.slab_stop <= length


@pytest.mark.parametrize("rank", [1, 2])
def test_local_call_on_the_slab_gives_the_global_slice(rank: int) -> None:
    """What each rank computes, without the communication: own keys and the needed keys of a global
    tensor placed in a zero slab, queries zero-padded; the cropped output is the global output's slice."""
    rng = random.Random(rank)
    for length, parts, rule, k, s, d, causal in _random_axes(rank, 60):
        other = rng.randint(1, 6) if rank == 2 else None
        shape = (length,) if other is None else (length, other)
        q, key, v = (torch.randn(1, *shape, 2, 4, dtype=torch.float64) for _ in range(3))
        kw = dict(kernel_size=(k,) + (3,) * (rank - 1), stride=(s,) + (1,) * (rank - 1),
                  dilation=(d,) + (1,) * (rank - 1), is_causal=(causal,) + (False,) * (rank - 1))
        ref = visattn.neighborhood_attention(q, key, v, **kw)
        plan = plan_axis(split_sizes(length, parts, rule), k, s, d, causal)
        for shard in plan.shards:
            if shard.stop == shard.start:
                continue
            keep = torch.cat([shard.needed, torch.arange(shard.start, shard.stop)])
            slabs = []
            for t in (key, v):
                slab = torch.zeros(1, shard.slab_length, *t.shape[2:], dtype=t.dtype)
                slab[:, keep - shard.slab_start] = t[:, keep]
                slabs.append(slab)
            qs = torch.zeros_like(slabs[0])
            qs[:, shard.pad_before: shard.pad_before + shard.stop - shard.start] = q[:, shard.start: shard.stop]
            kw_local = dict(kw, kernel_size=(plan.kernel,) + kw["kernel_size"][1:],
                            dilation=(plan.dilation,) + kw["dilation"][1:])
            out = visattn.neighborhood_attention(qs, *slabs, **kw_local)
            got = out[:, shard.pad_before: shard.pad_before + shard.stop - shard.start]
            torch.testing.assert_close(got, ref[:, shard.start: shard.stop], atol=1e-12, rtol=0,
                                       msg=lambda m: f"{(length, parts, rule, k, s, d, causal, shard)}: {m}")


def test_halo_widths_of_plain_na() -> None:
    """k = 7 on 64 split in 4: an interior shard needs 3 keys on each side and its slab is exactly them;
    causal needs 6 on the left only; dilation 2 doubles the reach."""
    plan = plan_axis(split_sizes(64, 4), 7, 1, 1, False)
    s = plan.shards[1]
    assert (s.start, s.stop) == (16, 32)
    assert torch.equal(s.needed, torch.arange(13, 35)) and (s.slab_start, s.slab_stop) == (13, 35)
    assert [plan.recv_index(1, p).tolist() for p in range(4)] == [[13, 14, 15], [], [32, 33, 34], []]
    causal = plan_axis(split_sizes(64, 4), 7, 1, 1, True).shards[1]
    assert torch.equal(causal.needed, torch.arange(10, 32)) and causal.slab_stop == 32
    dilated = plan_axis(split_sizes(64, 4), 7, 1, 2, False).shards[1]
    assert torch.equal(dilated.needed, torch.arange(10, 38))


def test_shards_narrower_than_the_halo_reach_several_ranks() -> None:
    """Shards of 2 with k = 7: at the global border the window shifts, so shard 0 needs keys up to
    k - 1 = 6 away (three ranks away); an interior shard needs 3 on each side (two ranks away)."""
    plan = plan_axis(split_sizes(20, 10), 7, 1, 1, False)
    assert plan.shards[0].needed.tolist() == list(range(7))
    assert [p for p in range(10) if plan.recv_index(0, p).numel()] == [1, 2, 3]
    assert plan.shards[4].needed.tolist() == list(range(5, 13))
    assert [p for p in range(10) if plan.recv_index(4, p).numel()] == [2, 3, 5, 6]


def test_periodic_slabs_wrap_around_the_ring() -> None:
    """A ring of 6 in two shards, kernel 5: each slab is its shard plus 2 keys either side, modulo 6, so
    key 4 (rank 0) and key 1 (rank 1) sit at both ends of a slab; everything else comes from the peer."""
    plan = plan_axis((3, 3), 5, 1, 1, False, True)
    assert plan.periodic and [(s.slab_start, s.slab_stop) for s in plan.shards] == [(-2, 5), (1, 8)]
    assert [s.slab_keys.tolist() for s in plan.shards] == [[4, 5, 0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 0, 1]]
    assert plan.recv_index(0, 1).tolist() == [3, 4, 5] and plan.recv_index(1, 0).tolist() == [0, 1, 2]


def test_periodic_dilation_fits_the_ring_and_the_slab_keeps_it() -> None:
    plan = plan_axis((4, 4), 3, 1, 3, False, True)  # 3 * 3 > 8: dilation 8 // 3 = 2, as unsharded
    assert plan.dilation == 2
    for s in plan.shards:
        assert s.slab_length >= 3 * 2 and set(s.needed.tolist()) == {(x + 2 * j) % 8 for x in range(s.start, s.stop)
                                                                      for j in (-1, 0, 1)}


@pytest.mark.parametrize("stride, causal, kernel", [(2, False, 3), (1, True, 3), (1, False, 7)])
def test_periodic_plans_refuse_what_a_ring_cannot_shard(stride: int, causal: bool, kernel: int) -> None:
    with pytest.raises(ValueError, match="sharded periodic axis needs stride 1, no causal mask and kernel_size"):
        plan_axis((3, 3), kernel, stride, 1, causal, True)
