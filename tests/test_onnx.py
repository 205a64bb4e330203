"""ONNX: NeighborhoodAttention2D (with/without RPB, dilation, stride) and a NAT-style block export
with ``torch.onnx.export(..., dynamo=False)`` and onnxruntime matches PyTorch within 1e-4 (fp32).

The export goes through the portable ``torch`` backend (gathers + matmuls); its index tensors are
baked in as constants, so the spatial size is fixed at export time (the test proves ONNX Runtime
refuses another size rather than computing a wrong answer)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from visattn import NeighborhoodAttention2D

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'visattn[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'visattn[onnx]')")

OPSET = 17


class NATBlock(nn.Module):
    """Pre-norm transformer block with NA as token mixer (NAT/DiNAT layer): ``[B, H, W, C]``."""

    def __init__(self, dim: int = 16, heads: int = 2, kernel_size: int = 5, dilation: int = 1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention2D(dim, heads, kernel_size, dilation=dilation, rel_pos_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _export(module: nn.Module, x: torch.Tensor, opset: int = OPSET) -> "ort.InferenceSession":
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about index tensors becoming constants: intended
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"])
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    assert {op.domain or "ai.onnx" for op in model.graph.node} == {"ai.onnx"}, "only standard ONNX ops"
    return ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])


def _randomize(module: nn.Module) -> nn.Module:
    """Non-trivial weights (the RPB table starts near zero) so every part of the graph matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module.eval()


CASES = {
    "plain": dict(kernel_size=5),
    "rpb": dict(kernel_size=5, rel_pos_bias=True),
    "dilation_rpb": dict(kernel_size=3, dilation=(2, 3), rel_pos_bias=True),
    "stride_causal": dict(kernel_size=(4, 5), stride=(2, 1), is_causal=(True, False), rel_pos_bias=True),
}


@pytest.mark.parametrize("name, opset", [(name, OPSET) for name in CASES] + [("dilation_rpb", 13)])
def test_neighborhood_attention_2d_roundtrip(name: str, opset: int) -> None:
    module = _randomize(NeighborhoodAttention2D(16, 2, **CASES[name]))
    x = torch.randn(2, 11, 14, 16, generator=torch.Generator().manual_seed(1))
    sess = _export(module, x, opset)
    (y,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), module(x), atol=1e-4, rtol=1e-4)


def test_nat_block_roundtrip() -> None:
    block = _randomize(NATBlock(dilation=2))
    x = torch.randn(1, 12, 10, 16, generator=torch.Generator().manual_seed(2))
    sess = _export(block, x)
    (y,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), block(x), atol=1e-4, rtol=1e-4)
    # Another input of the same shape reuses the graph...
    x2 = torch.randn(1, 12, 10, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(sess.run(None, {"x": x2.numpy()})[0]), block(x2),
                                   atol=1e-4, rtol=1e-4)
    # ...but the spatial size is fixed at export: another one is refused, not silently miscomputed.
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(None, {"x": torch.randn(1, 14, 10, 16).numpy()})


def test_export_routes_to_the_traceable_backend(monkeypatch) -> None:
    """While tracing for export, automatic selection picks the pure-PyTorch backend even when a
    faster (fused, untraceable) backend would win in eager mode."""
    from visattn import backends
    from visattn.backends.torch_tiled import TorchTiledBackend

    class Fused(TorchTiledBackend):
        name = "fused_test"

        def priority(self, p) -> float:
            return 1e9

        def forward(self, q, k, v, p, extras):
            assert not torch.jit.is_tracing(), "an untraceable kernel was traced"
            return super().forward(q, k, v, p, extras)

    monkeypatch.setitem(backends._INSTANCES, "fused_test", Fused())
    module = _randomize(NeighborhoodAttention2D(16, 2, 5, rel_pos_bias=True))
    x = torch.randn(1, 9, 8, 16)
    sess = _export(module, x)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]), module(x),
                                   atol=1e-4, rtol=1e-4)


def test_dynamic_spatial_sizes_with_the_dynamo_exporter(tmp_path) -> None:
    """``torch.onnx.export(dynamo=True)`` with ``dynamic_shapes``: one graph serves every batch and
    spatial size whose axes hold at least ``kernel_size * dilation`` tokens (the neighbourhood
    indices are computed in the graph from the input shape)."""
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (pip install 'visattn[onnx]')")
    module = _randomize(NeighborhoodAttention2D(16, 2, kernel_size=3, dilation=(2, 3), rel_pos_bias=True))
    Dim = torch.export.Dim
    x = torch.randn(2, 8, 11, 16)
    path = tmp_path / "na_dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True, opset_version=18, verbose=False,
                                    dynamic_shapes=({0: Dim("B", max=64), 1: Dim("H", min=6, max=1024),
                                                     2: Dim("W", min=9, max=1024)},))
    program.save(str(path))
    assert {op.domain or "ai.onnx" for op in onnx.load(str(path)).graph.node} == {"ai.onnx"}, "only standard ONNX ops"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [d if isinstance(d, int) else "dyn" for d in sess.get_inputs()[0].shape] == ["dyn", "dyn", "dyn", 16]
    for shape in [(2, 8, 11), (1, 6, 9), (3, 13, 20)]:
        x = torch.randn(*shape, 16, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]),
                                       module(x), atol=1e-4, rtol=1e-4, msg=lambda m: f"{shape}: {m}")
