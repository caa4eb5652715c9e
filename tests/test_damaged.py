"""Damaged videos are named as damaged: a file that promises N frames of which only M
decode is refused naming the video when the masks are for N frames, and encoded (M
frames, a warning, both counts in the attributes) when the masks are for the M.

Every file is written here with PyAV and damaged with plain file operations. How many
frames decode is established independently of memenc: each frame carries its number
(`media.frame_pattern`), and PyAV decodes the damaged file on its own.
"""

from __future__ import annotations

from pathlib import Path

import av
import media
import numpy as np
import pytest
from typer.testing import CliRunner

from memenc.cli.app import app
from memenc.pipeline.video import probe_video
from memenc.store import MemoryCache

N = 24  # frames written
GOP = 8
H, W = 48, 64
CUT_AT = 13  # damage starts in the data of this frame (presentation order)
SIZE = "64"  # model image size: the smallest the CLI tests use, to stay fast

# container -> (format, muxer options, suffix)
CONTAINERS = {
    "mp4-faststart": ("mp4", {"movflags": "+faststart"}, ".mp4"),
    "mp4-fragmented": ("mp4", {"movflags": "+frag_keyframe+empty_moov"}, ".mp4"),
    "mpegts": ("mpegts", {}, ".ts"),
    "mkv": ("matroska", {}, ".mkv"),
}
DAMAGES = ("truncated", "zero-tail", "cut-short")

runner = CliRunner()


def write(path: Path, fmt: str, options: dict) -> Path:
    frames = media.scene_frames(media.moving_labels(N, H, W))
    return media.write_frames(
        path, frames, options={"crf": "12", "g": str(GOP)}, container=fmt, container_options=options
    )


def damage(src: Path, dst: Path, kind: str) -> int:
    """truncated: the file ends inside frame CUT_AT's data; zero-tail: from there on the
    bytes are zeros (the size is unchanged); cut-short: the file ends cleanly where frame
    CUT_AT's data begins."""
    with av.open(str(src)) as c:
        s = c.streams.video[0]
        packets = sorted((p.pts, p.pos, p.size) for p in c.demux(s) if p.size)
    _, pos, size = packets[CUT_AT]
    data = src.read_bytes()
    at = pos if kind == "cut-short" else pos + size // 2
    if kind == "zero-tail":
        dst.write_bytes(data[:at] + bytes(len(data) - at))
    else:
        dst.write_bytes(data[:at])
    return at  # where the damage starts


def decodable(path: Path) -> int:
    """Frames 0..M-1 decode (by the number each carries); returns M."""
    seen = set()
    with av.open(str(path)) as c:
        for packet in c.demux(c.streams.video[0]):
            try:
                seen.update(
                    media.decode_pattern(f.to_ndarray(format="rgb24")) for f in packet.decode()
                )
            except av.FFmpegError:
                continue
    m = 0
    while m in seen:
        m += 1
    return m


def packets(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for p in c.demux(c.streams.video[0]) if p.size)


def promised(container: str, whole: Path, video: Path, at: int) -> int:
    """What each container states about its length: the sample table (mp4) and the
    track's DURATION tag (mkv) every frame written; a fragmented mp4, the frames of the
    fragments whose header survives (each fragment starts at a keyframe and its header
    precedes its data); MPEG-TS, which states nothing, the frame packets it holds."""
    if container == "mpegts":
        return packets(video)
    if container == "mp4-fragmented":
        with av.open(str(whole)) as c:
            listed = [(p.pos, p.is_keyframe) for p in c.demux(c.streams.video[0]) if p.size]
        return next((i for i, (pos, key) in enumerate(listed) if key and pos > at), N)
    return N


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("whole")
    return {
        name: write(d / f"{name}{suffix}", fmt, options)
        for name, (fmt, options, suffix) in CONTAINERS.items()
    }


def test_whole_files_promise_what_decodes(whole, tmp_path):
    for name, path in whole.items():
        info = probe_video(path)
        assert (info.frame_count, info.frame_count_declared) == (N, N), name
    # Edit lists hide frames: at a keyframe the demuxer drops them without a mark, at
    # another frame it marks them discarded. Neither file is damaged.
    for shift in (GOP, 3):
        cut = media.remux(whole["mp4-faststart"], tmp_path / f"cut{shift}.mp4", shift_frames=shift)
        info = probe_video(cut)
        assert (info.frame_count, info.frame_count_declared) == (N - shift, N - shift), shift


def encode(video: Path, masks: Path, out: Path, *extra: str):
    argv = ["encode", video, "--masks", masks, "--weights", "random", "--image-size", SIZE]
    return runner.invoke(app, [*map(str, argv), "-o", str(out), "-q", *extra])


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("container", CONTAINERS)
def test_damaged_video_is_named_or_encoded_with_a_warning(tmp_path, whole, container, kind):
    video = tmp_path / f"clip{CONTAINERS[container][2]}"
    at = damage(whole[container], video, kind)
    m = decodable(video)
    assert 0 < m < N
    # A file that promises no more than decodes cannot be told from a shorter one: for
    # those (the zeroed tail of a fragmented mp4 here: its last whole fragment decodes,
    # the next one's header is gone) the masks are what disagrees.
    n = max(promised(container, whole[container], video, at), m)
    probed = probe_video(video)
    assert (probed.frame_count, probed.frame_count_declared) == (m, n)
    labels = media.moving_labels(N, H, W)

    # masks for every frame written: the video is the problem
    full = tmp_path / f"masks_{N}.npy"
    np.save(full, labels)
    r = encode(video, full, tmp_path / "full.zarr")
    line = one_line(r.stderr)
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    if n > m:
        assert line == (
            f"memenc: error: {video}: only {m} of {n} frames decode; the file is truncated or "
            f"damaged ({full}: masks for {N} frames)"
        )
    else:  # nothing promised more: the masks disagree with the video, both named and counted
        assert line == f"memenc: error: {full}: masks for {N} frames, the video {video} has {m}"
    assert not (tmp_path / "full.zarr").exists()
    if n > m:
        # the same masks with --frames that select only frames that decode: encoded
        out = tmp_path / "selected.zarr"
        r = encode(video, full, out, "--frames", f"0:{m}")
        assert r.exit_code == 0, r.stderr
        assert one_line(r.stderr).startswith(f"memenc: warning: {video}: only {m} of {n}")
        assert MemoryCache(out).frame_index.tolist() == list(range(m))
        # one frame past them: the video is named as damaged again
        r = encode(video, full, tmp_path / "past.zarr", "--frames", f"0:{m + 1}")
        assert r.exit_code == 1 and "truncated or damaged" in one_line(r.stderr), r.stderr
        assert not (tmp_path / "past.zarr").exists()

    # masks for the frames that decode: those are encoded
    fit = tmp_path / f"masks_{m}.npy"
    np.save(fit, labels[:m])
    out = tmp_path / "fit.zarr"
    r = encode(video, fit, out)
    assert r.exit_code == 0, r.stderr
    if n > m:
        skipped = f"frame {m}" if n == m + 1 else f"frames {m}-{n - 1}"
        assert one_line(r.stderr) == (
            f"memenc: warning: {video}: only {m} of {n} frames decode (the file is truncated or "
            f"damaged); encoding those {m}, {skipped} skipped"
        )
    else:
        assert r.stderr.strip() == ""
    cache = MemoryCache(out)
    source = cache.attrs["source_video"]
    assert (source["frame_count"], source["frame_count_declared"]) == (m, n)
    assert cache.frame_index.tolist() == list(range(m))
