"""Object pointers (DESIGN §3a) against the reference oracle's `track_step` for frames given
as masks, with spread random weights and the decoder's object score pushed to a known sign."""

from __future__ import annotations

import copy

import oracle
import pytest
import torch
import torch.nn.functional as F

from memenc.encoders import load_model
from memenc.encoders.checkpoint import UNUSED_PREFIXES
from memenc.encoders.model import MemencModel
from memenc.errors import CheckpointError

S = 256
REL = 1e-5  # DESIGN §3, fp32 compute and storage
SHIFT = 5.0  # the decoder's object score is about ±1 with randn·0.1 weights


def make_inputs(seed: int = 0):
    """Three frames, two objects, masks at 90×120 (resized to S). Object 1 is empty in
    frame 1 and object 0 in frame 2; logits at 45×60, object 1 all negative in frame 0."""
    g = torch.Generator().manual_seed(seed)
    frames, masks = oracle.frames_and_masks(S, g)
    logits = torch.randn(3, 2, 45, 60, generator=g) * 8
    logits[0, 1] = -torch.rand(45, 60, generator=g) - 0.1
    return frames, masks, logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(variant, score shift) -> (reference with that shift, memenc model from its checkpoint)."""
    made = {}

    def make(variant: str, shift: float):
        if (variant, shift) not in made:
            ref = oracle.reference_with_score_bias(variant, S, shift)
            path = tmp_path_factory.mktemp("ckpt") / f"{variant}_{shift}.pt"
            made[variant, shift] = (
                ref,
                load_model(oracle.save_checkpoint(ref, path), image_size=S),
            )
        return made[variant, shift]

    return make


def is_no_obj_ptr(ref, ptr: torch.Tensor) -> bool:
    return torch.equal(ptr, ref.no_obj_ptr[0])


@pytest.mark.parametrize("variant", ["sam2.1_hiera_tiny", "sam2_hiera_small"])
@pytest.mark.parametrize("shift", [SHIFT, -SHIFT])
def test_pointers_and_memories_equal_track_step(checkpoints, variant, shift):
    ref, model = checkpoints(variant, shift)
    frames, masks, _ = make_inputs()
    out = model.encode_memory(model.image_features(frames), masks)
    assert out.obj_ptr.shape == (3, 2, 256) and out.obj_ptr.dtype == torch.float32
    worst = 0.0
    for f in range(frames.shape[0]):
        ms = [oracle.resize_binary(masks[f, o], S) for o in range(masks.shape[1])]
        steps = oracle.reference_track_step(ref, oracle.normalize(frames[f]), ms, frame_idx=f)
        for o, step in enumerate(steps):
            ptr, feats = out.obj_ptr[f, o], out.features[f, o]
            assert oracle.rel_l2(ptr, step["obj_ptr"][0]) <= REL, f"obj_ptr frame {f} obj {o}"
            assert oracle.rel_l2(feats, step["maskmem_features"][0]) <= REL
            worst = max(
                worst,
                oracle.max_abs(ptr, step["obj_ptr"][0]),
                oracle.max_abs(feats, step["maskmem_features"][0]),
            )
            assert float(out.object_score_logits[f, o]) == float(step["object_score_logits"])
            present = bool(ms[o].any())
            # the mask's own gate: an empty mask's pointer is no_obj_ptr whatever the decoder
            # says; a present object's pointer is the decoder's exactly when its score is > 0
            assert is_no_obj_ptr(ref, ptr) == (not present or shift < 0), (f, o)
    assert worst == 0.0, f"not bit-identical to the reference: max abs {worst:.3g}"
    assert (out.object_score_logits < 0).any() and (out.object_score_logits > 0).any()


def test_objects_sharing_a_decoder_call_keep_the_reference_bits(checkpoints):
    """On the CPU a frame's objects go through the two-way transformer together (the
    reference runs one at a time): with five objects in one frame, one of them empty, each
    pointer is still the reference's bit for bit."""
    ref, model = checkpoints("sam2.1_hiera_tiny", SHIFT)
    g = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (1, 3, S, S), generator=g, dtype=torch.uint8)
    masks = torch.rand(1, 5, S, S, generator=g) > torch.linspace(0.2, 0.95, 5)[:, None, None]
    masks[0, 3] = False
    out = model.encode_memory(model.image_features(frames), masks)
    steps = oracle.reference_track_step(ref, oracle.normalize(frames[0]), list(masks[0].float()))
    for o, step in enumerate(steps):
        assert torch.equal(out.obj_ptr[0, o], step["obj_ptr"][0]), f"object {o}"
    assert is_no_obj_ptr(ref, out.obj_ptr[0, 3]) and not is_no_obj_ptr(ref, out.obj_ptr[0, 0])


