"""The command line: exit codes, one-line errors for bad input, --json, inspect, preview."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import media
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from memenc.cli.app import app

runner = CliRunner()
T = 6


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    labels = media.moving_labels(T, 60, 80)
    video = media.write_video(d / "clip.mp4", media.scene_frames(labels))
    media.write_png_labels(d / "clip_masks", labels)
    return video, labels


def invoke(*args: str, env: dict | None = None):
    return runner.invoke(app, list(map(str, args)), env=env)


def stderr_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_encode_json_summary_and_inspect(tmp_path, clip):
    video, _ = clip
    out = tmp_path / "s.zarr"
    r = invoke("encode", video, "--weights", "random", "--image-size", "64", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (
        summary["status"] == "complete" and summary["frames"] == T and summary["objects"] == [3, 7]
    )
    assert summary["weights"] == "random" and summary["store"] == str(out)

    r = invoke("inspect", out, "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["status"] == "complete" and info["chunks_done"] == info["chunks_total"]
    r = invoke("inspect", out)
    assert r.exit_code == 0 and "maskmem_features" in r.stdout and "complete" in r.stdout


def test_preview_writes_a_picture(tmp_path, clip):
    video, _ = clip
    out = tmp_path / "s.zarr"
    assert (
        invoke(
            "encode", video, "--weights", "random", "--image-size", "64", "-o", out, "-q"
        ).exit_code
        == 0
    )
    png = tmp_path / "p.png"
    r = invoke("preview", out, "--frame", "2", "--object", "3", "-o", png)
    assert r.exit_code == 0, r.stderr
    from PIL import Image

    img = Image.open(png)
    assert img.width > img.height > 0


def test_usage_errors_exit_2(clip):
    video, _ = clip
    r = invoke("encode", video)  # neither --checkpoint nor --weights random
    assert r.exit_code == 2 and "--checkpoint" in stderr_line(r)
    r = invoke("encode", video, "--weights", "random", "--frames", "a:b")
    assert r.exit_code == 2 and "a:b" in stderr_line(r)
    r = invoke("encode", video, "--weights", "random", "--precision", "fp8")
    assert r.exit_code == 2 and "fp8" in stderr_line(r)


def test_debug_env_shows_the_traceback(tmp_path):
    r = invoke("encode", tmp_path / "nope.mp4", "--weights", "random", env={"MEMENC_DEBUG": "1"})
    assert r.exit_code == 1 and "Traceback" in r.stderr and "nope.mp4" in r.stderr


# ---- bad inputs: exit 1, one line naming the input, bounded time, nothing complete ----------


def _bad_inputs(root: Path, clip_video: Path, labels: np.ndarray) -> dict:
    """name -> (argv after 'encode', text the error line must contain)."""
    cases = {}

    def video_case(name: str, path: Path, must: str | None = None):
        cases[name] = ([path], must or path.name)

    video_case("missing path", root / "missing.mp4")
    (root / "empty_dir").mkdir()
    video_case("directory without frames", root / "empty_dir")
    (root / "zero.mp4").write_bytes(b"")
    video_case("0-byte file", root / "zero.mp4")
    (root / "text.mp4").write_text("hello, this is not a video\n" * 50)
    video_case("text named .mp4", root / "text.mp4")
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 10, 10)).save(root / "image.png")
    shutil.copy(root / "image.png", root / "png.mp4")
    video_case("PNG named .mp4", root / "png.mp4")
    _write_audio(root / "audio.mp4")
    video_case("audio-only file", root / "audio.mp4")
    data = clip_video.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    video_case("truncated mp4", root / "truncated.mp4")
    damaged = bytearray(data)
    mdat = damaged.find(b"mdat")
    rng = np.random.default_rng(0)
    start = mdat + 8 + 200
    damaged[start : start + len(damaged) // 2] = rng.integers(
        0, 256, len(damaged) // 2, dtype=np.uint8
    ).tobytes()[: len(damaged[start : start + len(damaged) // 2])]
    (root / "damaged.mp4").write_bytes(bytes(damaged))
    video_case("damaged frames", root / "damaged.mp4")

    media.write_png_labels(root / "short_masks", labels[:-2])
    np.save(root / "short.npy", labels[:-2])
    cases["masks with wrong frame count"] = (
        [clip_video, "--masks", root / "short.npy"],
        "short.npy",
    )
    wide = np.zeros((T, 60, 160), np.uint8)
    np.save(root / "wide.npy", wide)
    cases["masks with another aspect ratio"] = (
        [clip_video, "--masks", root / "wide.npy"],
        "wide.npy",
    )
    (root / "ckpt.pt").write_bytes(b"PK\x03\x04 garbage")
    cases["corrupt checkpoint"] = (
        [clip_video, "--checkpoint", root / "ckpt.pt", "--weights", "checkpoint"],
        "ckpt.pt",
    )
    return cases


def _write_audio(path: Path) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate = 16000
            frame.pts = i * 1024
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_bad_inputs_give_one_line_and_exit_1(tmp_path, clip):
    video, labels = clip
    cases = _bad_inputs(tmp_path, video, labels)
    for name, (argv, must) in cases.items():
        out = tmp_path / f"out_{len(os.listdir(tmp_path))}.zarr"
        extra = [] if "--checkpoint" in argv else ["--weights", "random"]
        t = time.monotonic()
        r = invoke(
            "encode", *argv, *extra, "--image-size", "64", "-o", out, "--decode-timeout", "30"
        )
        elapsed = time.monotonic() - t
        assert r.exit_code == 1, (name, r.exit_code, r.stdout, r.stderr)
        line = stderr_line(r)
        assert line.startswith("memenc: error: ") and must in line, (name, line)
        assert elapsed < 60, (name, elapsed)
        assert not _complete(out), name


def _complete(store: Path) -> bool:
    meta = store / "zarr.json"
    if not meta.exists():
        return False
    return (
        json.loads(meta.read_text()).get("attributes", {}).get("memenc", {}).get("status")
        == "complete"
    )


def test_existing_complete_store_with_other_settings(tmp_path, clip):
    video, _ = clip
    out = tmp_path / "s.zarr"
    base = ["encode", video, "--weights", "random", "--image-size", "64", "-o", out, "-q"]
    assert invoke(*base).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".memenc.lock"}
    r = invoke(*base, "--seed", "3")
    assert r.exit_code == 1
    line = stderr_line(r)
    assert "s.zarr" in line and "--overwrite" in line
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".memenc.lock"}
    assert before == after


def test_output_folder_without_write_permission(tmp_path, clip):
    """An output folder nobody may write to. Root ignores mode bits, so the folder is made
    immutable (chattr +i), which refuses root too; as another user chmod 555 does it."""
    video, _ = clip
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(locked)], check=True)
    else:
        locked.chmod(0o555)
    try:
        out = locked / "out.zarr"
        r = invoke("encode", video, "--weights", "random", "--image-size", "64", "-o", out)
        assert r.exit_code == 1, (r.exit_code, r.stderr)
        line = stderr_line(r)
        assert "locked/out.zarr" in line and ("not permitted" in line or "ermission" in line), line
        assert not out.exists()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        else:
            locked.chmod(0o755)


def test_open_cache_for_sam2_layout(tmp_path, clip):
    import memenc

    video, _ = clip
    out = tmp_path / "s.zarr"
    memenc.encode_video(video, weights="random", image_size=64, out=out)
    cache = memenc.open_cache(out)
    mem = cache.for_sam2(cache.row_of(4), object_id=7, device="cpu")
    assert mem["maskmem_features"].dtype == torch.bfloat16 and mem["maskmem_features"].shape == (
        1,
        64,
        4,
        4,
    )
    assert isinstance(mem["maskmem_pos_enc"], list) and mem["maskmem_pos_enc"][0].shape == (
        1,
        64,
        4,
        4,
    )


def test_second_writer_is_refused_with_a_clear_message(tmp_path, clip):
    """Another process holds the store's lock: encode exits 1 naming the store and the pid,
    and writes nothing into it."""
    video, _ = clip
    out = tmp_path / "s.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from memenc.pipeline.store import store_lock\n"
         f"with store_lock({str(out)!r}):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = invoke("encode", video, "--weights", "random", "--image-size", "64", "-o", out)
        assert r.exit_code == 1
        line = stderr_line(r)
        assert "s.zarr" in line and f"pid {holder.pid}" in line, line
        assert sorted(p.name for p in out.iterdir()) == [".memenc.lock"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    r = invoke("encode", video, "--weights", "random", "--image-size", "64", "-o", out, "-q")
    assert r.exit_code == 0, r.stderr  # free again once the holder is gone


def test_store_records_absolute_paths_so_cwd_does_not_matter(tmp_path, clip, monkeypatch):
    video, _ = clip
    monkeypatch.chdir(video.parent)
    out = tmp_path / "s.zarr"
    args = ["encode", video.name, "--weights", "random", "--image-size", "64", "-o", out, "--json"]
    assert invoke(*args).exit_code == 0
    info = json.loads(invoke("inspect", out, "--json").stdout)
    assert info["attrs"]["source_video"]["path"] == str(video.resolve())
    monkeypatch.chdir(tmp_path)  # same video by its absolute path, from elsewhere: a no-op
    again = json.loads(invoke(*[str(video) if a == video.name else a for a in args]).stdout)
    assert again["already_complete"]
