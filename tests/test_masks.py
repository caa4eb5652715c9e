"""Tests for memenc.pipeline.masks: every mask format, RLE decoding, validation errors."""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from media import write_frames, write_label_video
from PIL import Image

from memenc.errors import MaskError, UsageError, VideoDecodeError
from memenc.pipeline.masks import (
    MaskSource,
    conventional_mask_paths,
    decode_rle,
    find_masks_beside,
    open_masks,
    rle_string_to_counts,
)
from memenc.pipeline.selection import parse_objects
from memenc.pipeline.video import process as vprocess

# Masks at 24x16; the video is 48x32 (same aspect ratio, another resolution).
T, H, W = 12, 16, 24
VIDEO = {"video_frame_count": T, "video_width": 48, "video_height": 32}
STEP = 4  # SA-V: annotation k is video frame 4k
ANNOTATED = [0, 4, 8]


def make_labels() -> np.ndarray:
    """[T, H, W] uint8 labels with objects 3 and 7; 7 is absent in frames 0, 3, 6, 9."""
    labels = np.zeros((T, H, W), np.uint8)
    for t in range(T):
        labels[t, 2 + t % 3 : 9, 3 : 10 + t % 4] = 3
        if t % 3:
            labels[t, 8:14, 10 + t % 5 : 18 + t % 5] = 7
    return labels


def expected_masks(labels: np.ndarray, ids: list[int]) -> torch.Tensor:
    return torch.from_numpy(labels[:, None] == np.array(ids)[None, :, None, None])


# --------------------------------------------------------------------------- fixture writers


def counts_to_string(counts: list[int]) -> str:
    """COCO compressed RLE string of run lengths (the encoder the decoder inverts)."""
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def rle_counts(mask: np.ndarray) -> list[int]:
    flat = mask.T.ravel().astype(np.int8)  # column-major
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def rle_encode(mask: np.ndarray) -> dict:
    return {"size": list(mask.shape), "counts": counts_to_string(rle_counts(mask))}


def write_png_folder(folder: Path, labels: np.ndarray, skip: tuple[int, ...] = ()) -> Path:
    folder.mkdir()
    palette = [v for i in range(256) for v in (i * 37 % 256, i * 91 % 256, i * 53 % 256)]
    for t, frame in enumerate(labels):
        if t in skip:
            continue
        image = Image.frombytes("P", (frame.shape[1], frame.shape[0]), frame.tobytes())
        image.putpalette(palette)
        image.save(folder / f"{t:05d}.png")
    return folder


def write_grey_pngs(folder: Path, frames: np.ndarray) -> Path:
    folder.mkdir()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{t:05d}.png")
    return folder


def write_npz_booleans(path: Path, labels: np.ndarray, compressed: bool) -> Path:
    # channels deliberately in the order 7, 3: object_ids says which is which
    masks = np.stack([labels == 7, labels == 3], axis=1)
    save = np.savez_compressed if compressed else np.savez
    save(path, masks=masks, object_ids=np.array([7, 3], np.int32))
    return path


def sav_json(labels: np.ndarray, step: int = STEP, **extra) -> dict:
    annotated = labels[::step]
    return {
        "masklet": [[rle_encode(frame == 3), rle_encode(frame == 7)] for frame in annotated],
        "masklet_id": [3, 7],
        "video_frame_count": len(annotated) * step,
        **extra,
    }


def write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def write_all(tmp_path: Path, labels: np.ndarray) -> dict[str, Path]:
    """The same masks in every format."""
    return {
        "png": write_png_folder(tmp_path / "clip_masks", labels),
        "video": write_label_video(tmp_path / "masks.mkv", labels),
        "npy": _save_npy(tmp_path / "labels.npy", labels),
        "npz": write_npz_booleans(tmp_path / "masks.npz", labels, compressed=True),
        "npz-stored": write_npz_booleans(tmp_path / "stored.npz", labels, compressed=False),
        "sav-json": write_json(tmp_path / "clip_manual.json", sav_json(labels)),
    }


def _save_npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


@pytest.fixture
def labels() -> np.ndarray:
    return make_labels()


@pytest.fixture
def paths(tmp_path: Path, labels: np.ndarray) -> dict[str, Path]:
    return write_all(tmp_path, labels)


# --------------------------------------------------------------------------- same masks, every format


def test_every_format_reads_the_same_masks(paths, labels):
    expected = expected_masks(labels, [3, 7])
    assert not expected[0, 1].any() and expected[4, 1].any()  # 7 is absent in some frames
    kinds = {"png": "png", "video": "video", "npy": "npy", "npz": "npz", "npz-stored": "npz"}
    for name, path in paths.items():
        source = open_masks(path, **VIDEO)
        assert isinstance(source, MaskSource)
        assert source.object_ids == [3, 7], name
        assert source.is_logits is False
        assert (source.height, source.width) == (H, W)
        assert source.kind == kinds.get(name, name)
        got = source.read(ANNOTATED)
        assert got.dtype == torch.bool and got.shape == (3, 2, H, W), name
        assert torch.equal(got, expected[ANNOTATED]), name
        if name != "sav-json":
            assert source.annotated_frames is None
            assert torch.equal(source.read(range(T)), expected), name
        source.close()


