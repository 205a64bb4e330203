"""Swin window / shifted-window attention: GNA-based module vs an independent window-partition
implementation written the way the Swin paper's code does it (reshape into windows, relative
position index table, region mask from slices)."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params
from visattn import neighborhood_attention
from visattn.nn.mixers.window import ShiftedWindowAttention, WindowAttention, swin_shift_bias


def _swin_relative_index(M: int) -> torch.Tensor:
    """Swin's relative_position_index: ``[M*M, M*M]`` into a ``(2M-1)^2`` table."""
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (M - 1)  # query minus key
    return rel[..., 0] * (2 * M - 1) + rel[..., 1]


def _swin_region_mask(H: int, W: int, M: int, s: int) -> torch.Tensor:
    """Swin's attn_mask from slices: ``[nW, M*M, M*M]`` of 0 / -inf (Swin uses -100)."""
    img = torch.zeros(H, W)
    cnt = 0
    for hs in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for ws in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            img[hs, ws] = cnt
            cnt += 1
    win = img.reshape(H // M, M, W // M, M).transpose(1, 2).reshape(-1, M * M)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, float("-inf"))


def swin_direct(m: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Swin's forward: roll, window partition by reshape, softmax with table bias and mask."""
    B, H, W, C = x.shape
    M, s, nh = m.window_size, m.shift_size, m.num_heads
    assert H % M == 0 and W % M == 0
    if s:
        x = torch.roll(x, (-s, -s), (1, 2))
    win = x.reshape(B, H // M, M, W // M, M, C).transpose(2, 3).reshape(-1, M * M, C)
    qkv = m.qkv(win).reshape(win.shape[0], M * M, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q * m.scale) @ k.transpose(-1, -2)
    # Our rpb is indexed by key minus query; Swin's index above is query minus key: flip the table.
    table = m.rpb.flip(1, 2).permute(1, 2, 0).reshape(-1, nh)
    logits = logits + table[_swin_relative_index(M)].permute(2, 0, 1)[None]
    if s:
        mask = _swin_region_mask(H, W, M, s)
        logits = logits.reshape(B, -1, nh, M * M, M * M) + mask[None, :, None]
        logits = logits.reshape(-1, nh, M * M, M * M)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, M * M, C)
    out = m.proj(out).reshape(B, H // M, W // M, M, M, C).transpose(2, 3).reshape(B, H, W, C)
    if s:
        out = torch.roll(out, (s, s), (1, 2))
    return out


def windows_direct(m: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Non-shifted windows at any size, by explicit loops: queries of block ``b`` attend to keys
    ``[min(b*M, L-M), +M)`` (GNA's inward-moved last window)."""
    B, H, W, C = x.shape
    M, nh = m.window_size, m.num_heads
    q, k, v = m.qkv(x).reshape(B, H, W, 3, nh, C // nh).unbind(3)
    out = torch.empty_like(q)
    for r0 in range(0, H, M):
        for c0 in range(0, W, M):
            kr, kc = min(r0, H - M), min(c0, W - M)
            qq = q[:, r0:r0 + M, c0:c0 + M]
            kk, vv = k[:, kr:kr + M, kc:kc + M], v[:, kr:kr + M, kc:kc + M]
            qr = torch.arange(r0, r0 + qq.shape[1])[:, None, None, None]
            qc = torch.arange(c0, c0 + qq.shape[2])[None, :, None, None]
            dr = torch.arange(kr, kr + M)[None, None, :, None] - qr + M - 1
            dc = torch.arange(kc, kc + M)[None, None, None, :] - qc + M - 1
            bias = m.rpb[:, dr, dc]  # [nh, qh, qw, M, M]
            logits = torch.einsum("bijnd,bklnd->bijnkl", qq, kk) * m.scale + bias.permute(1, 2, 0, 3, 4)
            p = logits.flatten(-2).softmax(-1).reshape(logits.shape)
            out[:, r0:r0 + M, c0:c0 + M] = torch.einsum("bijnkl,bklnd->bijnd", p, vv)
    return m.proj(out.flatten(-2))


@pytest.mark.parametrize("H,W", [(14, 14), (14, 21)])
@pytest.mark.parametrize("shift", [0, 3])
def test_matches_swin_window_partition(H, W, shift):
    torch.manual_seed(0)
    m = WindowAttention(32, 4, window_size=7, shift_size=shift).double().eval()
    x = torch.randn(2, H, W, 32, dtype=torch.double)
    torch.testing.assert_close(m(x), swin_direct(m, x))


@pytest.mark.parametrize("H,W", [(10, 12), (9, 5), (4, 11)])
def test_non_dividing_sizes_follow_gna(H, W):
    torch.manual_seed(0)
    m = WindowAttention(16, 2, window_size=4).double().eval()
    x = torch.randn(2, H, W, 16, dtype=torch.double)
    torch.testing.assert_close(m(x), windows_direct(m, x))


def test_region_mask_equals_swin_slices():
    """Our "same wrap status per axis" mask gives Swin's slice mask whenever M divides the size."""
    H, W, M, s = 14, 21, 7, 3
    ours = swin_shift_bias("t", (H, W), M, (s, s), torch.device("cpu"), torch.float32)  # [H, W, K]
    swin = _swin_region_mask(H, W, M, s)  # [nW, M*M, M*M]
    # Re-lay ours out per window: query (i, j) in window (a, b); slot order is row-major in the window.
    ours_w = ours.reshape(H // M, M, W // M, M, M * M).permute(0, 2, 1, 3, 4).reshape(-1, M * M, M * M)
    torch.testing.assert_close(ours_w, swin)


def test_shifted_default_is_half_a_window():
    m = ShiftedWindowAttention(96, 3)
    assert m.shift_size == 3 and m.window_size == 7


def test_shift_is_dropped_on_sides_that_fit_one_window():
    """Swin's rule: no shift along a side <= M; then shifted == plain window attention there."""
    torch.manual_seed(0)
    plain = WindowAttention(16, 2, window_size=7).double().eval()
    shifted = ShiftedWindowAttention(16, 2, window_size=7).double().eval()
    shifted.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, 5, 16, dtype=torch.double)
    torch.testing.assert_close(shifted(x), plain(x))


@pytest.mark.parametrize("cls", [WindowAttention, ShiftedWindowAttention])
@pytest.mark.parametrize("H,W", [(8, 8), (9, 7)])
def test_generic_properties(cls, H, W):
    torch.manual_seed(0)
    check_all(cls(32, 4, window_size=4), torch.randn(2, H, W, 32))


def test_param_count_closed_form():
    """Swin: qkv 3C^2+3C, proj C^2+C, bias table (2M-1)^2 * heads."""
    C, h, M = 96, 3, 7
    assert count_params(WindowAttention(C, h, window_size=M)) == 4 * C * C + 4 * C + (2 * M - 1) ** 2 * h


def test_attention_dropout_path_is_the_same_attention():
    """With attention dropout on, the module takes the explicit-probabilities path; a vanishing rate
    must give the fused path's output (so the two paths compute the same attention)."""
    torch.manual_seed(0)
    m = ShiftedWindowAttention(16, 2, window_size=4, attn_drop=1e-12).double()
    x = torch.randn(2, 8, 8, 16, dtype=torch.double)
    m.train()
    y_train = m(x)
    m.eval()
    torch.testing.assert_close(y_train, m(x))


def test_is_blocked_gna_with_rpb():
    """The non-shifted module is literally NA with kernel = stride = M and the rpb table."""
    torch.manual_seed(0)
    m = WindowAttention(16, 2, window_size=5).double().eval()
    x = torch.randn(2, 10, 15, 16, dtype=torch.double)
    q, k, v = m.qkv(x).reshape(2, 10, 15, 3, 2, 8).unbind(3)
    o = neighborhood_attention(q, k, v, kernel_size=5, stride=5, rpb=m.rpb, backend="reference")
    torch.testing.assert_close(m(x), m.proj(o.flatten(-2)))


def test_bad_input_names_the_layout():
    with pytest.raises(ValueError, match=r"channels-last input \[B, H, W, 16\]"):
        WindowAttention(16, 2)(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="shift_size=7"):
        WindowAttention(16, 2, window_size=7, shift_size=7)


def test_gradcheck_through_the_shift_mask():
    """float64 gradcheck of the shifted module w.r.t. its input (the -inf bias path of the operator)."""
    torch.manual_seed(0)
    m = ShiftedWindowAttention(4, 2, window_size=2).double()
    x = torch.randn(1, 4, 3, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))



@pytest.mark.parametrize("H,W,shift", [(14, 21, 3), (28, 14, 5), (14, 14, 1), (7, 21, 3), (21, 7, 2)])
def test_band_decomposition_equals_roll_and_mask(H, W, shift):
    """Where M divides the shifted sides the mixer attends band by band (no roll, no mask: fused
    kernels); Swin's roll-and-mask form gives the same, including a side that fits one window."""
    torch.manual_seed(0)
    m = ShiftedWindowAttention(16, 2, window_size=7, shift_size=shift).double().eval()
    x = torch.randn(2, H, W, 16, dtype=torch.double)
    shifts = tuple(shift if L > 7 else 0 for L in (H, W))
    banded = m(x)
    torch.testing.assert_close(banded, m._shifted_masked(x, shifts))
    if H > 7 and W > 7:
        torch.testing.assert_close(banded, swin_direct(m, x))
