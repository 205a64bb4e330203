"""What one ``visattn bench`` run measures: the problem, its inputs, and the float64 oracle.

A :class:`BenchProblem` fixes the shapes and window arguments; every implementation receives the
same heads-last ``q, k, v [B, *S, H, D]`` and must return ``out [B, *S, H, D]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..backends import Problem
from ..spec import NASpec, make_spec, na_flops

__all__ = ["BenchProblem", "Oracle", "TOLERANCE", "GRAD_TOLERANCE", "compare", "default_shape"]

#: (atol, rtol) against the float64 oracle, per input dtype; the same numbers the parity tests use.
TOLERANCE = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
GRAD_TOLERANCE = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 6e-2),
}

_FN = "visattn bench"


def default_shape(rank: int) -> tuple[int, ...]:
    """NAT-Tiny's first stage (56x56 = 3136 tokens), spread over ``rank`` axes."""
    return {1: (3136,), 2: (56, 56), 3: (4, 28, 28)}[rank]


@dataclass(frozen=True)
class BenchProblem:
    """One neighborhood-attention call to benchmark: ``q, k, v [batch, *shape, heads, head_dim]``."""

    shape: tuple[int, ...] = (56, 56)
    heads: int = 4
    head_dim: int = 32
    kernel_size: tuple[int, ...] | int = 7
    stride: tuple[int, ...] | int = 1
    dilation: tuple[int, ...] | int = 1
    is_causal: tuple[bool, ...] | bool = False
    batch: int = 1
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backward: bool = False
    seed: int = 0
    spec: NASpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("heads", "head_dim", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_FN}: {name}={getattr(self, name)} must be >= 1.")
        if not 1 <= len(self.shape) <= 3:
            raise ValueError(f"{_FN}: shape={self.shape} has {len(self.shape)} axes; pass 1, 2 or 3 sizes.")
        spec = make_spec(_FN, self.shape, self.kernel_size, self.stride, self.dilation, self.is_causal)
        object.__setattr__(self, "spec", spec)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def tokens(self) -> int:
        return self.batch * math.prod(self.shape)

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    @property
    def flops(self) -> int:
        """Useful FLOPs of one timed call: ``visattn.spec.na_flops``, times 3 with the backward."""
        return na_flops(self.spec, self.batch, self.heads, self.head_dim) * (3 if self.backward else 1)

    def backend_problem(self) -> Problem:
        """The :class:`visattn.backends.Problem` a backend sees for this call."""
        return Problem(spec=self.spec, batch=self.batch, heads=self.heads, heads_kv=self.heads, dim=self.head_dim,
                       dim_v=self.head_dim, dtype=self.dtype, device=torch.device(self.device), scale=self.scale)

    def na_kwargs(self) -> dict:
        """Window arguments as the caller passed them (``neighborhood_attention`` / NATTEN keywords)."""
        return dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation, is_causal=self.is_causal)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Seeded ``q, k, v [B, *S, H, D]`` and the output gradient ``dout`` of the same shape."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.batch, *self.shape, self.heads, self.head_dim)
        q, k, v, dout = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
        return tuple(t.to(self.device, self.dtype) for t in (q, k, v, dout))  # type: ignore[return-value]

    def describe(self) -> str:
        """One line: shapes, window arguments (as used, with what was asked where the
        variable-resolution rule changed them), dtype, direction, device."""
        s = self.spec
        mode = "forward+backward" if self.backward else "forward"
        shape = "x".join(map(str, self.shape))
        causal = ",".join("1" if c else "0" for c in s.is_causal)
        window = []
        for name, used, asked in (("kernel", s.kernel_size, self.kernel_size), ("stride", s.stride, self.stride),
                                  ("dilation", s.dilation, self.dilation)):
            asked = asked if isinstance(asked, tuple) else (asked,) * self.rank
            window.append(f"{name} {_fmt(used)}" + ("" if tuple(asked) == used else f" (asked {_fmt(asked)}, "
                                                    f"fitted to the input)"))
        return (f"{self.rank}-D NA, B={self.batch}, {shape}, {self.heads} heads, head dim {self.head_dim}, "
                f"{', '.join(window)}, causal {causal}, {str(self.dtype).replace('torch.', '')}, {mode}, "
                f"{self.device}")

    def as_dict(self) -> dict:
        s = self.spec
        return dict(rank=self.rank, batch=self.batch, shape=list(self.shape), heads=self.heads,
                    head_dim=self.head_dim, kernel_size=list(s.kernel_size), stride=list(s.stride),
                    dilation=list(s.dilation), is_causal=list(s.is_causal),
                    dtype=str(self.dtype).replace("torch.", ""), device=self.device, backward=self.backward,
                    flops=self.flops)