def test_sav_json_step_and_annotated_frames(paths, labels):
    source = open_masks(paths["sav-json"], **VIDEO)
    assert source.kind == "sav-json"
    assert source.annotated_frames == ANNOTATED
    assert source.to_attrs()["frame_step"] == STEP
    assert source.has_mask(4) and not source.has_mask(5)
    with pytest.raises(MaskError, match=r"clip_manual\.json: frame 5 has no annotation"):
        source.read([4, 5])


@pytest.mark.parametrize("name", ["png", "video", "npy", "npz", "npz-stored", "sav-json"])
def test_read_any_order_with_repeats_and_objects_selection(paths, labels, name):
    source = open_masks(paths[name], objects=[7, 3], **VIDEO)
    assert source.object_ids == [7, 3]
    frames = [8, 0, 8, 4]
    got = source.read(frames)
    assert torch.equal(got, expected_masks(labels, [7, 3])[frames])
    # and again, after the reader moved on (the video restarts its decoder)
    assert torch.equal(source.read([0]), expected_masks(labels, [7, 3])[[0]])
    assert source.read([]).shape == (0, 2, H, W)


@pytest.mark.parametrize("name", ["png", "video", "npy", "npz", "sav-json"])
def test_unknown_object_id_lists_the_ids(paths, name):
    with pytest.raises(MaskError) as info:
        open_masks(paths[name], objects=[3, 9], **VIDEO)
    message = str(info.value)
    assert paths[name].name in message and "9" in message and "ids present: 3, 7" in message


def test_an_object_id_past_32_bits_is_refused_naming_the_file(tmp_path):
    labels = np.zeros((T, 32, 48), np.int64)
    labels[:, 4:9, 4:9] = 2**40
    labels[:, 20:25, 20:25] = 3
    path = tmp_path / "big_ids.npy"
    np.save(path, labels)
    with pytest.raises(MaskError, match=r"big_ids\.npy: object id 1099511627776 does not fit"):
        open_masks(path, **VIDEO)
    labels[:, 4:9, 4:9] = 2**31 - 1  # the largest int32 is fine
    np.save(path, labels)
    assert open_masks(path, **VIDEO).object_ids == [3, 2**31 - 1]


@pytest.mark.parametrize("name", ["video", "npz", "npz-stored"])
def test_sources_pickle_without_open_handles(paths, labels, name):
    source = open_masks(paths[name], **VIDEO)
    source.read([2])  # opens a decoder / memory map
    clone = pickle.loads(pickle.dumps(source))
    assert torch.equal(clone.read([5, 1]), expected_masks(labels, [3, 7])[[5, 1]])


def test_to_attrs_is_json_safe(paths):
    for name, path in paths.items():
        attrs = open_masks(path, **VIDEO).to_attrs()
        assert json.loads(json.dumps(attrs)) == attrs, name
        assert attrs["object_ids"] == [3, 7] and attrs["is_logits"] is False
        assert Path(attrs["path"]).is_absolute() and Path(attrs["path"]).name == path.name


# --------------------------------------------------------------------------- binary masks and logits


def test_binary_0_255_pngs_are_object_1(tmp_path, labels):
    binary = np.where(labels == 3, 255, 0).astype(np.uint8)
    binary[1] = 0  # an empty frame
    source = open_masks(write_grey_pngs(tmp_path / "m", binary), **VIDEO)
    assert source.object_ids == [1]
    assert torch.equal(source.read(range(T)), torch.from_numpy(binary[:, None] == 255))


def test_binary_0_255_mask_video_is_object_1(tmp_path, labels):
    binary = np.where(labels == 7, 255, 0).astype(np.uint8)
    source = open_masks(write_label_video(tmp_path / "m.mkv", binary), **VIDEO)
    assert source.object_ids == [1]
    assert torch.equal(source.read([4, 5]), torch.from_numpy(binary[[4, 5], None] == 255))


def test_grey_rgb_png_is_accepted_colour_png_is_not(tmp_path, labels):
    folder = tmp_path / "rgb"
    folder.mkdir()
    for t, frame in enumerate(labels):
        Image.fromarray(np.repeat(frame[..., None], 3, axis=2)).save(folder / f"{t:05d}.png")
    assert open_masks(folder, **VIDEO).object_ids == [3, 7]
    colour = np.zeros((H, W, 3), np.uint8)
    colour[2:5, 2:5] = (200, 0, 0)
    Image.fromarray(colour).save(folder / "00003.png")
    with pytest.raises(MaskError, match=r"00003\.png: a colour \(RGB\) PNG"):
        open_masks(folder, **VIDEO)


