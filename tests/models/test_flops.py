"""count_flops: MACs as fvcore and the NAT/DiNAT papers count them, attention ops included."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import visattn
from visattn import count_flops
from visattn.bench.flops import na_macs
from visattn.ops import register_na_flop_formula
from visattn.models import NAT_CONFIGS, create_model
from visattn.models.nat import NATBlock
from visattn.spec import make_spec

# The DiNAT-Large row is the ImageNet-22k model at 224 (its head has 21,841 classes; its FLOPs
# do not round to the table with a 1000-class head: 30.53G vs 30.57G).
_TABLE_NUM_CLASSES = {"dinat_large": 21841}


@pytest.mark.parametrize("name", sorted(NAT_CONFIGS))
def test_gmacs_match_paper_at_224(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=_TABLE_NUM_CLASSES.get(name, 1000)).eval()
    gmacs = count_flops(model, torch.empty(1, 3, 224, 224, device="meta")) / 1e9
    assert round(gmacs, 1) == NAT_CONFIGS[name].paper_gmacs, f"{name}: {gmacs:.3f} GMACs"


def test_na_module_count_is_the_formula_not_the_backend_work():
    """What the tiled backend computes internally (padded tiles) is replaced by the operator's count."""
    B, H, W, C, heads, k = 2, 14, 10, 32, 4, 7
    attn = visattn.NeighborhoodAttention2D(C, heads, k, dilation=2, rel_pos_bias=True)
    ops = count_flops(attn, torch.randn(B, H, W, C), by_op=True)
    N, D = H * W, C // heads
    # dilation 2 on a 10-wide axis: 7 * 2 > 10, so the variable-resolution rule uses dilation 1.
    assert ops == {"addmm": B * N * C * 3 * C + B * N * C * C,
                   "neighborhood_attention": 2 * B * N * k * k * heads * D + B * N * k * k * heads}


def test_small_maps_count_the_window_actually_used():
    attn = visattn.NeighborhoodAttention2D(16, 2, 7)  # no bias table
    ops = count_flops(attn, torch.randn(1, 5, 3, 16), by_op=True)
    assert ops["neighborhood_attention"] == 2 * 15 * 15 * 2 * 8  # the window is the whole 5x3 map


def test_na_macs_matches_spec_flops():
    spec = make_spec("t", (8, 9), 3, dilation=(2, 1))
    assert na_macs(spec, 2, 3, 16) == 2 * (2 * 72 * 9 * 3 * 16)  # QK^T and AV, B * N * K * H * D each
    assert na_macs(spec, 2, 3, 16, rpb=True) - na_macs(spec, 2, 3, 16) == 2 * 72 * 9 * 3


def test_dense_attention_on_cpu_is_counted():
    """PyTorch's counter has no formula for CPU SDPA; we count QK^T and AV like every other matmul."""
    block = NATBlock(32, 4, attn_type="global")
    ops = count_flops(block.attn, torch.randn(1, 6, 5, 32), by_op=True)
    N = 30
    assert ops["_scaled_dot_product_flash_attention_for_cpu"] == 2 * N * N * 32


def test_layer_norm_uses_fvcore_estimate_and_convs_are_macs():
    x = torch.randn(2, 3, 16, 16)
    conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
    assert count_flops(conv, x) == 2 * 8 * 8 * 8 * 3 * 9
    assert count_flops(torch.nn.LayerNorm(16), x) == 5 * x.numel()


def test_by_op_sums_to_total_and_nat_vs_dinat_cost_the_same():
    kw = dict(depths=(2, 2, 1, 1), num_classes=10)
    x = torch.randn(1, 3, 56, 56)  # a 14x14 first map: room for a 7x7 window at dilation 2
    nat = create_model("nat_mini", **kw).eval()
    dinat = create_model("dinat_mini", dilations=[[1, 2], [1, 1], [1], [1]], **kw).eval()
    by_op = count_flops(dinat, x, by_op=True)
    assert sum(by_op.values()) == count_flops(dinat, x)
    assert count_flops(nat, x) == count_flops(dinat, x)  # dilation changes which keys, not how many
    assert "bmm" not in by_op  # the backend's own matmuls were all attributed to the NA formula


def test_pytorch_counter_sees_a_registered_na_op():
    """The hook for visattn's torch.library ops: PyTorch's own FlopCounterMode counts the formula."""

    @torch.library.custom_op("visattn_test::na2d", mutates_args=())
    def na2d_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, stride: int,
                dilation: int, is_causal: bool) -> torch.Tensor:
        return visattn.na2d(q, k, v, kernel_size, stride, dilation, is_causal)

    register_na_flop_formula(torch.ops.visattn_test.na2d)
    q = torch.randn(2, 9, 11, 3, 8)
    with FlopCounterMode(display=False) as counter:
        na2d_op(q, q, q, 5, 1, 2, False)
    spec = make_spec("t", (9, 11), 5, 1, 2)
    assert counter.get_total_flops() == 2 * na_macs(spec, 2, 3, 8)


def test_pytorch_flop_counter_sees_the_attention_op() -> None:
    """A plain FlopCounterMode counts neighborhood attention by its formula, forward and backward,
    and the call still returns the eager result."""
    from visattn import na2d
    from visattn.spec import na_flops

    q = torch.randn(1, 13, 11, 4, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = na2d(q, q, q, 5, dilation=2)
        out.sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    fwd = na_flops(make_spec("t", (13, 11), 5, dilation=2), batch=1, heads=4, dim=16)
    assert counts == {"visattn.na_forward": fwd, "visattn.na_backward": 2 * fwd}
    torch.testing.assert_close(out, na2d(q, q, q, 5, dilation=2))
