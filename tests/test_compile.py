"""torch.compile: the custom ops (``visattn.ops``) keep a module using NA in one graph, forward and
backward match eager, and a new input resolution does not recompile every call."""

from __future__ import annotations

import pytest
import torch

from visattn import NeighborhoodAttention2D, na2d
from visattn.ops import na_backward, na_forward  # noqa: F401  (registers the ops)


def _counter(backend: str = "aot_eager"):
    """A compile backend that counts compiled frames; ``aot_eager`` runs AOTAutograd, so the fake
    impls and the registered backward are exercised without paying for code generation."""
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend(backend)


def _module(seed: int = 0) -> NeighborhoodAttention2D:
    torch.manual_seed(seed)
    return NeighborhoodAttention2D(16, 2, kernel_size=5, dilation=2, rel_pos_bias=True)


def _fwd_bwd(fn, module: torch.nn.Module, x: torch.Tensor):
    """Output and gradients (input, every parameter) of ``fn(x)`` under a random projection."""
    x = x.detach().requires_grad_()
    y = fn(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad((y * w).sum(), [x, *params])
    return y.detach(), grads


def test_ops_pass_opcheck() -> None:
    """torch.library.opcheck: schema, fake impl vs real shapes/strides, autograd registration."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 5, 2, 4, generator=g, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g, requires_grad=True)
    mask = torch.zeros(1, 6, 5, dtype=torch.bool)
    mask[0, :2] = True
    args = (q, k, v, rpb, None, mask, [3, 3], [1, 2], [2, 1], [False, False], 0.5, "", True)
    torch.library.opcheck(torch.ops.visattn.na_forward.default, args)


def test_fullgraph_module_matches_eager_forward_and_backward() -> None:
    module = _module()
    cnt = _counter()
    compiled = torch.compile(module, backend=cnt, fullgraph=True)  # fullgraph: any graph break raises
    x = torch.randn(2, 11, 12, 16, generator=torch.Generator().manual_seed(0))
    y_c, g_c = _fwd_bwd(compiled, module, x)
    y_e, g_e = _fwd_bwd(module, module, x)
    torch.testing.assert_close(y_c, y_e, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert cnt.frame_count == 1
    # The op is in the graph as one node: no backend internals were traced.
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_functional_extras_compile() -> None:
    """rpb, attn_bias, key_padding_mask, return_lse/return_attn and extra KV all trace; grads match."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 7, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    xk, xv = (torch.randn(1, 3, 2, 8, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.rand(1, 6, 7, generator=g) < 0.4
    mask[0, :3, :4] = True  # some queries see no neighbourhood key (they still see the extra tokens)
    bias = torch.randn(1, 6, 7, 2, 9, generator=g, requires_grad=True)
    rpb = torch.randn(2, 5, 5, generator=g, requires_grad=True)

    def f(q, k, v, xk, xv, mask, bias, rpb):
        return na2d(q, k, v, (3, 3), (1, 2), (2, 1), additional_keys=xk, additional_values=xv, rpb=rpb,
                    attn_bias=bias, key_padding_mask=mask, return_lse=True, return_attn=True)

    inputs = (q, k, v, xk, xv, mask, bias, rpb)
    got = torch.compile(f, backend=_counter(), fullgraph=True)(*inputs)
    want = f(*inputs)
    diff = [q, k, v, xk, xv, bias, rpb]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    loss = lambda o: o[0].sum() + (o[2] ** 2).sum() + o[1].exp().sum()  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(got), diff), torch.autograd.grad(loss(want), diff)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_new_resolution_does_not_recompile_every_call() -> None:
    """Default ``torch.compile``: the 2nd resolution recompiles once with symbolic sizes (automatic
    dynamic), further resolutions reuse it. Only crossing a variable-resolution regime (axis shorter
    than ``kernel * dilation`` or than ``kernel``) adds a graph, because the window rule changes."""
    module = _module()
    cnt = _counter("eager")
    compiled = torch.compile(module, backend=cnt, fullgraph=True)
    with torch.no_grad():
        for shape in [(11, 12), (13, 14), (15, 11), (17, 19), (12, 20)]:
            x = torch.randn(1, *shape, 16)
            torch.testing.assert_close(compiled(x), module(x), atol=1e-6, rtol=1e-5)
        assert cnt.frame_count == 2
        x = torch.randn(1, 4, 12, 16)  # axis 0 shorter than the kernel: a new regime, one more graph
        torch.testing.assert_close(compiled(x), module(x), atol=1e-6, rtol=1e-5)
        assert cnt.frame_count == 3


def test_dynamic_true_compiles_once() -> None:
    module = _module()
    cnt = _counter("eager")
    compiled = torch.compile(module, backend=cnt, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for shape in [(11, 12), (13, 14), (15, 11)]:  # not square: a square input duck-sizes H == W
            x = torch.randn(2, *shape, 16)
            torch.testing.assert_close(compiled(x), module(x), atol=1e-6, rtol=1e-5)
    assert cnt.frame_count == 1


@pytest.mark.slow
def test_inductor_fullgraph_matches_eager() -> None:
    """The default backend (Inductor, generates C++), forward and backward."""
    module = _module()
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(2, 11, 12, 16)
    y_c, g_c = _fwd_bwd(compiled, module, x)
    y_e, g_e = _fwd_bwd(module, module, x)
    torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_torch_export_keeps_one_custom_op_with_dynamic_sizes() -> None:
    """``torch.export`` (e.g. for AOTInductor/ExecuTorch) sees the attention as one custom-op node and
    the exported program serves other resolutions."""
    module = _module().eval()
    Dim = torch.export.Dim
    x = torch.randn(2, 12, 13, 16)
    program = torch.export.export(module, (x,), dynamic_shapes=({1: Dim("H", min=10), 2: Dim("W", min=10)},))
    ops = [n.target for n in program.graph.nodes if n.op == "call_function" and "visattn" in str(n.target)]
    assert ops == [torch.ops.visattn.na_forward.default]
    x2 = torch.randn(2, 17, 21, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), module(x2), atol=1e-6, rtol=1e-5)
