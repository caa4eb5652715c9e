"""Parent side: `VideoSource` (frames of one video in batches, prefetched by a decoder
child), `probe_video` and `read_frame`."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from memenc.errors import VideoDecodeError
from memenc.pipeline.video.child import video_child_main
from memenc.pipeline.video.process import Decoder, DecoderGone, SharedBuffer
from memenc.pipeline.video.types import NATIVE, FrameBatch, VideoInfo, short_error

__all__ = ["VideoSource", "probe_video", "read_frame"]

# How far decord may read ahead (RSS growth of the child while it waits for the
# next request) before the child seeks to stop it. Seeking throws the read-ahead
# away, and the next batch then decodes again from the previous keyframe, so a
# small budget trades CPU for memory. Linux only (read from /proc); elsewhere the
# child seeks whenever it goes idle.
_READAHEAD_BUDGET_BYTES = 32 * 2**20


def _stat(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoDecodeError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise VideoDecodeError(f"{path}: cannot read ({e.strerror or e})") from None
    if os.path.isdir(path):
        return st
    if not stat.S_ISREG(st.st_mode):
        raise VideoDecodeError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes)")
    return st


def _start(
    path: str, image_size: int | None, timeout_s: float, threads: int = 0
) -> tuple[Decoder, VideoInfo, np.ndarray]:
    st = _stat(path)
    args = (path, image_size, _READAHEAD_BUDGET_BYTES, threads)
    decoder = Decoder(path, timeout_s, video_child_main, args)
    try:
        msg = decoder.recv(time.monotonic())
        if msg[0] == "error":
            raise decoder.error(msg[1])
        _, fields, timestamps = msg
    except BaseException:
        decoder.kill()
        raise
    if os.path.isdir(path):
        info = VideoInfo(path=path, **fields)
    else:
        info = VideoInfo(path=path, size_bytes=st.st_size, mtime=st.st_mtime, **fields)
    return decoder, info, timestamps


def probe_video(path: str | os.PathLike[str], *, timeout_s: float = 60.0) -> VideoInfo:
    """Find out what a video file or frame folder holds and which backend reads it.

    Runs in a child process (PyAV, plus decord for files it may read), with
    ``timeout_s`` as the limit on a stall.

    Raises:
        VideoDecodeError: ``"<path>: <problem>"`` — missing, empty, not a video, no
            video stream, no frame decodes, or the probe crashed or stalled.
    """
    decoder, info, _ = _start(os.fspath(path), None, timeout_s)
    decoder.close()
    return info


def read_frame(path: str | os.PathLike[str], frame: int, *, timeout_s: float = 60.0) -> np.ndarray:
    """One source frame of a video file or frame folder at its displayed size.

    Frames are numbered as `VideoSource` numbers them. Decoded in a child process with
    ``timeout_s`` as the limit on a stall, like every other decode. Returns uint8 RGB
    ``[H, W, 3]`` (the container's rotation applied).

    Raises:
        VideoDecodeError: ``"<path>: <problem>"`` — as `probe_video`, or the frame is
            outside the video or does not decode.
    """
    path = os.fspath(path)
    decoder, info, _ = _start(path, NATIVE, timeout_s)
    try:
        if not 0 <= frame < info.frame_count:
            raise decoder.error(f"no frame {frame} (the video has {info.frame_count} frames)")
        decoder.send(("frame", 0, int(frame)))
        msg = decoder.recv(time.monotonic())
        if msg[0] == "error":
            raise decoder.error(msg[2])
        return msg[2]
    finally:
        decoder.close()


class VideoSource:
    """Frames of one video (file or frame folder), decoded in a child process.

    Takes the path and the model's ``image_size`` S; ``timeout_s`` bounds every wait
    for the decoder (the probe, each batch); ``threads`` is the decoder's own thread
    count (FFmpeg's, for decord and PyAV; 0: FFmpeg chooses from the cores), which
    changes the speed only, never the pixels. The probe runs at construction and its
    result is ``info``. Not thread-safe; use one source per thread.

    Raises:
        VideoDecodeError: from the constructor when the probe fails, and from the
            read methods when a frame does not decode or the decoder crashes or stalls
            (the source is then closed).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        image_size: int,
        *,
        timeout_s: float = 60.0,
        threads: int = 0,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.path = os.fspath(path)
        self.image_size = int(image_size)
        self.timeout_s = float(timeout_s)
        self.threads = int(threads)
        self._decoder: Decoder | None = None
        self._buffer: SharedBuffer | None = None
        self._pending: deque[int] = deque()  # request ids sent and not yet answered
        self._next_rid = 0
        self._generation = 0
        self._decoder, self.info, self._timestamps = _start(
            self.path, self.image_size, self.timeout_s, self.threads
        )

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Stop the decoder process and free the frame buffer. Safe to call twice."""
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
        self._pending.clear()

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __len__(self) -> int:
        return self.info.frame_count

    # -- reading ----------------------------------------------------------------------

    def read(self, frame_numbers: Sequence[int]) -> FrameBatch:
        """Decode the given frames (sorted, repeats allowed) as one `FrameBatch`.

        Raises:
            ValueError: frame numbers unsorted or outside ``[0, frame_count)``.
            VideoDecodeError: a frame does not decode, or the decoder died or stalled.
        """
        frames = self._check_frames(frame_numbers)
        self._live()
        if len(frames) == 0:
            import torch

            s = self.image_size
            empty = torch.zeros((0, 3, s, s), dtype=torch.uint8)
            return FrameBatch(empty, frames, np.zeros(0, np.float64))
        self._generation += 1
        self._drain()
        self._ensure_buffer(len(frames))
        rid = self._send_read(0, frames)
        return self._receive(rid, 0, frames, time.monotonic())

    def iter_batches(
        self, frame_numbers: Sequence[int], batch_size: int, prefetch: int = 2
    ) -> Iterator[FrameBatch]:
        """Yield the given frames (sorted) in batches of ``batch_size``.

        While the caller works on one batch, the child decodes up to ``prefetch``
        more. Starting another read or iteration ends this one.

        Raises:
            ValueError: bad frame numbers, batch_size < 1 or prefetch < 0.
            VideoDecodeError: as `read`.
        """
        frames = self._check_frames(frame_numbers)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        return self._iter(frames, int(batch_size), int(prefetch))

    def _iter(self, frames: np.ndarray, batch_size: int, prefetch: int) -> Iterator[FrameBatch]:
        self._generation += 1
        generation = self._generation
        self._drain()
        batches = [frames[i : i + batch_size] for i in range(0, len(frames), batch_size)]
        # Batch j decodes into slot j % slots. The caller holds batch i (copied out of
        # its slot) while batches i+1 .. i+prefetch are in flight.
        slots = max(prefetch, 1)
        self._ensure_buffer(slots * batch_size)
        sent: deque[tuple[int, int, np.ndarray, float]] = deque()  # rid, slot, frames, time
        n_sent = 0

        def send_upto(last: int) -> None:
            nonlocal n_sent
            while n_sent <= min(last, len(batches) - 1):
                slot = (n_sent % slots) * batch_size
                rid = self._send_read(slot, batches[n_sent])
                sent.append((rid, slot, batches[n_sent], time.monotonic()))
                n_sent += 1

        last_done = time.monotonic()
        try:
            for i in range(len(batches)):
                send_upto(max(i, prefetch - 1))
                rid, slot, want, sent_at = sent.popleft()
                # The child starts a request when it has finished the one before.
                batch = self._receive(rid, slot, want, max(sent_at, last_done))
                last_done = time.monotonic()
                send_upto(i + prefetch)  # ask for the next batch before yielding this one
                yield batch
                if self._generation != generation:
                    raise RuntimeError("VideoSource: iteration interrupted by another read")
        finally:
            if self._generation == generation:
                self._drain()

    # -- internals --------------------------------------------------------------------

    def _check_frames(self, frame_numbers: Sequence[int]) -> np.ndarray:
        frames = np.asarray(frame_numbers, dtype=np.int64).reshape(-1)
        n = self.info.frame_count
        if len(frames) and (frames.min() < 0 or frames.max() >= n):
            bad = frames[(frames < 0) | (frames >= n)][0]
            raise ValueError(f"{self.path}: frame {bad} out of range (the video has {n} frames)")
        if np.any(np.diff(frames) < 0):
            raise ValueError(f"{self.path}: frame numbers must be sorted")
        return frames

    def _live(self) -> Decoder:
        if self._decoder is None:
            raise VideoDecodeError(f"{self.path}: video source is closed")
        return self._decoder

    def _ensure_buffer(self, frames: int) -> None:
        """A frame buffer for ``frames`` frames (reused unless much too big or too small)."""
        if self._buffer is not None and frames <= self._buffer.frames <= 4 * frames:
            return
        decoder = self._live()
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
        try:
            buffer = SharedBuffer(frames, self.image_size)
        except OSError as e:  # /dev/shm and the temp folder both too small
            raise VideoDecodeError(f"{self.path}: {short_error(e)}; lower --batch-size") from None
        try:
            decoder.send(("map", buffer.path, buffer.nbytes))
            self._expect(decoder.recv(time.monotonic()), "ok")
        except BaseException:
            buffer.close()
            self._fail()
            raise
        buffer.unlink()  # both sides have it mapped; nothing is left behind on a crash
        self._buffer = buffer

    def _send_read(self, slot: int, frames: np.ndarray) -> int:
        rid = self._next_rid
        self._next_rid += 1
        try:
            self._live().send(("read", rid, slot, frames))
        except DecoderGone:
            self._fail()
            raise
        self._pending.append(rid)
        return rid

    def _receive(self, rid: int, slot: int, frames: np.ndarray, since: float) -> FrameBatch:
        decoder = self._live()
        try:
            while True:
                msg = decoder.recv(since)
                got = self._pending.popleft()
                if msg[0] == "error":
                    if msg[1] == rid:
                        raise decoder.error(msg[2])
                    continue  # an abandoned request: its error no longer matters
                self._expect(msg, "done")
                if got == rid:
                    break
        except DecoderGone:
            self._fail()
            raise
        assert self._buffer is not None
        import torch

        n = len(frames)
        pixels = torch.from_numpy(self._buffer.view[slot : slot + n].copy())
        return FrameBatch(pixels, frames.copy(), self._timestamps[frames].astype(np.float64))

    def _drain(self) -> None:
        """Wait for (and drop) the answers to requests nobody reads any more."""
        if not self._pending or self._decoder is None:
            return
        decoder = self._decoder
        try:
            while self._pending:
                decoder.recv(time.monotonic())
                self._pending.popleft()
        except DecoderGone:
            self._fail()
            raise

    def _expect(self, msg: tuple[Any, ...], kind: str) -> None:
        if msg[0] != kind:
            raise RuntimeError(f"decoder protocol error: expected {kind!r}, got {msg!r}")

    def _fail(self) -> None:
        """The decoder is gone or unusable: release everything."""
        self.close()