def _fmt(t: tuple) -> str:
    return str(t[0]) if len(set(t)) == 1 else "x".join(map(str, t))


@dataclass
class Oracle:
    """The float64 answer: ``out [B, *S, H, D]`` and, with the backward, ``grads`` = (dq, dk, dv)."""

    out: Optional[torch.Tensor]
    grads: Optional[tuple[torch.Tensor, ...]]
    seconds: float
    skipped: Optional[str] = None

    @staticmethod
    def compute(problem: BenchProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                max_bytes: float) -> "Oracle":
        """Run the ``reference`` backend in float64, a few heads at a time so memory stays under ``max_bytes``.

        Heads are independent (outputs and gradients), so chunking over them changes nothing but memory.
        """
        import time

        from ..functional import neighborhood_attention

        s = problem.spec
        # Gathered K and V neighbourhoods, logits and probabilities, doubled for autograd's saved tensors.
        per_head = problem.batch * s.num_tokens * s.window_size * (2 * problem.head_dim + 2) * 8
        per_head *= 2 if problem.backward else 1
        if per_head > max_bytes:
            return Oracle(None, None, 0.0, skipped=f"the float64 oracle needs {per_head / 2**30:.1f} GiB per head "
                                                   f"(> --max-gb {max_bytes / 2**30:g})")
        chunk = max(1, int(max_bytes // per_head))
        t0 = time.perf_counter()
        outs, grads = [], []
        for h in range(0, problem.heads, chunk):
            part = [t[..., h:h + chunk, :].double().detach().requires_grad_(problem.backward) for t in (q, k, v)]
            with torch.set_grad_enabled(problem.backward):
                out = neighborhood_attention(*part, **problem.na_kwargs(), scale=problem.scale, backend="reference")
                if problem.backward:
                    out.backward(dout[..., h:h + chunk, :].double())
                    grads.append([t.grad for t in part])
            outs.append(out.detach())
        g = tuple(torch.cat([gs[i] for gs in grads], dim=-2) for i in range(3)) if problem.backward else None
        return Oracle(torch.cat(outs, dim=-2), g, time.perf_counter() - t0)


def compare(problem: BenchProblem, oracle: Oracle, out: torch.Tensor,
            grads: Optional[tuple[torch.Tensor, ...]]) -> tuple[Optional[bool], Optional[float]]:
    """``(correct, max abs error)`` of an implementation's ``out`` (and ``grads``) vs the oracle.

    Correct means every element within ``atol + rtol * |oracle|`` (``TOLERANCE``/``GRAD_TOLERANCE`` of the
    input dtype). ``(None, None)`` when the oracle was skipped.
    """
    if oracle.out is None:
        return None, None
    pairs = [(out, oracle.out, TOLERANCE[problem.dtype])]
    if problem.backward:
        if grads is None or oracle.grads is None:
            return False, float("inf")
        pairs += [(g, r, GRAD_TOLERANCE[problem.dtype]) for g, r in zip(grads, oracle.grads, strict=True)]
    ok, worst = True, 0.0
    for got, want, (atol, rtol) in pairs:
        if got is None or tuple(got.shape) != tuple(want.shape):
            return False, float("inf")
        diff = (got.detach().double().cpu() - want.cpu()).abs()
        if not torch.isfinite(diff).all():
            return False, float("inf")
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        ok &= bool((diff <= atol + rtol * want.cpu().abs()).all())
    return ok, worst
