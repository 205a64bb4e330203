"""VMamba's SS2D against a direct cross-scan (four scans of flips and transposes, merged by hand), its
global receptive field and its parameter count."""

from __future__ import annotations

import torch

from module_checks import count_params
from scan_direct import receptive, route_scan, ss2d_epilogue, ss2d_prologue
from visattn.nn.mixers.ss2d import SS2D


def ss2d_direct(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    """VMamba's forward_corev0: CrossScan, one scan per direction, CrossMerge, LayerNorm, gate."""
    xc, z = ss2d_prologue(m, x)
    B, D, H, W = xc.shape
    row, col = xc.flatten(2), xc.transpose(2, 3).flatten(2)
    ys = [route_scan(m.ssm, k, seq) for k, seq in enumerate([row, col, row.flip(-1), col.flip(-1)])]
    untranspose = lambda t: t.view(B, D, W, H).transpose(2, 3).flatten(2)  # noqa: E731
    y = ys[0] + ys[2].flip(-1) + untranspose(ys[1]) + untranspose(ys[3].flip(-1))
    return ss2d_epilogue(m, y.view(B, D, H, W), z)


def test_matches_the_direct_cross_scan():
    torch.manual_seed(0)
    m = SS2D(16, d_state=4).double()
    x = torch.randn(2, 5, 7, 16, dtype=torch.double)
    torch.testing.assert_close(m(x), ss2d_direct(m, x))


def test_every_output_sees_the_whole_map():
    """The four directions reach every token: even a corner depends on the whole map."""
    torch.manual_seed(0)
    m = SS2D(8, d_state=2).double()
    x = torch.randn(1, 6, 5, 8, dtype=torch.double)
    everything = {(i, j) for i in range(6) for j in range(5)}
    for i, j in [(0, 0), (5, 4), (2, 3)]:
        assert receptive(m, x, i, j) == everything


def test_param_count_closed_form():
    """in_proj 2 C Di; conv Di (k^2 + 1); K routes x (x_proj (R + 2N) Di + dt_proj (R Di + Di) + A N Di + D Di);
    out_norm 2 Di; out_proj Di C (no biases on the projections)."""
    C, N, K, k = 96, 16, 4, 3
    Di, R = 2 * C, 6
    expect = 2 * C * Di + Di * (k * k + 1) + K * ((R + 2 * N) * Di + R * Di + Di + N * Di + Di) + 2 * Di + Di * C
    assert count_params(SS2D(C)) == expect
