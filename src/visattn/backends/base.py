"""What a backend is: a description of one call (:class:`Problem`) and the :class:`Backend` contract.

A backend computes the forward (output and log-sum-exp) and, if it has one, its own backward from
what the forward saved. It never deals with autograd: :mod:`visattn.ops` owns the one autograd
registration and calls :meth:`Backend.forward` / :meth:`Backend.backward`. A backend without a
backward of its own (``native_backward = False``) writes a differentiable forward instead, and
autograd through that forward is its backward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch

from ..spec import NASpec


@dataclass(frozen=True)
class Problem:
    """Everything a backend needs to decide whether it can serve a call, without the tensors.

    Shapes: ``q [B, *S, H, D]``, ``k [B, *S, H_kv, D]``, ``v [B, *S, H_kv, D_v]`` (heads-last).
    Whether gradients will be asked for is deliberately not part of it: the choice of backend must
    be the same for a call's forward and its backward, and the backward op cannot see it.
    """

    spec: NASpec
    batch: int
    heads: int
    heads_kv: int
    dim: int
    dim_v: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    has_rpb: bool = False
    has_attn_bias: bool = False
    has_key_padding_mask: bool = False
    return_attn: bool = False

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: NASpec, scale: float,
           extras: "Extras", return_attn: bool = False) -> "Problem":
        """The problem of a (validated) call on these tensors."""
        return cls(spec=spec, batch=q.shape[0], heads=q.shape[-2], heads_kv=k.shape[-2], dim=q.shape[-1],
                   dim_v=v.shape[-1], dtype=q.dtype, device=q.device, scale=scale, has_rpb=extras.rpb is not None,
                   has_attn_bias=extras.attn_bias is not None,
                   has_key_padding_mask=extras.key_padding_mask is not None, return_attn=return_attn)


@dataclass
class Extras:
    """Optional per-call tensors beyond q/k/v.

    * ``rpb [H, 2k0-1, ...]``: relative positional bias, indexed by key minus query group position.
    * ``attn_bias [B, *S, H, K]``: additive logits in neighbourhood-slot order.
    * ``key_padding_mask [B, *S]`` bool: ``True`` marks keys to ignore.
    """

    rpb: Optional[torch.Tensor] = None
    attn_bias: Optional[torch.Tensor] = None
    key_padding_mask: Optional[torch.Tensor] = None


@dataclass
class Result:
    """``out [B, *S, H, D_v]``, ``lse [B, *S, H]`` (float32 for half inputs, ``-inf`` where a query
    has no key), and ``attn [B, *S, H, K]`` when asked for."""

    out: torch.Tensor
    lse: torch.Tensor
    attn: Optional[torch.Tensor] = None


@dataclass
class Grads:
    """Input gradients of one call: ``dq``, ``dk``, ``dv`` shaped like the inputs, ``drpb`` like the
    bias table and ``dattn_bias`` like ``attn_bias`` (``None`` where the input was absent)."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    drpb: Optional[torch.Tensor] = None
    dattn_bias: Optional[torch.Tensor] = None


