"""The implementations ``visattn bench`` compares: our backends and the peers a user would otherwise use.

Each is a :class:`Peer`: a name, whether it can run here at all (:meth:`Peer.unavailable`), whether it
can run *this* problem (:meth:`Peer.refuse`, e.g. no backward or too much memory), and
:meth:`Peer.build`, which returns ``fn(q, k, v) -> out`` on heads-last ``[B, *S, H, D]`` tensors. Layout
conversions a peer needs (FlexAttention and SDPA want ``[B, H, N, D]``) are inside ``fn`` and timed:
a user holding heads-last activations pays them too.
"""

from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..backends import list_backends, why_not
from ..spec import neighbor_table, spec_windows
from .problem import BenchProblem

__all__ = ["Built", "Peer", "VisattnBackend", "Natten", "FlexAttention", "DenseSDPA", "PlainGather", "default_peers"]

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Built:
    """A ready-to-call implementation; ``setup_s`` is one-off work done in :meth:`Peer.build` (not timed)."""

    fn: Fn
    setup_s: float = 0.0
    setup_what: str = ""


class Peer(ABC):
    """One implementation in the comparison.

    ``kind`` is ``"visattn"`` (ours), ``"peer"`` (the same math elsewhere) or ``"dense"`` (different
    math, shown for scale); only ``checked`` peers are compared with the oracle. ``compiles`` marks a
    peer whose first call includes compilation (reported separately from its median).
    """

    name: str = ""
    kind: str = "peer"
    checked: bool = True
    compiles: bool = False
    #: set to a reason to list this peer without running it (e.g. the oracle, already run in float64)
    skip: Optional[str] = None

    def unavailable(self) -> Optional[str]:
        """Why this cannot run on this machine at all (e.g. not installed), or ``None``."""
        return None

    def refuse(self, problem: BenchProblem, max_bytes: float) -> Optional[str]:
        """Why this cannot (or should not, past ``max_bytes`` of estimated memory) run ``problem``."""
        return None

    @abstractmethod
    def build(self, problem: BenchProblem) -> Built:
        """Prepare ``problem`` (masks, tables) and return the callable to time."""


def _too_big(what: str, nbytes: float, max_bytes: float) -> Optional[str]:
    if nbytes <= max_bytes:
        return None
    return f"{what} needs ~{nbytes / 2**30:.1f} GiB (> --max-gb {max_bytes / 2**30:g})"


def _gather_bytes(problem: BenchProblem) -> float:
    """Memory of materialising K and V neighbourhoods ``[B, N, K, H, D]`` (doubled for the backward)."""
    s = problem.spec
    n = problem.batch * s.num_tokens * s.window_size * problem.heads * (2 * problem.head_dim + 2)
    return n * problem.dtype.itemsize * (2 if problem.backward else 1)


def _dense_bytes(problem: BenchProblem) -> float:
    """Memory of an unfused ``[B, H, N, N]`` score matrix, its mask and probabilities."""
    n = problem.spec.num_tokens
    return 3 * problem.batch * problem.heads * n * n * 4


def _to_bhnd(t: torch.Tensor) -> torch.Tensor:
    """``[B, *S, H, D] -> [B, H, N, D]`` (a view)."""
    return t.flatten(1, -3).transpose(1, 2)