def test_png_scan_reports_the_first_bad_file_in_frame_order(tmp_path, labels):
    """The opening scan reads files in threads; the error is still the first bad frame's,
    however the reads finish (here a later file fails faster: a tiny grey PNG)."""
    folder = write_png_folder(tmp_path / "pngs", labels)
    colour = np.zeros((H, W, 3), np.uint8)
    colour[2:5, 2:5] = (200, 0, 0)
    Image.fromarray(colour).save(folder / "00002.png")
    Image.new("L", (W * 2, H * 2)).save(folder / "00005.png")
    Image.new("L", (2, 2)).save(folder / "00009.png")
    for _ in range(5):
        with pytest.raises(MaskError, match=r"00002\.png: a colour \(RGB\) PNG"):
            open_masks(folder, **VIDEO)


def test_float_logits_npy(tmp_path):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(T, 2, H, W)).astype(np.float16)
    source = open_masks(_save_npy(tmp_path / "logits.npy", logits), **VIDEO)
    assert source.is_logits is True
    assert source.object_ids == [1, 2]
    got = source.read([3, 0])
    assert got.dtype == torch.float32 and got.shape == (2, 2, H, W)
    assert torch.equal(got, torch.from_numpy(logits[[3, 0]].astype(np.float32)))
    assert source.to_attrs()["layout"] == "logits"


@pytest.mark.parametrize("bad, named", [(np.nan, "NaN"), (np.inf, "an infinity"),
                                        (-np.inf, "an infinity")])  # fmt: skip
def test_logits_with_nan_or_inf_name_the_frame(tmp_path, bad, named):
    """Non-finite logits are refused naming the mask file (±inf came out of the mask's
    resize as NaN features, blamed on the model)."""
    logits = np.zeros((T, 1, H, W), np.float32)
    logits[6, 0, 3, 3] = bad
    source = open_masks(_save_npy(tmp_path / "logits.npy", logits), **VIDEO)
    assert source.read([5]).shape == (1, 1, H, W)
    with pytest.raises(MaskError, match=rf"logits\.npy: frame 6: the logits contain {named}; "):
        source.read([5, 6])


def test_npz_object_ids_beside_label_images_are_refused(tmp_path, labels):
    """[T, H, W] labels carry their ids as values: object_ids beside them would be dropped."""
    path = tmp_path / "m.npz"
    np.savez(path, labels=labels, object_ids=np.array([5, 9]))
    with pytest.raises(
        MaskError, match=r"m\.npz\[labels\]: an object_ids array beside \[T, H, W\] labels"
    ):
        open_masks(path, **VIDEO)


def test_npz_picks_the_named_array_and_numbers_objects_from_1(tmp_path, labels):
    masks = np.stack([labels == 3, labels == 7], axis=1)
    path = tmp_path / "m.npz"
    np.savez(path, other=np.zeros(3), masks=masks)
    source = open_masks(path, **VIDEO)
    assert source.object_ids == [1, 2]
    assert source.to_attrs()["array"] == "masks"
    assert torch.equal(source.read([4]), torch.from_numpy(masks[[4]]))


# --------------------------------------------------------------------------- RLE


def test_rle_decode_hand_computed_examples():
    # mask [[0,1],[1,1],[0,0]]: column-major 0,1,0 | 1,1,0 -> runs 1,1,1,2,1
    # run 4 is stored as 2 - run 2 = 1, run 5 as 1 - run 3 = 0: "11110"
    assert rle_string_to_counts("11110") == [1, 1, 1, 2, 1]
    mask = decode_rle({"size": [3, 2], "counts": "11110"})
    assert mask.dtype == np.bool_
    assert mask.tolist() == [[False, True], [True, True], [False, False]]
    # 40 = 0b1_01000 -> "X" (8 | 0x20 more) then "1"; the 4th run 1 is stored as
    # 1 - 3 = -2 -> 0b11110 -> "N"
    assert rle_string_to_counts("X132N") == [40, 3, 2, 1]
    assert rle_string_to_counts(b"X132N") == [40, 3, 2, 1]
    expected = np.zeros((23, 2), bool)
    expected[[17, 18, 19, 22], 1] = True
    assert np.array_equal(decode_rle({"size": [23, 2], "counts": "X132N"}), expected)
    assert np.array_equal(decode_rle({"size": [23, 2], "counts": [40, 3, 2, 1]}), expected)
    assert counts_to_string([40, 3, 2, 1]) == "X132N"  # the test encoder agrees


def test_rle_round_trips_random_masks():
    rng = np.random.default_rng(0)
    cases = [np.zeros((5, 7), bool), np.ones((4, 9), bool)]
    for _ in range(30):
        h, w = rng.integers(1, 70, size=2)
        if rng.random() < 0.5:
            cases.append(rng.random((h, w)) < rng.random())
        else:  # a few blocks: long runs, multi-character counts, negative deltas
            mask = np.zeros((h, w), bool)
            for _ in range(rng.integers(1, 5)):
                y, x = rng.integers(0, h), rng.integers(0, w)
                mask[y : y + rng.integers(1, h + 1), x : x + rng.integers(1, w + 1)] = True
            cases.append(mask)
    for mask in cases:
        rle = rle_encode(mask)
        assert rle_string_to_counts(rle["counts"]) == rle_counts(mask)
        assert np.array_equal(decode_rle(rle), mask)


