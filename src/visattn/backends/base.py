"""What a backend is: a description of one call (:class:`Problem`) and the :class:`Backend` contract."""

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
    requires_grad: bool = False
    has_rpb: bool = False
    has_attn_bias: bool = False
    has_key_padding_mask: bool = False
    return_attn: bool = False


@dataclass
class Extras:
    """Optional per-call tensors beyond q/k/v (issue "Beyond NATTEN").

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


class Backend(ABC):
    """One implementation of the operator. Subclasses set the class attributes and ``forward``.

    ``forward`` must be differentiable w.r.t. q, k, v (and the extras' float tensors) *including*
    gradients that flow into ``lse`` (extra KV tokens are merged through it).
    """

    name: str = ""
    description: str = ""
    #: whether k/v may have fewer heads than q; otherwise the dispatcher repeats them.
    supports_gqa: bool = False

    def unavailable(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all (missing dependency), or ``None``."""
        return None

    def refuse(self, p: Problem) -> Optional[str]:
        """Why this backend cannot serve ``p``, or ``None`` if it can."""
        return None

    def priority(self, p: Problem) -> float:
        """Higher wins in automatic selection among backends that accept ``p``."""
        return 0.0

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, extras: Extras) -> Result:
        """Run the call. q/k/v as in :class:`Problem` (k/v already repeated to ``H`` heads unless
        ``supports_gqa``); returns a :class:`Result`."""


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
    """The shared refusal of fused kernels: per-pair tensors (``attn_bias``, ``key_padding_mask``)
    and returning the weights, which a fused kernel never stores. The dispatcher then routes the
    call to the ``torch`` backend, which serves all of them."""
    for flag, what in (("has_attn_bias", "attn_bias"), ("has_key_padding_mask", "key_padding_mask"),
                       ("return_attn", "return_attn=True")):
        if getattr(p, flag):
            return f"{what} is not supported by this fused kernel (the torch backend serves it)"
    return None


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """LSE is kept in float32 for half inputs, in the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