def _from_bhnd(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D] -> [B, *S, H, D]`` shaped like ``like``."""
    return t.transpose(1, 2).reshape(like.shape)


class VisattnBackend(Peer):
    """One of our registered backends, forced by name through the public API."""

    kind = "visattn"

    def __init__(self, backend: str, skip: Optional[str] = None) -> None:
        self.backend = backend
        self.name = f"visattn {backend}"
        self.skip = skip

    def unavailable(self) -> Optional[str]:
        return why_not(self.backend)

    def refuse(self, problem: BenchProblem, max_bytes: float) -> Optional[str]:
        reason = why_not(self.backend, problem.backend_problem())
        if reason is None and self.backend == "reference":
            reason = _too_big("the oracle's explicit neighbour gather", _gather_bytes(problem), max_bytes)
        return reason

    def build(self, problem: BenchProblem) -> Built:
        from ..functional import neighborhood_attention

        kw = dict(problem.na_kwargs(), scale=problem.scale, backend=self.backend)
        return Built(lambda q, k, v: neighborhood_attention(q, k, v, **kw))


class Natten(Peer):
    """``natten.na1d/na2d/na3d`` (0.21): same arguments and layout as ours."""

    name = "NATTEN"

    def unavailable(self) -> Optional[str]:
        try:
            import natten
        except ImportError:
            return "natten is not installed (pip install natten==0.21.7 --no-build-isolation, after torch)"
        if not hasattr(natten, "na2d"):
            return f"natten {getattr(natten, '__version__', '?')} lacks na2d (needs 0.21)"
        return None

    def refuse(self, problem: BenchProblem, max_bytes: float) -> Optional[str]:
        if torch.device(problem.device).type == "cpu":
            # On CPU NATTEN 0.21 runs FlexAttention un-compiled: dense [B, H, N, N] scores.
            return _too_big("NATTEN's CPU path (dense flex scores)", _dense_bytes(problem), max_bytes)
        return None

    def build(self, problem: BenchProblem) -> Built:
        import natten

        fn = getattr(natten, f"na{problem.rank}d")
        kw = dict(problem.na_kwargs(), scale=problem.scale)

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with warnings.catch_warnings():  # its "flex_attention called without torch.compile" notice
                warnings.simplefilter("ignore")
                return fn(q, k, v, **kw)

        return Built(call)


def na_mask_mod(problem: BenchProblem):
    """FlexAttention ``mask_mod`` for the problem's neighbourhoods, from per-axis window bounds.

    Flat token indices are unravelled row-major; a key is allowed iff on every axis it is in the
    query's dilation group and its group position lies in ``[lo, hi]`` of :func:`visattn.spec.axis_windows`.
    Memory ``O(sum of axis lengths)``, never ``O(N^2)``.
    """
    device = torch.device(problem.device)
    axes = [(w.length, w.dilation, w.group.to(device), w.lo.to(device), w.hi.to(device))
            for w in spec_windows(problem.spec)]

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = None
        for length, dil, group, lo, hi in reversed(axes):  # the last axis varies fastest
            qc, kc = q_idx % length, kv_idx % length
            q_idx, kv_idx = q_idx // length, kv_idx // length
            t = kc // dil
            ok = (t >= lo[qc]) & (t <= hi[qc])
            if dil > 1:
                ok = ok & (kc % dil == group[qc])
            allowed = ok if allowed is None else allowed & ok
        return allowed

    return mask_mod


def na_block_mask(problem: BenchProblem, block: int = 128):
    """Exact FlexAttention ``BlockMask`` from the explicit neighbour table (``O(N * K)``, not ``O(N^2)``).

    A (query block, key block) pair is skipped when no query sees any key of it, and "full" (no
    ``mask_mod`` call needed) when every query of the block sees every key of it.
    """
    from torch.nn.attention.flex_attention import BlockMask

    index, valid, _ = neighbor_table(problem.spec)
    n = problem.spec.num_tokens
    nb = -(-n // block)
    qb = (torch.arange(n) // block)[:, None].expand_as(index)[valid]
    kb = (index // block)[valid]
    pairs = torch.bincount(qb * nb + kb, minlength=nb * nb).reshape(nb, nb)
    size = torch.full((nb,), block)
    size[-1] = n - block * (nb - 1)
    full = pairs == size[:, None] * size[None, :]
    partial = (pairs > 0) & ~full

    def blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        return (mask.sum(1).to(torch.int32)[None, None].to(problem.device),
                order.to(torch.int32)[None, None].to(problem.device))

    (num, idx), (full_num, full_idx) = blocks(partial), blocks(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=na_mask_mod(problem), seq_lengths=(n, n))


_COMPILED_FLEX = None


def _compiled_flex():
    """One ``torch.compile(flex_attention)`` per process, so repeated runs reuse its compile cache."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


