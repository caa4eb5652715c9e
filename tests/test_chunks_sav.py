"""`run_chunks` on any chunk list, and SA-V annotations paired with frames 0, 4, 8, …
end to end."""

from __future__ import annotations

import json

import media
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from memenc.cli.app import app
from memenc.encoders import load_model
from memenc.errors import UsageError
from memenc.pipeline.engine import run_chunks, store_layout
from memenc.pipeline.masks import open_masks
from memenc.pipeline.video import VideoSource
from memenc.store import CacheStore

runner = CliRunner()
S = 64
T = 10


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    video, labels = media.write_clip(d, T)
    return d, video, labels


def _store(path, video, masks_path, source, masks):
    model = load_model(weights="random", image_size=S, device="cpu")
    info = source.info
    layout = store_layout(
        model,
        list(range(T)),
        masks,
        video_attrs=info.to_attrs(),
        video_content="sha256:x",
        masks_content="sha256:y",
        selection=slice(None),
        store_dtype="float32",
        chunk_frames=3,
        precision="fp32",
    )
    return CacheStore.prepare(path, layout), model


@pytest.mark.parametrize("chunks", [[3, 1, 0, 2], [2, 0, 2, 1, 3, 0, 3]])
def test_run_chunks_sorts_and_dedupes(tmp_path, clip, chunks):
    d, video, _ = clip
    with VideoSource(video, S, timeout_s=60) as source:
        masks = open_masks(d / "clip_masks", video_frame_count=T, video_width=80, video_height=60)
        store, model = _store(tmp_path / "s.zarr", video, d / "clip_masks", source, masks)
        assert run_chunks(store, source, masks, model, chunks, batch_size=2) == 4
        assert store.pending_chunks() == []
        with pytest.raises(UsageError, match=r"chunk 4 is outside the store \(chunks 0\.\.3\)"):
            run_chunks(store, source, masks, model, [0, 4])
    store.finalize()
    got = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["maskmem_features"][:]
    assert not np.isnan(got).any()
    # the same numbers as chunks in order, one at a time
    with VideoSource(video, S, timeout_s=60) as source:
        ref, model = _store(tmp_path / "r.zarr", video, d / "clip_masks", source, masks)
        for c in range(4):
            run_chunks(ref, source, masks, model, [c], batch_size=2)
    want = zarr.open_group(str(tmp_path / "r.zarr"), mode="r")["maskmem_features"][:]
    np.testing.assert_array_equal(got, want)


def _sav(path, labels, annotations):
    doc = media.sav_json(labels, 4)
    doc["masklet"] = (doc["masklet"] * 2)[:annotations]
    doc["video_frame_count"] = T
    path.write_text(json.dumps(doc))
    return path


def _encode(video, masks, out, *extra):
    args = ["encode", video, "--masks", masks, "--weights", "random", "--image-size", S]
    return runner.invoke(app, [str(a) for a in [*args, "-o", out, "-q", *extra]])


def test_sav_annotations_are_frames_0_4_8(tmp_path, clip):
    _, video, labels = clip
    r = _encode(video, _sav(tmp_path / "v_manual.json", labels, 3), tmp_path / "s.zarr")
    assert r.exit_code == 0, r.stderr
    z = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert z["frame_index"][:].tolist() == [0, 4, 8]
    assert z.attrs["memenc"]["masks"]["frame_step"] == 4


def test_sav_annotation_count_that_does_not_fit_is_refused(tmp_path, clip):
    _, video, labels = clip
    masks = _sav(tmp_path / "v_manual.json", labels, 5)
    r = _encode(video, masks, tmp_path / "s.zarr")
    assert r.exit_code == 1
    assert "v_manual.json: 5 annotations do not fit a video of 10 frames" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "s.zarr").exists()
    # with another annotation step, 5 annotations of 10 frames are frames 0, 2, 4, 6, 8
    r = _encode(video, masks, tmp_path / "s.zarr", "--sav-step", "2")
    assert r.exit_code == 0, r.stderr
    z = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert z["frame_index"][:].tolist() == [0, 2, 4, 6, 8]
