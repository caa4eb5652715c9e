"""The eight released SAM 2 model variants, and detection of one from a checkpoint.

Figures are from the official configs (sam2 1.1.0's `configs/sam2/` and
`configs/sam2.1/`). Everything outside the Hiera trunk that memenc uses is shared:
FPN neck d_model 256 (nearest top-down on levels [2, 3], scalp 1), MemoryEncoder with
64 output channels and a 2-layer CXBlock fuser, mask sigmoid scale 20 and bias -10,
7 memory slots. SAM 2.1 adds `no_obj_embed_spatial`.

Object pointers (memenc/encoders/pointer.py) are made the same way in all eight: every
released config sets `use_obj_ptrs_in_encoder`, `pred_obj_scores`, `pred_obj_scores_mlp`,
`fixed_no_obj_ptr`, `use_mlp_for_obj_ptr_proj`, `use_high_res_features_in_sam`,
`iou_prediction_use_sigmoid` and `use_multimask_token_for_obj_ptr`, and none sets
`soft_no_obj_ptr`. What differs between the families is how memory attention reads the
pointers: SAM 2.1 adds a signed temporal encoding through its own projection
(`add_tpos_enc_to_obj_ptrs`, `proj_tpos_enc_in_obj_ptrs`, `use_signed_tpos_enc_to_obj_ptrs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from memenc.errors import CheckpointError


@dataclass(frozen=True)
class Variant:
    """One model variant: its family (sam2 / sam2.1), size and Hiera trunk settings."""

    family: str  # "sam2" | "sam2.1"
    size: str  # "tiny" | "small" | "base_plus" | "large"
    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    image_size: int = 1024
    d_model: int = 256
    mem_dim: int = 64
    fuser_layers: int = 2
    num_maskmem: int = 7
    sigmoid_scale: float = 20.0
    sigmoid_bias: float = -10.0

    def __str__(self) -> str:
        return self.name

    @property
    def name(self) -> str:
        """Official name, e.g. `sam2.1_hiera_tiny` (also the checkpoint's file stem)."""
        return f"{self.family}_hiera_{self.size}"

    @property
    def no_obj_embed_spatial(self) -> bool:
        """Whether empty objects get the learned no-object embedding (SAM 2.1 only)."""
        return self.family == "sam2.1"

    @property
    def tpos_enc_in_obj_ptrs(self) -> bool:
        """Whether memory attention adds a temporal encoding to the object pointers, through
        `obj_ptr_tpos_proj`, signed (SAM 2.1: `add_tpos_enc_to_obj_ptrs`,
        `proj_tpos_enc_in_obj_ptrs` and `use_signed_tpos_enc_to_obj_ptrs`; SAM 2: none)."""
        return self.family == "sam2.1"

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def channel_list(self) -> list[int]:
        """Trunk output channels per level, coarsest first (what the neck expects)."""
        return [self.embed_dim * 2**i for i in reversed(range(len(self.stages)))]


_TRUNKS = {
    "tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                 window_spec=(8, 4, 14, 7), window_pos_embed_bkg_spatial_size=(7, 7)),
    "small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
                  window_spec=(8, 4, 14, 7), window_pos_embed_bkg_spatial_size=(7, 7)),
    "base_plus": dict(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3),
                      global_att_blocks=(12, 16, 20), window_spec=(8, 4, 14, 7),
                      window_pos_embed_bkg_spatial_size=(14, 14)),
    "large": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                  window_spec=(8, 4, 16, 8), window_pos_embed_bkg_spatial_size=(7, 7)),
}  # fmt: skip

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(family=family, size=size, **trunk)
        for family in ("sam2", "sam2.1")
        for size, trunk in _TRUNKS.items()
    )
}

DEFAULT_VARIANT = "sam2.1_hiera_tiny"

# Short names users type: "tiny", "sam2.1_tiny", "sam2_hiera_s", "b+" ...
_SIZE_ALIASES = {"t": "tiny", "s": "small", "b+": "base_plus", "bplus": "base_plus",
                 "base": "base_plus", "l": "large"}  # fmt: skip


def get_variant(name: str) -> Variant:
    """Look a variant up by its official name (`sam2.1_hiera_tiny`) or a short form
    (`tiny`, `sam2_small`, `sam2.1_hiera_b+`). A bare size means SAM 2.1.
    Raises CheckpointError listing the known names."""
    key = name.strip().lower().replace("-", "_")
    family = "sam2.1"
    for prefix in ("sam2.1_", "sam2_"):
        if key.startswith(prefix):
            family, key = prefix[:-1], key[len(prefix) :]
            break
    key = key.removeprefix("hiera_")
    size = _SIZE_ALIASES.get(key, key)
    full = f"{family}_hiera_{size}"
    if full not in VARIANTS:
        raise CheckpointError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[full]


def detect_variant(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> Variant:
    """Tell the variant from a state dict's keys and shapes: the trunk's embed dim and block
    count give the size, `no_obj_embed_spatial` tells SAM 2.1 from SAM 2.
    Raises CheckpointError naming `source` when nothing matches."""
    patch = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch is None or not hasattr(patch, "shape") or len(patch.shape) != 4:
        raise CheckpointError(
            f"{source}: cannot detect the model variant: no image_encoder.trunk.patch_embed.proj.weight"
        )
    embed_dim = int(patch.shape[0])
    blocks = {
        int(k.split(".")[3])
        for k in state_dict
        if k.startswith("image_encoder.trunk.blocks.") and k.split(".")[3].isdigit()
    }
    depth = max(blocks) + 1 if blocks else 0
    family = "sam2.1" if "no_obj_embed_spatial" in state_dict else "sam2"
    for v in VARIANTS.values():
        if v.family == family and v.embed_dim == embed_dim and v.depth == depth:
            return v
    raise CheckpointError(
        f"{source}: no known SAM 2 variant has a Hiera trunk with embed_dim {embed_dim} "
        f"and {depth} blocks"
    )