class Backend(ABC):
    """One implementation of the operator. Subclasses set the class attributes and ``forward``.

    * ``native_backward = True``: :meth:`backward` computes the gradients from the inputs, the
      output and the LSE the forward returned; :meth:`forward` runs without autograd.
    * ``native_backward = False``: :meth:`forward` must be differentiable w.r.t. q, k, v and the
      extras' float tensors, *including* gradients that flow into ``lse`` (extra KV tokens are
      merged through it); autograd through it is the backward.
    """

    name: str = ""
    description: str = ""
    #: whether k/v may have fewer heads than q; otherwise the dispatcher repeats them.
    supports_gqa: bool = False
    #: whether :meth:`backward` is implemented (see the class docstring).
    native_backward: bool = False

    def unavailable(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all (missing dependency), or ``None``.

        Must be cheap and free of side effects (it compiles and loads nothing): it is asked for every
        call during automatic selection and by ``visattn info``.
        """
        return None

    def refuse(self, p: Problem) -> Optional[str]:
        """Why this backend cannot serve ``p``, or ``None`` if it can (cheap, no side effects)."""
        return None

    def priority(self, p: Problem) -> float:
        """Higher wins in automatic selection among backends that accept ``p``."""
        return 0.0

    def load(self) -> Optional[str]:
        """Get ready to run (compile, load a library); called before the first call this backend
        serves, and then on every call, so it must be cheap once done. Returns why it failed, after
        which :meth:`unavailable` must report that reason (selection then routes around it)."""
        return None

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, extras: Extras) -> Result:
        """Run the call. q/k/v as in :class:`Problem` (k/v already repeated to ``H`` heads unless
        ``supports_gqa``); returns a :class:`Result`."""

    def forward_packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       problems: list[tuple[Problem, int]], rpb: Optional[torch.Tensor] = None
                       ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The forward of several same-grid problems on packed rows in one launch (``na_varlen``'s
        inference path), or ``None`` when this backend has no such launch (the caller then runs them
        one by one). ``q [T, H, D]``, ``k [T, H_kv, D]``, ``v [T, H_kv, D_v]``; ``problems``:
        ``(problem, first row)`` pairs covering every row once; returns ``(out [T, H, D_v], lse [T, H])``.
        No autograd: callers use it only when no gradient is recorded."""
        return None

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 dout: torch.Tensor, dlse: Optional[torch.Tensor], p: Problem, extras: Extras,
                 attn: Optional[torch.Tensor] = None, dattn: Optional[torch.Tensor] = None) -> Grads:
        """Gradients of ``sum(out * dout) + sum(lse * dlse) + sum(attn * dattn)`` (``None``: zero) for a
        backend with ``native_backward``; ``out``/``lse``/``attn`` are what :meth:`forward` returned for
        these inputs (``attn`` only when ``p.return_attn``; ``dattn`` only when the weights were used)."""
        raise NotImplementedError(f"backend {self.name!r} has no native backward")


def safe_logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``torch.logsumexp`` whose all ``-inf`` rows give ``-inf`` with zero, not NaN, gradients.

    ``logsumexp``'s backward is ``grad * exp(x - lse)``, i.e. ``0 * exp(-inf + inf) = NaN`` on a row
    with no finite entry (a query whose keys are all masked); such rows are filled with zeros before
    the reduction and set back to ``-inf`` after, so their gradient is masked away (no data-dependent
    branch, so it traces for ``torch.compile`` and ONNX).
    """
    with torch.no_grad():
        empty = torch.isneginf(x.amax(dim=dim, keepdim=True))
    lse = torch.logsumexp(x.masked_fill(empty, 0.0), dim=dim)
    return lse.masked_fill(empty.squeeze(dim), float("-inf"))


def refuse_unfused_features(p: Problem) -> Optional[str]:
    """The shared refusal of fused kernels that do not read per-pair tensors (``attn_bias``,
    ``key_padding_mask``) nor write the weights. The dispatcher then routes the call to a backend that
    serves them (the ``torch`` backend does on every device)."""
    for flag, what in (("has_attn_bias", "attn_bias"), ("has_key_padding_mask", "key_padding_mask"),
                       ("return_attn", "return_attn=True")):
        if getattr(p, flag):
            return f"{what} is not supported by this fused kernel (the torch backend serves it)"
    return None


def refuse_general_geometry(p: Problem) -> Optional[str]:
    """The refusal of kernels that only walk same-grid, non-wrapping axes: keys on another grid than
    the queries, or periodic axes (the ``torch`` backend serves both, and on CPU the ``cpu`` one)."""
    if p.spec.cross_grid:
        return (f"keys on another grid ({p.spec.key_spatial}) than the queries ({p.spec.spatial}) are not supported "
                f"by this kernel (the torch backend serves them)")
    if any(p.spec.periodic):
        return "periodic axes are not supported by this kernel (the torch backend serves them)"
    return None


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """LSE is kept in float32 for half inputs, in the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
