"""``visattn bench --zoo``: every registered attention module at one shape, measured the same way.

Token mixers (layout ``channels_last``) get ``[1, 56, 56, 96]`` with 3 heads (NAT-Tiny's first stage);
CNN plug-ins (``channels_first``) get ``[1, 64, 56, 56]`` (a ResNet stage), with 2 heads where they
take heads, so both have head dim 32. A module's registry record may adjust this:

* ``bench_kwargs``: constructor keywords (override the defaults above);
* ``bench_input``: the full input shape (e.g. ``(1, 8, 28, 28, 96)`` for a 3-D mixer). Without it,
  a mixer with a ``rank`` attribute of 1 or 3 gets the same 3136 tokens as ``(3136,)`` or ``(4, 28, 28)``.

A module that fails to build or run is reported with its error, not dropped.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..console import ProgressBar
from .measure import peak_extra_bytes, time_call
from .problem import default_shape
from .runner import Progress, error_text

__all__ = ["ZooRow", "run_zoo", "zoo_setup", "MIXER_DIM", "MIXER_HEADS", "PLUGIN_CHANNELS", "PLUGIN_HEADS"]

MIXER_DIM, MIXER_HEADS = 96, 3
PLUGIN_CHANNELS, PLUGIN_HEADS = 64, 2
SPATIAL = (56, 56)
#: kernel size given to constructors that require one (NAT's default)
DEFAULT_KERNEL = 7


@dataclass
class ZooRow:
    """One module's measurements; ``status`` is ``ok`` or ``failed`` (with ``reason``)."""

    name: str
    layout: str
    status: str = "ok"
    reason: str = ""
    input_shape: list[int] = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    params: Optional[int] = None
    fwd_gflop: Optional[float] = None
    fwd_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    peak_fwd_mb: Optional[float] = None
    peak_fwd_bwd_mb: Optional[float] = None
    paper: str = ""
    notes: list[str] = field(default_factory=list)


def zoo_setup(name: str, info: dict) -> tuple[dict, tuple[int, ...]]:
    """Constructor keywords and input shape for registered module ``name`` (see the module docstring)."""
    params = inspect.signature(info["cls"].__init__).parameters
    mixer = info["layout"] == "channels_last"
    kwargs: dict = {}
    if "num_heads" in params:
        kwargs["num_heads"] = MIXER_HEADS if mixer else PLUGIN_HEADS
    if "kernel_size" in params and params["kernel_size"].default is inspect.Parameter.empty:
        kwargs["kernel_size"] = DEFAULT_KERNEL
    kwargs.update(info.get("bench_kwargs", {}))
    if "bench_input" in info:
        shape = tuple(info["bench_input"])
    elif mixer:
        rank = getattr(info["cls"], "rank", 2)
        shape = (1, *(default_shape(rank) if rank in (1, 3) else SPATIAL), MIXER_DIM)
    else:
        shape = (1, PLUGIN_CHANNELS, *SPATIAL)
    return kwargs, shape


def _count_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs seen by ``torch.utils.flop_counter`` (matmuls, convolutions, SDPA).

    Under the counter every neighborhood-attention call is one ``visattn::na_forward`` op counted
    by its exact formula (:mod:`visattn.ops`), i.e. the useful work ``2 * tokens * K * H * (D + D_v)``
    (plus the bias adds with RPB), not a tiled backend's masked halo keys or nothing for a fused
    kernel: the same count on every machine, whichever backend runs the timings.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def run_zoo(names: Optional[Sequence[str]] = None, *, device: str = "cpu", budget_s: float = 1.0,
            measure_memory: bool = True, progress: Optional[Progress] = None,
            create: Optional[Callable[..., torch.nn.Module]] = None) -> list[ZooRow]:
    """Measure every registered module (or ``names``): params, forward FLOPs, forward and
    forward+backward median ms, peak extra memory of each. ``budget_s`` bounds each timing.
    Progress lines go to ``progress`` when given, else to stderr under a progress bar (one step
    per module)."""
    from ..nn import attn_info, create_attn, list_attn

    create = create or create_attn
    names = list(list_attn() if names is None else names)
    rows = []
    with ProgressBar(len(names), "visattn bench --zoo", log=progress, transient=True) as bar:
        for i, name in enumerate(names, 1):
            tag = f"[{i}/{len(names)}] {name}"
            bar.describe(tag)
            info = attn_info(name)
            row = ZooRow(name, info["layout"], paper=info.get("paper", ""))
            rows.append(row)
            try:
                _measure(row, info, create, device, budget_s, measure_memory, tag, bar)
            except Exception as e:  # report and go on: one broken module must not hide the others
                row.status, row.reason = "failed", error_text(e)
                bar(f"{tag}: failed ({row.reason})")
            bar.advance()
    return rows


def _measure(row: ZooRow, info: dict, create: Callable[..., torch.nn.Module], device: str, budget_s: float,
             measure_memory: bool, tag: str, progress: Progress) -> None:
    """Fill ``row`` for one module; raises whatever building or running it raises."""
    kwargs, shape = zoo_setup(row.name, info)
    row.kwargs, row.input_shape = kwargs, list(shape)
    channels = shape[-1] if row.layout == "channels_last" else shape[1]
    progress(f"{tag}: building {list(shape)} {kwargs}...")
    module = create(row.name, channels, **kwargs).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    row.params = sum(p.numel() for p in module.parameters())
    # Eval mode for both timings: dropout off and norms on running statistics, so that batch 1 works
    # for every module (a BatchNorm after global pooling cannot train on one value per channel).
    module.eval()
    try:
        row.fwd_gflop = _count_flops(module, x) / 1e9
    except Exception as e:  # a kernel that does not run under a dispatch mode: time it anyway
        row.notes.append(f"FLOPs not counted ({error_text(e)})")

    def forward():
        with torch.no_grad():
            return module(x)

    dout = torch.randn(forward().shape, generator=gen).to(device)
    # The input gets a gradient too, as inside a network (and a parameter-free module has a backward).
    x_leaf = x.detach().requires_grad_(True)

    def forward_backward():
        module.zero_grad(set_to_none=True)
        x_leaf.grad = None
        module(x_leaf).backward(dout)

    progress(f"{tag}: timing forward...")
    row.fwd_ms = time_call(forward, device, budget_s).median * 1e3
    progress(f"{tag}: timing forward+backward...")
    row.fwd_bwd_ms = time_call(forward_backward, device, budget_s).median * 1e3
    if measure_memory:
        row.peak_fwd_mb = _mb(peak_extra_bytes(forward, device))
        module.zero_grad(set_to_none=True)
        x_leaf.grad = None
        row.peak_fwd_bwd_mb = _mb(peak_extra_bytes(forward_backward, device))
    progress(f"{tag}: {row.fwd_ms:.2f} ms fwd, {row.fwd_bwd_ms:.2f} ms fwd+bwd")


def _mb(nbytes: Optional[int]) -> Optional[float]:
    return None if nbytes is None else nbytes / 2**20


def zoo_flops_note() -> str:
    return ("forward GFLOP: counted by torch.utils.flop_counter (matmul, convolution and SDPA ops; softmax, "
            "norms and elementwise ops are not counted); neighborhood attention is one visattn::na_forward op counted by "
            "its formula, the useful work (4 * tokens * prod(kernel) * head_dim * heads, + bias adds), not a "
            "backend's internals; custom kernels outside visattn.functional are invisible to the counter.")


def fmt_params(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)

