"""LaMamba-Diff's token mixing: the continuous-scan SS2D against LaMamba's own path construction, the
residual composition with window attention, and its receptive field."""

from __future__ import annotations

import torch

from scan_direct import receptive, route_scan, ss2d_epilogue, ss2d_prologue
from visattn.nn.mixers.lamamba import ContinuousSS2D, LaMamba


def _path(N, start_row, start_col, dir_row, dir_col, vertical):
    """LaMamba-Diff's lr_tranverse / tb_tranverse."""
    out = []
    for a in range(N):
        for b in range(N):
            row, col = ((b if a % 2 == 0 else N - 1 - b), a) if vertical else (a, (b if a % 2 == 0 else N - 1 - b))
            out.append((start_row + dir_row * row) * N + start_col + dir_col * col)
    return torch.tensor(out)


def continuous_direct(m: ContinuousSS2D, x: torch.Tensor) -> torch.Tensor:
    """cross_scan_continuous / cross_merge_continuous around SS2D's core."""
    xc, z = ss2d_prologue(m, x)
    seq = xc.flatten(2)
    N = x.shape[1]
    paths = [_path(N, 0, 0, 1, 1, False), _path(N, N - 1, 0, -1, 1, False), _path(N, N - 1, 0, -1, 1, True),
             _path(N, N - 1, N - 1, -1, -1, True)]
    y = sum(torch.empty_like(seq).index_copy_(-1, p, route_scan(m.ssm, k, seq[..., p])) for k, p in enumerate(paths))
    return ss2d_epilogue(m, y.view(xc.shape), z)


def test_continuous_scan_matches_lamambas_paths():
    torch.manual_seed(0)
    m = ContinuousSS2D(16, d_state=2).double()
    x = torch.randn(2, 6, 6, 16, dtype=torch.double)
    torch.testing.assert_close(m(x), continuous_direct(m, x))


def test_block_composition():
    """x + mixer(x) is the block's x1 = x + SS2D(LN(x)), x2 = x1 + WA(LN(x1))."""
    torch.manual_seed(0)
    m = LaMamba(16, num_heads=2, window_size=4, shift_size=2).double()
    x = torch.randn(2, 8, 8, 16, dtype=torch.double)
    x1 = x + m.ssm(m.norm_ssm(x))
    x2 = x1 + m.attn(m.norm_attn(x1))
    torch.testing.assert_close(x + m(x), x2)


def test_every_output_sees_the_whole_map():
    torch.manual_seed(0)
    m = LaMamba(8, num_heads=2, window_size=3).double()
    x = torch.randn(1, 6, 7, 8, dtype=torch.double)
    assert receptive(m, x, 0, 0) == {(i, j) for i in range(6) for j in range(7)}