@pytest.mark.parametrize(
    "rle",
    [
        {"size": [3, 2], "counts": "1111"},  # covers 4 pixels, not 6
        {"size": [3, 2], "counts": "11\x7f"},  # invalid character
        {"size": [3, 2], "counts": "1X"},  # ends inside a run length
        {"size": [3], "counts": "11110"},
        {"size": [3, 2], "counts": 5},
        {"size": [3, 2], "counts": [True, 5]},  # a boolean is no run length
        {"size": [3, 2], "counts": [2**70]},  # too long for int64: no OverflowError
        {"size": [3, 2], "counts": [2**70, 6 - 2**70]},
        {"size": [3, 2], "counts": "o" * 40 + "0"},  # the same, compressed
    ],
)
def test_rle_decode_rejects_malformed(rle):
    with pytest.raises(ValueError):
        decode_rle(rle)


def test_bad_rle_in_sav_json_names_frame_and_object(tmp_path, labels):
    doc = sav_json(labels)
    doc["masklet"][1][1]["counts"] = "1111"
    source = open_masks(write_json(tmp_path / "v_manual.json", doc), **VIDEO)
    assert source.read([0]).shape == (1, 2, H, W)
    with pytest.raises(MaskError, match=r"v_manual\.json: frame 4 \(annotation 1\), object 7"):
        source.read([4])


# --------------------------------------------------------------------------- validation errors


def test_frame_count_mismatch_is_an_error(tmp_path, labels):
    bad = {
        "npy": _save_npy(tmp_path / "short.npy", labels[:11]),
        "npz": write_npz_booleans(tmp_path / "short.npz", labels[:11], compressed=True),
        "video": write_label_video(tmp_path / "short.mkv", labels[:11]),
        "sav-json": write_json(
            tmp_path / "long_manual.json", sav_json(np.concatenate([labels, labels[:4]]))
        ),
    }
    for path in bad.values():
        with pytest.raises(MaskError, match=rf"{path.name}.*(frames|video_frame_count)"):
            open_masks(path, **VIDEO)
    folder = write_png_folder(tmp_path / "pngs", labels)
    Image.frombytes("P", (W, H), labels[0].tobytes()).save(folder / "00012.png")
    with pytest.raises(
        MaskError, match=r"00012\.png: mask for frame 12, but the video has 12 frames"
    ):
        open_masks(folder, **VIDEO)


def test_missing_png_is_reported_when_its_frame_is_read(tmp_path, labels):
    folder = write_png_folder(tmp_path / "pngs", labels, skip=(5,))
    source = open_masks(folder, **VIDEO)
    assert torch.equal(source.read([4, 6]), expected_masks(labels, [3, 7])[[4, 6]])
    assert not source.has_mask(5)
    with pytest.raises(MaskError, match=r"pngs: no mask file for frame 5"):
        source.read([4, 5])


def test_frame_outside_the_video_is_an_error(paths):
    source = open_masks(paths["npy"], **VIDEO)
    with pytest.raises(MaskError, match=r"labels\.npy: frame 12 is outside the video"):
        source.read([12])
    with pytest.raises(MaskError, match=r"frame -1 is outside"):
        source.read([-1])


def test_aspect_ratio(tmp_path):
    hd = {"video_frame_count": 2, "video_width": 1920, "video_height": 1080}
    close = np.zeros((2, 56, 100), np.uint8)  # 1.786 vs 1.778: 0.45% off, fine
    close[:, 3, 3] = 1
    assert open_masks(_save_npy(tmp_path / "close.npy", close), **hd).object_ids == [1]
    off = np.ones((2, 57, 100), np.uint8)  # 1.754: 1.3% off
    with pytest.raises(
        MaskError, match=r"off\.npy: mask size 100x57 .* does not match the video's 1920x1080"
    ):
        open_masks(_save_npy(tmp_path / "off.npy", off), **hd)


@pytest.mark.parametrize("name", ["png", "video", "sav-json", "npz"])
def test_aspect_ratio_every_format(tmp_path, name):
    square = np.zeros((T, 16, 16), np.uint8)
    square[:, 2:5, 2:5] = 3
    writers = {
        "png": lambda: write_png_folder(tmp_path / "sq", square),
        "video": lambda: write_label_video(tmp_path / "sq.mkv", square),
        "sav-json": lambda: write_json(tmp_path / "sq.json", sav_json(square)),
        "npz": lambda: write_npz_booleans(tmp_path / "sq.npz", square, compressed=True),
    }
    path = writers[name]()
    with pytest.raises(MaskError, match=rf"{path.name}.*16x16.*does not match"):
        open_masks(path, **VIDEO)


