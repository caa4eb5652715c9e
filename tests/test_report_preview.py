"""`describe_store` (memenc inspect) and `render_preview` (memenc preview).

Small stores throughout: T=6 frames, objects [1, 2], 4x4 features, F=4 frames per chunk
(2 chunks, the second short). The preview tests write a real 64x48 video of six solid
colours with PyAV and a folder of grey label PNGs, and point the store's attributes at
them, as `memenc encode` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import media
import numpy as np
import pytest
import zarr
from PIL import Image

from memenc.errors import StoreError, UsageError
from memenc.pipeline.preview import CAPTION_HEIGHT, PANEL_GAP, render_preview
from memenc.store import SCHEMA, CacheStore, StoreLayout, describe_store, fingerprint, open_cache

T, H, W, F = 6, 4, 4, 4
OBJECT_IDS = [1, 2]
VIDEO_W, VIDEO_H = 64, 48
PANEL_H = 96  # 2x the video: panel width 128, masks upscale exactly
PANEL_W = 128
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (200, 40, 200), (40, 200, 200)]  # fmt: skip
OBJECT_COLOURS = [(255, 64, 64), (64, 255, 64)]  # preview's colours for the 1st and 2nd object


# ----------------------------------------------------------------- inputs


def write_video(path: Path) -> Path:
    """Six frames, frame k a solid COLOURS[k] (H.264, so colours are close, not exact)."""
    frames = [np.full((VIDEO_H, VIDEO_W, 3), colour, np.uint8) for colour in COLOURS]
    return media.write_frames(path, frames, options={"crf": "10"})


def object_box(object_id: int, frame: int) -> tuple[slice, slice]:
    """Where object_id is in frame (rows, cols of the 64x48 video); object 1 moves right."""
    if object_id == 1:
        return slice(8, 24), slice(8 + 4 * frame, 24 + 4 * frame)
    return slice(30, 44), slice(40, 60)


def label_image(frame: int) -> np.ndarray:
    labels = np.zeros((VIDEO_H, VIDEO_W), np.uint8)
    for oid in OBJECT_IDS:
        labels[object_box(oid, frame)] = oid
    return labels


def write_masks(folder: Path) -> Path:
    folder.mkdir()
    for t in range(T):
        Image.fromarray(label_image(t)).save(folder / f"{t:05d}.png")
    return folder


def object_features(object_id: int) -> np.ndarray:
    """[64, H, W] rank-1 features: object 1 varies with x², object 2 with y² (exact in
    float16), so the first principal component is that square and the others are empty."""
    a = (np.arange(64) % 5 + 1).astype(np.float32) / 4
    ramp = np.arange(4, dtype=np.float32) ** 2
    grid = (
        np.broadcast_to(ramp, (H, W)) if object_id == 1 else np.broadcast_to(ramp[:, None], (H, W))
    )
    return a[:, None, None] * grid[None]


def layout(video: Path | None = None, masks: Path | None = None) -> StoreLayout:
    attrs = {
        "source_video": {
            "path": str(video or "/nonexistent/video.mp4"),
            "width": VIDEO_W,
            "height": VIDEO_H,
            "fps": 24.0,
            "frame_count": T,
            "codec": "h264",
            "backend": "pyav",
        },
        "masks": {
            "path": str(masks or "/nonexistent/masks"),
            "kind": "png",
            "object_ids": OBJECT_IDS,
        },
        "model": {"variant": "tiny", "image_size": 64, "weights": "random", "seed": 0},
    }
    rng = np.random.default_rng(0)
    return StoreLayout(
        num_frames=T,
        object_ids=OBJECT_IDS,
        feat_hw=(H, W),
        store_dtype="float16",
        chunk_frames=F,
        frame_index=np.arange(T, dtype=np.int64),
        pos_enc=rng.standard_normal((64, H, W)).astype(np.float32),
        tpos_enc=rng.standard_normal((7, 64)).astype(np.float32),
        attrs=attrs,
        fingerprint=fingerprint(attrs),
    )


@pytest.fixture
def written_store(tmp_path: Path):
    """Factory for a store at ``tmp_path/<name>`` whose every row holds `object_features`,
    its attributes pointing at `video` and `masks`; complete unless `chunks` (the chunks
    to write) is given. Returns the store's path."""

    def make(
        name: str = "v.zarr",
        video: Path | None = None,
        masks: Path | None = None,
        chunks: list[int] | None = None,
    ) -> Path:
        path = tmp_path / name
        store = CacheStore.prepare(path, layout(video, masks))
        feats = np.stack([object_features(oid) for oid in OBJECT_IDS])  # [O, 64, H, W]
        for chunk in range(store.num_chunks) if chunks is None else chunks:
            n = len(store.chunk_rows(chunk))
            scores = np.tile(np.array([10.0, -10.0], np.float32), (n, 1))
            pointers = np.full((n, len(OBJECT_IDS), 256), 0.5, np.float32)
            feats_n = np.broadcast_to(feats, (n, *feats.shape))
            store.write_chunk(chunk, feats_n, scores, np.arange(n) / 24, pointers)
        if chunks is None:
            store.finalize()
        return path

    return make


