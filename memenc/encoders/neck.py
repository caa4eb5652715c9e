"""SAM 2's FPN neck, reduced to what the memory path needs.

The checkpoint holds one 1×1 lateral conv per trunk level (`convs.{i}.conv`, coarsest
first). memenc keeps all of them so checkpoints load strictly, but computes only the
stride-16 output: the lateral of the stride-16 map plus the nearest-upsampled lateral of
the stride-32 map (top-down levels [2, 3]); the stride-32 level itself is dropped by
scalp 1 and levels 0–1 (strides 4, 8) feed only SAM's mask decoder. The result equals
the reference's `backbone_fpn[-1]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Lateral(nn.Module):
    """A 1×1 conv wrapped so its key is `convs.{i}.conv.*`, as in the checkpoint."""

    def __init__(self, in_dim: int, d_model: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, d_model, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FpnNeck(nn.Module):
    """Lateral 1×1 convs over the trunk's levels; `forward` returns the stride-16 map."""

    levels_used = 2  # the trunk's coarsest maps that `forward` reads (strides 16 and 32)

    def __init__(self, backbone_channel_list: list[int], d_model: int = 256) -> None:
        super().__init__()
        self.backbone_channel_list = list(backbone_channel_list)  # coarsest first
        self.convs = nn.ModuleList(_Lateral(c, d_model) for c in backbone_channel_list)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """`levels`: trunk outputs finest first, `[B, C_i, H_i, W_i]`, ending with the
        stride-16 and stride-32 maps (the only ones read). Returns pix_feat
        `[B, d_model, H/16, W/16]`."""
        top = self.convs[0](levels[-1])  # stride 32
        lateral = self.convs[1](levels[-2])  # stride 16
        # the reference upsamples in float32 whatever the compute dtype
        up = F.interpolate(top.to(torch.float32), scale_factor=2.0, mode="nearest")
        return lateral + up
