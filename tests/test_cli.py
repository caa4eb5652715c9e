"""The command line: exit codes, one-line errors for bad input, --json, inspect, preview."""

from __future__ import annotations

import contextlib
import json
import os
import re
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
    return media.write_clip(tmp_path_factory.mktemp("cli"), T)


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
    # where the run's stages spent it: the CPU pipeline's four, in pipeline order
    assert list(summary["stages"]) == ["decode", "compute", "assemble", "write"]
    compute = summary["stages"]["compute"]
    assert compute["busy"] > 0 and compute["busy"] <= compute["seconds"] <= summary["seconds"]

    r = invoke("encode", video, "--weights", "random", "--image-size", "64", "-o",
               tmp_path / "h.zarr")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    line = " ".join(r.stdout.split())  # the closing line names the stage that bounded it
    assert re.search(r"frames/s, compute busy \d+% of the time;", line), line

    r = invoke("inspect", out, "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["status"] == "complete" and info["chunks_done"] == info["chunks_total"]
    assert info["attrs"]["model"]["weights"] == "random"  # the whole record is under --json
    r = invoke("inspect", out)
    assert r.exit_code == 0, r.stderr
    rows = dict(
        ln.strip().split("  ", 1) for ln in r.stdout.splitlines()[1:10] if ln.startswith("  ")
    )
    assert str(video.resolve()) in rows["video"] and f"{T} frames" in rows["video"]
    assert rows["model"].strip() == "sam2.1_hiera_tiny at 64 px, random weights, seed 0"
    assert str(video.parent / "clip_masks") in rows["masks"]
    assert rows["objects"].strip() == "3, 7"
    assert rows["frames"].strip().startswith(f"{T} (source frames 0…{T - 1}")
    assert rows["storage"].strip().startswith("float16")
    assert rows["status"].strip() == "complete"
    assert rows["chunks done"].strip().startswith(f"{info['chunks_total']}/")
    assert "maskmem_features" in r.stdout
    assert rows["pointers"].strip().startswith("obj_ptr")
    assert any(ln.split()[:2] == ["obj_ptr", "frame,object,pointer_channel"] for ln in
               r.stdout.splitlines())  # fmt: skip
    # a summary, not the raw attribute record
    assert "{" not in r.stdout and "fingerprint" not in r.stdout and "sigmoid" not in r.stdout


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


def usage_error_line(result) -> str:
    """A usage error: exit 2, the command's usage line, and exactly one `Error:` line."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("Usage: "), result.stderr
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


# argv after `encode VIDEO` -> the option the one error line must name
BAD_OPTIONS = {
    "unknown option": (["--bogus"], "--bogus"),
    "unknown option value-like": (["--image-sise", "256"], "--image-sise"),
    "image size 0": (["--image-size", "0"], "--image-size"),
    "image size 100": (["--image-size", "100"], "--image-size"),
    "image size negative": (["--image-size", "-64"], "--image-size"),
    "image size not a number": (["--image-size", "big"], "--image-size"),
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "chunk frames 0": (["--chunk-frames", "0"], "--chunk-frames"),
    "frames malformed": (["--frames", "a:b"], "--frames"),
    "frames step 0": (["--frames", "0:4:0"], "--frames"),
    "frames one part": (["--frames", "5"], "--frames"),
    "objects malformed": (["--objects", "1,,2"], "--objects"),
    "objects not ids": (["--objects", "cat"], "--objects"),
    "device unknown": (["--device", "tpu"], "--device"),
    "device cuda index beyond": (["--device", "cuda:99"], "--device"),
    "precision": (["--precision", "fp8"], "--precision"),
    "store dtype": (["--store-dtype", "int8"], "--store-dtype"),
    "weights": (["--weights", "pretrained"], "--weights"),
    "variant": (["--variant", "huge"], "--variant"),
    "decode timeout 0": (["--decode-timeout", "0"], "--decode-timeout"),
    "decode timeout inf": (["--decode-timeout", "inf"], "--decode-timeout"),
    "decode timeout nan": (["--decode-timeout", "nan"], "--decode-timeout"),
    "decoders 0": (["--decoders", "0"], "--decoders"),
    "decoders not a number": (["--decoders", "two"], "--decoders"),
    "decoders not whole": (["--decoders", "1.5"], "--decoders"),
    "checkpoint with random weights": (["--checkpoint", "x.pt"], "--checkpoint"),
    "empty output path": (["-o", ""], "-o/--out: an empty path"),  # it meant the cwd
}


def test_bad_options_are_usage_errors_before_any_side_effect(tmp_path, clip, monkeypatch):
    """Each bad option: exit 2, one line naming it; no decoder started, no model loaded,
    no store created."""
    import memenc.pipeline.engine as engine

    started = []

    def spy(name):
        def record(*args, **kwargs):
            started.append(name)
            raise AssertionError(f"{name} started for a usage error")

        return record

    monkeypatch.setattr(engine, "VideoSource", spy("VideoSource"))
    monkeypatch.setattr(engine, "load_model", spy("load_model"))
    monkeypatch.setattr(engine, "store_lock", spy("store_lock"))
    video, _ = clip
    for name, (argv, option) in BAD_OPTIONS.items():
        out = tmp_path / "out.zarr"
        r = invoke("encode", video, "--weights", "random", "-o", out, *argv)
        line = usage_error_line(r)
        assert option in line, (name, line)
        assert not out.exists(), name
        assert started == [], (name, started)
    # the image size rule is stated
    r = invoke("encode", video, "--weights", "random", "--image-size", "100")
    assert "multiple of 32" in usage_error_line(r)


def test_bad_options_in_the_library_raise_before_the_decoder(tmp_path, clip, monkeypatch):
    """encode_video checks its arguments before VideoSource opens (library callers too)."""
    import memenc.pipeline.engine as engine
    from memenc.errors import UsageError

    monkeypatch.setattr(engine, "VideoSource", None)  # calling it would be a TypeError
    video, _ = clip
    bad = [
        {"image_size": 100},
        {"image_size": 0},
        {"batch_size": 0},
        {"chunk_frames": 0},
        {"frames": "0:4:0"},
        {"objects": "x"},
        {"device": "tpu"},
        {"precision": "fp8"},
        {"store_dtype": "int8"},
        {"weights": "random", "checkpoint": "x.pt"},
        {"weights": "nope"},
        {"variant": "huge"},
        {"decoders": 0},
        {"decoders": 1.5},
    ]
    for kwargs in bad:
        args = {"weights": "random", **kwargs}
        with pytest.raises(UsageError):
            engine.encode_video(video, out=tmp_path / "o.zarr", **args)
        assert not (tmp_path / "o.zarr").exists()
    with pytest.raises(UsageError, match="an empty path"):  # not the current folder
        engine.encode_video(video, out="", weights="random")


def test_an_empty_store_path_is_a_usage_error(tmp_path):
    for argv in (["inspect", ""], ["preview", " ", "--frame", "0", "-o", tmp_path / "p.png"]):
        assert usage_error_line(invoke(*argv)) == "Error: STORE: an empty path; name the store"
    assert not (tmp_path / "p.png").exists()


def test_weights_random_with_checkpoint_is_a_usage_error(clip):
    video, _ = clip
    r = invoke("encode", video, "--weights", "random", "--checkpoint", "sam2.1_hiera_tiny")
    line = usage_error_line(r)
    assert "--checkpoint" in line and "--weights" in line


def test_progress_bar_follows_stderr_not_stdout(monkeypatch):
    """The bar is drawn on stderr: a terminal there (stdout piped) shows it, and a piped
    stderr (stdout a terminal) hides it."""
    import memenc.cli.options as cli

    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.setattr(cli.sys, "stdout", Stream(False))
    monkeypatch.setattr(cli.sys, "stderr", Stream(True))
    assert cli.progress_wanted(quiet=False, as_json=False)
    assert not cli.progress_wanted(quiet=True, as_json=False)
    monkeypatch.setattr(cli.sys, "stdout", Stream(True))
    monkeypatch.setattr(cli.sys, "stderr", Stream(False))
    assert not cli.progress_wanted(quiet=False, as_json=False)


_HOST_OOM = RuntimeError(
    "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 26843545600 bytes. Error code 12 (Cannot allocate memory)"
)


# error -> (an option of the run, the start of the line, the advice it must give)
OUT_OF_MEMORY = {
    "cuda": (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
             ["--batch-size", "8"], "out of GPU memory", ["smaller --batch-size", "8"]),
    "cuda, older torch": (
        RuntimeError("CUDA out of memory. Tried to allocate 512.00 MiB (GPU 0; 7.8 GiB total)"),
        ["--batch-size", "8"], "out of GPU memory", ["smaller --batch-size", "8"]),
    "host, torch": (_HOST_OOM, ["--image-size", "8192"], "out of memory (",
                    ["smaller --image-size"]),
    "host, python": (MemoryError(), ["--image-size", "8192"], "out of memory (",
                     ["smaller --image-size"]),
}  # fmt: skip


@pytest.mark.parametrize("case", OUT_OF_MEMORY)
def test_out_of_memory_is_one_line_suggesting_a_smaller_run(clip, monkeypatch, case):
    import memenc.pipeline.engine as engine

    error, option, start, advice = OUT_OF_MEMORY[case]

    def raise_oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(engine, "encode_video", raise_oom)
    video, _ = clip
    r = invoke("encode", video, "--weights", "random", *option)
    assert r.exit_code == 1, r.stderr
    line = stderr_line(r)
    assert line.startswith(f"memenc: error: {start}"), line
    assert all(a in line for a in advice) and "internal error" not in line, line
    assert len(line) < 220, line


def test_out_of_memory_in_inspect_gives_no_encoding_advice(tmp_path, monkeypatch):
    """inspect has no --image-size or --batch-size to lower (a store whose metadata claims
    absurd sizes can exhaust memory there)."""
    import memenc.store.report as report

    def raise_oom(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(report, "describe_store", raise_oom)
    r = invoke("inspect", tmp_path / "s.zarr")
    assert r.exit_code == 1, r.stderr
    line = stderr_line(r)
    assert line == "memenc: error: out of memory (MemoryError)", line


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
    media.write_audio(root / "audio.mp4")
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


def test_a_selection_of_no_frames_says_so_not_that_masks_are_missing(tmp_path, clip):
    video, labels = clip
    out = tmp_path / "s.zarr"
    for spec in ("5:2", f"{len(labels)}:{len(labels) + 9}"):
        r = invoke("encode", video, "--weights", "random", "--image-size", "64", "-o", out,
                   "--frames", spec)  # fmt: skip
        line = usage_error_line(r)
        assert f"selects no frames of the video's {len(labels)}" in line, line
        assert not out.exists()


def test_chunk_frames_past_what_blosc_takes_is_a_usage_error_without_a_store(tmp_path, clip):
    """The chunk size is known once the model and masks are: a chunk of more than 2 GiB
    (Blosc's limit) is refused there, naming the largest --chunk-frames that fits."""
    video, labels = clip
    out = tmp_path / "s.zarr"
    argv = ["encode", video, "--weights", "random", "--image-size", "64", "-o", out]
    # S=64: a frame of one object's float16 features is 64 * 4 * 4 * 2 = 2048 bytes, of
    # every object's float32 pointers 256 * 4 * O
    frame_bytes = max(2048, 1024 * len(np.unique(labels[labels > 0])))
    most = (2**31 - 1 - 16) // frame_bytes
    r = invoke(*argv, "--chunk-frames", str(most + 1))
    line = usage_error_line(r)
    assert f"--chunk-frames {most + 1}" in line and f"at most {most}" in line, line
    assert not out.exists()
    # past 2 GiB in one frame (S=65536: 64 * 4096**2 * 2 bytes), the image size is named
    big = ["encode", video, "--weights", "random", "--image-size", "65536", "-o", out]
    line = usage_error_line(invoke(*big))
    assert "--image-size 65536" in line and "smaller --image-size" in line, line
    assert not out.exists()
    r = invoke(*argv, "--chunk-frames", "4", "--quiet")
    assert r.exit_code == 0, r.stderr


def test_bad_video_is_reported_before_a_bad_checkpoint(tmp_path, clip):
    """The checkpoint loads in a thread while the video is opened: with both bad, the
    video's error is the one reported, as when the model loaded after the video; with only
    the checkpoint bad, its error comes, and no store is left complete."""
    video, _ = clip
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 garbage")
    (tmp_path / "text.mp4").write_text("hello, this is not a video\n" * 50)
    for argv, must in (
        ([tmp_path / "text.mp4", "--masks", video.parent / f"{video.stem}_masks"], "text.mp4"),
        ([video], "ckpt.pt"),
    ):
        out = tmp_path / f"out_{must}.zarr"
        r = invoke("encode", *argv, "--checkpoint", tmp_path / "ckpt.pt", "--image-size", "64",
                   "-o", out)  # fmt: skip
        assert r.exit_code == 1, (must, r.stdout, r.stderr)
        line = stderr_line(r)
        assert (
            line.startswith("memenc: error: ")
            and must in line
            and ("ckpt.pt" not in line or must == "ckpt.pt")
        ), line
        assert not _complete(out)


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
         "import sys; from memenc.store import store_lock\n"
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


def _stuck_opening_a_fifo(pid: int) -> bool:
    """Whether a thread of process `pid` waits in the kernel for a FIFO's writer."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            if (task / "wchan").read_text().strip() == "wait_for_partner":
                return True
    return False


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/proc").is_dir(), reason="Linux")
def test_sigterm_ends_a_command_stuck_in_a_read_that_never_returns(tmp_path, clip):
    """A chunk file that blocks on open (a FIFO here; a stalled network mount alike):
    before, SIGTERM printed 'memenc: terminated' and the process stayed, its exit waiting
    for Zarr's reader thread. Now it exits 143 a few seconds after."""
    video, _ = clip
    out = tmp_path / "s.zarr"
    r = invoke("encode", video, "--weights", "random", "--image-size", "64", "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    chunk = next((out / "maskmem_features").glob("c.0.*"))
    chunk.unlink()
    os.mkfifo(chunk)
    proc = subprocess.Popen(
        [sys.executable, "-m", "memenc", "preview", str(out), "--frame", "0", "-o",
         str(tmp_path / "p.png")], stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        t = time.monotonic()
        while not _stuck_opening_a_fifo(proc.pid) and time.monotonic() - t < 120:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        if not _stuck_opening_a_fifo(proc.pid):
            pytest.skip("this kernel does not show the FIFO wait in wchan")
        proc.terminate()
        assert proc.wait(timeout=30) == 143
        assert proc.stderr.read().strip().splitlines()[-1] == "memenc: terminated"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
