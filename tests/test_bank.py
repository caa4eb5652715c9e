"""The whole memory bank (issue 9): a memenc store read with `sam2_output_dict` drives SAM 2's
own `track_step` on frames without annotation exactly as the reference's in-memory outputs
for the same annotated frames do, and the stored pointers and memories are the reference's.

Oracle: Meta's sam2 1.1.0 with randn·0.1 weights and the decoder's object-score bias
shifted to a known sign (tests/oracle.py), at S=256 on a 12-frame synthetic clip with two
objects (7 only in even frames, so empty on some annotated frames).
"""

from __future__ import annotations

import media
import oracle
import pytest
import torch

from memenc import encode_video, open_cache

S = 256
T = 12
REL = 1e-5  # DESIGN §3: fp32 compute, float32 storage
SHIFT = 5.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("bank")
    labels = media.moving_labels(T, 120, 160)
    video = media.write_video(d / "clip.mp4", media.scene_frames(labels))
    media.write_png_labels(d / "all_masks", labels)
    sparse = media.write_png_labels(d / "some_masks", labels)
    for f in range(T):
        if f not in (4, 7):  # annotations only on frames 4 and 7
            (sparse / f"{f:05d}.png").unlink()
    return video, labels, d


@pytest.fixture(scope="module")
def frames_of(clip):
    """The reference's frames: load_video_frames (decord, resized in the decoder)."""
    from sam2.utils.misc import load_video_frames

    images, _, _ = load_video_frames(str(clip[0]), S, offload_video_to_cpu=True)
    return images


@torch.inference_mode()
def backbone(ref, image: torch.Tensor) -> tuple:
    """(vision_feats, vision_pos_embeds, feat_sizes) of one normalised frame [3, S, S]."""
    return ref._prepare_backbone_features(ref.forward_image(image[None]))[1:]


@torch.inference_mode()
def downstream(ref, feats: tuple, t: int, output_dict: dict) -> dict:
    """SAM 2 on a frame without annotation: memory attention over `output_dict`, then the
    mask decoder (REFERENCE.md)."""
    vf, vpos, fs = feats
    return ref.track_step(
        frame_idx=t,
        is_init_cond_frame=False,
        current_vision_feats=vf,
        current_vision_pos_embeds=vpos,
        feat_sizes=fs,
        point_inputs=None,
        mask_inputs=None,
        output_dict=output_dict,
        num_frames=T,
        run_mem_encoder=False,
    )


CASES = [
    # variant, score shift, how frames get annotations
    ("sam2.1_hiera_tiny", SHIFT, "strided"),
    ("sam2.1_hiera_tiny", -SHIFT, "strided"),
    ("sam2.1_hiera_tiny", SHIFT, "skip-unmasked"),
    ("sam2_hiera_tiny", SHIFT, "strided"),
]


@pytest.mark.parametrize(("variant", "shift", "annotation"), CASES)
def test_cache_drives_track_step_as_the_reference_bank(
    tmp_path, clip, frames_of, variant, shift, annotation
):
    video, labels, d = clip
    ref = oracle.reference_with_score_bias(variant, S, shift)
    ckpt = oracle.save_checkpoint(ref, tmp_path / "ckpt.pt")
    if annotation == "strided":  # every frame has a mask; encode 2, 5, 8
        kw, annotated = {"masks": d / "all_masks", "frames": "2:10:3"}, [2, 5, 8]
    else:  # masks only on frames 4 and 7
        kw, annotated = {"masks": d / "some_masks", "skip_unmasked": True}, [4, 7]
    encode_video(
        video, checkpoint=ckpt, image_size=S, out=tmp_path / "c.zarr", store_dtype="float32",
        precision="fp32", chunk_frames=2, batch_size=2, **kw,
    )  # fmt: skip
    cache = open_cache(tmp_path / "c.zarr")
    assert cache.frame_index.tolist() == annotated and cache.has_pointers

    # the reference's own bank: track_step(mask_inputs=m, run_mem_encoder=True) per frame
    ref_steps = {}  # (frame, object id) -> track_step output
    for f in annotated:
        ms = [oracle.resize_binary(torch.from_numpy(labels[f] == oid), S) for oid in media.IDS]
        for oid, step in zip(media.IDS, oracle.reference_track_step(ref, frames_of[f], ms, f)):
            ref_steps[f, oid] = step
    absent = [(f, oid) for f in annotated for oid in media.IDS if not (labels[f] == oid).any()]
    assert absent and len(absent) < len(ref_steps)  # object 7 is empty on some frames

    # stored pointers and memories are the reference's
    worst = 0.0
    for (f, oid), step in ref_steps.items():
        row = cache.row_of(f)
        for got, want in (
            (cache.pointer(row, oid), step["obj_ptr"][0]),
            (cache.features(row, oid), step["maskmem_features"][0]),
        ):
            assert oracle.rel_l2(got, want) <= REL, (f, oid)
            worst = max(worst, oracle.max_abs(got, want))
        assert cache.score(row, oid) == float(step["object_score_logits"])
        is_no_obj = torch.equal(cache.pointer(row, oid), ref.no_obj_ptr[0])
        assert is_no_obj == ((f, oid) in absent or shift < 0), (f, oid)
    assert worst == 0.0, f"stored bank not bit-identical to the reference: max abs {worst:.3g}"

    # downstream: frames before, between and after the annotated ones
    unannotated = [t for t in range(T) if t not in annotated]
    assert min(unannotated) < annotated[0] and max(unannotated) > annotated[-1]
    present_masks = 0
    banks = {}
    for oid in media.IDS:
        mine = cache.sam2_output_dict(oid)
        theirs = {
            "cond_frame_outputs": {f: ref_steps[f, oid] for f in annotated},
            "non_cond_frame_outputs": {},
        }
        assert list(mine["cond_frame_outputs"]) == annotated
        banks[oid] = mine, theirs
    for t in unannotated:
        feats = backbone(ref, frames_of[t])
        for oid, (mine, theirs) in banks.items():
            a = downstream(ref, feats, t, mine)
            b = downstream(ref, feats, t, theirs)
            for key in ("pred_masks", "obj_ptr", "object_score_logits"):
                assert oracle.rel_l2(a[key], b[key]) <= REL, (oid, t, key)
            present_masks += int((b["object_score_logits"] > 0).any())
    # the sign of the shifted score head shows downstream too: objects found or not
    assert (present_masks > 0) == (shift > 0)
