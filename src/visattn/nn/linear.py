"""``nn.Linear`` for channels-last maps, routed around a slow CPU GEMM.

The x86 builds of PyTorch run ``F.linear`` in float32 through MKL's sgemm, which is tuned for
Intel's CPUs; on others it measured markedly slower than oneDNN, which every x86 build also has.
The same projection of a channels-last map ``[B, H, W, C]``, written as a 1x1 convolution of its
``[B, C, H, W]`` view (no copy: the view is channels-last in memory), goes to oneDNN. On an AMD
EPYC (Zen 4), 2 threads, it measured 1.3-2.3x faster in inference for the shapes of the
backbones' MLPs and projections (e.g. 8x56x56, 96 -> 384: 17.5 ms vs 22.7 ms; 8x14x14,
384 -> 1536: 4.4 ms vs 9.7 ms), but not always in training (1x7x7, 768 -> 3072: its backward was
2.5x slower), so the route is taken only where it was measured to win: eager inference.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "onednn_projection"]

#: ``0`` turns the oneDNN route off, ``1`` forces it on any x86 CPU (for measuring); unset: automatic.
ENV = "VISATTN_ONEDNN_LINEAR"


@functools.lru_cache(maxsize=1)
def _cpu_prefers_onednn() -> bool:
    """Whether float32 GEMMs of this process should avoid MKL's sgemm: an MKL build of torch on a
    non-Intel x86 CPU with oneDNN available (or ``VISATTN_ONEDNN_LINEAR=1``)."""
    setting = os.environ.get(ENV)
    if setting == "0" or not torch.backends.mkldnn.is_available():
        return False
    if setting == "1":
        return True
    if "BLAS_INFO=mkl" not in torch.__config__.show():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" not in line
    except OSError:
        pass
    return False


#: PyTorch gives a 1x1 float32 convolution of a single image to oneDNN only above this many input
#: elements (``ConvParams::use_mkldnn``); below it runs its own im2col + GEMM, slower than ``F.linear``.
_ONEDNN_MIN_SINGLE_IMAGE_NUMEL = 20480


def onednn_projection(x: torch.Tensor, layer: nn.Linear) -> bool:
    """Whether ``layer(x)`` should run as a 1x1 convolution: a contiguous float32 ``[B, H, W, C]``
    CPU map that PyTorch's convolution hands to oneDNN (``B > 1`` or more than 20480 elements), eager,
    without autograd, no ``TorchDispatchMode`` active (FLOP counters and profilers then see the
    ``addmm`` they expect of a linear layer), on a CPU where :func:`_cpu_prefers_onednn` holds."""
    return (x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
            and (x.shape[0] > 1 or x.numel() > _ONEDNN_MIN_SINGLE_IMAGE_NUMEL)
            and layer.weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and torch._C._len_torch_dispatch_stack() == 0
            and _cpu_prefers_onednn())


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state-dict keys and results to float32 rounding) whose eager
    inference on a channels-last map ``[B, H, W, C_in] -> [B, H, W, C_out]`` may run as a 1x1
    convolution through oneDNN (see the module docstring); every other input goes to ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if onednn_projection(x, self):
            y = F.conv2d(x.permute(0, 3, 1, 2), self.weight[:, :, None, None], self.bias)
            return y.permute(0, 2, 3, 1)
        return F.linear(x, self.weight, self.bias)
