"""visattn.nn.linear.Linear: nn.Linear's parameters and results, with a oneDNN route for eager
inference on channels-last maps that is taken exactly where it is meant to be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visattn.nn import linear as linear_mod
from visattn.nn.linear import Linear, onednn_projection


@pytest.fixture
def route(monkeypatch):
    """Set ``VISATTN_ONEDNN_LINEAR`` for one test (the CPU probe is cached: clear it around)."""
    def set_(value: str) -> None:
        monkeypatch.setenv(linear_mod.ENV, value)
        linear_mod._cpu_prefers_onednn.cache_clear()
    yield set_
    linear_mod._cpu_prefers_onednn.cache_clear()


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def test_is_an_nn_linear_with_the_same_state_dict() -> None:
    torch.manual_seed(0)
    ours, ref = Linear(12, 20), nn.Linear(12, 20)
    assert isinstance(ours, nn.Linear)
    ref.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()


@needs_onednn
@pytest.mark.parametrize("shape,bias", [((2, 9, 7, 12), True), ((2, 1, 1, 12), False), ((3, 5, 13, 12), True),
                                        ((1, 41, 42, 12), True)])
def test_onednn_route_equals_linear(route, shape, bias) -> None:
    route("1")
    torch.manual_seed(0)
    layer = Linear(12, 20, bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert onednn_projection(x, layer)
        y = layer(x)
        expect = F.linear(x, layer.weight, layer.bias)
    assert y.shape == expect.shape and y.is_contiguous()
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_route_not_taken_with_autograd_other_dtypes_or_layouts(route, monkeypatch) -> None:
    route("1")
    layer = Linear(8, 4)
    x = torch.randn(2, 3, 5, 8)
    assert not onednn_projection(x, layer)  # parameters need grad, grad mode on: F.linear (its backward)
    with torch.no_grad():
        assert not onednn_projection(x.double(), layer)
        assert not onednn_projection(x.transpose(1, 2), layer)  # not contiguous
        assert not onednn_projection(x[0], layer)  # not a 4-D map
    monkeypatch.setattr(linear_mod.F, "conv2d", lambda *a, **k: pytest.fail("the oneDNN route ran under autograd"))
    layer(x).sum().backward()
    assert layer.weight.grad is not None


def test_switched_off_by_the_environment(route) -> None:
    route("0")
    with torch.no_grad():
        assert not onednn_projection(torch.randn(1, 2, 2, 8), Linear(8, 4))


@needs_onednn
def test_single_small_images_keep_f_linear_because_torch_would_not_use_onednn(route) -> None:
    """PyTorch runs a 1x1 float32 convolution of one image with at most 20480 input elements with its
    own im2col + GEMM instead of oneDNN (slower than F.linear): the route skips exactly those."""
    from torch.profiler import profile

    route("1")
    layer = Linear(288, 64)

    def conv_kernels(x: torch.Tensor) -> set[str]:
        with torch.no_grad(), profile() as prof:
            F.conv2d(x.permute(0, 3, 1, 2), layer.weight[:, :, None, None], layer.bias)
        return {e.name for e in prof.events()} & {"aten::mkldnn_convolution", "aten::_slow_conv2d_forward"}

    small, large, batched = torch.randn(1, 7, 7, 288), torch.randn(1, 9, 8, 288), torch.randn(2, 7, 7, 288)
    with torch.no_grad():
        assert not onednn_projection(small, layer) and conv_kernels(small) == {"aten::_slow_conv2d_forward"}
        for x in (large, batched):
            assert onednn_projection(x, layer) and conv_kernels(x) == {"aten::mkldnn_convolution"}
        torch.testing.assert_close(layer(small), F.linear(small, layer.weight, layer.bias))
