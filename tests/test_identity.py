"""A run's identity is its inputs' content and the settings that determine the numbers:
copied inputs and another batch size are the same run (a no-op on a complete store);
changed content at the same path, or another setting that changes the numbers, is
refused with a message naming what differs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import media
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from memenc.cli.app import app
from memenc.store import NUMBERS_VERSION, RunSettings, content_sha256

runner = CliRunner()
T = 6
S = 64


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def copy_inputs(src: Path, dst: Path) -> tuple[Path, Path]:
    """The clip and its PNG masks, copied (new paths, new mtimes)."""
    dst.mkdir()
    video = Path(shutil.copyfile(src / "clip.mp4", dst / "clip.mp4"))
    masks = Path(shutil.copytree(src / "clip_masks", dst / "clip_masks"))
    return video, masks


def replace_keeping_mtime(path: Path, write) -> None:
    """Write other bytes at `path`, then put its old mtime back."""
    st = path.stat()
    write(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A complete store of a 6-frame clip (random weights, S=64) and its inputs."""
    d = tmp_path_factory.mktemp("identity")
    labels = media.moving_labels(T, 60, 80)
    media.write_video(d / "clip.mp4", media.scene_frames(labels))
    media.write_png_labels(d / "clip_masks", labels)
    out = d / "s.zarr"
    r = invoke("encode", d / "clip.mp4", "--weights", "random", "--image-size", S, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    return d, out, labels


def _other_pixels(labels):
    def write(path: Path) -> None:
        media.write_video(path, 255 - media.scene_frames(labels))

    return write


def _other_mask(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as img:
        labels = np.asarray(img).copy()
    assert not (labels[:5, :5] == 3).all()
    labels[:5, :5] = 3  # object 3 grows by a corner
    Image.fromarray(labels).save(path)  # a grey label PNG


# (case, mutate the copied inputs, extra CLI args, setting the message must name)
REFUSED = [
    ("pixels, same path and mtime", "video", [], "video_content"),
    ("mask content, same mtime", "mask", [], "masks_content"),
    ("precision", None, ["--precision", "bf16"], "precision"),
    ("image size", None, ["--image-size", "128"], "image_size"),
    ("frames", None, ["--frames", "0:4"], "num_frames"),
    ("objects", None, ["--objects", "3"], "object_ids"),
    ("store dtype", None, ["--store-dtype", "float32"], "store_dtype"),
    ("seed of random weights", None, ["--seed", "1"], "model.seed"),
]


@pytest.mark.parametrize(("case", "mutate", "extra", "named"), REFUSED, ids=[c[0] for c in REFUSED])
def test_other_content_or_settings_are_refused(tmp_path, base, case, mutate, extra, named):
    d, out, labels = base
    video, masks = copy_inputs(d, tmp_path / "in")
    if mutate == "video":
        replace_keeping_mtime(video, _other_pixels(labels))
    elif mutate == "mask":
        replace_keeping_mtime(masks / "00002.png", _other_mask)
    before = json.dumps(json.loads((out / "zarr.json").read_text()), sort_keys=True)
    args = ["--weights", "random", "--image-size", S, *extra]
    if "--image-size" in extra:
        args = ["--weights", "random", *extra]
    r = invoke("encode", video, *args, "-o", out, "-q")
    assert r.exit_code == 1, (case, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{out}: store was made with other settings" in lines[0], lines[0]
    assert named in lines[0] and "use --overwrite" in lines[0], lines[0]
    # paths and mtimes are not what differs
    assert "source_video.path" not in lines[0] and "mtime" not in lines[0], lines[0]
    assert json.dumps(json.loads((out / "zarr.json").read_text()), sort_keys=True) == before


@pytest.mark.parametrize("case", ["copied inputs", "batch size", "both"])
def test_copied_inputs_and_batch_size_are_the_same_run(tmp_path, base, case):
    d, out, _ = base
    video, masks = (d / "clip.mp4", d / "clip_masks")
    if case != "batch size":
        video, masks = copy_inputs(d, tmp_path / "elsewhere")
        os.utime(video, (1_000_000, 1_000_000))  # and another mtime
    extra = ["--batch-size", "3"] if case != "copied inputs" else []
    r = invoke(
        "encode", video, "--masks", masks, "--weights", "random", "--image-size", S,
        *extra, "-o", out, "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["already_complete"] is True and summary["chunks_written"] == 0


def test_checkpoint_content_is_the_identity(tmp_path, ref_checkpoint):
    """A copied checkpoint is the same run; other weights (another file's sha256) are not."""
    _, ckpt = ref_checkpoint("sam2.1_hiera_tiny", 256)
    labels = media.moving_labels(2, 60, 80)
    video = media.write_video(tmp_path / "clip.mp4", media.scene_frames(labels))
    media.write_png_labels(tmp_path / "clip_masks", labels)
    out = tmp_path / "s.zarr"
    common = ["--image-size", 256, "-o", out, "--json"]
    r = invoke("encode", video, "--checkpoint", ckpt, *common)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["chunks_written"] == 1

    copied = shutil.copyfile(ckpt, tmp_path / "elsewhere.pt")
    r = invoke("encode", video, "--checkpoint", copied, *common)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["already_complete"] is True

    other = tmp_path / "other.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    weights = state.get("model", state)
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.ndim == 4)
    weights[name] = weights[name] + 1e-3
    torch.save(state, other)
    r = invoke("encode", video, "--checkpoint", other, *common)
    assert r.exit_code == 1, r.stderr
    assert "model.checkpoint_sha256" in r.stderr and "other settings" in r.stderr, r.stderr


def test_settings_declare_stored_and_fingerprinted_fields():
    """Every field says what it is; paths are stored but not fingerprinted; batch size and
    device are stored only; the numbers version is both."""
    roles = {
        f.name: (f.metadata["stored"], f.metadata["fingerprinted"], f.metadata["provenance"])
        for f in dataclasses.fields(RunSettings)
    }
    assert roles["batch_size"][:2] == (True, False) and roles["device"][:2] == (True, False)
    assert roles["decoders"][:2] == (True, False)  # --decoders K: the same pixels, faster
    assert roles["numbers_version"][:2] == (True, True)
    for name in ("video_content", "masks_content", "precision", "storage_dtype", "chunk_frames"):
        assert roles[name][:2] == (True, True), name
    assert "path" in roles["source_video"][2] and "mtime" in roles["source_video"][2]
    assert "path" in roles["masks"][2] and "checkpoint" in roles["model"][2]
    assert all(stored or fp for stored, fp, _ in roles.values())

    def settings(**changes):
        values = dict(
            numbers_version=NUMBERS_VERSION,
            source_video={"path": "/a/v.mp4", "mtime": 1.0, "backend": "decord"},
            video_content="sha256:aa",
            frame_selection={"spec": "::", "frames": 2},
            frames=(0, 1),
            model={"checkpoint": "/a/c.pt", "checkpoint_sha256": "bb"},
            masks={"path": "/a/m", "mtime": 2.0, "object_ids": [1]},
            masks_content="sha256:cc",
            memory={"binarize": True},
            precision="fp32",
            storage_dtype="float16",
            chunk_frames=2,
            batch_size=4,
            device="cpu",
        )
        return RunSettings(**{**values, **changes})

    fp = settings().fingerprint()
    moved = settings(
        source_video={"path": "/b/v.mp4", "mtime": 9.0, "backend": "decord"},
        masks={"path": "/b/m", "mtime": 9.0, "object_ids": [1]},
        model={"checkpoint": "/b/c.pt", "checkpoint_sha256": "bb"},
        batch_size=1,
        device="cuda",
        decoders=8,
    )
    assert moved.fingerprint() == fp
    assert settings(numbers_version=NUMBERS_VERSION + 1).fingerprint() != fp
    assert settings(source_video={"path": "/a/v.mp4", "backend": "pyav"}).fingerprint() != fp
    assert settings(frames=(0, 2)).fingerprint() != fp
    assert "frames" not in settings().attrs() and settings().attrs()["batch_size"] == 4


def test_content_hash_covers_bytes_and_frame_names(tmp_path):
    a, b = tmp_path / "00000.png", tmp_path / "00001.png"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    one = content_sha256([a, b])
    assert content_sha256([a, b]) == one
    b.write_bytes(b"twO")
    assert content_sha256([a, b]) != one
    b.write_bytes(b"two")
    a.rename(tmp_path / "00002.png")  # the same bytes as another frame
    assert content_sha256([tmp_path / "00002.png", b]) != one
    c = tmp_path / "single.bin"
    c.write_bytes(b"x" * (3 << 20))
    import hashlib

    assert content_sha256([c]) == "sha256:" + hashlib.sha256(b"x" * (3 << 20)).hexdigest()


def test_frame_folder_video_is_identified_by_its_frames(tmp_path):
    """A folder of frame images: a copied folder is the same run, one changed frame (same
    name, same mtime) is not."""
    from PIL import Image

    labels = media.moving_labels(3, 60, 80)
    frames = tmp_path / "a" / "frames"
    frames.mkdir(parents=True)
    for t, rgb in enumerate(media.scene_frames(labels)):
        Image.fromarray(rgb).save(frames / f"{t:05d}.png")
    masks = media.write_png_labels(tmp_path / "a" / "masks", labels)
    out = tmp_path / "s.zarr"

    def encode(folder: Path):
        args = ["--masks", masks, "--weights", "random", "--image-size", S, "-o", out, "--json"]
        return invoke("encode", folder, *args)

    assert encode(frames).exit_code == 0
    copied = Path(shutil.copytree(frames, tmp_path / "b" / "frames"))
    r = encode(copied)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["already_complete"] is True
    replace_keeping_mtime(
        copied / "00001.png",
        lambda p: Image.fromarray(255 - media.scene_frames(labels)[1]).save(p),
    )
    r = encode(copied)
    assert r.exit_code == 1 and "video_content" in r.stderr, r.stderr
