"""LocalMamba against a direct multi-direction SS2D (its local_scan view/permute, per-direction channel
attention, sum), its direction parsing, and what a windowed scan sees."""

from __future__ import annotations

import pytest
import torch

from scan_direct import receptive, route_scan, ss2d_epilogue, ss2d_prologue
from visattn.nn.mixers.local_scan import LocalScan


def local_scan_direct(m: LocalScan, x: torch.Tensor, w: int) -> torch.Tensor:
    """Directions ('h', 'v_flip', 'w<w>', 'w<w>_flip') written as LocalMamba's MultiScan does (w divides the map)."""
    xc, z = ss2d_prologue(m, x)
    B, D, H, W = xc.shape
    local = xc.view(B, D, H // w, w, W // w, w).permute(0, 1, 2, 4, 3, 5).flatten(2)
    seqs = [xc.flatten(2), xc.transpose(2, 3).flatten(2).flip(-1), local, local.flip(-1)]
    ys = [route_scan(m.ssm, k, s) for k, s in enumerate(seqs)]

    def unlocal(t):
        return t.view(B, D, H // w, W // w, w, w).permute(0, 1, 2, 4, 3, 5).reshape(B, D, H * W)

    maps = [ys[0], ys[1].flip(-1).view(B, D, W, H).transpose(2, 3).flatten(2), unlocal(ys[2]), unlocal(ys[3].flip(-1))]
    y = sum(m.attn(t.transpose(1, 2)) for t in maps).transpose(1, 2).reshape(B, D, H, W)
    return ss2d_epilogue(m, y, z)


def test_matches_localmambas_multi_scan():
    torch.manual_seed(0)
    m = LocalScan(16, directions=("h", "v_flip", "w2", "w2_flip"), d_state=4).double()
    x = torch.randn(2, 4, 6, 16, dtype=torch.double)
    torch.testing.assert_close(m(x), local_scan_direct(m, x, 2))


def test_a_windowed_scan_reaches_its_window_first():
    """Without conv and channel attention, a windowed scan's output at a token depends on the tokens
    before it in the route: its window's first, then every window scanned before (the state runs on)."""
    torch.manual_seed(0)
    m = LocalScan(8, directions=("w3",), d_state=2, d_conv=1, channel_attention=False).double()
    H, W = 6, 7
    x = torch.randn(1, H, W, 8, dtype=torch.double)
    blocks = [(0, 3), (3, 6)], [(0, 3), (3, 6), (6, 7)]
    order = [(i, j) for r0, r1 in blocks[0] for c0, c1 in blocks[1] for i in range(r0, r1) for j in range(c0, c1)]
    for i, j in [(0, 0), (1, 4), (4, 2), (5, 6)]:
        assert receptive(m, x, i, j) == set(order[: order.index((i, j)) + 1])


def test_bad_directions_raise():
    with pytest.raises(ValueError, match=r"direction 'd' is not one of 'h', 'v', 'w<k>'"):
        LocalScan(16, directions=("h", "d"))