def test_png_sizes_must_agree(tmp_path, labels):
    folder = write_png_folder(tmp_path / "pngs", labels)
    Image.new("P", (W * 2, H * 2)).save(folder / "00007.png")
    with pytest.raises(MaskError, match=r"00007\.png: size 48x32 differs from 00000\.png"):
        open_masks(folder, **VIDEO)


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((T, H, W), np.float32), "dtype float32 for shape"),
        (np.zeros((T, 2, H, W), np.uint8), "expected bool masks or float logits"),
        (np.zeros((T, H), np.uint8), "expected \\[T, H, W\\] labels"),
        (np.zeros((T, 0, H, W), bool), "no objects"),
        (np.zeros((T, H, W), np.uint8), "every mask is empty"),
        (np.full((T, H, W), -2, np.int16), "negative label"),
    ],
)
def test_bad_arrays(tmp_path, array, problem):
    path = _save_npy(tmp_path / "bad.npy", array)
    with pytest.raises(MaskError, match=rf"bad\.npy: .*{problem}"):
        open_masks(path, **VIDEO)


def test_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}] * T, dtype=object), allow_pickle=True)
    with pytest.raises(MaskError, match=r"objects\.npy: not a readable \.npy"):
        open_masks(path, **VIDEO)


def test_bad_npz_object_ids(tmp_path, labels):
    masks = np.stack([labels == 3, labels == 7], axis=1)
    for name, ids in {"dup": [3, 3], "short": [3], "neg": [-1, 2]}.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, masks=masks, object_ids=np.array(ids))
        with pytest.raises(MaskError, match=rf"{name}\.npz\[masks\]: .*object_ids"):
            open_masks(path, **VIDEO)


