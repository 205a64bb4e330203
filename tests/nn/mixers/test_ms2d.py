"""MSVMamba's MS2D against a direct implementation of its forward (full-resolution row-major scan, the
three low-resolution routes concatenated into one sequence, bilinear upsampling, SE gate), and its
receptive field."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scan_direct import receptive, route_scan
from visattn.nn.mixers.ms2d import MS2D


def ms2d_direct(m: MS2D, x: torch.Tensor) -> torch.Tensor:
    B, H, W, _ = x.shape
    xi, z = m.in_proj(x).chunk(2, dim=-1)
    xc = xi.permute(0, 3, 1, 2)
    full, low = F.silu(m.conv2d(xc)), F.silu(m.conv2d_b1(xc))
    D, h, w = low.shape[1:]
    y = m.out_norm(route_scan(m.ssm, 0, full.flatten(2)).transpose(1, 2)).view(B, H, W, D)
    l = h * w
    cols = low.transpose(2, 3).flatten(2)
    seq = torch.cat([low.flatten(2).flip(-1), cols, cols.flip(-1)], 2)
    out = m.out_norm(route_scan(m.ssm_low, 0, seq).transpose(1, 2)).transpose(1, 2)  # [B, D, 3l]
    y_low = (out[..., :l].flip(-1).view(B, D, h, w) + out[..., l:2 * l].view(B, D, w, h).transpose(2, 3)
             + out[..., 2 * l:].flip(-1).view(B, D, w, h).transpose(2, 3))
    y = y + F.interpolate(y_low, size=(H, W), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    gate = torch.sigmoid(m.se.fc2(F.relu(m.se.fc1(y.mean((1, 2), keepdim=True)))))
    return m.out_proj(y * gate * F.silu(z))


def test_matches_the_direct_multiscale_scan():
    torch.manual_seed(0)
    m = MS2D(16, d_state=2).double()
    for H, W in [(6, 8), (7, 5)]:
        x = torch.randn(2, H, W, 16, dtype=torch.double)
        torch.testing.assert_close(m(x), ms2d_direct(m, x))


def test_the_low_resolution_branch_gives_a_global_view():
    """The full-resolution scan is row-major only, yet the first token sees the whole map through the
    reversed low-resolution scans (SE off, so its global average is not what connects them)."""
    torch.manual_seed(0)
    m = MS2D(8, d_state=2, se=False).double()
    x = torch.randn(1, 8, 6, 8, dtype=torch.double)
    assert receptive(m, x, 0, 0) == {(i, j) for i in range(8) for j in range(6)}
