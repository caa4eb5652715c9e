"""SAM 2's mask decoder, reduced to what the object pointer needs.

The decoder runs its output tokens (object-score token, IoU token, 4 mask tokens) with
the prompt tokens through the two-way transformer over the image embedding. The object
pointer is made from mask token 0 as the transformer leaves it, and the object score from
the object-score token: neither passes through the mask upscaling. So the upscaling path
(`output_upscaling`, and the high-resolution FPN projections `conv_s0`, `conv_s1` that
are added inside it), the hypernetwork MLPs that turn tokens into masks, and the IoU head
do not change the pointer; memenc leaves them out and ignores their checkpoint keys
(tests/test_pointers.py checks this on the reference). The IoU token and all four mask
tokens do take part in the attention, so they are kept. Keys: `sam_mask_decoder.*`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from memenc.encoders.two_way import MLP, Tokens, TwoWayTransformer

NUM_MASK_TOKENS = 4  # the single-mask token and 3 multimask tokens


def by_rows(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, apart: bool
) -> torch.Tensor:
    """`fn(x)`, or with `apart` `fn` of each row of `x` (dim 0) on its own, concatenated:
    the reference runs one object per call, and some kernels round differently for one
    row than for several."""
    return torch.cat([fn(r) for r in x.split(1)]) if apart else fn(x)


class MaskDecoder(nn.Module):
    """Transformer, output tokens and object-score head (`pred_obj_score_head`, an MLP with
    `score_mlp`, else one linear)."""

    def __init__(self, transformer: TwoWayTransformer, dim: int = 256, score_mlp: bool = True):
        super().__init__()
        self.transformer = transformer
        self.obj_score_token = Tokens(1, dim)
        self.iou_token = Tokens(1, dim)
        self.mask_tokens = Tokens(NUM_MASK_TOKENS, dim)
        self.pred_obj_score_head = MLP(dim, dim, 1, 3) if score_mlp else nn.Linear(dim, 1)

    def forward(
        self,
        image: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        score_rows_apart: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image `[1 or N, C, h, w]` (1: one image for every prompt), image_pe `[1, C, h, w]`, sparse prompts `[1 or N, P, C]`
        (1: the same for every image), dense prompts `[N, C, h, w]` -> (mask token 0
        `[N, C]`, object score logits `[N, 1]`). score_rows_apart: run the score head one
        row at a time, as the reference does for one object (its linears round differently
        for one row than for several)."""
        n = dense.shape[0]
        # [obj_score, iou, mask_0 .. mask_3] then the prompts: [1 or N, 6 + P, C]
        out_tokens = torch.cat(
            (self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight)
        )
        tokens = torch.cat((out_tokens[None].expand(sparse.shape[0], -1, -1), sparse), dim=1)
        src = image + dense
        pos = image_pe.expand(n, -1, -1, -1)  # [N, C, h, w], a view (channels-last strides)
        hs, _ = self.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 2 : 2 + NUM_MASK_TOKENS]  # [N, 4, C]
        score = by_rows(self.pred_obj_score_head, hs[:, 0], score_rows_apart)
        return mask_tokens_out[:, 0], score
