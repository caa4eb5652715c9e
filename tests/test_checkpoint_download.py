"""Official checkpoints: the default one fetched by `memenc encode video.mp4`, the offline
message, and the integrity of downloads (length, loadability, the recorded sha256)."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import media
import pytest
import torch
from typer.testing import CliRunner

from memenc.cli.app import app
from memenc.encoders.checkpoint import download_official
from memenc.errors import CheckpointError

runner = CliRunner()


class Server:
    """A loopback HTTP server for `MEMENC_CHECKPOINT_BASE_URL`: serves `files` (URL path
    -> bytes), counts requests, and can announce no Content-Length and cut the body."""

    def __init__(self, files: dict[str, bytes], *, length: bool = True, cut: int | None = None):
        self.files, self.length, self.cut = files, length, cut
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # without Content-Length the body ends at close

            def do_GET(self) -> None:
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                if server.length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if server.cut is None else body[: server.cut])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


TINY_URL = "/092824/sam2.1_hiera_tiny.pt"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MEMENC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEMENC_CHECKPOINT", raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> bytes:
    """A loadable checkpoint file's bytes (a state dict of tensors), large enough that a
    cut-off copy is not a loadable file."""
    path = tmp_path_factory.mktemp("small") / "c.pt"
    gen = torch.Generator().manual_seed(0)
    torch.save({"model": {"w": torch.randn(64, 1024, generator=gen)}}, path)
    return path.read_bytes()


def cached(home: Path) -> list[str]:
    folder = home / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_records_sha256_and_reuses_it(home, small_checkpoint, monkeypatch):
    with Server({TINY_URL: small_checkpoint}) as srv:
        monkeypatch.setenv("MEMENC_CHECKPOINT_BASE_URL", srv.url)
        path = download_official("sam2.1_hiera_tiny")
        assert path.read_bytes() == small_checkpoint
        record = path.with_name(path.name + ".sha256").read_text().split()[0]
        assert record == hashlib.sha256(small_checkpoint).hexdigest()
        assert download_official("sam2.1_hiera_tiny") == path
        assert srv.requests == [TINY_URL]  # the second call used the cache
    assert cached(home) == ["sam2.1_hiera_tiny.pt", "sam2.1_hiera_tiny.pt.sha256"]


def test_corrupted_or_unrecorded_cache_is_downloaded_again(home, small_checkpoint, monkeypatch):
    with Server({TINY_URL: small_checkpoint}) as srv:
        monkeypatch.setenv("MEMENC_CHECKPOINT_BASE_URL", srv.url)
        path = download_official("sam2.1_hiera_tiny")
        damaged = bytearray(small_checkpoint)
        damaged[len(damaged) // 2] ^= 0xFF  # same size, one bit pattern changed
        path.write_bytes(bytes(damaged))
        assert download_official("sam2.1_hiera_tiny") == path
        assert path.read_bytes() == small_checkpoint
        assert len(srv.requests) == 2
        path.with_name(path.name + ".sha256").unlink()  # no record: not trusted
        download_official("sam2.1_hiera_tiny")
        assert len(srv.requests) == 3 and path.read_bytes() == small_checkpoint


def test_without_content_length_a_whole_file_is_accepted(home, small_checkpoint, monkeypatch):
    with Server({TINY_URL: small_checkpoint}, length=False) as srv:
        monkeypatch.setenv("MEMENC_CHECKPOINT_BASE_URL", srv.url)
        assert download_official("sam2.1_hiera_tiny").read_bytes() == small_checkpoint


def test_truncated_body_without_content_length_leaves_no_cached_file(
    home, small_checkpoint, monkeypatch
):
    cut = len(small_checkpoint) * 2 // 3
    with Server({TINY_URL: small_checkpoint}, length=False, cut=cut) as srv:
        monkeypatch.setenv("MEMENC_CHECKPOINT_BASE_URL", srv.url)
        with pytest.raises(CheckpointError, match="no Content-Length") as e:
            download_official("sam2.1_hiera_tiny")
    assert srv.url in str(e.value) and "\n" not in str(e.value)
    assert cached(home) == []  # no checkpoint, no record, no .partial


def test_truncated_body_with_content_length_leaves_no_cached_file(
    home, small_checkpoint, monkeypatch
):
    with Server({TINY_URL: small_checkpoint}, cut=1000) as srv:
        monkeypatch.setenv("MEMENC_CHECKPOINT_BASE_URL", srv.url)
        with pytest.raises(CheckpointError, match=f"1000 of {len(small_checkpoint)} bytes"):
            download_official("sam2.1_hiera_tiny")
    assert cached(home) == []


# ------------------------------------------------- `memenc encode video.mp4`, as users type it


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory) -> Path:
    """A 3-frame clip with its masks beside it (clip_masks/)."""
    d = tmp_path_factory.mktemp("short")
    labels = media.moving_labels(3, 60, 80)
    video = media.write_video(d / "clip.mp4", media.scene_frames(labels))
    media.write_png_labels(d / "clip_masks", labels)
    return video


def test_encode_without_checkpoint_fetches_the_default_once(
    tmp_path, home, short_clip, ref_checkpoint
):
    _, ckpt = ref_checkpoint("sam2.1_hiera_base_plus", 256)
    body = Path(ckpt).read_bytes()
    url_path = "/092824/sam2.1_hiera_base_plus.pt"
    out = tmp_path / "run.zarr"
    with Server({url_path: body}) as srv:
        r = runner.invoke(
            app,
            ["encode", str(short_clip), "--image-size", "256", "-o", str(out), "--json"],
            env={"MEMENC_CHECKPOINT_BASE_URL": srv.url},
        )
        assert r.exit_code == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["variant"] == "sam2.1_hiera_base_plus"
        assert summary["weights"] == "checkpoint" and summary["frames"] == 3
        model = json.loads((out / "zarr.json").read_text())["attributes"]["memenc"]["model"]
        cached_path = home / "checkpoints/sam2.1_hiera_base_plus.pt"
        assert model["checkpoint"] == str(cached_path)
        assert model["checkpoint_sha256"] == hashlib.sha256(body).hexdigest()
        # the next run finds it in $MEMENC_HOME and asks the server nothing
        assert download_official("sam2.1_hiera_base_plus") == cached_path
        assert srv.requests == [url_path]


def test_memenc_checkpoint_env_names_the_default(tmp_path, home, short_clip, ref_checkpoint):
    _, ckpt = ref_checkpoint("sam2.1_hiera_tiny", 256)
    out = tmp_path / "env.zarr"
    r = runner.invoke(
        app,
        ["encode", str(short_clip), "--image-size", "256", "-o", str(out), "--json"],
        env={"MEMENC_CHECKPOINT": str(ckpt), "MEMENC_CHECKPOINT_BASE_URL": "http://127.0.0.1:9"},
    )
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["variant"] == "sam2.1_hiera_tiny"  # not the base_plus default
    model = json.loads((out / "zarr.json").read_text())["attributes"]["memenc"]["model"]
    assert model["checkpoint"] == str(ckpt) and cached(home) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("base", ["closed port", "unresolvable host"])
def test_offline_default_checkpoint_says_how_to_pass_a_file(tmp_path, home, short_clip, base):
    url = (
        f"http://127.0.0.1:{_closed_port()}"
        if base == "closed port"
        else "http://memenc-no-such-host.invalid"
    )
    out = tmp_path / "off.zarr"
    r = runner.invoke(
        app,
        ["encode", str(short_clip), "--image-size", "256", "-o", str(out)],
        env={"MEMENC_CHECKPOINT_BASE_URL": url},
    )
    assert r.exit_code == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "sam2.1_hiera_base_plus" in lines[0] and "--checkpoint FILE" in lines[0], lines[0]
    assert not out.exists() and cached(home) == []