@pytest.fixture
def scene(tmp_path: Path, written_store) -> dict[str, Path]:
    video = write_video(tmp_path / "clip.mp4")
    masks = write_masks(tmp_path / "clip_masks")
    store = written_store("clip.zarr", video, masks)
    return {"video": video, "masks": masks, "store": store, "dir": tmp_path}


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def panels(png: Path) -> list[np.ndarray]:
    """The three panels of a preview, each [PANEL_H, PANEL_W, 3]."""
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (PANEL_H + CAPTION_HEIGHT, 3 * PANEL_W + 2 * PANEL_GAP, 3)
    step = PANEL_W + PANEL_GAP
    return [image[:PANEL_H, i * step : i * step + PANEL_W] for i in range(3)]


def panel_box(object_id: int, frame: int) -> np.ndarray:
    """bool [PANEL_H, PANEL_W]: where the object is in a panel (the video upscaled 2x)."""
    where = np.zeros((VIDEO_H, VIDEO_W), bool)
    where[object_box(object_id, frame)] = True
    return where.repeat(2, axis=0).repeat(2, axis=1)


# ----------------------------------------------------------------- describe_store


def test_describe_partial_store(written_store) -> None:
    path = written_store(chunks=[0])
    before = snapshot(path)
    info = describe_store(path)
    assert snapshot(path) == before  # read-only: nothing written, not even a lock file

    assert info["path"] == str(path)
    assert info["status"] == "in_progress"
    assert info["schema"] == SCHEMA
    assert info["fingerprint"] == layout().fingerprint
    assert (info["chunks_done"], info["chunks_total"], info["chunks_pending"]) == (1, 2, "1")
    assert info["num_frames"] == T and (info["frame_first"], info["frame_last"]) == (0, T - 1)
    assert info["object_ids"] == OBJECT_IDS
    assert info["problems"] == []
    assert info["attrs"] == zarr.open_group(path, mode="r").attrs["memenc"]
    assert info["attrs"]["source_video"]["frame_count"] == T

    arrays = {a["name"]: a for a in info["arrays"]}
    assert [a["name"] for a in info["arrays"]][:2] == ["maskmem_features", "maskmem_pos_enc"]
    assert set(arrays) == {
        "maskmem_features",
        "maskmem_pos_enc",
        "object_score_logits",
        "obj_ptr",
        "frame_index",
        "timestamp",
        "object_id",
        "maskmem_tpos_enc",
        "chunk_done",
    }
    ptr = arrays["obj_ptr"]
    assert ptr["dimension_names"] == ["frame", "object", "pointer_channel"]
    assert (ptr["shape"], ptr["chunks"], ptr["dtype"]) == ([T, 2, 256], [F, 2, 256], "float32")
    assert ptr["stored_chunks"] == 1  # chunk 0; chunk 1 not written
    feats = arrays["maskmem_features"]
    assert feats["dimension_names"] == ["frame", "object", "channel", "y", "x"]
    assert feats["shape"] == [T, 2, 64, H, W]
    assert feats["chunks"] == [F, 1, 64, H, W]
    assert feats["dtype"] == "float16"
    assert feats["codecs"] == ["bytes", "blosc", "crc32c"]
    assert feats["nbytes"] == T * 2 * 64 * H * W * 2
    assert feats["stored_chunks"] == 2  # chunk 0 of both objects; chunk 1 not written
    assert feats["stored_bytes"] > 0
    assert arrays["chunk_done"]["stored_chunks"] == 1
    assert arrays["object_score_logits"]["dtype"] == "float32"
    assert arrays["frame_index"]["dtype"] == "int64"
    assert arrays["object_id"]["dimension_names"] == ["object"]
    assert arrays["maskmem_tpos_enc"]["shape"] == [7, 64]
    assert all(a["stored_bytes"] > 0 for a in info["arrays"])
    assert info["size_on_disk"] > sum(a["stored_bytes"] for a in info["arrays"])  # + metadata
    json.dumps(info, allow_nan=False)  # JSON as it is, no default= needed