@pytest.mark.slow
def test_pointer_equals_track_step_at_1024(tmp_path):
    ref = oracle.reference_with_score_bias("sam2.1_hiera_tiny", 1024, SHIFT)
    model = load_model(oracle.save_checkpoint(ref, tmp_path / "ckpt.pt"))
    frames = torch.randint(
        0, 256, (1, 3, 1024, 1024), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    masks = torch.zeros(1, 1, 1024, 1024, dtype=torch.bool)
    masks[..., 200:700, 300:600] = True
    out = model.encode_memory(model.image_features(frames), masks)
    step = oracle.reference_track_step(ref, oracle.normalize(frames[0]), [masks[0, 0]])[0]
    assert not is_no_obj_ptr(ref, out.obj_ptr[0, 0])
    assert oracle.max_abs(out.obj_ptr[0, 0], step["obj_ptr"][0]) == 0.0
    assert oracle.max_abs(out.features[0, 0], step["maskmem_features"][0]) == 0.0


def test_logit_masks_get_the_pointer_of_the_mask_they_describe(checkpoints):
    """For logits the pointer is that of the mask input `logits > 0` (resized to S)."""
    ref, model = checkpoints("sam2.1_hiera_tiny", SHIFT)
    frames, _, logits = make_inputs()
    out = model.encode_memory(model.image_features(frames[:2]), logits[:2])
    for f in range(2):
        lg = F.interpolate(logits[f][:, None], size=(S, S), mode="bilinear", align_corners=False)
        ms = [(x[0] > 0).float() for x in lg]
        steps = oracle.reference_track_step(ref, oracle.normalize(frames[f]), ms, frame_idx=f)
        for o, step in enumerate(steps):
            assert torch.equal(out.obj_ptr[f, o], step["obj_ptr"][0]), (f, o)
    assert is_no_obj_ptr(ref, out.obj_ptr[0, 1])  # all negative: absent
    assert not is_no_obj_ptr(ref, out.obj_ptr[0, 0])


def test_given_scores_gate_the_pointer(checkpoints):
    ref, model = checkpoints("sam2.1_hiera_tiny", SHIFT)
    frames, masks, _ = make_inputs()
    pix = model.image_features(frames[:1])
    swapped = torch.tensor([[-10.0, 10.0]])  # object 0 has a mask, object 1 not
    out = model.encode_memory(pix, masks[:1, :2], object_score_logits=swapped)
    assert out.object_score_logits.tolist() == swapped.tolist()
    assert is_no_obj_ptr(ref, out.obj_ptr[0, 0])
    empty = torch.zeros(1, 1, S, S)  # the decoder's own pointer for an empty mask
    step = oracle.reference_track_step(ref, oracle.normalize(frames[0]), [empty[0, 0]])[0]
    assert is_no_obj_ptr(ref, step["obj_ptr"][0])
    assert not is_no_obj_ptr(ref, out.obj_ptr[0, 1])


def test_pointer_does_not_depend_on_the_heads_memenc_skips(checkpoints):
    """The reference's pointer does not change when every parameter memenc does not load
    (mask upscaling with conv_s0/conv_s1, hypernetworks, IoU head, point prompts, no-mask
    embedding) is redrawn, while its predicted mask does."""
    ref, model = checkpoints("sam2.1_hiera_tiny", SHIFT)
    other = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(7)
    redrawn = 0
    with torch.no_grad():
        for name, p in sorted(other.named_parameters()):
            if name.startswith(UNUSED_PREFIXES):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                redrawn += 1
    assert redrawn >= 20 and any(
        n.startswith("sam_mask_decoder.conv_s0") for n, _ in other.named_parameters()
    )
    frames, masks, _ = make_inputs()
    image = oracle.normalize(frames[0])
    m = [oracle.resize_binary(masks[0, 0], S)]
    # with a dense prompt, the mask decoder's mask output is what the skipped heads make
    with torch.inference_mode():
        bo = [r.forward_image(image[None]) for r in (ref, other)]
        heads = []
        for r, b in zip((ref, other), bo):
            _, vf, _, fs = r._prepare_backbone_features(b)
            pf = vf[-1].permute(1, 2, 0).view(1, 256, *fs[-1])
            hr = [x.permute(1, 2, 0).view(1, x.size(2), *s) for x, s in zip(vf[:-1], fs[:-1])]
            heads.append(
                r._forward_sam_heads(
                    pf, mask_inputs=r.mask_downsample(m[0][None, None]), high_res_features=hr
                )
            )
    assert not torch.equal(heads[0][0], heads[1][0])  # low-res masks differ
    assert torch.equal(heads[0][5], heads[1][5])  # obj_ptr does not
    a = oracle.reference_track_step(ref, image, m)[0]["obj_ptr"]
    b = oracle.reference_track_step(other, image, m)[0]["obj_ptr"]
    assert torch.equal(a, b) and not is_no_obj_ptr(ref, a[0])


def test_all_objects_at_once_match_within_bounds(checkpoints, monkeypatch):
    """The accelerator path (all frames and objects in one call) on the CPU: within DESIGN
    §3's bounds of the per-object path, which is the reference's bit for bit."""
    _, model = checkpoints("sam2.1_hiera_tiny", SHIFT)
    frames, masks, _ = make_inputs()
    pix = model.image_features(frames)
    one_by_one = model.encode_memory(pix, masks)
    monkeypatch.setattr(MemencModel, "frame_batch", property(lambda self: None))
    batched = model.encode_memory(pix, masks)
    assert oracle.rel_l2(batched.obj_ptr, one_by_one.obj_ptr) <= REL
    assert oracle.rel_l2(batched.features, one_by_one.features) <= REL


@pytest.mark.parametrize(
    "key",
    [
        "obj_ptr_proj.layers.2.bias",
        "no_obj_ptr",
        "mask_downsample.weight",
        "sam_prompt_encoder.mask_downscaling.4.weight",
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj.weight",
        "sam_mask_decoder.pred_obj_score_head.layers.2.bias",
    ],
)
def test_missing_pointer_key_is_named(tmp_path, checkpoints, key):
    ref, _ = checkpoints("sam2.1_hiera_tiny", SHIFT)
    state = ref.state_dict()
    del state[key]
    torch.save({"model": state}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=rf"missing\.pt: .*missing keys {key}"):
        load_model(tmp_path / "missing.pt", image_size=S)


def test_checkpoint_without_the_skipped_heads_loads(tmp_path, checkpoints):
    ref, model = checkpoints("sam2.1_hiera_tiny", SHIFT)
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith(UNUSED_PREFIXES)}
    assert len(state) < len(ref.state_dict())
    torch.save({"model": state}, tmp_path / "lean.pt")
    lean = load_model(tmp_path / "lean.pt", image_size=S)
    frames, masks, _ = make_inputs()
    pix = lean.image_features(frames[:1])
    assert torch.equal(
        lean.encode_memory(pix, masks[:1]).obj_ptr, model.encode_memory(pix, masks[:1]).obj_ptr
    )


def test_pointers_can_be_skipped_and_no_objects_is_no_pointers(checkpoints):
    _, model = checkpoints("sam2.1_hiera_tiny", SHIFT)
    frames, masks, _ = make_inputs()
    pix = model.image_features(frames[:1])
    with_ptr = model.encode_memory(pix, masks[:1])
    without = model.encode_memory(pix, masks[:1], pointers=False)
    assert without.obj_ptr is None and with_ptr.obj_ptr is not None
    assert torch.equal(without.features, with_ptr.features)
    none = model.encode_memory(pix, masks[:1, :0])
    assert none.obj_ptr.shape == (1, 0, 256) and none.features.shape[:2] == (1, 0)
