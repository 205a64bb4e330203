"""Sharded neighborhood attention on 2, 3 and 4 gloo processes equals the single-process call.

Every rank compares its output shard and the gradients of its input shards with the single-process
result in float64 (replicated inputs: the sum of the ranks' gradients). The sweeps cover 1-D/2-D/3-D
inputs, uneven shards, shards narrower than the halo and empty ones, dilation, stride, causal on the
sharded axis and on others, even kernels, kernels longer than the axis, RPB, GQA, extra KV tokens,
attention bias, key padding masks, LSE and attention weights, periodic axes (sharded too: rings whose
shards are narrower than the halo, a ring shorter than a slab, dilation reduced to fit), and 2x2
process grids. Each group is spawned once per test, with a timeout.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import dist_cases
import dist_harness

SWEEPS = {
    2: [
        dict(shape=(13,), kernel=5),
        dict(shape=(13,), kernel=5, stride=2, dilation=2, lse=True),
        dict(shape=(11,), kernel=4, causal=True, rpb=True),
        dict(shape=(9, 7), kernel=3, dilation=2, rpb=True),
        dict(shape=(9, 7), kernel=(3, 5), causal=(False, True), axes=(1,), heads=4, kv_heads=2, extra=3),
        dict(shape=(5, 4, 6), kernel=3, stride=(1, 1, 2), axes=(2,), lse=True, attn=True, dim_v=3),
        dict(shape=(6, 8), kernel=7, dilation=(1, 2), rpb=True, batch=2),
        dict(shape=(8, 6), kernel=3, attn_bias=True, mask=True, lse=True),
        dict(shape=(13,), kernel=5, periodic=True, rpb=True, lse=True),
        dict(shape=(9, 7), kernel=3, dilation=2, periodic=(True, False), attn=True, attn_bias=True, mask=True),
        dict(shape=(6,), kernel=5, periodic=True, rpb=True, attn=True),  # each slab holds a key twice
    ],
    3: [
        dict(shape=(7,), kernel=5, rpb=True),
        dict(shape=(17,), kernel=5, stride=2, dilation=3, causal=True, lse=True),
        dict(shape=(2,), kernel=3, extra=2),
        dict(shape=(8, 5), kernel=(5, 3), dilation=(2, 1), heads=4, kv_heads=1, rpb=True, extra=2),
        dict(shape=(6, 6, 5), kernel=3, causal=(True, True, False), axes=(0,), lse=True),
        dict(shape=(4, 9, 5), kernel=(3, 4, 3), causal=(True, False, False), axes=(1,), rpb=True),
        dict(shape=(7, 6), kernel=3, periodic=(False, True), axes=(0,), attn=True),
        dict(shape=(7,), kernel=7, periodic=True, rpb=True, lse=True),  # shards of 3, 2, 2 keys, halo 3
        dict(shape=(8, 5), kernel=(3, 5), dilation=(3, 1), periodic=(True, True), heads=4, kv_heads=2, extra=2,
             rpb=True),  # 3 * 3 > 8: dilation 2 on the ring
    ],
    4: [
        dict(shape=(9,), kernel=7, lse=True),
        dict(shape=(10, 6), kernel=5, stride=5, mask=True),
        dict(shape=(5, 4, 6), kernel=3, axes=(2,), attn=True, mask=True, attn_bias=True),
        dict(shape=(9, 7), kernel=3, dilation=2, axes=(0, 1), grid=(2, 2), rpb=True, lse=True),
        dict(shape=(5, 6, 4), kernel=3, stride=(1, 2, 1), causal=(True, False, False), axes=(0, 1), grid=(2, 2),
             heads=4, kv_heads=2, extra=2),
        dict(shape=(3, 7, 5), kernel=(3, 5, 3), dilation=(1, 1, 2), axes=(1, 2), grid=(2, 2), attn=True),
        dict(shape=(9, 7), kernel=3, periodic=(True, True), axes=(0, 1), grid=(2, 2), rpb=True, lse=True),
        dict(shape=(5,), kernel=4, periodic=True, attn=True, mask=True),  # even kernel, shards 2, 1, 1, 1
    ],
}


def _no_errors(results: list) -> None:
    errors = [e for r in results for e in r["errors"]]
    assert not errors, "\n".join(errors[:20])
    assert all(r["checked"] > 0 for r in results)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sweep_matches_single_process(world: int) -> None:
    _no_errors(dist_harness.run(world, dist_cases.sweep, SWEEPS[world]))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_random_sweep_matches_single_process(world: int) -> None:
    """300 random geometries and feature mixes per group size (``-m slow``)."""
    _no_errors(dist_harness.run(world, dist_cases.sweep, dist_cases.random_cases(world, 300, grid=world == 4),
                                timeout=900))


def test_dtensor_inputs_on_1d_and_2d_meshes() -> None:
    """DTensor in, DTensor with the same placements out; torch.chunk-sized shards (the last rank of a
    2x2 mesh's column gets an empty one: 5 rows in chunks of 3, 2); batch sharding and replication."""
    mesh_cases = [
        dict(shape=(10, 7), kernel=3, mesh=(4,), placements=(1,)),
        dict(shape=(6, 9), kernel=(3, 5), dilation=(2, 1), causal=(False, True), mesh=(4,), placements=(2,)),
        dict(shape=(5, 7), kernel=3, mesh=(2, 2), placements=(1, 2)),
        dict(shape=(3, 6, 5), kernel=3, stride=(1, 2, 1), mesh=(2, 2), placements=(3, 2)),
        dict(shape=(9, 7), kernel=5, batch=2, mesh=(2, 2), placements=(0, 1)),
        dict(shape=(9, 7), kernel=5, mesh=(2, 2), placements=(None, 1)),
        dict(shape=(8, 10), kernel=5, periodic=(False, True), mesh=(2, 2), placements=(1, 2)),  # a sharded ring
    ]
    _no_errors(dist_harness.run(4, dist_cases.dtensor_sweep, mesh_cases))


@pytest.mark.parametrize("world, rank3", [(2, False), (3, True)])
def test_module_matches_single_process_layer(world: int, rank3: bool) -> None:
    """The sharded layer loads the single-process layer's state dict; outputs match, and the ranks'
    parameter gradients sum to the single-process ones (qkv, proj, rpb alike)."""
    _no_errors(dist_harness.run(world, dist_cases.module_check, rank3))


def test_bad_calls_raise_on_every_rank_and_leave_the_group_usable() -> None:
    results = dist_harness.run(3, dist_cases.bad_calls)
    for rank, found in enumerate(results):
        size, kernel, local, shape, ring, after = found
        assert size.startswith("ValueError") and "tensor_split" in size and "[4, 2, 4]" in size
        assert kernel.startswith("ValueError") and "kernel_size" in kernel and "(5, 5)" in kernel
        if rank == 0:
            assert local.startswith("ValueError") and "stride=(4, 4)" in local
        else:
            assert local.startswith("ValueError") and "rank(s) [0] rejected their arguments" in local
        assert "spatial shape off the sharded axis" in shape and "rank 0: (5,)" in shape
        assert ring.startswith("ValueError") and "sharded and periodic" in ring and "kernel_size <= 6" in ring
        assert after == ""  # a good call afterwards: no rank was left behind in a collective


def test_uninitialized_process_group_is_a_clear_error() -> None:
    assert not dist.is_initialized()
    message = dist_cases.not_initialized()
    assert message.startswith("RuntimeError") and "init_process_group" in message


@pytest.mark.parametrize("world, dilation, periodic", [(2, 1, False), (3, 2, False), (3, 1, True)])
def test_counted_bytes_match_the_plan(world: int, dilation: int, periodic: bool) -> None:
    """Forward sends what the plan says each rank's peers need; backward returns what each rank received
    (on a ring too, where every rank has two neighbours)."""
    for r, found in enumerate(dist_harness.run(world, dist_cases.traffic, (16, 8), 5, dilation, periodic)):
        assert found["counted"]["forward"] == found["predicted_sent"] > 0, (r, found)
        assert found["counted"]["backward"] == found["predicted_received"] > 0, (r, found)
