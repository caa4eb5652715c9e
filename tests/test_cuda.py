"""The CUDA path (DESIGN §3 bounds): fp32 on CUDA against memenc on the CPU (bit-identical to
the reference) and against the reference oracle when it is installed; bf16/fp16 autocast
against CUDA fp32; a whole `memenc encode --device cuda` store against a CPU store.

Without a CUDA device these tests are skipped (and counted as skipped); the TF32 switch is
checked on any machine. The oracle comparison skips on its own when `sam2` is missing, so
the rest runs where only memenc's runtime dependencies travelled (benchmarks/gpu.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import oracle
import pytest
import torch

from memenc.encoders import load_model, use_exact_fp32
from memenc.pipeline.engine import autocast_for

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
REL, MAX_ABS = 1e-5, 1e-4  # DESIGN §3, fp32 compute and storage
REL_LOW = 1e-2  # DESIGN §3, bf16/fp16 compute
# Across devices (CUDA against the CPU) fp32 kernels add in different orders. DESIGN §3's
# bounds hold against the reference on the same device; against the CPU the max-abs bound
# is taken relative to the largest value (1e-5 of it, DESIGN's relative bound), since these
# features reach |x| ~ 50-60 with randn·0.1 weights. On an H200 (torch 2.11, CUDA 13)
# memenc's features on CUDA measured max abs 0.9-1.45e-4 against the CPU (memenc's and
# SAM 2's; under 3e-6 of the largest value) and 0.76-0.92e-4 against SAM 2 on CUDA
# (gpu.sh, parity.jsonl). SAM 2's own CUDA-vs-CPU gap bounds the test below but was not
# recorded in that run; `measure` records it from the next one.
CROSS_DEVICE_PEAK_REL = 1e-5
SHIFT = 5.0  # pushes the decoder's object score positive, so pointers are not no_obj_ptr


def _tf32_state() -> tuple[str, str]:
    return (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)


@pytest.fixture
def tf32_on():
    """TF32 allowed for convolutions and matmuls (as a user might set it), restored after."""
    saved = _tf32_state()
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    yield
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def test_use_exact_fp32_turns_tf32_off(tf32_on):
    use_exact_fp32()
    assert _tf32_state() == ("ieee", "ieee")


def test_load_model_turns_tf32_off(tf32_on):
    load_model(weights="random", image_size=64)
    assert _tf32_state() == ("ieee", "ieee")


def test_fp32_on_cuda_turns_tf32_off_and_other_precisions_leave_it(tf32_on):
    autocast_for(torch.device("cpu"), "fp32")
    assert _tf32_state() == ("tf32", "tf32")  # the CPU has no TF32: nothing to change
    autocast_for(torch.device("cuda"), "fp32")  # touches no device: runs without CUDA
    assert _tf32_state() == ("ieee", "ieee")


@needs_cuda
def test_cuda_fp32_convolutions_and_matmuls_run_in_full_precision(tf32_on):
    """After use_exact_fp32 a CUDA fp32 convolution and matmul agree with float64 on the CPU
    within 1e-5 (float32 rounding is ~5e-7 here; TF32, allowed by the fixture first, ~3e-4)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 96, 64, 64, generator=g), torch.randn(192, 96, 3, 3, generator=g)
    a, b = torch.randn(512, 768, generator=g), torch.randn(768, 512, generator=g)
    conv64 = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    mm64 = a.double() @ b.double()
    for setting in ("tf32", "ieee"):
        if setting == "ieee":
            use_exact_fp32()
        conv = torch.nn.functional.conv2d(x.cuda(), w.cuda(), padding=1).cpu()
        mm = (a.cuda() @ b.cuda()).cpu()
        bound = REL if setting == "ieee" else 1.0  # TF32: measured and recorded only
        assert_close(conv, conv64, bound, None, f"conv2d fp32 with {setting}")
        assert_close(mm, mm64, bound, None, f"matmul fp32 with {setting}")


