"""Scan routes: each family against the papers' own constructions, windows and dilation groups against
neighborhood attention's, gather/scatter inverses, and the causal receptive field of a route scan."""

from __future__ import annotations

import itertools

import pytest
import torch

from visattn import selective_scan
from visattn.scan import routes as R
from visattn.spec import make_spec, neighbor_table

SIZES = [(4, 4), (6, 8), (5, 7), (1, 6), (7, 1), (1, 1)]


def all_routes(H: int, W: int) -> list[R.Route]:
    return [*R.cross(H, W), R.snake(H, W), R.snake(H, W, vertical=True, from_bottom=True, from_right=True),
            R.diagonal(H, W), R.diagonal(H, W, mirror=True), R.spiral(H, W), R.spiral(H, W, mirror=True),
            R.windows(H, W, 3), R.windows(H, W, 2, column_major=True), *R.atrous(H, W), *R.atrous(H, W, 3)]


@pytest.mark.parametrize("H,W", SIZES)
def test_routes_visit_tokens_once_and_invert_exactly(H, W):
    x = torch.randn(2, H, W, 3, dtype=torch.float64)
    for r in all_routes(H, W):
        index = r.index
        assert index.unique().numel() == index.numel(), f"{r} visits a token twice"
        if r.kind != "dilation_group":
            assert sorted(index.tolist()) == list(range(H * W)), f"{r} misses tokens"
        seq = R.scan_routes(x, [r])
        assert torch.equal(seq[:, :, 0], x.reshape(2, H * W, 3)[:, index])
        back = R.unscan_routes(seq, [r], (H, W))[..., 0, :]
        visited = torch.zeros(H * W, dtype=torch.bool)
        visited[index] = True
        assert torch.equal(back.reshape(2, H * W, 3)[:, visited], x.reshape(2, H * W, 3)[:, visited])
        assert not back.reshape(2, H * W, 3)[:, ~visited].any()


@pytest.mark.parametrize("H,W", SIZES)
def test_merging_a_cover_gives_back_the_map(H, W):
    """Scan then merge is the identity for a partition (the atrous groups), K x for K full routes."""
    x = torch.randn(2, H, W, 3, dtype=torch.float64)
    for step in (2, 3):
        routes = R.atrous(H, W, step)
        assert torch.equal(R.merge_routes(R.scan_routes(x, routes), routes, (H, W)), x)
    routes = R.cross(H, W)
    torch.testing.assert_close(R.merge_routes(R.scan_routes(x, routes), routes, (H, W)), 4 * x, atol=0, rtol=0)


def test_cross_scan_is_vmamba_cross_scan():
    """VMamba's CrossScan: flatten, transpose-flatten, then both flipped (written with its tensor ops)."""
    x = torch.randn(2, 5, 7, 3)
    xc = x.permute(0, 3, 1, 2)  # [B, C, H, W], VMamba's layout
    xs = torch.stack([xc.flatten(2), xc.transpose(2, 3).flatten(2)], 1)
    xs = torch.cat([xs, xs.flip(-1)], 1)  # [B, 4, C, L]
    assert torch.equal(R.scan_routes(x, R.cross(5, 7)), xs.permute(0, 3, 1, 2))


@pytest.mark.parametrize("H,W", [(4, 4), (6, 8), (5, 7)])
def test_atrous_is_efficientvmamba_efficient_scan(H, W):
    """EfficientVMamba's EfficientScan (step 2) on an even map, with its slicing; on odd sizes it pads the
    map with zeros, we scan the real tokens only (the padded positions are where the two differ)."""
    x = torch.randn(1, H, W, 2)
    xc = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (0, W % 2, 0, H % 2))
    official = [xc[:, :, ::2, ::2], xc.transpose(2, 3)[:, :, ::2, 1::2], xc[:, :, ::2, 1::2],
                xc.transpose(2, 3)[:, :, 1::2, 1::2]]
    ours = R.scan_routes(x, R.atrous(H, W))
    for k, part in enumerate(official):
        part = part.flatten(2)[0].t()  # [L, C]
        n = len(R.atrous(H, W)[k])
        if H % 2 == 0 and W % 2 == 0:
            assert torch.equal(ours[0, :, k], part)
        else:  # the real tokens of each sub-grid, in the official order
            real = torch.zeros(H + H % 2, W + W % 2, dtype=torch.bool)
            real[:H, :W] = True
            real = R.scan_routes(real[None, ..., None].float(), [R.raster(H + H % 2, W + W % 2)])[0, :, 0, 0]
            mask = [real.view(H + H % 2, W + W % 2)[::2, ::2], real.view(H + H % 2, W + W % 2).t()[::2, 1::2],
                    real.view(H + H % 2, W + W % 2)[::2, 1::2], real.view(H + H % 2, W + W % 2).t()[1::2, 1::2]][k]
            assert torch.equal(ours[0, :n, k], part[mask.flatten().bool()])


