"""The C kernels' window tables and the fused backward's race-freedom, checked against the explicit
neighbourhoods of :func:`visattn.spec.neighbor_table` (not against the tables themselves)."""

from __future__ import annotations

import torch

from visattn.backends.cpu.geometry import axis_tables, colour_chunks, key_grid
from visattn.spec import axis_windows, make_spec, neighbor_table


def _axis_sees(length: int, kernel: int, stride: int, dilation: int, causal: bool,
               key_length: int | None = None) -> torch.Tensor:
    """[query, key] bool along one axis (keys on a grid of ``key_length``, default ``length``), from the
    spec's explicit neighbourhoods."""
    key_length = length if key_length is None else key_length
    index, valid, _ = neighbor_table(make_spec("axis", (length,), kernel, stride, dilation, causal,
                                               key_spatial=(key_length,)))
    sees = torch.zeros(length, key_length, dtype=torch.bool)
    rows = torch.arange(length)[:, None].expand_as(index)
    sees[rows[valid], index[valid]] = True
    return sees


def _random_axes(g: torch.Generator, rank: int) -> list[tuple[int, int, int, int, bool]]:
    rint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    axes = []
    for _ in range(rank):
        dil = rint(1, 3)
        length = rint(dil, 30)
        kernel = rint(1, length // dil)
        axes.append((length, kernel, rint(1, kernel), dil, bool(rint(0, 1))))
    return axes


def test_axis_tables_are_the_neighbourhoods_in_group_major_order() -> None:
    """Index i stands for coordinate pos[i]; its keys are the indices lo[i]..hi[i]; the queries seeing
    key j are the indices qlo[j]..qhi[j]; key j fills slot j - sof[i]: all agree with the explicit
    neighbourhoods."""
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        (length, kernel, stride, dil, causal), = _random_axes(g, 1)
        pos, lo, hi, _, qlo, qhi, sof, kpos, ksrc = axis_tables(length, kernel, stride, dil, causal, kernel)
        assert torch.equal(kpos, pos) and torch.equal(ksrc, pos)  # one grid: keys indexed like queries
        sees = _axis_sees(length, kernel, stride, dil, causal)[pos][:, pos]  # in index order
        idx = torch.arange(length)
        by_table = (idx[None, :] >= lo[:, None]) & (idx[None, :] <= hi[:, None])
        assert torch.equal(by_table, sees)
        seen_by = (idx[:, None] >= qlo[None, :]) & (idx[:, None] <= qhi[None, :])
        assert torch.equal(seen_by, sees)
        # Key index j sits in slot j - sof[i] of query i: the slot order of attn_bias and the weights.
        index, valid, _ = neighbor_table(make_spec("axis", (length,), kernel, stride, dil, causal))
        for i in range(length):
            keys = torch.arange(int(lo[i]), int(hi[i]) + 1)
            slots = keys - sof[i]
            assert bool(((slots >= 0) & (slots < index.shape[1])).all())
            assert bool(valid[pos[i], slots].all()) and torch.equal(index[pos[i], slots], pos[keys])
            assert int(valid[pos[i]].sum()) == len(keys)


def test_axis_tables_on_another_key_grid_and_on_periodic_axes() -> None:
    """The same with queries and keys indexed separately: cross-grid keys (coarser and finer than the
    queries, kernel up to the key axis; keys no query sees have an empty run qlo > qhi) and periodic
    axes, whose key indices run over the virtual grid (kpos) and stand for the real keys ksrc (the
    spec's ``key_source``): query i's keys lo[i]..hi[i] fill slots key - sof[i] with the real keys of
    the explicit neighbourhoods."""
    g = torch.Generator().manual_seed(2)
    rint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    for it in range(300):
        periodic = it % 3 == 0
        length = rint(1, 20)
        key_length = length if periodic else rint(1, 25)
        kernel, dil = rint(1, 7), rint(1, 3)
        stride = 1 if periodic else rint(1, kernel)
        causal = False if periodic else bool(rint(0, 1))
        spec = make_spec("axis", (length,), kernel, stride, dil, causal, key_spatial=(key_length,), periodic=periodic)
        (k, s, d, c), = zip(spec.kernel_size, spec.stride, spec.dilation, spec.is_causal)
        pos, lo, hi, _, qlo, qhi, sof, kpos, ksrc = axis_tables(length, k, s, d, c, kernel, key_length, periodic)
        nk = key_grid(spec)[0]
        assert len(pos) == len(lo) == len(hi) == len(sof) == length
        assert len(qlo) == len(qhi) == len(kpos) == len(ksrc) == nk
        assert sorted(pos.tolist()) == list(range(length)) and sorted(kpos.tolist()) == list(range(nk))
        # key index -> the real key the kernels read: the spec's key_source of its virtual coordinate
        real = axis_windows(length, k, s, d, c, key_length, periodic).key_coord(kpos)
        assert torch.equal(ksrc, real) and bool(((ksrc >= 0) & (ksrc < key_length)).all())
        index, valid, _ = neighbor_table(spec)
        for i in range(length):
            keys = torch.arange(int(lo[i]), int(hi[i]) + 1)
            slots = keys - sof[i]
            assert bool(((slots >= 0) & (slots < index.shape[1])).all())
            assert bool(valid[pos[i], slots].all()) and torch.equal(index[pos[i], slots], real[keys])
            assert int(valid[pos[i]].sum()) == len(keys)
        idx, kidx = torch.arange(length), torch.arange(nk)
        by_table = (kidx[None, :] >= lo[:, None]) & (kidx[None, :] <= hi[:, None])
        seen_by = (idx[:, None] >= qlo[None, :]) & (idx[:, None] <= qhi[None, :])
        assert torch.equal(seen_by, by_table)


def test_fused_backward_chunks_of_one_colour_never_share_a_query() -> None:
    """The fused backward's race-freedom: run c and run c + 2 of the split axis (indices in
    dilation-group-major order, pairs on the last axis) are seen by disjoint sets of queries, so the
    units of one colour write disjoint dQ rows. Checked over random geometries (kernel, stride,
    dilation, causal per axis; ranks 1-3), with keys on the query grid and on another one (then the
    runs cut the key grid)."""
    g = torch.Generator().manual_seed(0)
    for it in range(300):
        rank = int(torch.randint(1, 4, (1,), generator=g))
        axes = _random_axes(g, rank)
        key_spatial = None
        if it % 2:  # cross-grid: each key axis from a half to twice its query axis
            key_spatial = tuple(max(1, int(L * float(torch.rand((), generator=g) * 1.5 + 0.5))) for L, *_ in axes)
        spec = make_spec("t", *zip(*axes), key_spatial=key_spatial)
        axis, chunk, count = colour_chunks(spec)
        shape = (1,) * (3 - rank) + spec.key_spatial
        if shape[axis] == 1:
            assert count == 1
            continue
        length, kernel, stride, dil, causal = axes[axis - (3 - rank)]
        key_length = shape[axis]
        kernel, stride, dil = spec.kernel_size[axis - (3 - rank)], spec.stride[axis - (3 - rank)], \
            spec.dilation[axis - (3 - rank)]
        order = sorted(range(key_length), key=lambda c: (c % dil, c // dil))  # group-major key index -> coordinate
        per_unit = 2 if axis == 2 else 1
        sees = _axis_sees(length, kernel, stride, dil, causal, key_length)
        runs = [order[i * chunk * per_unit:(i + 1) * chunk * per_unit] for i in range(count)]
        assert sum(map(len, runs)) == key_length
        seen_by = [sees[:, run].any(1) for run in runs]  # queries seeing each run
        for c in range(count - 2):
            assert not (seen_by[c] & seen_by[c + 2]).any(), (axes, axis, chunk, c)
