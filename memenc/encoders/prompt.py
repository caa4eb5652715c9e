"""SAM's prompt encoder, reduced to what a mask-input frame's object pointer needs.

For a frame given as a mask, SAM 2 (`_use_mask_as_output`) prompts its mask decoder with
the mask as a dense prompt and no points. "No points" is itself a prompt: SAM 2 pads with
one point labelled −1, and the prompt encoder adds a second padding point (no box), so the
sparse prompt is two copies of `not_a_point_embed` — the points' positional encoding is
discarded for label −1, so it is not computed here. Point/box embeddings and
`no_mask_embed` (used only when no mask is given) are not part of this module, and their
checkpoint keys are ignored. Keys: `sam_prompt_encoder.{pe_layer, not_a_point_embed,
mask_downscaling}.*`.
"""

from __future__ import annotations

import torch
from torch import nn

from memenc.encoders.memory import LayerNorm2d
from memenc.encoders.position import PositionEmbeddingRandom
from memenc.encoders.two_way import Tokens

# SAM's padding for "no points": the given point (label −1) and the one the encoder appends
NUM_PADDING_POINTS = 2


class PromptEncoder(nn.Module):
    """Dense mask prompt `[N, 1, 4h, 4w]` -> `[N, embed_dim, h, w]`; padding points; the
    decoder's dense positional encoding of the h×w image embedding."""

    def __init__(self, embed_dim: int = 256, mask_in_chans: int = 16) -> None:
        super().__init__()
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.not_a_point_embed = Tokens(1, embed_dim)
        mid = mask_in_chans // 4
        # two 2×2 stride-2 convs (stride 4 in all), each with LayerNorm2d and GELU, then 1×1
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mid, kernel_size=2, stride=2),
            LayerNorm2d(mid),
            nn.GELU(),
            nn.Conv2d(mid, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )

    def dense(self, masks: torch.Tensor) -> torch.Tensor:
        """Mask prompts `[N, 1, 4h, 4w]` -> dense embeddings `[N, embed_dim, h, w]`."""
        return self.mask_downscaling(masks)

    def padding_points(self, n: int) -> torch.Tensor:
        """The sparse prompt for "no points": `[n, 2, embed_dim]`."""
        return self.not_a_point_embed.weight[None].expand(n, NUM_PADDING_POINTS, -1)

    def get_dense_pe(self, h: int, w: int) -> torch.Tensor:
        """Positional encoding of the h×w image embedding, `[1, embed_dim, h, w]`."""
        return self.pe_layer((h, w))[None]