def test_windows_are_localmamba_local_scan():
    """LocalMamba's local_scan (window w dividing the map): view into windows and permute, row-major or,
    with its column option, column-major; its 'flip' reverses the whole sequence."""
    H, W, w = 8, 12, 4
    x = torch.randn(2, H, W, 3)
    windowed = x.view(2, H // w, w, W // w, w, 3)
    rows = windowed.permute(0, 1, 3, 2, 4, 5).reshape(2, -1, 3)
    cols = windowed.permute(0, 3, 1, 4, 2, 5).reshape(2, -1, 3)
    assert torch.equal(R.scan_routes(x, [R.windows(H, W, w)])[:, :, 0], rows)
    assert torch.equal(R.scan_routes(x, [R.windows(H, W, w, column_major=True)])[:, :, 0], cols)
    assert torch.equal(R.scan_routes(x, [R.windows(H, W, w).flip()])[:, :, 0], rows.flip(1))


@pytest.mark.parametrize("H,W,w", [(8, 12, 4), (7, 10, 3), (5, 5, 7), (9, 4, 2)])
def test_windows_are_neighborhood_attentions_blocked_windows(H, W, w):
    """Two tokens share a route window exactly when blocked neighborhood attention (kernel = stride = w)
    gives them the same neighbourhood: a window is consecutive in the route."""
    index, _, _ = neighbor_table(make_spec("test", (H, W), w, w))
    order = R.windows(H, W, w).index.tolist()
    runs = [list(g) for _, g in itertools.groupby(order, key=lambda t: tuple(index[t].tolist()))]
    assert len(runs) == len({tuple(row.tolist()) for row in index})  # each neighbourhood is one run
    for run in runs:
        assert sorted(run) == sorted(set(run))


@pytest.mark.parametrize("H,W,d", [(6, 8, 2), (7, 5, 3), (3, 9, 4), (1, 5, 2)])
def test_dilation_groups_are_neighborhood_attentions(H, W, d):
    """Tokens of one dilation-group route are exactly the queries whose dilated neighbourhoods (kernel
    covering the axis) reach each other: the spec's dilation groups, fit_axis included."""
    spec = make_spec("test", (H, W), 1, 1, d)
    dh, dw = spec.dilation
    for gh, gw in itertools.product(range(d), range(d)):
        tokens = set(R.dilation_group(H, W, d, (gh, gw)).index.tolist())
        want = {i * W + j for i in range(H) for j in range(W) if i % dh == gh and j % dw == gw}
        assert tokens == want


def _lamamba_path(N: int, start_row: int, start_col: int, dir_row: int, dir_col: int, vertical: bool) -> list[int]:
    """LaMamba-Diff's continuous paths (its lr_tranverse / tb_tranverse loops) on an N x N map."""
    path = []
    for a in range(N):
        for b in range(N):
            if vertical:
                row, col = (b if a % 2 == 0 else N - 1 - b), a
            else:
                row, col = a, (b if a % 2 == 0 else N - 1 - b)
            path.append((start_row + dir_row * row) * N + start_col + dir_col * col)
    return path


def test_snakes_are_lamamba_continuous_scans():
    N = 6
    assert R.snake(N, N).index.tolist() == _lamamba_path(N, 0, 0, 1, 1, False)
    assert R.snake(N, N, from_bottom=True).index.tolist() == _lamamba_path(N, N - 1, 0, -1, 1, False)
    assert R.snake(N, N, vertical=True, from_bottom=True).index.tolist() == _lamamba_path(N, N - 1, 0, -1, 1, True)
    assert R.snake(N, N, vertical=True, from_bottom=True, from_right=True).index.tolist() == \
        _lamamba_path(N, N - 1, N - 1, -1, -1, True)


def test_diagonal_and_spiral_are_mhs_vm_scans():
    """MHS-VM's diag_scan (anti-diagonals, alternate ones reversed) and spiral_scan, with their mirrors,
    written as its loops."""
    h, w = 4, 6
    diag = []
    for k in range(h + w - 1):
        cells = [(i, k - i) for i in range(h) if 0 <= k - i < w]
        diag += cells[::-1] if (k + 1) % 2 == 1 else cells
    assert R.diagonal(h, w).index.tolist() == [i * w + j for i, j in diag]
    assert R.diagonal(h, w, mirror=True).index.tolist() == [i * w + (w - 1 - j) for i, j in diag]
    spiral, (t, b, l, r) = [], (0, h - 1, 0, w - 1)
    while t < b and l < r:  # full rings only: an even-sized map has nothing else
        spiral += [(t, j) for j in range(l, r)] + [(i, r) for i in range(t, b)]
        spiral += [(b, j) for j in range(r, l, -1)] + [(i, l) for i in range(b, t, -1)]
        t, b, l, r = t + 1, b - 1, l + 1, r - 1
    assert R.spiral(h, w).index.tolist() == [i * w + j for i, j in spiral]
    assert R.spiral(h, w, mirror=True).index.tolist() == [(h - 1 - i) * w + j for i, j in spiral]


def test_a_route_scan_sees_exactly_the_tokens_before_it():
    """A selective scan along a route: the output at a token depends on the tokens at or before it in
    the route and on no other (so a window route reaches a window's tokens together, and the ones of
    the windows before it); padded routes of other lengths change nothing."""
    H, W, C, N = 5, 6, 2, 3
    routes = [R.windows(H, W, 2), *R.atrous(H, W)]
    x = torch.randn(1, H, W, C, dtype=torch.float64, requires_grad=True)
    seq = R.scan_routes(x, routes)  # [1, L, K, C]
    K, L = len(routes), seq.shape[1]
    u = seq.reshape(1, L, K * C).transpose(1, 2)
    g = torch.Generator().manual_seed(0)
    Bm, Cm = (torch.randn(1, K, N, L, generator=g, dtype=torch.float64) for _ in range(2))
    A = -torch.rand(K * C, N, generator=g, dtype=torch.float64)
    y = selective_scan(u, torch.ones_like(u), A, Bm, Cm).transpose(1, 2).reshape(1, L, K, C)
    out = R.unscan_routes(y, routes, (H, W))  # [1, H, W, K, C]
    for k, r in enumerate(routes):
        order = r.index.tolist()
        for pos in (0, len(order) // 2, len(order) - 1):
            if not order:
                continue
            t = order[pos]
            (grad,) = torch.autograd.grad(out[0, t // W, t % W, k].sum(), x, retain_graph=True)
            seen = {p for p in range(H * W) if grad[0].reshape(H * W, C)[p].abs().sum() > 0}
            assert seen == set(order[: pos + 1]), f"{r} at position {pos}"
        alone = selective_scan(R.scan_routes(x, [r])[:, :, 0].transpose(1, 2), torch.ones(1, C, len(r),
                               dtype=torch.float64), A[k * C:(k + 1) * C], Bm[:, k, :, :len(r)], Cm[:, k, :, :len(r)])
        torch.testing.assert_close(y[0, : len(r), k], alone[0].t())


def test_bad_routes_raise_clear_errors():
    x = torch.randn(1, 4, 5, 2)
    with pytest.raises(ValueError, match=r"routes \['raster\(\)'\] are for maps of another size than \(4, 5\)"):
        R.scan_routes(x, [R.raster(5, 4)])
    with pytest.raises(TypeError, match="routes must be a non-empty sequence of Route"):
        R.scan_routes(x, [])
    with pytest.raises(ValueError, match=r"group=\(2, 0\) must lie in \[0, dilation=2\)"):
        R.dilation_group(4, 5, 2, (2, 0))
    with pytest.raises(ValueError, match=r"expected \[B, 20, 1, C\]"):
        R.unscan_routes(torch.randn(1, 19, 1, 2), [R.raster(4, 5)], (4, 5))