class FlexAttention(Peer):
    """PyTorch FlexAttention with the NA neighbourhood as ``mask_mod`` + an exact block mask.

    ``compiled=False`` runs the eager path, which materialises dense ``[B, H, N, N]`` scores.
    """

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self.compiles = compiled
        self.name = "flex compiled" if compiled else "flex eager"

    def unavailable(self) -> Optional[str]:
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs >= 2.5)"
        return None

    def refuse(self, problem: BenchProblem, max_bytes: float) -> Optional[str]:
        if problem.backward and torch.device(problem.device).type == "cpu":
            return "FlexAttention has no backward on CPU (torch raises NotImplementedError)"
        if not self.compiled:
            return _too_big("eager flex (dense scores)", _dense_bytes(problem), max_bytes)
        return None

    def build(self, problem: BenchProblem) -> Built:
        from torch.nn.attention.flex_attention import flex_attention

        t0 = time.perf_counter()
        block_mask = na_block_mask(problem)
        setup = time.perf_counter() - t0
        attend = _compiled_flex() if self.compiled else flex_attention
        scale = problem.scale

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = attend(_to_bhnd(q), _to_bhnd(k), _to_bhnd(v), block_mask=block_mask, scale=scale)
            return _from_bhnd(out, q)

        return Built(call, setup, "block mask")


class DenseSDPA(Peer):
    """``F.scaled_dot_product_attention`` over all tokens: global attention, what "just use
    attention" costs. Different math, so not checked against the NA oracle."""

    name = "dense SDPA (global, not NA)"
    kind = "dense"
    checked = False

    def build(self, problem: BenchProblem) -> Built:
        scale = problem.scale

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = torch.nn.functional.scaled_dot_product_attention(_to_bhnd(q), _to_bhnd(k), _to_bhnd(v), scale=scale)
            return _from_bhnd(out, q)

        return Built(call)


class PlainGather(Peer):
    """What a user writes by hand: gather K/V neighbourhoods with the neighbour table, then two matmuls.

    Independent of our backends (only the window rules are shared); memory ``O(N * K * H * D)``.
    """

    name = "plain gather"

    def refuse(self, problem: BenchProblem, max_bytes: float) -> Optional[str]:
        return _too_big("the K/V neighbourhood gather", _gather_bytes(problem), max_bytes)

    def build(self, problem: BenchProblem) -> Built:
        index, valid, _ = (t.to(problem.device) for t in neighbor_table(problem.spec))
        all_valid = bool(valid.all())  # only causal windows have empty slots
        scale = problem.scale

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            qh, kh, vh = _to_bhnd(q), _to_bhnd(k), _to_bhnd(v)
            kn, vn = kh[:, :, index], vh[:, :, index]  # [B, H, N, K, D]
            logits = (qh.unsqueeze(-2) @ kn.transpose(-1, -2)).squeeze(-2) * scale  # [B, H, N, K]
            if not all_valid:
                logits = logits.masked_fill(~valid, float("-inf"))
            out = (logits.softmax(-1).unsqueeze(-2) @ vn).squeeze(-2)
            return _from_bhnd(out, q)

        return Built(call)


def default_peers(time_reference: bool = False) -> list[Peer]:
    """Every registered visattn backend (new ones appear automatically), then the outside peers.

    The ``reference`` backend is the oracle: it already ran in float64 to check everyone, and timing
    its deliberately naive gather would take much of the run, so it is listed but only timed when
    ``time_reference`` is set.
    """
    oracle_note = "the correctness oracle (run in float64 above); time it with --only reference"
    ours: list[Peer] = [VisattnBackend(name, None if name != "reference" or time_reference else oracle_note)
                        for name in list_backends()]
    return ours + [Natten(), FlexAttention(compiled=False), FlexAttention(compiled=True), DenseSDPA(), PlainGather()]

