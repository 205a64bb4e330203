"""Ultra-Lightweight Subspace Attention Module (ULSAM): one spatial attention map per channel group."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_divisible, check_input, check_positive_int
from ..registry import register_attn

__all__ = ["ULSAM"]


def _max_pool_3x3_s1(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 3, stride=1, padding=1)`` as two separable 1-D maxima.

    Same values (max is separable, -inf padding as in max_pool2d); on CPU PyTorch's stride-1
    max_pool2d on NCHW tensors is ~15x slower than these four elementwise maxima.
    """
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


@register_attn(
    "ulsam",
    layout="channels_first",
    paper="ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks (2020)",
    complexity="O(C*H*W)",
    backends="pure torch",
    bench_kwargs={},
)
class ULSAM(nn.Module):
    """Split channels into ``g`` subspaces; each learns a softmax attention map over positions.

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (same dtype); any ``H, W >= 1``; ``C`` must be a
    multiple of ``num_subspaces``.

    Paper: Saini, Jha, Das, Mittal, Mohan, "ULSAM: Ultra-Lightweight Subspace Attention Module for
    Compact Convolutional Neural Networks" (WACV 2020). Mechanism, per subspace ``F_n`` of
    ``m = C/g`` channels: ``A_n = softmax_HW(PW(maxpool3x3,s1(DW1x1(F_n))))`` (one map per
    subspace, summing to 1 over positions) and ``F^_n = A_n * F_n + F_n``; the outputs are
    concatenated. All subspaces run at once: the depthwise 1x1 convs are one per-channel scale
    ``dw_weight: [C]`` and the pointwise ``m -> 1`` convs one ``pw_weight: [g, m]`` contraction.

    Parameters: ``2*C`` (``m`` depthwise + ``m`` pointwise weights per subspace). Deliberate
    differences: (1) no conv biases: a bias before the softmax over positions is constant over
    positions (max-pool passes a constant shift through), so it cannot change the output and would
    only receive zero gradient; (2) the authors' code adds BatchNorm + ReLU after both convs, which
    the paper's equation does not have: we follow the equation (a ReLU before the softmax would
    flatten all negative logits to one value).
    """

    def __init__(self, channels: int, num_subspaces: int = 4) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        self.num_subspaces = check_positive_int(name, "num_subspaces", num_subspaces)
        check_divisible(name, "channels", channels, "num_subspaces", num_subspaces)
        m = channels // num_subspaces
        # The depthwise 1x1 conv is a per-channel scale and the pointwise m -> 1 convs a per-subspace
        # dot product; as plain parameters they avoid PyTorch's slow per-group conv loop on CPU.
        # Initialized like nn.Conv2d (uniform in +-1/sqrt(fan_in), fan_in = 1 and m).
        self.dw_weight = nn.Parameter(torch.empty(channels).uniform_(-1.0, 1.0))
        self.pw_weight = nn.Parameter(torch.empty(num_subspaces, m).uniform_(-(m ** -0.5), m ** -0.5))

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The subspace attention maps ``[B, g, H, W]``; each sums to 1 over ``H, W``."""
        check_input(self, x, self.channels)
        b, c, h, w = x.shape
        pooled = _max_pool_3x3_s1(x * self.dw_weight[:, None, None])
        logits = torch.einsum("bgmhw,gm->bghw", pooled.view(b, self.num_subspaces, -1, h, w), self.pw_weight)
        return torch.softmax(logits.flatten(2), dim=-1).view_as(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        attn = self.attention_maps(x)[:, :, None]  # [B, g, 1, H, W], broadcast over the m channels
        xs = x.view(b, self.num_subspaces, c // self.num_subspaces, h, w)
        return (xs * attn + xs).view(b, c, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_subspaces={self.num_subspaces}"