def test_describe_complete_store(written_store) -> None:
    path = written_store()
    info = describe_store(str(path))
    assert info["status"] == "complete"
    assert (info["chunks_done"], info["chunks_total"], info["chunks_pending"]) == (2, 2, "")
    feats = next(a for a in info["arrays"] if a["name"] == "maskmem_features")
    assert feats["stored_chunks"] == 4
    partial = describe_store(written_store("p.zarr", chunks=[0]))
    assert feats["stored_bytes"] > next(
        a["stored_bytes"] for a in partial["arrays"] if a["name"] == "maskmem_features"
    )
    assert json.loads(json.dumps(info)) == info


def test_inspect_into_a_closed_pipe_stops_quietly(written_store) -> None:
    """`memenc inspect s.zarr | head`: once the reader has gone, memenc stops without a
    traceback or an "internal error" line, with SIGPIPE's status (141)."""
    path = written_store()
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before memenc writes
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "memenc", "inspect", str(path)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


def test_describe_reports_unfinished_creation(written_store) -> None:
    path = written_store(chunks=[])
    group = zarr.open_group(path, mode="r+")
    group.attrs["memenc"] = {**group.attrs["memenc"], "status": "creating"}
    info = describe_store(path)
    assert info["status"] == "creating"
    assert info["chunks_done"] == 0
    assert any("did not finish" in p for p in info["problems"])


def test_describe_refuses_what_is_not_a_store(tmp_path: Path) -> None:
    missing = tmp_path / "missing.zarr"
    with pytest.raises(StoreError, match=r"missing\.zarr: not a memenc store \(no such file"):
        describe_store(missing)
    assert not missing.exists()  # never created

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match=r"empty: not a memenc store \(empty directory\)"):
        describe_store(empty)
    assert list(empty.iterdir()) == []

    file = tmp_path / "file.zarr"
    file.write_text("hello")
    with pytest.raises(StoreError, match="not a directory, so not a memenc store"):
        describe_store(file)

    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("x")
    with pytest.raises(StoreError, match="without zarr.json, not a memenc store"):
        describe_store(other)
    assert sorted(p.name for p in other.iterdir()) == ["a.txt"]

    plain = tmp_path / "plain.zarr"
    zarr.create_group(plain, zarr_format=3, attributes={"foo": 1})
    before = snapshot(plain)
    with pytest.raises(StoreError, match="not a memenc cache"):
        describe_store(plain)
    assert snapshot(plain) == before