def test_unknown_unreadable_and_empty_inputs(tmp_path, labels):
    garbage = tmp_path / "masks.bin"
    garbage.write_bytes(b"\x00\x01 definitely not a video " * 20)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no masks here")
    single = tmp_path / "00000.png"
    Image.frombytes("P", (W, H), labels[0].tobytes()).save(single)
    cases = {
        garbage: "unknown mask format",
        tmp_path / "missing.npy": "no such file or folder",
        empty: "no .png mask files",
        single: "a single image",
        write_json(tmp_path / "x.json", {"masks": []}): "not an SA-V annotation file",
        write_json(tmp_path / "y.json", {"masklet": []}): "no annotated frames",
    }
    broken_json = tmp_path / "broken_manual.json"
    broken_json.write_text('{"masklet": [')
    cases[broken_json] = "not valid JSON"
    broken_npz = tmp_path / "broken.npz"
    broken_npz.write_bytes(b"PK\x03\x04 but not really a zip")
    cases[broken_npz] = "not a readable .npz"
    broken_png = write_png_folder(tmp_path / "broken_png", labels[:2])
    (broken_png / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cases[broken_png / "00001.png"] = "cannot read PNG"
    for path, problem in cases.items():
        with pytest.raises(MaskError) as info:
            open_masks(path.parent if path.name == "00001.png" else path, **VIDEO)
        message = str(info.value)
        assert message.startswith(str(path)) and problem in message, message
        assert "\n" not in message


def test_sav_json_nested_too_deeply_is_named(tmp_path):
    path = tmp_path / "deep_manual.json"
    path.write_text('{"masklet": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(MaskError, match=r"deep_manual\.json: .*nested too deeply"):
        open_masks(path, **VIDEO)


def test_sav_json_structure_errors(tmp_path, labels):
    doc = sav_json(labels)
    doc["masklet"][2] = doc["masklet"][2][:1]
    with pytest.raises(MaskError, match=r"a_manual\.json: annotation 2 has 1 objects"):
        open_masks(write_json(tmp_path / "a_manual.json", doc), **VIDEO)
    doc = sav_json(labels)
    doc["masklet_id"] = [3, 3]
    with pytest.raises(MaskError, match=r"b_manual\.json: 'masklet_id' must be"):
        open_masks(write_json(tmp_path / "b_manual.json", doc), **VIDEO)
    # 6 annotations at step 4 would need frames 0..20, the video has 9
    doc = sav_json(labels)
    del doc["video_frame_count"]
    doc["masklet"] = doc["masklet"] * 2
    with pytest.raises(MaskError, match=r"c_manual\.json: 6 annotations do not fit"):
        open_masks(write_json(tmp_path / "c_manual.json", doc), **{**VIDEO, "video_frame_count": 9})


def test_sav_json_sizes_too_large_or_not_positive_name_their_object(tmp_path, labels):
    """A few hundred bytes of RLE can declare masks of 60000x80000 (the video's aspect
    ratio): refused as PNGs of that size are, before any plane is made. A bad size on
    the first object is named there, not as a mismatch blamed on the next one."""
    h, w = 60000, 80000
    doc = sav_json(labels)
    for annotation in doc["masklet"]:
        for rle in annotation:
            rle["size"], rle["counts"] = [h, w], [h * w]
    path = write_json(tmp_path / "bomb_manual.json", doc)
    with pytest.raises(MaskError, match=r"bomb_manual\.json: annotation 0, object 3: RLE 'size' "
                       r"80000x60000 is too large to read safely"):  # fmt: skip
        open_masks(path, **VIDEO)
    for bad in ([0, 0], [-6, -8]):
        doc = sav_json(labels)
        doc["masklet"][0][0]["size"] = bad
        path = write_json(tmp_path / "bad_manual.json", doc)
        with pytest.raises(MaskError, match=r"annotation 0, object 3: RLE 'size' .* must be posi"):
            open_masks(path, **VIDEO)
    doc = sav_json(labels)
    first = doc["masklet"][0][0]["size"]
    doc["masklet"][1][1]["size"] = [2 * first[0], 2 * first[1]]
    path = write_json(tmp_path / "two_manual.json", doc)
    with pytest.raises(MaskError, match=rf"annotation 1, object 7: size {2 * first[1]}x"
                       rf"{2 * first[0]} differs from annotation 0, object 3's"):  # fmt: skip
        open_masks(path, **VIDEO)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_mask_path_that_is_no_regular_file_is_named_not_read(tmp_path):
    """A FIFO with no writer blocked the format sniffing forever; a device never ends."""
    fifo = tmp_path / "m.npy"
    os.mkfifo(fifo)
    link = tmp_path / "z.json"
    link.symlink_to("/dev/zero")
    for path in (fifo, link):
        with pytest.raises(MaskError, match=rf"{path.name}: not a regular file"):
            open_masks(path, **VIDEO)


def _sav_doc(annotations: int, frames: int | None = None) -> dict:
    """An SA-V document with `annotations` annotations of objects 3 and 7."""
    labels = np.concatenate([make_labels()] * 2)[:annotations]
    doc = sav_json(labels, step=1)
    if frames is None:
        del doc["video_frame_count"]
    else:
        doc["video_frame_count"] = frames
    return doc


@pytest.mark.parametrize(
    ("frames", "annotations", "step", "annotated"),
    [
        (10, 3, 4, [0, 4, 8]),  # SA-V: frames 0, 4, 8 of 0..9 (not 0, 3, 6)
        (12, 3, 4, [0, 4, 8]),
        (13, 4, 4, [0, 4, 8, 12]),
        (1, 1, 4, [0]),
        (10, 5, 2, [0, 2, 4, 6, 8]),  # another annotation step
        (10, 10, 1, list(range(10))),
    ],
)
def test_sav_json_annotation_k_is_frame_k_times_step(
    tmp_path, frames, annotations, step, annotated
):
    path = write_json(tmp_path / "v_manual.json", _sav_doc(annotations, frames))
    source = open_masks(path, **{**VIDEO, "video_frame_count": frames}, sav_step=step)
    assert source.annotated_frames == annotated
    assert source.to_attrs()["frame_step"] == step
    labels = np.concatenate([make_labels()] * 2)[:annotations]
    assert torch.equal(source.read(annotated), expected_masks(labels, [3, 7]))


@pytest.mark.parametrize(
    ("frames", "annotations", "step", "needs"),
    [(10, 5, 4, 3), (10, 2, 4, 3), (13, 3, 4, 4), (10, 3, 2, 5)],
)
def test_sav_json_annotation_count_must_fit_the_step(tmp_path, frames, annotations, step, needs):
    path = write_json(tmp_path / "v_manual.json", _sav_doc(annotations, frames))
    with pytest.raises(
        MaskError,
        match=rf"v_manual\.json: {annotations} annotations do not fit a video of {frames} "
        rf"frames annotated every {step} frames \(that needs {needs}\); pass --sav-step",
    ):
        open_masks(path, **{**VIDEO, "video_frame_count": frames}, sav_step=step)


def test_sav_step_below_one_is_a_usage_error(paths):
    with pytest.raises(UsageError, match="--sav-step must be at least 1, got 0"):
        open_masks(paths["sav-json"], **VIDEO, sav_step=0)


@pytest.mark.parametrize("size", [[16.5, 24], [16.0, 24]])
def test_non_integer_rle_size_is_refused_at_open(tmp_path, labels, size):
    doc = sav_json(labels)
    for annotation in doc["masklet"]:
        for rle in annotation:
            rle["size"] = list(size)
    path = write_json(tmp_path / "f_manual.json", doc)
    with pytest.raises(MaskError, match=r"f_manual\.json: annotation 0, object 3: .*'size'"):
        open_masks(path, **VIDEO)


def test_decompression_bomb_png_names_the_file(tmp_path, labels, monkeypatch):
    folder = write_png_folder(tmp_path / "bomb_masks", labels)
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS with DecompressionBombError (no OSError)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W // 4)
    with pytest.raises(MaskError, match=r"00000\.png: image too large to read safely"):
        open_masks(folder, **VIDEO)


# --------------------------------------------------------------------------- options and finding


def test_parse_objects():
    assert parse_objects(None) is None
    assert parse_objects("1,2,7") == [1, 2, 7]
    assert parse_objects(" 7, 0 ") == [7, 0]
    for bad in ["", "1,,2", "a", "-1", "1,1", "1.5", "2,"]:
        with pytest.raises(UsageError, match="--objects"):
            parse_objects(bad)


def test_open_masks_rejects_empty_or_repeated_selection(paths):
    for objects in ([], [3, 3]):
        with pytest.raises(UsageError):
            open_masks(paths["npy"], objects=objects, **VIDEO)


@pytest.mark.parametrize(
    "name", ["clip_masks", "clip.masks.npy", "clip.masks.npz", "clip_manual.json"]
)
def test_find_masks_beside_each_conventional_name(tmp_path, name):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    target = tmp_path / name
    if name.endswith("_masks"):
        target.mkdir()
    else:
        target.write_bytes(b"")
    assert find_masks_beside(video) == target


def test_find_masks_beside_order_and_frame_folders(tmp_path):
    frames = tmp_path / "clip"
    frames.mkdir()
    (tmp_path / "clip_manual.json").write_text("{}")
    (tmp_path / "clip.masks.npz").write_bytes(b"")
    assert find_masks_beside(frames) == tmp_path / "clip.masks.npz"
    (tmp_path / "clip_masks").mkdir()
    assert find_masks_beside(str(frames) + "/") == tmp_path / "clip_masks"


def test_find_masks_beside_lists_the_places_it_looked(tmp_path):
    video = tmp_path / "clip.mp4"
    (tmp_path / "clip_masks").write_bytes(b"")  # a file, not the folder it looks for
    with pytest.raises(MaskError) as info:
        find_masks_beside(video)
    message = str(info.value)
    assert message.startswith(str(video))
    assert conventional_mask_paths(video) == [
        tmp_path / "clip_masks",
        tmp_path / "clip.masks.npy",
        tmp_path / "clip.masks.npz",
        tmp_path / "clip_manual.json",
    ]
    for place in conventional_mask_paths(video):
        assert str(place) in message


# --------------------------------------------------------------------------- mask videos


def _write_video_as(path: Path, frames: np.ndarray, codec: str, pix_fmt: str, fmt: str) -> Path:
    """Label frames [T, H, W] in a lossless video of the given pixel format (``fmt`` is how
    the frames are handed to the encoder)."""
    if fmt == "rgb24":
        data = [np.repeat(frame[..., None], 3, axis=-1).astype(np.uint8) for frame in frames]
    elif fmt == "pal8":
        palette = np.array([[i * 37 % 256, 0, 255 - i, 255] for i in range(256)], np.uint8)
        data = [(frame.astype(np.uint8), palette) for frame in frames]
    else:
        data = [frame.astype(np.uint16) for frame in frames]
    return write_frames(path, data, codec=codec, pix_fmt=pix_fmt, frame_format=fmt)


@pytest.mark.parametrize(
    ("codec", "pix_fmt", "fmt", "scale"),
    [
        ("ffv1", "bgr0", "rgb24", 1),  # RGB with equal channels: one channel
        ("png", "pal8", "pal8", 1),  # palette indices, whatever the colours
        ("ffv1", "gray16le", "gray16le", 1000),  # 16-bit ids beyond 255
    ],
)
def test_mask_video_label_values_are_exact(tmp_path, labels, codec, pix_fmt, fmt, scale):
    values = labels.astype(np.int64) * scale
    name = "m.mov" if codec == "png" else "m.mkv"  # Matroska takes no PNG frames
    path = _write_video_as(tmp_path / name, values, codec, pix_fmt, fmt)
    source = open_masks(path, **VIDEO)
    assert source.object_ids == [3 * scale, 7 * scale]
    assert torch.equal(source.read(range(T)), expected_masks(values, [3 * scale, 7 * scale]))


def test_lossy_mask_video_is_refused_naming_the_codec(tmp_path, labels):
    grey = [np.repeat(frame[..., None], 3, axis=-1).astype(np.uint8) * 30 for frame in labels]
    path = write_frames(tmp_path / "lossy.mp4", grey)  # libx264, yuv420p
    with pytest.raises(MaskError, match=r"lossy\.mp4: the mask video is h264, a lossy codec"):
        open_masks(path, **VIDEO)


def test_truncated_mask_video_is_named_as_truncated(tmp_path, labels):
    """A mask video cut short decodes fewer frames than its file promises (Matroska: its
    length in seconds): the error names the mask file as truncated, with both counts,
    instead of a bare count mismatch. A whole mask video of the wrong length is still a
    count mismatch."""
    longer = np.concatenate([labels] * 4)  # 48 frames: the cut leaves more than a GOP
    whole = write_label_video(tmp_path / "whole.mkv", longer)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 6 // 10])
    video = {**VIDEO, "video_frame_count": len(longer), "video_path": "clip.mp4"}
    assert open_masks(whole, **video).object_ids == [3, 7]
    with pytest.raises(MaskError) as info:
        open_masks(cut, **video)
    got = re.fullmatch(
        rf"{re.escape(str(cut))}: only (\d+) of the mask video's 48 frames decode; the file "
        r"is truncated or damaged \(the video clip\.mp4 has 48 frames\)",
        str(info.value),
    )
    assert got is not None, str(info.value)
    assert 0 < int(got.group(1)) < 48
    with pytest.raises(MaskError, match=r"whole\.mkv: the mask video has 48 frames, the video"):
        open_masks(whole, **{**video, "video_frame_count": 40})


def test_colour_mask_video_is_refused(tmp_path, labels):
    rgb = [np.stack([frame, frame, frame * 0], axis=-1) for frame in labels]
    path = write_frames(tmp_path / "colour.mkv", rgb, codec="ffv1", pix_fmt="bgr0")
    with pytest.raises(MaskError, match=r"colour\.mkv: frame 0 is in colour"):
        open_masks(path, **VIDEO)


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ("mask-probe:hang", "mask decoder timed out after 1s"),
        ("mask-read:hang", "mask decoder timed out after 1s"),
        ("mask-read:segv", r"mask decoder crashed \(signal 11"),
    ],
)
def test_mask_video_decoder_that_hangs_or_crashes_fails_in_time(paths, monkeypatch, fault, problem):
    monkeypatch.setattr(vprocess, "_CHILD_FAULT", fault)
    t0 = time.monotonic()
    with (
        pytest.raises(MaskError, match=problem) as info,
        open_masks(paths["video"], timeout_s=1.0, **VIDEO) as source,
    ):
        source.read([0, 1])
    assert time.monotonic() - t0 < 20
    message = str(info.value)
    assert message.startswith(f"{paths['video']}: ") and "\n" not in message


