"""K decoder processes over one video (`--decoders K`): the same store bit for bit, a
failure in any one of them ends the run cleanly, and no process is left behind."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import media
import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

import memenc.pipeline.decoders as decoders_mod
import memenc.pipeline.engine as engine
from memenc import encode_video, open_cache
from memenc.cli.app import app
from memenc.errors import UsageError, VideoDecodeError
from memenc.pipeline.decoders import choose_decoders, decoder_threads, split_rows
from memenc.pipeline.video import process as vprocess

S = 256  # the failure tests use 64: their point is not the size
T = 23
# 11 rows (frames 1, 3, ... 21) in chunks of 3: chunks of 3, 3, 3 and 2 rows; batches of
# 2 rows, so batches cross chunk boundaries and the groups' batches differ from K=1's
FRAMES = "1::2"
OPTS = dict(weights="random", frames=FRAMES, chunk_frames=3, batch_size=2, device="cpu")
runner = CliRunner()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("decoders")
    labels = media.moving_labels(T, 120, 160)
    video = media.write_video(d / "clip.mp4", media.scene_frames(labels), options={"g": "5"})
    media.write_png_labels(d / "clip_masks", labels)
    return video


@pytest.fixture(scope="module")
def reference(clip, tmp_path_factory):
    """The store one decoder writes at image size S, as arrays."""
    stores: dict[int, dict[str, np.ndarray]] = {}

    def at(size: int) -> dict[str, np.ndarray]:
        if size not in stores:
            out = tmp_path_factory.mktemp("ref") / f"k1-{size}.zarr"
            encode_video(clip, out=out, decoders=1, image_size=size, **OPTS)
            stores[size] = arrays(out)
        return stores[size]

    return at


def no_new_children(before: set) -> bool:
    """No process started since `before` (this process's children then) is still alive."""
    return set(multiprocessing.active_children()) <= before


def arrays(path: Path) -> dict[str, np.ndarray]:
    z = zarr.open_group(str(path), mode="r")
    return {k: z[k][:] for k in z.array_keys()}


class Spy:
    """Records the VideoSources `ParallelDecode` opens for decoders 2..K (one at a time, so
    the test hook reaches only the child meant); decoder `of` (1 is the caller's) gets
    the child fault `fault`."""

    def __init__(self, monkeypatch, fault: str | None = None, of: int = 0) -> None:
        self.opened: list = []
        real = decoders_mod.VideoSource
        spy = self
        lock = threading.Lock()

        class Recorded(real):
            def __init__(self, *args, **kwargs):
                # ParallelDecode's thread i decodes group i, with decoder i+1
                number = int(threading.current_thread().name.rsplit("-", 1)[1]) + 1
                with lock:
                    if fault and number == of:
                        monkeypatch.setattr(vprocess, "_CHILD_FAULT", fault)
                    try:
                        super().__init__(*args, **kwargs)
                    finally:
                        monkeypatch.setattr(vprocess, "_CHILD_FAULT", None)
                    spy.opened.append(self)

        monkeypatch.setattr(decoders_mod, "VideoSource", Recorded)

    def all_closed(self) -> bool:
        return all(s._decoder is None for s in self.opened)


def test_split_rows_groups_whole_chunks_with_about_equal_rows():
    rows = list(range(11))
    assert split_rows(rows, 3, 1) == [rows]
    assert split_rows(rows, 3, 2) == [rows[:6], rows[6:]]
    assert split_rows(rows, 3, 3) == [rows[:3], rows[3:6], rows[6:]]
    # more parts than chunks: one group per chunk
    assert split_rows(rows, 3, 8) == [rows[:3], rows[3:6], rows[6:9], rows[9:]]
    # pending chunks with gaps (a resumed run): whole chunks still
    assert split_rows([3, 4, 5, 9, 10, 11, 12], 3, 2) == [[3, 4, 5], [9, 10, 11, 12]]
    sizes = [len(g) for g in split_rows(list(range(1000)), 7, 8)]
    assert sum(sizes) == 1000 and max(sizes) - min(sizes) <= 7
    assert split_rows([], 3, 2) == []


def test_auto_decoders_and_their_threads():
    assert choose_decoders(None, torch.device("cpu"), cores=16) == 1
    assert choose_decoders(None, torch.device("cuda"), cores=16) == 4
    assert choose_decoders(None, torch.device("cuda"), cores=6) == 3
    assert choose_decoders(None, torch.device("cuda"), cores=64) == 4
    assert choose_decoders(None, torch.device("cuda"), cores=2) == 1
    assert choose_decoders(3, torch.device("cpu"), cores=2) == 3
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(UsageError, match="--decoders"):
            choose_decoders(bad, torch.device("cpu"))
    # one decoder keeps FFmpeg's own choice; K share the cores, at least one thread each
    assert decoder_threads(1, cores=16) == 0
    assert [decoder_threads(k, cores=16) for k in (2, 4, 8, 32)] == [8, 4, 2, 1]


@pytest.mark.parametrize("k", [2, 3, 8])
def test_k_decoders_write_the_same_store_bit_for_bit(tmp_path, clip, reference, monkeypatch, k):
    """K=2, 3, and 8 (more decoders than the 4 chunks): every array equal to K=1's,
    timestamps and frame_index included; K-1 more decoders started, all closed, no
    process left; at most one chunk per decoder being filled at a time."""
    before = set(multiprocessing.active_children())
    spy = Spy(monkeypatch)
    filling: set[int] = set()  # chunk buffers created and not yet complete
    most = 0

    class Counted(engine._ChunkBuffer):
        def __init__(self, *args):
            nonlocal most
            super().__init__(*args)
            filling.add(id(self))
            most = max(most, len(filling))

        def put(self, *args):
            full = super().put(*args)
            if full:
                filling.discard(id(self))
            return full

    monkeypatch.setattr(engine, "_ChunkBuffer", Counted)
    out = tmp_path / "s.zarr"
    result = encode_video(clip, out=out, decoders=k, image_size=S, **OPTS)
    want = reference(S)
    assert result.chunks_written == 4 and result.status == "complete"
    assert len(spy.opened) == k - 1  # started while the model loaded; K > 4 chunks: unused
    assert spy.all_closed() and no_new_children(before)
    assert 1 <= most <= min(k, 4)  # one chunk being filled per decoder, at most
    got = arrays(out)
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name], equal_nan=True), name
    assert open_cache(out).attrs["decoders"] == k  # provenance only
    assert got["frame_index"].tolist() == list(range(1, T, 2))