def make_inputs(s: int, seed: int = 0):
    """Three frames, two objects; masks at 90×120 (resized to S), object 1 empty in frame 1
    and object 0 in frame 2, so both score signs and pointer kinds occur."""
    return oracle.frames_and_masks(s, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An official-format checkpoint with every parameter drawn from N(0, 0.1²), as the
    reference oracle's (tests/oracle.py), and the object-score head pushed positive (as
    oracle.reference_with_score_bias), so pointers are not all no_obj_ptr. Made without
    the oracle, which the GPU machine may lack."""
    model = load_model(weights="random", image_size=256)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.sam_mask_decoder.pred_obj_score_head.layers[2].bias += SHIFT
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


def run(model, frames, masks, precision: str = "fp32"):
    """pix_feat and the memory output as the engine computes them, moved to the CPU."""
    with autocast_for(model.device, precision):
        pix = model.image_features(frames)
        out = model.encode_memory(pix, masks)
    return (
        pix.float().cpu(),
        out.features.float().cpu(),
        out.object_score_logits.float().cpu(),
        out.obj_ptr.float().cpu(),
    )


def measure(got, want, what: str) -> tuple[float, float]:
    """(relative L2, max abs) of `got` against `want`; with $MEMENC_PARITY_OUT set, also
    appended there as a JSON line (gpu.sh keeps them for the note)."""
    err, worst = oracle.rel_l2(got, want), oracle.max_abs(got, want)
    if os.environ.get("MEMENC_PARITY_OUT"):
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        peak = float(want.double().abs().max())
        line = {"test": test, "what": what, "rel_l2": err, "max_abs": worst, "peak": peak}
        with open(os.environ["MEMENC_PARITY_OUT"], "a") as f:
            f.write(json.dumps(line) + "\n")
    return err, worst


def assert_close(got, want, rel: float, max_abs: float | None, what: str) -> float:
    """Assert the bounds (measured and recorded by `measure`)."""
    err, worst = measure(got, want, what)
    assert err <= rel, f"{what}: relative L2 {err:.3g} > {rel}"
    if max_abs is not None:
        assert worst <= max_abs, f"{what}: max abs {worst:.3g} > {max_abs}"
    return err


def cross_device_max_abs(want: torch.Tensor) -> float:
    """The max-abs bound for fp32 CUDA against the CPU (see CROSS_DEVICE_PEAK_REL), never
    looser than DESIGN's 1e-4."""
    return max(MAX_ABS, CROSS_DEVICE_PEAK_REL * float(want.double().abs().max()))


@pytest.fixture(scope="module")
def models(checkpoint):
    """S -> (CPU model, CUDA model) from `checkpoint`."""
    made = {}

    def make(s: int):
        if s not in made:
            cpu = load_model(checkpoint, image_size=s)
            cuda = load_model(checkpoint, image_size=s, device="cuda")
            made[s] = cpu, cuda
        return made[s]

    return make


@needs_cuda
@pytest.mark.parametrize("s", [256, 512])
def test_cuda_fp32_matches_the_cpu(models, s):
    cpu, cuda = models(s)
    frames, masks = make_inputs(s)
    want = run(cpu, frames, masks)
    got = run(cuda, frames, masks)
    names = ("pix_feat", "maskmem_features", "object_score_logits", "obj_ptr")
    for g, w, name in zip(got, want, names):
        assert_close(g, w, REL, cross_device_max_abs(w), name)
    assert torch.equal(got[2], want[2])  # ±10: exact
    assert (want[2] > 0).any() and (want[2] < 0).any()
    no_obj = cpu.no_obj_ptr.detach().reshape(-1)
    present = [not torch.equal(want[3][f, o], no_obj) for f in range(3) for o in range(2)]
    assert any(present) and not all(present)  # both kinds of pointer were compared


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_autocast_within_1e_2_of_fp32(models, precision):
    _, cuda = models(256)
    frames, masks = make_inputs(256, seed=1)
    want = run(cuda, frames, masks, "fp32")
    got = run(cuda, frames, masks, precision)
    # DESIGN §3 bounds what is stored (memories and pointers), not pix_feat
    assert_close(got[1], want[1], REL_LOW, None, f"{precision} maskmem_features")
    assert_close(got[3], want[3], REL_LOW, None, f"{precision} obj_ptr")
    assert torch.equal(got[2], want[2])
    assert oracle.rel_l2(got[0], want[0]) > 0  # autocast really ran in lower precision