# --------------------------------------------------------------------------- a damaged video


def test_masks_for_more_frames_than_a_damaged_video_decodes_name_the_video(tmp_path, labels):
    """The video promises 20 frames, 12 decode: masks for 12 fit; masks for more are
    refused naming the video as damaged, with both counts and the masks' own."""
    video = str(tmp_path / "clip.mp4")
    damaged = {**VIDEO, "video_path": video, "video_frame_count_declared": 20}
    longer = np.concatenate([labels, labels[:8]])  # 20 frames
    fit = {
        "npy": _save_npy(tmp_path / "fit.npy", labels),
        "video": write_label_video(tmp_path / "fit.mkv", labels),
        "png": write_png_folder(tmp_path / "fit_pngs", labels),
    }
    for name, path in fit.items():
        assert open_masks(path, **damaged).object_ids == [3, 7], name
    bad = {
        _save_npy(tmp_path / "all.npy", longer): "masks for 20 frames",
        write_label_video(tmp_path / "all.mkv", longer): "the mask video has 20 frames",
        write_png_folder(tmp_path / "all_pngs", longer) / "00019.png": "mask for frame 19",
    }
    for path, claim in bad.items():
        with pytest.raises(VideoDecodeError) as info:
            open_masks(path.parent if path.suffix == ".png" else path, **damaged)
        assert str(info.value) == (
            f"{video}: only 12 of 20 frames decode; the file is truncated or damaged "
            f"({path}: {claim})"
        )
        # the same masks against a whole 12-frame video: the masks disagree, both named
        with pytest.raises(MaskError) as info:
            open_masks(path.parent if path.suffix == ".png" else path, video_path=video, **VIDEO)
        message = str(info.value)
        assert message.startswith(f"{path}: {claim}") and f"the video {video} has 12" in message


