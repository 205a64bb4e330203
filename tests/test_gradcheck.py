"""``torch.autograd.gradcheck`` in float64 on small cases, for every usable backend, including the
gradient that flows into LSE and through extra KV tokens."""

from __future__ import annotations

import pytest
import torch

from visattn import neighborhood_attention
from brute import takes_float64
from visattn.backends import list_backends, why_not

# gradcheck needs float64. Float32-only kernels (cpu_c; triton) have their gradients compared with the
# float64 oracle by the parity harness instead (tests/backends/test_parity.py).
BACKENDS = [b for b in list_backends() if why_not(b) is None and takes_float64(b)]

CASES = [
    dict(spatial=(7,), kernel_size=3, stride=2, dilation=2, is_causal=False),
    dict(spatial=(5, 4), kernel_size=(3, 2), stride=(1, 2), dilation=(1, 2), is_causal=(True, False)),
    dict(spatial=(3, 4, 3), kernel_size=(2, 3, 3), stride=1, dilation=1, is_causal=(False, False, True)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c["spatial"])))
@pytest.mark.parametrize("extra", [0, 2])
def test_gradcheck(backend: str, case: dict, extra: int) -> None:
    case = dict(case)
    S = case.pop("spatial")
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v = mk(1, *S, 2, 4), mk(1, *S, 2, 4), mk(1, *S, 2, 3)
    xk, xv = (mk(1, extra, 2, 4), mk(1, extra, 2, 3)) if extra else (None, None)

    def f(*args):
        out, lse = neighborhood_attention(*args[:3], **case, additional_keys=args[3] if extra else None,
                                          additional_values=args[4] if extra else None,
                                          backend=backend, return_lse=True)
        return out, lse

    inputs = (q, k, v) + ((xk, xv) if extra else ())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)
