"""The reference oracle: Meta's SAM 2 (`sam2==1.1.0`), built on the CPU with spread random
weights, and the reference computations of ../shared/REFERENCE.md."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

CONFIGS = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_tiny": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_small": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_base_plus": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_large": "configs/sam2/sam2_hiera_l.yaml",
}


@lru_cache(maxsize=4)
def reference_model(variant: str, image_size: int, seed: int = 0) -> torch.nn.Module:
    """SAM2Base for `variant` at `image_size`, every parameter drawn from N(0, 0.1²) under
    `seed` (so gamma, no_obj_embed_spatial etc. are far from their near-zero inits)."""
    from sam2.build_sam import build_sam2

    ref = build_sam2(
        CONFIGS[variant],
        ckpt_path=None,
        device="cpu",
        hydra_overrides_extra=[f"++model.image_size={image_size}"],
    ).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(ref.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return ref


def save_checkpoint(ref: torch.nn.Module, path: Path) -> Path:
    """Write `ref` as an official-format checkpoint `{"model": state_dict}`."""
    torch.save({"model": ref.state_dict()}, path)
    return path


def normalize(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float, /255 and ImageNet mean/std, as load_video_frames does."""
    mean = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
    std = torch.tensor((0.229, 0.224, 0.225))[:, None, None]
    x = frames_u8.float() / 255.0
    x -= mean
    x /= std
    return x


@torch.inference_mode()
def reference_frame(ref, image: torch.Tensor):
    """One normalised frame [3, S, S] -> (pix_feat [1, 256, h, w], vision_feats, feat_sizes)."""
    backbone_out = ref.forward_image(image[None])
    _, vision_feats, _, feat_sizes = ref._prepare_backbone_features(backbone_out)
    h, w = feat_sizes[-1]
    pix_feat = vision_feats[-1].permute(1, 2, 0).reshape(1, -1, h, w)
    return pix_feat, vision_feats, feat_sizes


@torch.inference_mode()
def reference_memory(ref, vision_feats, feat_sizes, logits: torch.Tensor, score: float):
    """SAM 2's memory for one object: logits [S, S] and its object score ->
    (maskmem_features [64, h, w], maskmem_pos_enc [64, h, w])."""
    feats, pos = ref._encode_new_memory(
        vision_feats,
        feat_sizes,
        logits[None, None].float(),
        torch.tensor([[score]]),
        is_mask_from_pts=False,
    )
    return feats[0], pos[-1][0]


def resize_binary(mask: torch.Tensor, s: int) -> torch.Tensor:
    """add_new_mask's resize of a binary [H, W] mask to S×S (bilinear, antialias, >= 0.5)."""
    m = mask[None, None].float()
    if tuple(mask.shape) != (s, s):
        m = torch.nn.functional.interpolate(
            m, size=(s, s), mode="bilinear", align_corners=False, antialias=True
        )
        m = (m >= 0.5).float()
    return m[0, 0]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@lru_cache(maxsize=4)
def reference_with_score_bias(variant: str, image_size: int, shift: float) -> torch.nn.Module:
    """A copy of `reference_model` whose mask decoder's object-score head has `shift` added
    to its last bias, which fixes the sign of the decoder's object score (with randn·0.1
    weights it is about ±1 for every input, REFERENCE.md), so pointers are not all
    `no_obj_ptr`. Every released config scores with an MLP (`pred_obj_scores_mlp`)."""
    import copy

    ref = copy.deepcopy(reference_model(variant, image_size))
    with torch.no_grad():
        ref.sam_mask_decoder.pred_obj_score_head.layers[2].bias += shift
    return ref


@torch.inference_mode()
def reference_track_step(ref, image: torch.Tensor, masks: list[torch.Tensor], frame_idx: int = 0):
    """SAM 2's step for a frame given as masks (REFERENCE.md), one call per object as the
    video predictor runs it: normalised image [3, S, S] and 0/1 masks [S, S] -> one
    track_step output dict per mask (obj_ptr [1, 256], maskmem_features [1, 64, h, w],
    object_score_logits [1, 1], ...)."""
    backbone_out = ref.forward_image(image[None])
    _, vf, vpos, fs = ref._prepare_backbone_features(backbone_out)
    return [
        ref.track_step(
            frame_idx=frame_idx,
            is_init_cond_frame=True,
            current_vision_feats=vf,
            current_vision_pos_embeds=vpos,
            feat_sizes=fs,
            point_inputs=None,
            mask_inputs=m[None, None].float(),
            output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
            num_frames=frame_idx + 1,
            run_mem_encoder=True,
        )
        for m in masks
    ]


def frames_and_masks(s: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three uint8 frames [3, 3, S, S] and two objects' masks [3, 2, 90, 120] (resized to S
    by the model), drawn from `gen`: object 1 is empty in frame 1 and object 0 in frame 2,
    so both score signs and both pointer kinds occur."""
    frames = torch.randint(0, 256, (3, 3, s, s), generator=gen, dtype=torch.uint8)
    masks = torch.zeros(3, 2, 90, 120, dtype=torch.bool)
    masks[:2, 0, 10:50, 20:70] = True
    masks[0, 1, 40:, :30] = True
    masks[2, 1] = torch.rand(90, 120, generator=gen) > 0.7
    return frames, masks
