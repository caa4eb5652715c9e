"""`MaskSource.read_to`: label-map sources send `[B, H, W]` labels and expand them on the
device, equal to `read`'s planes bit for bit; other sources send their planes. On the CPU
it is `read` and runs no torch operation (the engine calls it from its decode thread)."""

from __future__ import annotations

import media
import numpy as np
import pytest
import torch
from dispatch import RecordOps

import memenc.pipeline.masks as masks_mod
from memenc.pipeline.masks import open_masks

T, H, W = 6, 48, 64
FRAMES = [4, 1, 1, 5, 0]  # any order, a repeat


@pytest.fixture(scope="module")
def labels():
    return media.moving_labels(T, H, W)  # objects 3 and 7 (7 in even frames only)


def sources(tmp_path, labels):
    wide = labels.astype(np.int64) * 1000  # labels that need int32 on the device
    wide[labels == 3] = 70000
    np.save(tmp_path / "wide.npy", wide)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "planes.npy", np.stack([labels == 3, labels == 7], axis=1))
    yield "png", {}, media.write_png_labels(tmp_path / "png", labels)
    yield "png --objects 7,3", {"objects": [7, 3]}, tmp_path / "png"  # order as given
    yield "video", {}, media.write_label_video(tmp_path / "m.mkv", labels)
    yield "npy labels", {}, tmp_path / "labels.npy"
    yield "npy wide labels", {}, tmp_path / "wide.npy"
    yield "npy planes", {}, tmp_path / "planes.npy"


def test_read_to_equals_read_and_sends_label_maps(tmp_path, labels, monkeypatch):
    opened = [
        (name, open_masks(path, video_frame_count=T, video_width=W, video_height=H, **kw))
        for name, kw, path in sources(tmp_path, labels)
    ]
    want = {name: src.read(FRAMES) for name, src in opened}
    built_on_host = []
    real = masks_mod._labels_to_masks

    def spy(labels, values):
        built_on_host.append(labels.shape)
        return real(labels, values)

    monkeypatch.setattr(masks_mod, "_labels_to_masks", spy)
    for name, src in opened:
        got = src._expand_on(FRAMES, torch.device("cpu"))  # read_to's path off the CPU
        assert got.dtype == torch.bool and got.shape == want[name].shape, name
        assert torch.equal(got, want[name]), name
        assert want[name].any(), name  # something to compare
        src.close()
    assert built_on_host == []  # label maps were expanded by read_to, not into host planes
    if torch.cuda.is_available():  # on a GPU: the same planes, made there
        for name, src in opened:
            assert torch.equal(src.read_to(FRAMES, "cuda").cpu(), want[name]), name


def test_compact_labels_keep_the_values():
    for values, dtype in (([0, 3, 255], np.uint8), ([0, 300], np.int16), ([7, 70000], np.int32)):
        for src in (np.int64, np.uint16, np.int32):
            a = np.array(values, dtype=np.int64)
            if a.max() > np.iinfo(src).max:
                continue
            out = masks_mod._compact_labels(a.astype(src)[None, None])
            assert out.dtype == dtype and out.reshape(-1).tolist() == values
    assert masks_mod._compact_labels(np.array([[[True, False]]])).dtype == np.uint8
    assert masks_mod._compact_labels(np.array([[[2**63 + 1]]], np.uint64)) is None


def test_read_to_on_the_cpu_runs_no_torch_operation(tmp_path, labels):
    """On the CPU `read_to` builds the planes with numpy: a torch operation in the engine's
    decode thread would start a second OpenMP team, and libgomp then stops the compute
    team's workers spinning (measured ~20% slower at S=512 on 2 cores). The dispatch mode
    sees the operations the label-map path runs, so it can see them here."""
    for name, kw, path in sources(tmp_path, labels):
        src = open_masks(path, video_frame_count=T, video_width=W, video_height=H, **kw)
        want = src.read(FRAMES)
        seen: list = []
        with RecordOps(seen):
            got = src.read_to(FRAMES, "cpu")
        assert seen == [], (name, seen)
        assert torch.equal(got, want), name
        expanding: list = []
        with RecordOps(expanding):
            src._expand_on(FRAMES, "cpu")
        src.close()
        if name != "npy planes":  # label maps: the comparison is a torch operation
            assert expanding, name
