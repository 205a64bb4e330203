"""MOAT and tiny-MOAT: sizes against the paper and the official code, any input size, the attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from family_checks import check_classifier_and_backbone, paper_row, params_and_gmacs
from visattn.models import create_model
from visattn.models.moat import MOAT_CONFIGS, MOATAttention, MOATBlock
from visattn.nn.layers import MBConv

# The official parameter counts, from the official test (google-research/deeplab2,
# model/pixel_encoder/moat_test.py at 64bc1c1; the tables are independent of the input size).
OFFICIAL_PARAMS = {"moat_0": 27_846_892, "moat_1": 41_598_448, "moat_2": 73_422_408, "moat_3": 189_958_040,
                   "tiny_moat_0": 3_355_348, "tiny_moat_1": 5_122_895, "tiny_moat_2": 9_772_741,
                   "tiny_moat_3": 19_534_390}


@pytest.mark.parametrize("name", sorted(MOAT_CONFIGS))
def test_params_match_the_official_model_and_the_paper(name: str) -> None:
    params, gmacs = params_and_gmacs(name)
    row = paper_row(name)
    assert params == OFFICIAL_PARAMS[name] and round(params / 1e6, 1) == row.paper_params_m
    # MOAT's FLOPs are TensorFlow's profiler count halved (the official test): every float op of the
    # graph, elementwise ones (BatchNorm, GELU, softmax, residual adds) included. Ours are fvcore's
    # MACs, which leave those out: never above the printed value's rounding interval (+-0.05), at most
    # 2% below it.
    assert gmacs <= row.paper_gmacs + 0.05 and 1.02 * gmacs >= row.paper_gmacs - 0.05, f"{name}: {gmacs:.3f} GMACs"


def test_stage_layout() -> None:
    model = create_model("tiny_moat_0", depths=(1, 1, 2, 1))
    assert all(isinstance(s.blocks[0], MBConv) for s in model.stages[:2])
    assert all(isinstance(b, MOATBlock) for s in model.stages[2:] for b in s.blocks)
    block = model.stages[2].blocks[1]
    assert isinstance(block.mbconv.se, torch.nn.Identity) and block.attn.num_heads == 4
    assert [s.blocks[0].attn.rpb.shape[-1] for s in model.stages[2:]] == [27, 13]


def test_any_size_classifier_and_backbone() -> None:
    check_classifier_and_backbone("tiny_moat_0", depths=(1, 1, 2, 1))


def _dense(m: MOATAttention, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Global attention, the bias of query (i, j) and key (k, l) read at table[:, k - i + H - 1, l - j + W - 1]."""
    B, H, W, C = x.shape
    q, k, v = m.qkv(x).reshape(B, H * W, 3, m.num_heads, -1).permute(2, 0, 3, 1, 4)
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    i, j = i.flatten(), j.flatten()
    bias = table[:, i[None, :] - i[:, None] + H - 1, j[None, :] - j[:, None] + W - 1]
    attn = (q @ k.transpose(-1, -2) * m.scale + bias).softmax(-1)
    return m.proj((attn @ v).transpose(1, 2).reshape(B, H, W, C))


@pytest.mark.parametrize("size", [(5, 5), (9, 4), (1, 3)])
def test_attention_is_global_with_the_resized_relative_table(size) -> None:
    torch.manual_seed(0)
    m = MOATAttention(16, 2, pos_size=5).double().eval()
    x = torch.randn(2, *size, 16, dtype=torch.double)
    table = F.interpolate(m.rpb[None], size=(2 * size[0] - 1, 2 * size[1] - 1), mode="bilinear",
                          align_corners=False)[0]
    if size == (5, 5):
        assert torch.equal(m.relative_bias(5, 5), m.rpb)  # the learned size: no resampling
    with torch.no_grad():
        torch.testing.assert_close(m(x), _dense(m, x, table))


def test_block_is_mbconv_then_residual_attention() -> None:
    torch.manual_seed(0)
    block = MOATBlock(8, 32, stride=2, pos_size=3).eval()
    x = torch.randn(1, 6, 5, 8)
    with torch.no_grad():
        y = block.mbconv(x)
        torch.testing.assert_close(block(x), y + block.attn(block.norm(y)))
    assert y.shape == (1, 3, 3, 32)
