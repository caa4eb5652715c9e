"""Every decode runs under a deadline: a mask video whose decoder hangs fails `encode` in
time with one line naming the mask file, and `preview`'s frame and mask decode in a
child process too (a hang there greys the panel instead of stopping the picture)."""

from __future__ import annotations

import time

import media
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from memenc.cli.app import app
from memenc.pipeline.preview import render_preview
from memenc.pipeline.video import process as vprocess

T, H, W = 6, 48, 64
runner = CliRunner()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("deadline")
    labels = media.moving_labels(T, H, W)
    video = media.write_video(d / "clip.mp4", media.scene_frames(labels))
    masks = media.write_label_video(d / "masks.mkv", labels)
    return video, masks


def encode(video, masks, out, *extra):
    argv = ["encode", video, "--masks", masks, "--weights", "random", "--image-size", "64"]
    return runner.invoke(app, [*map(str, argv), "-o", str(out), "-q", *extra])


@pytest.mark.parametrize("fault", ["mask-probe:hang", "mask-read:hang"])
def test_mask_video_that_hangs_fails_encode_within_the_deadline(tmp_path, clip, monkeypatch, fault):
    video, masks = clip
    monkeypatch.setattr(vprocess, "_CHILD_FAULT", fault)
    t0 = time.monotonic()
    r = encode(video, masks, tmp_path / "s.zarr", "--decode-timeout", "2")
    elapsed = time.monotonic() - t0
    assert r.exit_code == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"memenc: error: {masks}: mask decoder timed out after 2s"]
    assert elapsed < 60  # the model loads once the masks have opened (mask-read)


def test_preview_decodes_under_the_deadline(tmp_path, clip, monkeypatch):
    video, masks = clip
    store = tmp_path / "s.zarr"
    assert encode(video, masks, store).exit_code == 0
    whole = render_preview(store, 2, tmp_path / "ok.png", panel_height=48)
    panels = np.asarray(Image.open(whole))

    pw = (panels.shape[1] - 8) // 3  # three panels, two 4-pixel gaps

    def panel(picture, i):
        return picture[:48, i * (pw + 4) : i * (pw + 4) + pw]

    # the frame's decoder hangs: panel (a) is "unavailable"; the features are still shown
    # the mask video's decoder hangs: panel (b) is "unavailable"; the frame is still shown
    for fault, grey, same in (("read:hang", 0, 2), ("mask-probe:hang", 1, 0)):
        monkeypatch.setattr(vprocess, "_CHILD_FAULT", fault)
        t0 = time.monotonic()
        out = render_preview(store, 2, tmp_path / "hung.png", panel_height=48, timeout_s=1.0)
        assert time.monotonic() - t0 < 20, fault
        got = np.asarray(Image.open(out))
        assert (panel(got, grey)[:10] == 128).all(), fault  # grey, its reason written below
        assert not (panel(panels, grey)[:10] == 128).all(), fault
        assert np.array_equal(panel(got, same), panel(panels, same)), fault
