"""memenc.encoders against the reference oracle (Meta's SAM 2) with spread random weights."""

from __future__ import annotations

import http.server
import os
import threading
import zipfile
from pathlib import Path

import oracle
import pytest
import torch
import torch.nn.functional as F

from memenc.encoders import VARIANTS, hiera, load_model
from memenc.encoders.checkpoint import memenc_home
from memenc.errors import CheckpointError

REL, ABS = 1e-5, 1e-4  # DESIGN §3, fp32 compute and storage


def assert_close(mine: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """The DESIGN §3 bounds; returns the max abs error."""
    assert mine.shape == ref.shape, f"{what}: shape {tuple(mine.shape)} != {tuple(ref.shape)}"
    rel, mx = oracle.rel_l2(mine, ref), oracle.max_abs(mine, ref)
    assert rel <= REL and mx <= ABS, f"{what}: rel L2 {rel:.3g}, max abs {mx:.3g}"
    return mx


def make_inputs(s: int, seed: int = 0):
    """Two frames and three objects per frame, the masks at a resolution other than S
    (and another aspect ratio) so every resize path runs; object 2 is empty in frame 0, and
    object 1 is empty in frame 1."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (2, 3, s, s), generator=g, dtype=torch.uint8)
    h, w = 90, 120
    masks = torch.zeros(2, 3, h, w, dtype=torch.bool)
    masks[:, 0, 10:50, 20:70] = True
    masks[0, 1, 40:, :30] = True
    masks[1, 2] = torch.rand(h, w, generator=g) > 0.7
    logits = torch.randn(2, 3, h // 2, w // 2, generator=g) * 8
    logits[0, 1] = -torch.rand(h // 2, w // 2, generator=g) - 0.1  # all negative: absent
    return frames, masks, logits


def check_parity(ref, model, frames, masks, logits):
    s = model.image_size
    worst = 0.0
    pix = model.image_features(frames)
    out_bin = model.encode_memory(pix, masks)
    out_log = model.encode_memory(pix, logits)
    for i in range(frames.shape[0]):
        ref_pix, vision_feats, feat_sizes = oracle.reference_frame(ref, oracle.normalize(frames[i]))
        worst = max(worst, assert_close(pix[i], ref_pix[0], f"pix_feat frame {i}"))
        for o in range(masks.shape[1]):
            m = oracle.resize_binary(masks[i, o], s)
            score = 10.0 if m.any() else -10.0
            feats, pos = oracle.reference_memory(ref, vision_feats, feat_sizes, m * 20 - 10, score)
            assert float(out_bin.object_score_logits[i, o]) == score
            worst = max(
                worst,
                assert_close(
                    out_bin.features[i, o], feats, f"binary features frame {i} object {o}"
                ),
                assert_close(out_bin.pos_enc, pos, "pos_enc"),
            )

            lg = F.interpolate(
                logits[i, o][None, None], size=(s, s), mode="bilinear", align_corners=False
            )[0, 0]
            score = 10.0 if (lg > 0).any() else -10.0
            feats, _ = oracle.reference_memory(ref, vision_feats, feat_sizes, lg, score)
            assert float(out_log.object_score_logits[i, o]) == score
            worst = max(
                worst,
                assert_close(out_log.features[i, o], feats, f"logit features frame {i} object {o}"),
            )
    # the cases the inputs were built to cover did occur
    assert (out_bin.object_score_logits < 0).any() and (out_bin.object_score_logits > 0).any()
    assert (out_log.object_score_logits < 0).any() and (out_log.object_score_logits > 0).any()
    # On the CPU memenc runs the reference's kernels on the reference's layouts, one frame
    # per call, so the README's claim is stronger than the bounds: the numbers are identical.
    assert worst == 0.0, f"not bit-identical to the reference: max abs {worst:.3g}"


PARITY = [
    (v, s)
    for v in ("sam2.1_hiera_tiny", "sam2_hiera_small", "sam2.1_hiera_base_plus")
    for s in (256, 512)
]


@pytest.mark.parametrize(("variant", "size"), PARITY)
def test_parity_with_reference(ref_checkpoint, variant, size):
    ref, path = ref_checkpoint(variant, size)
    model = load_model(path, image_size=size)
    assert model.variant.name == variant and model.image_size == size
    check_parity(ref, model, *make_inputs(size))


@pytest.mark.slow
def test_parity_at_1024(ref_checkpoint):
    ref, path = ref_checkpoint("sam2.1_hiera_tiny", 1024)
    model = load_model(path)
    assert model.image_size == 1024
    frames, masks, logits = make_inputs(1024, seed=3)
    check_parity(ref, model, frames[:1], masks[:1], logits[:1])


@pytest.mark.parametrize("size", [512, 320])
def test_pieces_change_no_bits(monkeypatch, size):
    """The CPU runs the first stages' attention windows and MLP rows in pieces
    (hiera.PIECE_TOKENS); the features and memories are the whole-tensor path's bit for bit
    (that path is the reference's: test_pointers, test_bank). 320 pads the windows."""
    model = load_model(weights="random", seed=3, image_size=size)
    frames, masks, _ = make_inputs(size, seed=1)
    runs = []
    for piece in (hiera.PIECE_TOKENS, 10**9, 150):  # 150: the padded stage too
        monkeypatch.setattr(hiera, "PIECE_TOKENS", piece)
        pix = model.image_features(frames[:1])
        runs.append((pix, model.encode_memory(pix, masks[:1])))
    for pix, out in runs[1:]:
        assert torch.equal(pix, runs[0][0])
        assert torch.equal(out.features, runs[0][1].features)
        assert torch.equal(out.obj_ptr, runs[0][1].obj_ptr)


def test_the_position_embedding_is_made_once_and_anew_for_new_weights(monkeypatch):
    """Hiera's position embedding depends only on its two parameters and the map's size,
    so image_features makes it once; weights changed in place, or replaced, make it anew
    (the features then equal a fresh model's with those weights, bit for bit)."""
    model = load_model(weights="random", seed=3, image_size=256)
    other = load_model(weights="random", seed=4, image_size=256)
    trunk = model.image_encoder.trunk
    made = []
    make = trunk._make_pos_embed
    monkeypatch.setattr(trunk, "_make_pos_embed", lambda h, w: made.append((h, w)) or make(h, w))
    frames = make_inputs(256)[0]
    first = model.image_features(frames)
    assert torch.equal(model.image_features(frames), first)
    assert made == [(64, 64)]  # 2 frames, twice: made once

    with torch.no_grad():  # in place: the parameters' versions change
        trunk.pos_embed.copy_(other.image_encoder.trunk.pos_embed)
        trunk.pos_embed_window.copy_(other.image_encoder.trunk.pos_embed_window)
    changed = model.image_features(frames)
    assert len(made) == 2 and not torch.equal(changed, first)
    mixed = load_model(weights="random", seed=3, image_size=256)
    mixed.image_encoder.trunk.pos_embed = other.image_encoder.trunk.pos_embed
    mixed.image_encoder.trunk.pos_embed_window = other.image_encoder.trunk.pos_embed_window
    assert torch.equal(changed, mixed.image_features(frames))

    # replaced (as load_state_dict(assign=True) does): new tensors
    trunk.pos_embed = torch.nn.Parameter(first.new_zeros(trunk.pos_embed.shape))
    trunk.pos_embed_window = torch.nn.Parameter(first.new_zeros(trunk.pos_embed_window.shape))
    zeroed = model.image_features(frames)
    assert len(made) == 3 and not torch.equal(zeroed, changed)


def test_cpu_pieces_hold_no_whole_projection_and_one_frames_masks(monkeypatch):
    """On the CPU the stage transitions project their shortcut a band of rows at a time
    (at most PIECE_TOKENS tokens a call; whole, 16384 at 512) and encode_memory resizes
    and scales the masks of one frame at a time, not the batch's: the two places where a
    frame's live memory peaked at 1024. Their numbers are whole tensors' (above)."""
    model = load_model(weights="random", seed=3, image_size=512)
    trunk = model.image_encoder.trunk
    tokens: list[int] = []
    hooks = [
        block.proj.register_forward_hook(lambda m, i, o: tokens.append(i[0].shape[:-1].numel()))
        for block in trunk.blocks
        if block.dim != block.dim_out
    ]
    frames, masks, _ = make_inputs(512, seed=1)
    try:
        pix = model.image_features(frames)
    finally:
        for h in hooks:
            h.remove()
    transitions = sum(block.dim != block.dim_out for block in trunk.blocks)
    assert max(tokens) <= hiera.PIECE_TOKENS and len(tokens) > 2 * transitions  # two frames

    sizes: list[int] = []
    resize = model.mask_logits
    monkeypatch.setattr(model, "mask_logits", lambda m: sizes.append(m.shape[0]) or resize(m))
    out = model.encode_memory(pix, masks)
    assert sizes == [1, 1] and out.features.shape[:2] == (2, 3)


def test_cpu_blocks_write_into_the_running_map_and_keep_only_the_maps_read(monkeypatch):
    """On the CPU a windowed block that keeps the map's size writes its output into its
    input (Hiera's own running map), except the block after a stage's end, whose input
    is that stage's output; the image encoder keeps only the two maps its neck reads, and
    they are the full trunk's last two, bit for bit. The memory encoder's CXBlocks apply
    GELU in place (pwconv2 reads pwconv1's output tensor)."""
    model = load_model(weights="random", seed=3, image_size=512)
    trunk = model.image_encoder.trunk
    frames, masks, _ = make_inputs(512, seed=1)
    x = model._normalize(frames[:1])

    same: dict[int, bool] = {}
    pieces: set[int] = set()  # blocks whose map is run in pieces (PIECE_TOKENS)

    def watch(i):
        def hook(m, args, out):
            same[i] = out.data_ptr() == args[0].data_ptr()
            if args[0].shape[1:3].numel() > hiera.PIECE_TOKENS:
                pieces.add(i)

        return hook

    hooks = [b.register_forward_hook(watch(i)) for i, b in enumerate(trunk.blocks)]
    with torch.inference_mode():
        kept = trunk(x.clone(), coarsest=2)
        for h in hooks:
            h.remove()
        every = trunk(x.clone())
    writes = {
        i
        for i, b in enumerate(trunk.blocks)
        if i in pieces
        and b.window_size > 0
        and b.dim == b.dim_out
        and i - 1 not in trunk.stage_ends
    }
    assert 0 in writes and {i for i, w in same.items() if w} == writes
    assert len(kept) == 2 and len(every) == 4
    assert all(torch.equal(a, b) for a, b in zip(kept, every[2:]))

    made, read = [], []
    block = model.memory_encoder.fuser.layers[0]
    block.pwconv1.register_forward_hook(lambda m, a, out: made.append(out.data_ptr()))
    block.pwconv2.register_forward_pre_hook(lambda m, a: read.append(a[0].data_ptr()))
    model.encode_memory(model.image_features(frames[:1]), masks[:1])
    assert made and read == made


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_normalising_in_place_leaves_the_callers_frames_alone(dtype):
    """`_normalize` divides and subtracts in place once it holds its own copy: the numbers
    are the out-of-place formula's bit for bit, and float32 frames, which `.to` would not
    copy, are not changed."""
    model = load_model(weights="random", seed=3, image_size=256)
    frames = make_inputs(256)[0].to(dtype)
    before = frames.clone()
    got = model._normalize(frames)
    want = (before.to(torch.float32) / 255.0 - model.pixel_mean) / model.pixel_std
    assert torch.equal(got, want) and torch.equal(frames, before)


def test_frame_workers_change_no_bits():
    """On the CPU the frames of a batch run side by side on single-threaded workers
    (MemencModel.frame_workers), convolutions on the caller's thread count; features, scores
    and pointers are one frame at a time's bit for bit (that path is the reference's:
    test_pointers, test_bank), for more workers than frames too, and the caller's thread
    count is as it was. 320 pads the windows."""
    model = load_model(weights="random", seed=3, image_size=320)
    first, second = make_inputs(320, seed=1), make_inputs(320, seed=2)
    frames = torch.cat([first[0], second[0][:1]])
    masks = torch.cat([first[1], second[1][:1]])
    threads = torch.get_num_threads()
    seen: list[tuple[str, int]] = []
    hook = model.image_encoder.trunk.blocks[0].register_forward_hook(
        lambda *_: seen.append((threading.current_thread().name, torch.get_num_threads()))
    )
    runs = {}
    try:
        for workers in (1, 2, 4):
            seen.clear()
            model.set_frame_workers(workers)
            pix = model.image_features(frames)
            with_ptr = model.encode_memory(pix, masks)
            without = model.encode_memory(pix, masks, pointers=False)
            runs[workers] = (pix, with_ptr, without)
            assert torch.get_num_threads() == threads
            if workers == 1:
                assert seen == [(threading.current_thread().name, threads)] * 3
            else:  # each frame in a worker, on one thread
                assert [n.startswith("memenc-frame") and t == 1 for n, t in seen] == [True] * 3
    finally:
        hook.remove()
        model.set_frame_workers(None)
    pix, with_ptr, without = runs[1]
    for other in (runs[2], runs[4]):
        assert torch.equal(other[0], pix)
        for out, base in ((other[1], with_ptr), (other[2], without)):
            assert torch.equal(out.features, base.features)
            assert torch.equal(out.object_score_logits, base.object_score_logits)
        assert torch.equal(other[1].obj_ptr, with_ptr.obj_ptr) and other[2].obj_ptr is None


def test_frame_workers_only_where_a_frame_is_small():
    """Side by side only on the CPU, eager, outside autocast, with 2-4 threads and a
    stride-4 map of at most 8 MiB: S=512 for sam2.1 tiny, not 1024."""
    small = load_model(weights="random", seed=3, image_size=512)
    threads = torch.get_num_threads()
    assert small.frame_workers == (threads if 2 <= threads <= 4 else 1)
    assert load_model(weights="random", seed=3, image_size=1024).frame_workers == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert small.frame_workers == 1
    small.set_frame_workers(3)
    assert small.frame_workers == 3
    with pytest.raises(ValueError, match="at least 1"):
        small.set_frame_workers(0)


def test_bf16_autocast_keeps_the_reference_dtypes(ref_checkpoint):
    """Under bf16 autocast each Hiera block's output has the reference block's dtype (the
    residual sums stay float32: an in-place add into a bfloat16 attention output would
    narrow them), and the features stay within 1e-2 of the reference's bf16 ones."""
    ref, path = ref_checkpoint("sam2.1_hiera_tiny", 256)
    model = load_model(path, image_size=256)
    frames = make_inputs(256)[0][:1]
    dtypes: dict[str, list[torch.dtype]] = {"memenc": [], "reference": []}
    hooks = [
        block.register_forward_hook(lambda m, i, o, side=side: dtypes[side].append(o.dtype))
        for side, trunk in (("memenc", model.image_encoder.trunk), ("reference", ref.image_encoder.trunk))
        for block in trunk.blocks
    ]  # fmt: skip
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            ours = model.image_features(frames)
            theirs = ref.forward_image(oracle.normalize(frames))["vision_features"]
    finally:
        for h in hooks:
            h.remove()
    assert dtypes["memenc"] == dtypes["reference"] and torch.float32 in dtypes["memenc"]
    assert oracle.rel_l2(ours.float(), theirs.float()) <= 1e-2


def test_masks_at_model_size_are_used_as_given(ref_checkpoint):
    """A binary mask already at S×S is not resized (add_new_mask's other branch)."""
    ref, path = ref_checkpoint("sam2.1_hiera_tiny", 256)
    model = load_model(path, image_size=256)
    frames, _, _ = make_inputs(256)
    masks = torch.zeros(2, 2, 256, 256, dtype=torch.bool)
    masks[:, 0, 3:7, 5:6] = True  # tiny: would vanish if it were resized and thresholded
    pix = model.image_features(frames)
    out = model.encode_memory(pix, masks)
    _, vf, fs = oracle.reference_frame(ref, oracle.normalize(frames[0]))
    feats, _ = oracle.reference_memory(ref, vf, fs, masks[0, 0].float() * 20 - 10, 10.0)
    assert out.object_score_logits.tolist() == [[10.0, -10.0], [10.0, -10.0]]
    assert_close(out.features[0, 0], feats, "S×S mask")


def test_no_object_embedding_is_added_for_empty_masks_in_sam21_only(ref_checkpoint):
    ref, path = ref_checkpoint("sam2.1_hiera_tiny", 256)
    model = load_model(path, image_size=256)
    pix = model.image_features(make_inputs(256)[0][:1])
    empty = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    with_embed = model.encode_memory(pix, empty).features
    forced_present = model.encode_memory(
        pix, empty, object_score_logits=torch.tensor([[10.0]])
    ).features
    diff = (with_embed - forced_present)[0, 0]  # [64, h, w]: the embedding at every position
    expected = ref.no_obj_embed_spatial[0][:, None, None].expand_as(diff)
    assert_close(diff, expected, "no_obj_embed_spatial")
    assert float(ref.no_obj_embed_spatial.abs().max()) > 0.05  # spread, not the near-zero init


def test_random_weights_are_seeded_and_labelled():
    a = load_model(weights="random", seed=1, image_size=64)
    b = load_model(weights="random", seed=1, image_size=64)
    c = load_model(weights="random", seed=2, image_size=64)
    assert a.weights == "random" and a.variant.name == "sam2.1_hiera_tiny" and a.seed == 1
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["memory_encoder.out_proj.weight"], sc["memory_encoder.out_proj.weight"]
    )
    assert a.maskmem_tpos_enc.shape == (7, 1, 1, 64)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_checkpoints_load_strictly_and_variant_is_detected(tmp_path, variant):
    ref = oracle.reference_model(variant, 256)
    path = oracle.save_checkpoint(ref, tmp_path / "ckpt.pt")
    model = load_model(path, image_size=256)
    assert model.variant.name == variant
    assert model.weights == "checkpoint" and model.checkpoint == str(path)
    assert len(model.checkpoint_sha256) == 64
    ours = model.state_dict()
    theirs = ref.state_dict()
    assert ours.keys() <= theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(model.maskmem_tpos_enc, ref.maskmem_tpos_enc)
    assert (model.no_obj_embed_spatial is not None) == variant.startswith("sam2.1")
    # the pointer heads load from the official names; the heads that do not change the
    # pointer (mask upscaling with the high-resolution FPN projections, IoU head) do not
    for key in ("mask_downsample.weight", "obj_ptr_proj.layers.2.bias", "no_obj_ptr",
                "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                "sam_mask_decoder.pred_obj_score_head.layers.2.bias"):  # fmt: skip
        assert key in ours
    assert not any(
        k.startswith(("sam_mask_decoder.conv_s0", "sam_mask_decoder.iou_prediction")) for k in ours
    )
    # a bare state dict loads the same
    torch.save(theirs, tmp_path / "bare.pt")
    assert load_model(tmp_path / "bare.pt", image_size=256).variant.name == variant


def test_variant_can_be_forced_and_mismatch_is_named(ref_checkpoint):
    _, path = ref_checkpoint("sam2.1_hiera_tiny", 256)
    with pytest.raises(CheckpointError, match=r"sam2\.1_hiera_small.*missing keys"):
        load_model(path, variant="sam2.1_hiera_small", image_size=256)
    assert load_model(path, variant="tiny", image_size=256).variant.name == "sam2.1_hiera_tiny"


# ---- bad checkpoints ------------------------------------------------------------------


@pytest.fixture()
def good_state(ref_checkpoint):
    ref, _ = ref_checkpoint("sam2.1_hiera_tiny", 256)
    return ref.state_dict()


def test_truncated_checkpoint(tmp_path, ref_checkpoint):
    _, path = ref_checkpoint("sam2.1_hiera_tiny", 256)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable PyTorch checkpoint"):
        load_model(bad)


def test_checkpoint_missing_a_needed_key(tmp_path, good_state):
    state = dict(good_state)
    del state["memory_encoder.fuser.layers.1.gamma"]
    torch.save({"model": state}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "missing.pt")
    msg = str(e.value)
    assert "missing.pt" in msg and "memory_encoder.fuser.layers.1.gamma" in msg
    assert "sam2.1_hiera_tiny" in msg


def test_checkpoint_with_misshaped_key(tmp_path, good_state):
    state = dict(good_state)
    state["memory_encoder.out_proj.weight"] = torch.zeros(32, 256, 1, 1)
    torch.save({"model": state}, tmp_path / "shape.pt")
    with pytest.raises(
        CheckpointError,
        match=r"shape\.pt.*mis-shaped.*memory_encoder\.out_proj\.weight \(32, 256, 1, 1\)",
    ):
        load_model(tmp_path / "shape.pt")


@pytest.mark.parametrize(
    ("name", "content"),
    [("notes.pt", b"this is not a checkpoint\n"), ("empty.pt", b"")],
)
def test_file_that_is_not_a_checkpoint(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{name}: not a readable PyTorch checkpoint"):
        load_model(tmp_path / name)


def test_pickle_of_something_else_is_not_a_checkpoint(tmp_path):
    torch.save({"epoch": 3, "note": "hello"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: not a SAM 2 checkpoint"):
        load_model(tmp_path / "other.pt")
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:
        z.writestr("a.txt", "x")
    with pytest.raises(CheckpointError, match=r"zip\.pt"):
        load_model(tmp_path / "zip.pt")


def test_a_plain_pickle_is_named_without_torchs_warnings(tmp_path):
    """A pickle of objects that are not tensors (protocol 4, not torch.save's): before,
    torch's two-line UserWarning on pickle protocols was printed, then a message cut off
    mid-sentence. Nothing in it runs: memenc loads weights only."""
    import pickle
    import warnings

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    (tmp_path / "p.pt").write_bytes(pickle.dumps({"x": Payload()}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would fail the load instead
        with pytest.raises(CheckpointError, match=r"p\.pt: a pickle that holds more than "
                           r"tensors, not a SAM 2 checkpoint"):  # fmt: skip
            load_model(tmp_path / "p.pt")
    assert not marker.exists()


def test_unknown_name_is_neither_file_nor_official(tmp_path):
    with pytest.raises(CheckpointError, match=r"sam3_giant: no such file, and not an official"):
        load_model("sam3_giant")


# ---- official checkpoints by name, against a loopback server ---------------------------


class _Server:
    """A loopback HTTP server for checkpoint files; `truncate` sends half the bytes of a
    response while announcing all of them."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.hits, self.truncate = files, [], False
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if outer.truncate else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(ref_checkpoint, tmp_path, monkeypatch):
    _, path = ref_checkpoint("sam2.1_hiera_tiny", 256)
    srv = _Server({"/092824/sam2.1_hiera_tiny.pt": path.read_bytes()})
    monkeypatch.setenv("MEMENC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEMENC_CHECKPOINT_BASE_URL", srv.url)
    yield srv
    srv.close()


def test_official_name_is_downloaded_once_into_the_cache(server, ref_checkpoint):
    ref, path = ref_checkpoint("sam2.1_hiera_tiny", 256)
    seen = []
    model = load_model(
        "sam2.1_hiera_tiny", image_size=256, progress=lambda d, t: seen.append((d, t))
    )
    cached = memenc_home() / "checkpoints" / "sam2.1_hiera_tiny.pt"
    assert cached.read_bytes() == path.read_bytes()
    assert model.checkpoint == str(cached) and model.variant.name == "sam2.1_hiera_tiny"
    assert seen and seen[-1] == (path.stat().st_size, path.stat().st_size)
    assert torch.equal(model.memory_encoder.out_proj.weight, ref.memory_encoder.out_proj.weight)
    load_model("sam2.1_hiera_tiny", image_size=256)  # second use: from the cache
    assert server.hits == ["/092824/sam2.1_hiera_tiny.pt"]


def test_interrupted_download_leaves_no_file(server):
    server.truncate = True
    with pytest.raises(CheckpointError, match=r"sam2\.1_hiera_tiny\.pt: download interrupted"):
        load_model("sam2.1_hiera_tiny")
    folder = memenc_home() / "checkpoints"
    assert list(folder.iterdir()) == []
    server.truncate = False  # the next run downloads it whole
    assert load_model("sam2.1_hiera_tiny", image_size=256).variant.name == "sam2.1_hiera_tiny"


def test_missing_official_file_on_server(server):
    with pytest.raises(
        CheckpointError, match=r"sam2_hiera_large\.pt: download of sam2_hiera_large failed"
    ):
        load_model("sam2_hiera_large")
    assert not Path(memenc_home() / "checkpoints" / "sam2_hiera_large.pt").exists()


def test_the_model_holds_the_checkpoints_tensors_not_copies(ref_checkpoint, monkeypatch):
    """load_model assigns the loaded tensors to the model (no second copy of the weights
    while loading); a tensor of another dtype is converted to the model's float32."""
    import memenc.encoders as encoders

    _, path = ref_checkpoint("sam2.1_hiera_tiny", 256)
    loaded = {}
    real = encoders.read_state_dict

    def keep(p):
        state = real(p)
        state["obj_ptr_proj.layers.0.bias"] = state["obj_ptr_proj.layers.0.bias"].double()
        loaded.update(state)
        return state

    monkeypatch.setattr(encoders, "read_state_dict", keep)
    model = load_model(path, image_size=256)
    params = dict(model.named_parameters())
    same = [k for k, p in params.items() if p.data_ptr() == loaded[k].data_ptr()]
    assert len(same) == len(params) - 1
    bias = params["obj_ptr_proj.layers.0.bias"]
    assert bias.dtype == torch.float32 and "obj_ptr_proj.layers.0.bias" not in same
    assert torch.equal(bias, loaded["obj_ptr_proj.layers.0.bias"].float())


def _mapped_from(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map the file ``path`` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_a_zip_checkpoints_weights_stay_in_the_file_and_a_legacy_one_still_loads(
    ref_checkpoint, tmp_path
):
    """An official (zip-format) checkpoint is memory-mapped: every parameter of the loaded
    model lies in a mapping of the checkpoint file, not on the heap. A legacy-format file
    (which torch cannot map) loads through a plain read, to the same weights."""
    _, path = ref_checkpoint("sam2.1_hiera_tiny", 256)
    model = load_model(path, image_size=256)
    ranges = _mapped_from(path.resolve())
    assert ranges, "the checkpoint file is not mapped"
    params = dict(model.named_parameters())
    outside = [
        k for k, p in params.items() if not any(lo <= p.data_ptr() < hi for lo, hi in ranges)
    ]
    assert outside == []

    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(path, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    again = load_model(legacy, image_size=256)
    assert _mapped_from(legacy.resolve()) == []
    for k, p in dict(again.named_parameters()).items():
        assert torch.equal(p, params[k]), k
