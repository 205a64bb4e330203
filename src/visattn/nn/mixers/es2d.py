"""EfficientVMamba's ES2D: an atrous selective scan, one dilation-2 sub-grid per route."""

from __future__ import annotations

from ...scan.routes import Route, atrous
from ..registry import register_attn
from .scan_base import VisualScanMixer

__all__ = ["ES2D"]


@register_attn("es2d", layout="channels_last",
               paper="EfficientVMamba: Atrous Selective Scan for Light Weight Visual Mamba (2024)",
               complexity="O(N C N_state / 4)", backends="visattn selective scan", bench_kwargs=dict())
class ES2D(VisualScanMixer):
    """Efficient 2-D scanning (ES2D), EfficientVMamba's token mixer. ``x [B, H, W, C] -> [B, H, W, C]``.

    Pei et al., "EfficientVMamba: Atrous Selective Scan for Light Weight Visual Mamba" (2024). VMamba's
    SS2D (:class:`~visattn.nn.mixers.ss2d.SS2D`) with the cross-scan replaced by skip sampling: the map
    is split into its four dilation-2 groups (sub-grids of ``N / 4`` tokens, skip sampling with step 2),
    sub-grid ``(0, 0)`` and ``(0, 1)`` scanned row-major, ``(1, 0)`` and ``(1, 1)`` column-major, each
    with its own parameters; every token takes its own sub-grid's output (EfficientMerge). The scan
    work is a quarter of SS2D's; a token's scan sees only its own sub-grid (the 3x3 conv before the
    scan mixes neighbouring sub-grids).

    Deliberate difference: on an odd side EfficientVMamba zero-pads the map, so padded tokens enter the
    scans of the sub-grids they fall in; here the sub-grids hold only real tokens (identical on even
    sides). The paper's full EVSS block adds a convolutional branch and SE fusion around this mixer;
    they belong to the block.
    """

    num_routes = 4

    def routes(self, H: int, W: int) -> tuple[Route, ...]:
        return atrous(H, W, 2)
