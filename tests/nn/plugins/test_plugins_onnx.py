"""Every CNN plug-in exports to ONNX (torch.export-based exporter) and onnxruntime reproduces it.

Slow (the exporter takes seconds per module), so marked ``slow``; needs the ``onnx`` extra.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from plugin_helpers import single_thread  # noqa: F401
from visattn import create_attn, list_attn


@pytest.mark.slow
@pytest.mark.parametrize("name", list_attn("channels_first"))
def test_onnx_export_matches_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnx extra not installed")
    pytest.importorskip("onnxscript", reason="onnx extra not installed")
    torch.manual_seed(0)
    m = create_attn(name, 32).eval()
    x = torch.randn(2, 32, 9, 13)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), str(path), verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), m(x), atol=1e-5, rtol=1e-4)