@pytest.mark.parametrize(
    ("fault", "problem"),
    [("read:crash", "decoder crashed (signal 9 (SIGKILL))"), ("read:hang", "decoder timed out")],
)
def test_one_of_k_decoders_failing_ends_the_run_cleanly(
    tmp_path, clip, reference, monkeypatch, fault, problem
):
    """The third of 3 decoders crashes or hangs: one line naming the video, exit 1; the
    chunks marked done are exactly as K=1 wrote them, the failed decoder's chunk is not
    marked; every decoder is closed; a rerun completes the same store."""
    before = set(multiprocessing.active_children())
    spy = Spy(monkeypatch, fault=fault, of=3)
    out = tmp_path / "s.zarr"
    want = reference(64)
    argv = ["encode", clip, "--weights", "random", "--image-size", 64, "--frames", FRAMES,
            "--chunk-frames", 3, "--batch-size", 2, "--decoders", 3, "--device", "cpu",
            "--decode-timeout", 3, "-o", out, "-q"]  # fmt: skip
    r = runner.invoke(app, list(map(str, argv)))
    assert r.exit_code == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"memenc: error: {clip}: {problem}"), lines
    assert len(spy.opened) == 2 and spy.all_closed()
    assert no_new_children(before)

    got = arrays(out)
    done = got["chunk_done"].astype(bool)
    assert not done[2:].any()  # the third decoder's chunks (rows 6-10) never finished
    for c in np.flatnonzero(done):
        rows = slice(c * 3, c * 3 + 3)
        for name in ("maskmem_features", "object_score_logits", "obj_ptr", "timestamp"):
            assert np.array_equal(got[name][rows], want[name][rows]), (c, name)

    encode_video(clip, out=out, decoders=2, image_size=64, **OPTS)
    got = arrays(out)
    for name in want:
        assert np.array_equal(got[name], want[name], equal_nan=True), name


def test_decoder_that_fails_to_open_ends_the_run(tmp_path, clip, monkeypatch):
    """A second decoder whose probe crashes: the run ends with its one line."""
    before = set(multiprocessing.active_children())
    Spy(monkeypatch, fault="probe:crash", of=2)
    with pytest.raises(VideoDecodeError, match="decoder exited|decoder crashed") as e:
        encode_video(clip, out=tmp_path / "s.zarr", decoders=2, image_size=64, **OPTS)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{clip}: ")
    assert no_new_children(before)


def test_bad_decoders_is_a_usage_error_in_batch_too(tmp_path, clip):
    """`memenc batch --decoders 0` exits 2 naming the option; the library refuses before
    it makes the output folder."""
    from memenc.pipeline.batch import BatchSettings, run_batch

    r = runner.invoke(app, ["batch", str(clip), "-o", str(tmp_path / "o"), "--decoders", "0"])
    assert r.exit_code == 2 and "--decoders" in r.stderr, r.stderr
    for bad in (0, 2.5):
        with pytest.raises(UsageError, match="--decoders"):
            run_batch([clip], tmp_path / "out", settings=BatchSettings(decoders=bad))
        assert not (tmp_path / "out").exists()
