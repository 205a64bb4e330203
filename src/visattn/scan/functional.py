"""``visattn.selective_scan``: Mamba's selective scan with ``mamba-ssm``'s signature, on every device."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .checks import check_scan, compute_dtype
from .ops import CHUNK, select_path
from .reference import selective_scan_reference

__all__ = ["selective_scan"]


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, backend: Optional[str] = None
                   ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The selective scan of Mamba (S6), forward and backward, with ``mamba-ssm``'s semantics.

    Shapes: ``u, delta, z: [batch, dim, L]``, ``A: [dim, N]``, ``B, C: [batch, N, L]`` or grouped
    ``[batch, groups, N, L]`` (channel ``d`` reads group ``d // (dim // groups)``), ``D, delta_bias:
    [dim]``. With ``dt = delta + delta_bias`` (then ``softplus(dt)`` if ``delta_softplus``), for every
    channel: ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t`` (``h_{-1} = 0``), ``y_t = <C_t, h_t> + D u_t``,
    ``out = y * silu(z)``.

    Returns ``out [batch, dim, L]`` in ``u``'s dtype and, with ``return_last_state``, also
    ``h_{L-1} [batch, dim, N]`` in the compute dtype (float64 if any input is float64, else float32:
    bfloat16/float16 inputs are computed in float32). ``out`` is a transposed view of a contiguous
    ``[batch, L, dim]`` tensor (``out.transpose(1, 2)`` is contiguous, what channels-last callers want).

    ``backend``: ``None`` picks the fused C kernel for float32-computed CPU calls (compiled on the first
    such call, cached on disk) and the chunked PyTorch scan elsewhere; ``"cpu"``, ``"torch"`` or
    ``"reference"`` (the sequential loop, :func:`~visattn.scan.selective_scan_reference`) force one.
    Gradients flow to every tensor argument, ``last_state`` included; ``torch.compile(fullgraph=True)``
    sees one custom op. Raises ``TypeError``/``ValueError`` for arguments off the convention, or a
    forced backend that cannot serve the call.
    """
    check_scan("selective_scan", u, delta, A, B, C, D, z, delta_bias)
    if backend == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend is not None and not torch.compiler.is_compiling():  # a forced path that cannot serve: say so now
        select_path("selective_scan", backend, u.device, compute_dtype(u, delta, A, B, C, D, z, delta_bias))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    out, last, _ = torch.ops.visattn.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                                         backend or "", CHUNK, needs_grad)
    return (out, last) if return_last_state else out
