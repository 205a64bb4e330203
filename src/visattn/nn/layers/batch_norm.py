"""BatchNorm for the channels-last maps the token mixers and blocks pass between them."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BatchNorm2dChannelsLast"]


class BatchNorm2dChannelsLast(nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` over the channels of a channels-last map: ``[B, H, W, C] -> [B, H, W, C]``.

    The hybrid backbones normalize with BatchNorm where a transformer would use LayerNorm (VAN's
    blocks and tokenizers, BiFormer's tokenizers and final norm). Same parameters, buffers and
    state-dict keys as ``nn.BatchNorm2d(C)``, so their checkpoints load as they are; the permuted
    view is a channels_last-strided NCHW tensor, which PyTorch's BatchNorm handles without a copy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected a channels-last map [B, H, W, {self.num_features}], "
                             f"got {tuple(x.shape)}.")
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