def test_npy_read_with_plain_reads_any_order_fortran_and_truncated(tmp_path, labels):
    path = _save_npy(tmp_path / "c.npy", labels)
    source = open_masks(path, **VIDEO)
    frames = [11, 0, 5, 5]
    assert torch.equal(source.read(frames), expected_masks(labels, [3, 7])[frames])
    assert not any(m.path == str(path) for m in _maps())  # read, not memory-mapped
    fortran = _save_npy(tmp_path / "f.npy", np.asfortranarray(labels))
    assert torch.equal(open_masks(fortran, **VIDEO).read(frames), source.read(frames))
    cut = tmp_path / "cut.npy"
    cut.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MaskError, match=r"cut\.npy: not a readable \.npy array \(.*truncated"):
        open_masks(cut, **VIDEO)


def test_label_scan_finds_values_past_the_first_piece(tmp_path):
    big = np.zeros((3, 600, 1000), np.uint16)  # 1.8 M values: two scan pieces
    big[2, -1, -1] = 300
    big[0, 0, 0] = 5
    video = {"video_frame_count": 3, "video_width": 1000, "video_height": 600}
    assert open_masks(_save_npy(tmp_path / "b.npy", big), **video).object_ids == [5, 300]
    small = big.astype(np.uint8) % 7  # 300 % 256 % 7 == 2
    assert open_masks(_save_npy(tmp_path / "u.npy", small), **video).object_ids == [2, 5]


class _Map:
    def __init__(self, line: str) -> None:
        parts = line.split(maxsplit=5)
        self.path = parts[5].strip() if len(parts) > 5 else ""


def _maps() -> list[_Map]:
    with open("/proc/self/maps") as f:
        return [_Map(line) for line in f]