@needs_cuda
def test_cuda_fp32_matches_the_reference(tmp_path):
    """memenc on CUDA against SAM 2 on CUDA: DESIGN §3's bounds. Against SAM 2 on the CPU:
    no further from it than SAM 2 on CUDA is (with 2× room), and within 1e-5 relative."""
    import copy

    pytest.importorskip("sam2", reason="the reference oracle (sam2) is not installed")
    s = 256
    ref = oracle.reference_with_score_bias("sam2.1_hiera_tiny", s, SHIFT)
    model = load_model(oracle.save_checkpoint(ref, tmp_path / "ck.pt"), image_size=s, device="cuda")
    ref_cuda = copy.deepcopy(ref).cuda()  # load_model turned TF32 off for both
    frames, masks = make_inputs(s)
    _, feats, scores, ptrs = run(model, frames, masks)
    for f in range(frames.shape[0]):
        ms = [oracle.resize_binary(masks[f, o], s) for o in range(masks.shape[1])]
        image = oracle.normalize(frames[f])
        on_cpu = oracle.reference_track_step(ref, image, ms, frame_idx=f)
        on_cuda = oracle.reference_track_step(
            ref_cuda, image.cuda(), [m.cuda() for m in ms], frame_idx=f
        )
        for o, (step, step_cuda) in enumerate(zip(on_cpu, on_cuda)):
            where = f"frame {f} object {o}"
            for name, got in (("maskmem_features", feats[f, o]), ("obj_ptr", ptrs[f, o])):
                want_cuda = step_cuda[name][0].float().cpu()
                want_cpu = step[name][0]
                assert_close(got, want_cuda, REL, MAX_ABS, f"{name} {where} vs SAM 2 on CUDA")
                _, sam2_own = measure(
                    want_cuda, want_cpu, f"SAM 2's own {name} {where}, CUDA vs CPU"
                )
                assert_close(
                    got,
                    want_cpu,
                    REL,
                    max(MAX_ABS, 2 * sam2_own),
                    f"{name} {where} vs SAM 2 on CPU",
                )
            assert float(scores[f, o]) == float(step["object_score_logits"])
            assert float(scores[f, o]) == float(step_cuda["object_score_logits"])


def _encode(video, out, checkpoint, device: str, precision: str) -> dict:
    cmd = [sys.executable, "-m", "memenc", "encode", str(video), "-o", str(out),
           "--checkpoint", str(checkpoint), "--image-size", "256", "--device", device,
           "--precision", precision, "--store-dtype", "float32", "--batch-size", "3",
           "--chunk-frames", "4", "--quiet", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def clip_and_cpu_store(tmp_path_factory, checkpoint):
    """A 10-frame 160×120 clip with PNG masks beside it, and its store made on the CPU."""
    for module in ("av", "decord", "zarr"):
        pytest.importorskip(module, reason=f"{module} is not installed")
    import media

    d = tmp_path_factory.mktemp("clip")
    labels = media.moving_labels(10, 120, 160)
    video = media.write_video(d / "clip.mp4", media.scene_frames(labels))
    media.write_png_labels(d / "clip_masks", labels)
    return video, _encode(video, d / "cpu.zarr", checkpoint, "cpu", "fp32")["store"]


@needs_cuda
@pytest.mark.parametrize(("precision", "rel", "max_abs"), [("fp32", REL, MAX_ABS), ("bf16", REL_LOW, None)])  # fmt: skip
def test_encode_on_cuda_matches_a_cpu_store(
    tmp_path, checkpoint, clip_and_cpu_store, precision, rel, max_abs
):
    from media import IDS

    from memenc import open_cache

    video, cpu_store = clip_and_cpu_store
    result = _encode(video, tmp_path / "cuda.zarr", checkpoint, "cuda", precision)
    assert result["device"].startswith("cuda") and result["status"] == "complete"
    want, got = open_cache(cpu_store), open_cache(result["store"])
    assert got.frame_index.tolist() == want.frame_index.tolist() == list(range(10))
    assert got.object_ids == want.object_ids == list(IDS)
    np.testing.assert_array_equal(got.timestamps, want.timestamps)

    def stack(cache, read):
        return torch.stack([torch.stack([read(cache, r, o) for o in IDS]) for r in range(10)])

    feats = [stack(c, lambda c, r, o: c.features(r, o)) for c in (got, want)]
    ptrs = [stack(c, lambda c, r, o: c.pointer(r, o)) for c in (got, want)]
    scores = [stack(c, lambda c, r, o: torch.tensor(c.score(r, o))) for c in (got, want)]
    fp32 = max_abs is not None  # fp32 across devices: max abs relative to the peak
    feats_abs = cross_device_max_abs(feats[1]) if fp32 else None
    ptrs_abs = cross_device_max_abs(ptrs[1]) if fp32 else None
    assert_close(*feats, rel, feats_abs, "maskmem_features")
    assert_close(*ptrs, rel, ptrs_abs, "obj_ptr")
    assert torch.equal(*scores)
    assert (scores[1] < 0).any()  # object 7 is absent from odd frames
    assert oracle.rel_l2(got.pos_enc, want.pos_enc) <= 1e-6
