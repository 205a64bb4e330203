"""Vim's bidirectional Mamba against a direct two-branch implementation (flip, causal conv, scan with
the z gate, flip back, average), on maps and on token sequences; its receptive field."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from module_checks import count_params
from scan_direct import route_scan
from visattn.nn.mixers.vim import BidirectionalMamba


def vim_direct(m: BidirectionalMamba, seq: torch.Tensor) -> torch.Tensor:
    """Vim's bimamba v2 on ``seq [B, L, C]``: the backward branch runs on the flipped sequence with its own
    conv and scan parameters, its output flipped back; ``(forward + backward) / 2``."""
    D, L = m.d_inner, seq.shape[1]
    xz = m.in_proj(seq).transpose(1, 2)  # [B, 2D, L]
    outs = []
    for k, flip in enumerate((False, True)):
        x, z = (xz.flip(-1) if flip else xz).chunk(2, dim=1)
        conv = F.conv1d(x, m.conv1d.weight[k * D:(k + 1) * D], m.conv1d.bias[k * D:(k + 1) * D],
                        padding=m.conv1d.padding[0], groups=D)[..., :L]
        y = route_scan(m.ssm, k, F.silu(conv), z)
        outs.append(y.flip(-1) if flip else y)
    return m.out_proj(((outs[0] + outs[1]) / 2).transpose(1, 2))


def test_matches_the_direct_bidirectional_block():
    torch.manual_seed(0)
    m = BidirectionalMamba(16, d_state=4).double()
    seq = torch.randn(2, 23, 16, dtype=torch.double)
    torch.testing.assert_close(m(seq), vim_direct(m, seq))
    grid = torch.randn(2, 4, 5, 16, dtype=torch.double)  # a map is its row-major sequence
    torch.testing.assert_close(m(grid), vim_direct(m, grid.reshape(2, 20, 16)).view(2, 4, 5, 16))


def test_every_token_sees_the_whole_sequence():
    """Forward and backward scans: even the first and last tokens depend on every token."""
    torch.manual_seed(0)
    m = BidirectionalMamba(8, d_state=2).double()
    seq = torch.randn(1, 12, 8, dtype=torch.double, requires_grad=True)
    for t in (0, 5, 11):
        (g,) = torch.autograd.grad(m(seq)[0, t].sum(), seq)
        assert (g[0].abs().sum(-1) > 0).all()


def test_param_count_closed_form():
    """in_proj 2 C Di; two causal convs 2 Di (k + 1); two S6 sets; out_proj Di C."""
    C, N, k = 96, 16, 4
    Di, R = 2 * C, 6
    s6 = (R + 2 * N) * Di + R * Di + Di + N * Di + Di
    assert count_params(BidirectionalMamba(C)) == 2 * C * Di + 2 * Di * (k + 1) + 2 * s6 + Di * C


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"token sequence \[B, L, 16\]"):
        BidirectionalMamba(16)(torch.randn(2, 5, 8))


def test_causal_depthwise_conv_is_mambas_conv1d():
    from visattn.nn.mixers.vim import causal_depthwise_conv

    x, w, b = (torch.randn(*s, dtype=torch.double) for s in ((2, 11, 6), (6, 1, 4), (6,)))
    want = F.conv1d(x.transpose(1, 2), w, b, padding=3, groups=6)[..., :11].transpose(1, 2)
    torch.testing.assert_close(causal_depthwise_conv(x, w, b), want)
