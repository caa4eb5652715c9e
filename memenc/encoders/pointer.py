"""Object pointers of mask-input frames, as SAM 2's `_use_mask_as_output` makes them.

For a frame given as a mask `m` (0/1, S×S), SAM 2 runs its SAM heads on the frame's own
stride-16 feature, without memory: the dense prompt is `mask_downsample(m)` (a 4×4
stride-4 conv), the sparse prompt the padding for "no points", one output mask. The
pointer is `obj_ptr_proj` (an MLP) of mask token 0, and it is gated twice by
`no_obj_ptr` (`fixed_no_obj_ptr`, hard gates): by the decoder's object score, then by
whether the mask has any foreground. Every released sam2 and sam2.1 config has these same
settings (`pred_obj_scores`, `pred_obj_scores_mlp`, `fixed_no_obj_ptr`,
`use_mlp_for_obj_ptr_proj`; no `soft_no_obj_ptr`; `use_multimask_token_for_obj_ptr`
matters only for multimask output, which mask inputs do not use).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from memenc.encoders.decoder import MaskDecoder, by_rows
from memenc.encoders.prompt import PromptEncoder


class PointerHeads(Protocol):
    """The modules that make pointers, under the checkpoint's names (MemencModel has them)."""

    mask_downsample: nn.Conv2d
    sam_prompt_encoder: PromptEncoder
    sam_mask_decoder: MaskDecoder
    obj_ptr_proj: nn.Module
    no_obj_ptr: torch.Tensor


def mix_no_object(
    ptr: torch.Tensor, present: torch.Tensor, no_obj_ptr: torch.Tensor
) -> torch.Tensor:
    """`fixed_no_obj_ptr`: the pointer where `present` `[N, 1]` is true, `no_obj_ptr`
    `[1, C]` where it is false, in the reference's arithmetic (so the bits are its)."""
    lam = present.to(ptr.dtype)
    ptr = lam * ptr
    return ptr + (1 - lam) * no_obj_ptr


def object_pointers(
    heads: PointerHeads,
    pix_feat: torch.Tensor,
    masks: torch.Tensor,
    present: torch.Tensor,
    exact: bool = False,
) -> torch.Tensor:
    """Pointers of B frames × O objects.

    pix_feat `[B, 256, h, w]`; masks `[B, O, S, S]`, the 0/1 input masks as float
    (S = 16h); present `[B, O]` bool, whether each object is there (the second gate).
    exact: the reference's rounding, on the CPU. The reference runs one object at a time;
    the mask prompt's convolutions and the one-row heads (object score, `obj_ptr_proj`)
    round differently with more objects in a call, so they run object by object, while
    the two-way transformer takes a frame's objects together (each object's results do not
    depend on how many share the call: tests/test_pointers.py holds them to the reference
    bit for bit). False: every frame and object in one call (the accelerator path).
    Returns `[B, O, 256]`.
    """
    b, o = masks.shape[:2]
    if o == 0:
        return pix_feat.new_zeros(b, 0, heads.no_obj_ptr.shape[-1])
    image_pe = heads.sam_prompt_encoder.get_dense_pe(*pix_feat.shape[-2:])
    if not exact:
        return _pointers(heads, pix_feat, image_pe, masks, present, exact=False)
    rows = []
    for f in range(b):
        # an object whose mask is empty gets `no_obj_ptr` from the second gate whatever the
        # decoder says (0·ptr + 1·no_obj_ptr, exactly), so it skips the decoder
        there = [k for k in range(o) if bool(present[f, k])]
        row = [heads.no_obj_ptr.view(1, 1, -1)] * o
        if there:
            pick = slice(None) if len(there) == o else there  # a slice is a view, not a copy
            ptr = _pointers(
                heads, pix_feat[f : f + 1], image_pe, masks[f : f + 1, pick],
                present[f : f + 1, pick], exact=True,
            )  # fmt: skip
            for i, k in enumerate(there):
                row[k] = ptr[:, i : i + 1]
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def _pointers(
    heads: PointerHeads,
    pix_feat: torch.Tensor,
    image_pe: torch.Tensor,
    masks: torch.Tensor,
    present: torch.Tensor,
    exact: bool,
) -> torch.Tensor:
    """`object_pointers` of B frames × O objects in one decoder call; image_pe
    `[1, 256, h, w]` is `get_dense_pe`."""
    b, o, s1, s2 = masks.shape
    c, h, w = pix_feat.shape[1:]
    # each object sees its frame's feature, in the channels-last layout the reference's
    # feature has (the transformer reads it as tokens [B*O, hw, C], and the kernels round
    # by layout). One frame: the decoder's `image + dense` broadcasts it, and the sum keeps
    # that layout. More: [B, C, h, w] -> [B*O, C, h, w], copied.
    image = pix_feat
    if b > 1:
        image = pix_feat.permute(0, 2, 3, 1)[:, None].expand(b, o, h, w, c)
        image = image.reshape(b * o, h, w, c).permute(0, 3, 1, 2)  # -> [B*O, C, h, w]
    flat = masks.reshape(b * o, 1, s1, s2)
    prompts = heads.sam_prompt_encoder
    dense = by_rows(lambda m: prompts.dense(heads.mask_downsample(m)), flat, exact)
    token, score = heads.sam_mask_decoder(
        image, image_pe, prompts.padding_points(1), dense, score_rows_apart=exact
    )  # [B*O, C], [B*O, 1]
    ptr = by_rows(heads.obj_ptr_proj, token, exact)
    ptr = mix_no_object(ptr, score > 0, heads.no_obj_ptr)
    ptr = mix_no_object(ptr, present.reshape(b * o, 1), heads.no_obj_ptr)
    return ptr.view(b, o, -1)
