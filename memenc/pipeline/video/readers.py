"""Child side: the frame readers that fill a request — decord (resized in its decoder,
bounded read-ahead), PyAV (edit lists applied, resized through decord's filter chain) and
image files (resized like SAM 2's loader). Runs only in the decoder process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from memenc.pipeline.video.types import DecodeFailure, short_error

if TYPE_CHECKING:
    from memenc.pipeline.video.probe import ProbeResult

__all__ = ["DecordReader", "ImageReader", "PyAVReader"]


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _filter_chain(rotation: int, size: int | None) -> list[tuple[str, str]]:
    """The filters decord puts between decoder and output for a given rotation (no
    ``scale`` when ``size`` is None: frames at their displayed size)."""
    rot = rotation % 360
    chain: list[tuple[str, str]] = []
    if rot == 90:  # counter-clockwise display rotation
        chain.append(("transpose", "2"))
    elif rot == 270:
        chain.append(("transpose", "1"))
    elif rot == 180:
        chain += [("transpose", "1"), ("transpose", "1")]
    if size is not None:
        chain.append(("scale", f"{size}:{size}"))
    chain.append(("format", "rgb24"))
    return chain


class _Resizer:
    """PyAV frame -> ``[3, S, S]`` uint8 through the filter chain decord uses (with
    ``size`` None, `convert` gives the frame at its displayed size)."""

    def __init__(self, size: int | None, rotation: int) -> None:
        self.size = size
        self.rotation = rotation
        self._key: tuple[Any, ...] | None = None
        self._graph: Any = None

    def __call__(self, frame: Any, out: np.ndarray) -> None:
        out[...] = self.convert(frame).transpose(2, 0, 1)  # [S, S, 3] -> [3, S, S]

    def convert(self, frame: Any) -> np.ndarray:
        """The frame through the chain, as uint8 RGB ``[H, W, 3]``."""
        import av

        key = (frame.width, frame.height, frame.format.name)
        if key != self._key:
            graph = av.filter.Graph()
            nodes = [
                graph.add_buffer(
                    width=frame.width,
                    height=frame.height,
                    format=frame.format.name,
                    time_base=frame.time_base or Fraction(1, 1000),
                )
            ]
            nodes += [
                graph.add(name, args) for name, args in _filter_chain(self.rotation, self.size)
            ]
            nodes.append(graph.add("buffersink"))
            for a, b in zip(nodes, nodes[1:]):
                a.link_to(b)
            graph.configure()
            self._graph, self._key = graph, key
        self._graph.push(frame)
        return self._graph.pull().to_ndarray()


class DecordReader:
    """Frames through decord, resized in its decoder. Bounded read-ahead."""

    def __init__(self, vr: Any, budget: int) -> None:
        self.vr = vr
        self.budget = budget
        self._baseline: int | None = None
        self._capped = True

    def read(self, frames: np.ndarray, out: np.ndarray) -> None:
        import decord

        errors = (RuntimeError, decord.DECORDError, decord.DECORDLimitReachedError)
        try:
            batch = self.vr.get_batch(frames.tolist()).asnumpy()  # [B, S, S, 3]
        except errors:
            self._one_by_one(frames, out, errors)
        else:
            out[...] = batch.transpose(0, 3, 1, 2)  # [B, S, S, 3] -> [B, 3, S, S]
        if self._baseline is None:  # growth is measured from the first batch, so it cannot creep
            self._baseline = _rss_bytes()
        self._capped = False

    def _one_by_one(self, frames: np.ndarray, out: np.ndarray, errors: tuple[type, ...]) -> None:
        """After a batch failed: each frame alone, from a clean decoder state each time
        (after a failure decord's position is unreliable). The first frame that fails
        alone is named. With frame threads and B-frames a damaged packet also fails a
        batch that ends a few frames before it, whose frames all decode alone: then the
        batch is theirs and the read goes on."""
        for i, k in enumerate(frames.tolist()):
            try:
                with contextlib.suppress(*errors):
                    self.vr.seek(0)
                one = self.vr.get_batch([k]).asnumpy()  # [1, S, S, 3]
            except errors as e:
                raise DecodeFailure(f"frame {k}: decord: {short_error(e)}") from None
            out[i] = one[0].transpose(2, 0, 1)

    def idle(self) -> None:
        """Called while waiting for a request: stop read-ahead past the budget."""
        if self._capped:
            return
        rss = _rss_bytes()
        if rss is None or self._baseline is None or rss - self._baseline > self.budget:
            import decord

            # A seek to anywhere but the current position stops read-ahead. If decord
            # refuses it, the next read starts from a clean state anyway (see `read`);
            # nothing to report, and no traceback on the child's stderr.
            with contextlib.suppress(
                RuntimeError, decord.DECORDError, decord.DECORDLimitReachedError
            ):
                self.vr.seek(0)
            self._capped = True


class PyAVReader:
    """Frames through PyAV, edit lists applied, resized like decord.

    Decodes forward; a request behind the current position reopens the file, and a
    request past the next keyframe seeks (only when frame timestamps identify frames).
    """

    def __init__(self, path: str, probe: ProbeResult, size: int | None, threads: int = 0) -> None:
        self.path = path
        self.probe = probe
        self.threads = threads  # FFmpeg's thread count; 0: its automatic choice
        self.resize = _Resizer(size, probe.rotation)
        self._container: Any = None
        self._frames: Iterator[tuple[int, Any]] | None = None
        self._next = 0  # index of the next frame the iterator yields
        self._damaged_at: int | None = None
        self._damage = ""

    def _open(self, seek_index: int | None = None) -> None:
        import av

        self.close()
        self._container = av.open(self.path, metadata_errors="ignore")
        # FFmpeg's default (slice) threading: with frame threading, a packet that fails
        # to decode loses the frames still in flight, which shifts a damaged file.
        stream = self._container.streams.video[0]
        if self.threads > 0:
            stream.thread_count = self.threads
        self._next = 0
        if seek_index is not None:
            # Only with pts identifying frames; the first decoded frame says where we are.
            self._container.seek(int(self.probe.pts[seek_index]), stream=stream, backward=True)
            self._next = seek_index
        self._frames = self._decode(stream)

    def _decode(self, stream: Any) -> Iterator[tuple[int, Any]]:
        """Yield (frame index, frame): by pts when pts identify frames, else by count."""
        import av

        index_of = self.probe.index_of
        count = 0
        for packet in self._container.demux(stream):
            try:
                decoded = packet.decode()
            except (av.FFmpegError, ValueError) as e:
                # A packet that does not decode: with frames counted, every later
                # index is in doubt.
                if self._damaged_at is None or count < self._damaged_at:
                    self._damaged_at = count
                self._damage = short_error(e)
                continue
            for frame in decoded:
                if index_of is not None:
                    k = index_of.get(frame.pts)
                    if k is None:
                        continue
                else:
                    k = count
                count = k + 1
                yield k, frame

    def close(self) -> None:
        self._frames = None
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None

    def _keyframe_before(self, target: int) -> int:
        keys = self.probe.key_index
        return int(keys[np.searchsorted(keys, target, side="right") - 1])

    def read(self, frames: np.ndarray, out: np.ndarray) -> None:
        for j, target in enumerate(frames.tolist()):
            if j and target == frames[j - 1]:
                out[j] = out[j - 1]
                continue
            self.resize(self._frame(target), out[j])

    def read_native(self, target: int) -> np.ndarray:
        """Frame ``target`` at its displayed size, uint8 RGB ``[H, W, 3]``."""
        return self.resize.convert(self._frame(target))

    def _frame(self, target: int) -> Any:
        seekable = self.probe.index_of is not None
        key = self._keyframe_before(target) if seekable else 0
        # Reposition when behind the target, or when a keyframe lies between the
        # current position and the target (seeking skips decoding up to it).
        if self._frames is None or target < self._next or key > self._next:
            self._open(seek_index=key if key > 0 else None)
        return self._read_one(target)

    def _read_one(self, target: int) -> Any:
        import av

        assert self._frames is not None
        while True:
            if (
                self._damaged_at is not None
                and self.probe.index_of is None
                and target >= self._damaged_at
            ):
                raise DecodeFailure(f"frame {target}: does not decode ({self._damage})")
            try:
                k, frame = next(self._frames)
            except StopIteration:
                self._frames = None
                detail = f" ({self._damage})" if self._damage else ""
                raise DecodeFailure(f"frame {target}: decoder ended before it{detail}") from None
            except (av.FFmpegError, ValueError) as e:
                self._frames = None
                raise DecodeFailure(f"frame {target}: {short_error(e)}") from None
            self._next = k + 1
            if k == target:
                return frame
            if k > target:
                detail = f" ({self._damage})" if self._damage else ""
                raise DecodeFailure(f"frame {target}: does not decode{detail}")

    def idle(self) -> None:
        pass


class ImageReader:
    """Frames from image files, resized like SAM 2's ``_load_img_as_tensor``."""

    def __init__(self, files: list[str], size: int | None) -> None:
        self.files = files
        self.size = size

    def read(self, frames: np.ndarray, out: np.ndarray) -> None:
        for j, k in enumerate(frames.tolist()):
            out[j] = self.read_native(k).transpose(2, 0, 1)  # [S, S, 3] -> [3, S, S]

    def read_native(self, k: int) -> np.ndarray:
        """Image ``k`` as uint8 RGB ``[H, W, 3]``, resized to S×S unless size is None."""
        from PIL import Image

        try:
            with Image.open(self.files[k]) as img:
                rgb = img.convert("RGB")
                if self.size is not None:
                    rgb = rgb.resize((self.size, self.size))
                return np.asarray(rgb)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            name = os.path.basename(self.files[k])
            raise DecodeFailure(f"frame {k} ({name}): {short_error(e)}") from None

    def idle(self) -> None:
        pass
