"""EfficientVMamba's ES2D against a direct EfficientScan / EfficientMerge, and the receptive field of its
atrous scan: a token sees its own sub-grid only, the part scanned before it."""

from __future__ import annotations

import torch

from scan_direct import receptive, route_scan, ss2d_epilogue, ss2d_prologue
from visattn.nn.mixers.es2d import ES2D


def es2d_direct(m: ES2D, x: torch.Tensor) -> torch.Tensor:
    """EfficientScan's slicing (step 2, even map), one scan per sub-grid, EfficientMerge's assignment."""
    xc, z = ss2d_prologue(m, x)
    B, D, H, W = xc.shape
    parts = [xc[:, :, ::2, ::2], xc.transpose(2, 3)[:, :, ::2, 1::2], xc[:, :, ::2, 1::2],
             xc.transpose(2, 3)[:, :, 1::2, 1::2]]
    ys = [route_scan(m.ssm, k, p.flatten(2)) for k, p in enumerate(parts)]
    h, w = H // 2, W // 2
    y = xc.new_empty(B, D, H, W)
    y[:, :, ::2, ::2] = ys[0].view(B, D, h, w)
    y[:, :, 1::2, ::2] = ys[1].view(B, D, w, h).transpose(2, 3)
    y[:, :, ::2, 1::2] = ys[2].view(B, D, h, w)
    y[:, :, 1::2, 1::2] = ys[3].view(B, D, w, h).transpose(2, 3)
    return ss2d_epilogue(m, y, z)


def test_matches_efficientvmamba_on_even_maps():
    torch.manual_seed(0)
    m = ES2D(16, d_state=4).double()
    x = torch.randn(2, 6, 8, 16, dtype=torch.double)
    torch.testing.assert_close(m(x), es2d_direct(m, x))


def test_a_token_sees_the_earlier_part_of_its_own_sub_grid():
    """Without the 3x3 conv (``d_conv=1``) nothing mixes the sub-grids: the output at a token depends on
    the tokens of its dilation-2 group up to it in that group's scan order, and on nothing else."""
    torch.manual_seed(0)
    m = ES2D(8, d_state=2, d_conv=1).double()
    H, W = 7, 6
    x = torch.randn(1, H, W, 8, dtype=torch.double)
    for i, j in [(3, 2), (4, 5), (6, 1), (0, 0)]:
        rows, cols = range(i % 2, H, 2), range(j % 2, W, 2)
        group = [(r, c) for r in rows for c in cols] if i % 2 == 0 else [(r, c) for c in cols for r in rows]
        assert receptive(m, x, i, j) == set(group[: group.index((i, j)) + 1])