@pytest.mark.parametrize("damage", ["{bad json", "[]", "null"])
@pytest.mark.parametrize("array", ["maskmem_features", "chunk_done"])
def test_damaged_array_metadata_is_named_not_a_crash(written_store, damage, array) -> None:
    """An array's zarr.json that is not JSON, or JSON that is not an object: reading and
    resuming refuse the store naming the array; inspect lists it as a problem."""
    from memenc import open_cache

    path = written_store(chunks=[0])  # in progress: no consolidated copy of the metadata
    (path / array / "zarr.json").write_text(damage)
    message = rf"malformed store: array '{array}' has unreadable metadata"
    with pytest.raises(StoreError, match=message):
        open_cache(path)
    with pytest.raises(StoreError, match=message):
        CacheStore.open_for_write(path)
    info = describe_store(path)
    assert any(f"'{array}' has unreadable metadata" in p for p in info["problems"])
    if damage != "{bad json":
        return
    shown = subprocess.run([sys.executable, "-m", "memenc", "inspect", str(path)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr == ""  # not asyncio's log of the listing's other tasks
    assert f"array '{array}' has unreadable metadata" in shown.stdout


def test_an_array_replaced_by_a_group_is_named_not_a_crash(written_store) -> None:
    """obj_ptr's zarr.json saying "group": before, AttributeError ('Group' object has no
    attribute 'chunks') from the reader, and 'internal error' from the CLI."""
    from memenc import open_cache

    path = written_store(chunks=[0])  # in progress: no consolidated copy of the metadata
    (path / "obj_ptr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    message = r"malformed store: 'obj_ptr' is a group, not an array"
    for read in (open_cache, CacheStore.open_for_write):
        with pytest.raises(StoreError, match=message):
            read(path)
    assert any("'obj_ptr' is a group" in p for p in describe_store(path)["problems"])


def _edit_record(path, edit) -> None:
    """Hand-edit the group's `memenc` attribute in its zarr.json (as a user might)."""
    meta = json.loads((path / "zarr.json").read_text())
    edit(meta["attributes"]["memenc"])
    (path / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(model="x"),
        lambda m: m.update(source_video=[1]),
        lambda m: m.update(frame_selection=5),
        lambda m: m.update(masks=7),
    ],
)
def test_inspect_shows_a_record_field_of_another_type_as_unknown(written_store, edit) -> None:
    """Before: 'internal error: AttributeError: 'str' object has no attribute 'get''."""
    path = written_store()
    _edit_record(path, edit)
    shown = subprocess.run([sys.executable, "-m", "memenc", "inspect", str(path)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    assert "status        complete" in shown.stdout


def test_a_nan_in_the_record_is_named(written_store) -> None:
    """JSON has no NaN, but Zarr reads one from zarr.json. Before: inspect failed with
    'internal error: ValueError: Out of range float values', the reader with a message
    naming no attribute."""
    from memenc import open_cache

    path = written_store()
    _edit_record(path, lambda m: m["source_video"].update(fps=float("nan")))
    message = r"malformed store: attribute source_video\.fps is nan"
    with pytest.raises(StoreError, match=message):
        open_cache(path)
    info = describe_store(path)
    assert info["attrs"]["source_video"]["fps"] is None
    assert [p for p in info["problems"] if "source_video.fps" in p]
    json.dumps(info, allow_nan=False)  # what `inspect --json` prints is JSON
    shown = subprocess.run([sys.executable, "-m", "memenc", "inspect", str(path), "--json"],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert shown.returncode == 0, shown.stderr


@pytest.mark.parametrize("text", ["null", "[1]", '"x"', "3"])
def test_group_metadata_that_is_not_an_object_is_named_damaged(written_store, text) -> None:
    path = written_store()
    (path / "zarr.json").write_text(text)
    for read in (describe_store, open_cache):
        with pytest.raises(StoreError, match=r"zarr.json is damaged \(not a JSON object\)$"):
            read(path)


# ----------------------------------------------------------------- render_preview


def test_preview_shows_the_chosen_frame_mask_and_features(scene: dict[str, Path]) -> None:
    out = scene["dir"] / "p3.png"
    assert render_preview(scene["store"], 3, out, object_id=1, panel_height=PANEL_H) == out
    frame_panel, mask_panel, pca_panel = panels(out)

    # (a) frame 3's colour everywhere (not a neighbour's: the colours are far apart)
    diff = np.abs(frame_panel.astype(int) - np.array(COLOURS[3])).max(axis=-1)
    assert diff.max() <= 12
    for k in (2, 4):
        assert np.abs(frame_panel.astype(int) - np.array(COLOURS[k])).max() > 100

    # (b) object 1's box at frame 3 in the first object's colour, the dimmed frame elsewhere
    box = panel_box(1, 3)
    is_colour = (mask_panel == OBJECT_COLOURS[0]).all(axis=-1)
    np.testing.assert_array_equal(is_colour, box)
    dimmed = np.round(frame_panel[~box].astype(np.float32) * 0.35).astype(np.uint8)
    np.testing.assert_array_equal(mask_panel[~box], dimmed)

    # (c) rank-1 features growing with x²: red goes 0 -> 255 along x, G and B mid-grey
    cells = pca_panel[:: PANEL_H // H, :: PANEL_W // W]  # one pixel per feature cell
    np.testing.assert_array_equal(cells[..., 0], np.broadcast_to([0, 28, 113, 255], (H, W)))
    assert (cells[..., 1:] == 128).all()
    assert (pca_panel[: PANEL_H // H, : PANEL_W // W] == cells[0, 0]).all()  # nearest upscale


def test_preview_default_object_and_second_object(scene: dict[str, Path]) -> None:
    first = render_preview(scene["store"], 3, scene["dir"] / "a.png", panel_height=PANEL_H)
    explicit = render_preview(scene["store"], 3, scene["dir"] / "b.png", 1, panel_height=PANEL_H)
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(explicit)))

    second = render_preview(scene["store"], 3, scene["dir"] / "c.png", 2, panel_height=PANEL_H)
    _, mask1, pca1 = panels(first)
    _, mask2, pca2 = panels(second)
    np.testing.assert_array_equal((mask2 == OBJECT_COLOURS[1]).all(axis=-1), panel_box(2, 3))
    assert not (mask1 == OBJECT_COLOURS[1]).all(axis=-1).any()
    assert not np.array_equal(pca1, pca2)
    cells = pca2[:: PANEL_H // H, :: PANEL_W // W]
    np.testing.assert_array_equal(cells[..., 0], np.broadcast_to([[0], [28], [113], [255]], (H, W)))


def test_preview_frame_decides_frame_and_mask(scene: dict[str, Path]) -> None:
    out = render_preview(scene["store"], 1, scene["dir"] / "p1.png", 1, panel_height=PANEL_H)
    frame_panel, mask_panel, _ = panels(out)
    assert np.abs(frame_panel.astype(int) - np.array(COLOURS[1])).max() <= 12
    np.testing.assert_array_equal((mask_panel == OBJECT_COLOURS[0]).all(axis=-1), panel_box(1, 1))


def test_preview_default_size_keeps_aspect(scene: dict[str, Path]) -> None:
    out = render_preview(scene["store"], 0, scene["dir"] / "big.png")
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (3 * 341 + 2 * PANEL_GAP, 256 + CAPTION_HEIGHT)  # 256 * 64/48


def test_preview_without_video_or_masks_draws_grey_panels(scene: dict[str, Path]) -> None:
    scene["video"].unlink()
    out = render_preview(scene["store"], 3, scene["dir"] / "nv.png", 1, panel_height=PANEL_H)
    frame_panel, mask_panel, _ = panels(out)
    grey = (frame_panel == 128).all(axis=-1)
    assert grey[:10].all() and grey[-10:].all()  # grey, with text in the middle
    assert not grey.all()
    # the mask is still shown, over black instead of the frame
    np.testing.assert_array_equal((mask_panel == OBJECT_COLOURS[0]).all(axis=-1), panel_box(1, 3))
    assert (mask_panel[~panel_box(1, 3)] == 0).all()

    for png in scene["masks"].iterdir():
        png.unlink()
    out = render_preview(scene["store"], 3, scene["dir"] / "nm.png", 1, panel_height=PANEL_H)
    _, mask_panel, _ = panels(out)
    grey = (mask_panel == 128).all(axis=-1)
    assert grey[:10].all() and not grey.all()


def test_preview_of_unreadable_video(scene: dict[str, Path]) -> None:
    scene["video"].write_bytes(b"not a video at all" * 100)
    out = render_preview(scene["store"], 2, scene["dir"] / "bad.png", panel_height=PANEL_H)
    frame_panel, mask_panel, _ = panels(out)
    assert (frame_panel[:10] == 128).all()
    np.testing.assert_array_equal((mask_panel == OBJECT_COLOURS[0]).all(axis=-1), panel_box(1, 2))


def test_preview_of_logit_masks(tmp_path: Path, written_store) -> None:
    video = write_video(tmp_path / "clip.mp4")
    logits = np.full((T, 2, VIDEO_H, VIDEO_W), -5.0, np.float32)
    for t in range(T):
        for o, oid in enumerate(OBJECT_IDS):
            logits[(t, o, *object_box(oid, t))] = 3.0
    np.save(tmp_path / "logits.npy", logits)
    store = written_store("v.zarr", video, tmp_path / "logits.npy")
    out = render_preview(store, 4, tmp_path / "l.png", 2, panel_height=PANEL_H)
    _, mask_panel, _ = panels(out)
    np.testing.assert_array_equal((mask_panel == OBJECT_COLOURS[1]).all(axis=-1), panel_box(2, 4))


def test_preview_errors(scene: dict[str, Path]) -> None:
    store, folder = scene["store"], scene["dir"]
    with pytest.raises(StoreError, match=r"frame 17 is not in the store \(6 frames from 0 to 5\)"):
        render_preview(store, 17, folder / "x.png")
    with pytest.raises(StoreError, match=r"object 9 is not in the store \(objects \[1, 2\]\)"):
        render_preview(store, 0, folder / "x.png", object_id=9)
    with pytest.raises(StoreError, match=r"no-such-dir/x\.png: cannot write the preview"):
        render_preview(store, 0, folder / "no-such-dir" / "x.png")
    (folder / "taken.png").mkdir()
    with pytest.raises(StoreError, match="cannot write the preview"):
        render_preview(store, 0, folder / "taken.png")  # a directory
    with pytest.raises(UsageError, match=r"x\.jpg: the preview is a PNG"):
        render_preview(store, 0, folder / "x.jpg")  # PNG bytes under another name
    with pytest.raises(UsageError, match="the preview is a PNG"):
        render_preview(store, 0, folder)  # no suffix at all
    with pytest.raises(StoreError, match="no memenc store here"):
        render_preview(folder / "absent.zarr", 0, folder / "x.png")
    assert not (folder / "x.png").exists()
    assert not list(folder.glob("*.partial"))


def test_preview_of_unwritten_chunk(tmp_path: Path, written_store) -> None:
    store = written_store(chunks=[0])
    out = render_preview(store, 3, tmp_path / "ok.png", panel_height=PANEL_H)  # chunk 0: fine
    assert out.is_file()
    with pytest.raises(StoreError, match=r"row 4 \(frame 4\) is in chunk 1, which is not written"):
        render_preview(store, 4, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
