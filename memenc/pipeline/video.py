"""Video sources: probe a video, then decode and resize its frames in a child process.

`probe_video` says what a video is (size, frame rate, true frame count, codec) and
which decoder reads it; `VideoSource` hands out frames as `FrameBatch`es of uint8
RGB tensors ``[B, 3, S, S]`` with the pixels SAM 2's own loader produces.

Backends (DESIGN.md §3, RELIABILITY.md "decord"):

- ``decord``: the default for MP4/MOV, Matroska and AVI files. Each frame is resized
  to S×S in decord's FFmpeg filter graph (``VideoReader(path, width=S, height=S)``),
  exactly as ``sam2.utils.misc.load_video_frames_from_video_file`` does.
- ``pyav``: files decord mis-reads or refuses, found by the probe: containers other
  than the above (MPEG-TS, raw ``.h264`` ...), MP4s whose edit list hides frames
  (decord returns every frame shifted, without an error), and files where decord's
  frame count or timestamps disagree with what a player presents. PyAV decodes with
  edit lists applied and resizes through the same filter chain decord builds
  (``[transpose=…,]scale=S:S,format=rgb24`` with FFmpeg's default scaler flags), so
  the pixels match decord's (tests/test_video.py measures it).
- ``images``: a folder of ``.jpg``/``.jpeg``/``.png`` frames, named by frame number
  as SAM 2 expects (sorted by integer stem when every stem is an integer, otherwise
  by name), resized like SAM 2's ``_load_img_as_tensor``: PIL ``convert("RGB")``
  then ``resize((S, S))`` with PIL's default filter.

The frame count and timestamps are those a player presents: the frames PyAV's
demuxer does not discard (edit lists applied), ordered by presentation time, minus
frames at the end that do not decode or lost a neighbour (a truncated file). What the
file promises (its index, stated length or frame packets) is kept as
``frame_count_declared``, so a damaged file can be named as such. Timestamps are seconds
from the stream's start (the first presented frame of an MP4 is at 0.0); streams
without timestamps (raw ``.h264``) get ``index / fps``; image folders get the
0-based frame index.

Isolation: everything that decodes (PyAV, decord, PIL) runs in a child process
started with the ``forkserver`` method (``spawn`` where that is missing), never
``fork``, because torch is loaded in the parent. A `VideoSource` keeps one child for
its lifetime, so the decoder opens once; frames come back through a shared-memory
buffer. Every wait for the child has a deadline (``timeout_s``; a long probe sends
heartbeats, so the deadline measures a stall, not the size of the file). A child
that stalls is killed; one that dies is reported. Either way the parent raises
`VideoDecodeError` naming the file and carries on. As with any multiprocessing code, a
script that uses this module must guard its entry point (``if __name__ == "__main__":``),
because the child process imports the main module. In a daemonic process (a Dask
worker), which multiprocessing may not give children, the decoder is a plain subprocess
instead (`memenc.pipeline.decoder_process`), with the same deadlines and kills.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import stat
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from memenc.errors import UsageError, VideoDecodeError

if TYPE_CHECKING:
    import torch

# torch is imported only where the parent builds tensors: the forkserver preloads this
# module, and a decoder child without torch is ~200 MB smaller.

__all__ = [
    "FrameBatch",
    "LabelVideo",
    "VideoInfo",
    "VideoSource",
    "parse_frames",
    "probe_video",
    "read_frame",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""File suffixes (any case) that make up a frame folder."""

# Containers decord reads correctly when the probe finds nothing else wrong; every
# other container is decoded with PyAV (MPEG-TS spins then fails, raw streams are
# refused, see RELIABILITY.md).
_DECORD_FORMATS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})

# FFmpeg demuxers that read a single picture: PyAV opens e.g. a PNG named .mp4 as a
# one-frame "video" through these.
_IMAGE_DEMUXERS = frozenset({"image2", "image2pipe", "gif", "apng", "ico", "tiff"})

# decord's fault_tol: a tiny float makes it raise on the first frame it would
# otherwise silently replace with a neighbour. A float >= 1 is a percentage and
# never fires for a short video; 0 disables the check.
_DECORD_FAULT_TOL = 1e-9

# How far decord may read ahead (RSS growth of the child while it waits for the
# next request) before the child seeks to stop it. Seeking throws the read-ahead
# away, and the next batch then decodes again from the previous keyframe, so a
# small budget trades CPU for memory. Linux only (read from /proc); elsewhere the
# child seeks whenever it goes idle.
_READAHEAD_BUDGET_BYTES = 32 * 2**20

# Timestamps from decord and from the probe agree within this many frame periods.
_TIMESTAMP_TOLERANCE_FRAMES = 0.25

# The child sends a heartbeat at most this often during a long probe.
_HEARTBEAT_S = 0.5

# image_size that asks a decoder child for frames at their own size (`read_frame`).
_NATIVE = 0

# Test hook: "<stage>:<action>", stage in {"probe", "read"}, action in {"crash",
# "segv", "hang", "exit"}. Passed to each new child; None in normal use.
_CHILD_FAULT: str | None = None


# --------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What the probe found out about a video file or frame folder.

    ``width``/``height`` are the displayed size of the original frames (after the
    container's rotation, as SAM 2 reports it); ``frame_count`` is the number of
    frames a player presents that decode; ``frame_count_declared`` the number the
    file promises (its index, stated length, or frame packets), larger than
    ``frame_count`` when the file is truncated or damaged at the end; ``fps`` is the
    container's average rate (0.0 for a frame folder). ``backend`` names the decoder
    that reads the frames and ``backend_reason`` why it was chosen.
    """

    path: str
    size_bytes: int
    mtime: float
    width: int
    height: int
    fps: float
    frame_count: int
    frame_count_declared: int
    codec: str
    container: str
    backend: str
    backend_reason: str

    def to_attrs(self) -> dict[str, Any]:
        """Return the fields as a JSON-safe dict (for the store's attributes)."""
        return asdict(self)


@dataclass(frozen=True)
class FrameBatch:
    """Decoded frames and where they came from.

    ``frames``: uint8 ``[B, 3, S, S]`` RGB, resized to S×S as SAM 2 resizes them.
    ``frame_index``: int64 ``[B]``, the source frame number of each row.
    ``timestamps``: float64 ``[B]``, seconds, from the decoder.
    """

    frames: torch.Tensor
    frame_index: np.ndarray
    timestamps: np.ndarray

    def __post_init__(self) -> None:
        import torch

        f = self.frames
        if not isinstance(f, torch.Tensor) or f.dtype != torch.uint8:
            raise ValueError(f"FrameBatch.frames must be a uint8 tensor, got {_describe(f)}")
        if f.ndim != 4 or f.shape[1] != 3 or f.shape[2] != f.shape[3]:
            raise ValueError(f"FrameBatch.frames must be [B, 3, S, S], got {list(f.shape)}")
        b = f.shape[0]
        for name, dtype in (("frame_index", np.int64), ("timestamps", np.float64)):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != (b,):
                raise ValueError(
                    f"FrameBatch.{name} must be {np.dtype(dtype)} [{b}], got {_describe(a)}"
                )

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def _describe(x: object) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None:
        return type(x).__name__
    return f"{type(x).__name__} {dtype} {list(shape)}"


def parse_frames(spec: str | None) -> slice:
    """Parse a ``--frames`` selection ``START:STOP[:STEP]`` into a slice.

    Python slice semantics: parts may be empty (``"::4"``, ``"100:"``) and START/STOP
    may be negative (counted from the end). STEP must be positive, so frames come in
    increasing order. ``None`` or ``""`` selects every frame.

    Raises:
        UsageError: the text is not of that form; the message quotes it.
    """
    if spec is None or not spec.strip():
        return slice(None)
    parts = spec.strip().split(":")
    if len(parts) not in (2, 3):
        raise UsageError(
            f"--frames {spec!r}: expected START:STOP or START:STOP:STEP "
            "(each part an integer or empty, e.g. 0:100, ::4, 10:)"
        )
    values: list[int | None] = []
    for part in parts:
        part = part.strip()
        try:
            values.append(int(part) if part else None)
        except ValueError:
            raise UsageError(f"--frames {spec!r}: {part!r} is not an integer") from None
    if len(values) == 3 and values[2] is not None and values[2] < 1:
        raise UsageError(f"--frames {spec!r}: STEP must be a positive integer")
    return slice(*values)


# --------------------------------------------------------------------------------------
# Child side: probing and decoding. Runs only in the decoder process.
# --------------------------------------------------------------------------------------


class _Failure(Exception):
    """A problem with the input, reported to the parent as one line."""


# decord prefixes its messages with "[hh:mm:ss] /source/file.cc:123: " (sometimes
# twice) and the file name in brackets.
_DECORD_NOISE = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: |\[[^\]]*\] ?")


def _short(e: BaseException) -> str:
    """One line for an exception from a decoder library, without the file name."""
    strerror = getattr(e, "strerror", None)  # PyAV: the message without the file name
    text = strerror if isinstance(strerror, str) and strerror else str(e)
    text = " ".join(_DECORD_NOISE.sub("", text).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _apply_fault(stage: str, fault: str | None) -> None:
    if not fault or not fault.startswith(stage + ":"):
        return
    action = fault.split(":", 1)[1]
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "exit":
        os._exit(3)
    elif action == "hang":
        threading.Event().wait()


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


class _DecordReader:
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
        except errors as e:
            # Name the first frame that fails on its own, from a clean decoder state
            # each time (after a failure decord's position is unreliable). With frame
            # threads and B-frames, a damaged packet also fails a few frames before it.
            for k in frames.tolist():
                try:
                    with contextlib.suppress(*errors):
                        self.vr.seek(0)
                    self.vr.get_batch([k])
                except errors as e1:
                    raise _Failure(f"frame {k}: decord: {_short(e1)}") from None
            raise _Failure(f"frames {frames[0]}-{frames[-1]}: decord: {_short(e)}") from None
        out[...] = batch.transpose(0, 3, 1, 2)  # [B, S, S, 3] -> [B, 3, S, S]
        if self._baseline is None:  # growth is measured from the first batch, so it cannot creep
            self._baseline = _rss_bytes()
        self._capped = False

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


class _PyAVReader:
    """Frames through PyAV, edit lists applied, resized like decord.

    Decodes forward; a request behind the current position reopens the file, and a
    request past the next keyframe seeks (only when frame timestamps identify frames).
    """

    def __init__(self, path: str, probe: _ProbeResult, size: int | None) -> None:
        self.path = path
        self.probe = probe
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
                self._damage = _short(e)
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
                raise _Failure(f"frame {target}: does not decode ({self._damage})")
            try:
                k, frame = next(self._frames)
            except StopIteration:
                self._frames = None
                detail = f" ({self._damage})" if self._damage else ""
                raise _Failure(f"frame {target}: decoder ended before it{detail}") from None
            except (av.FFmpegError, ValueError) as e:
                self._frames = None
                raise _Failure(f"frame {target}: {_short(e)}") from None
            self._next = k + 1
            if k == target:
                return frame
            if k > target:
                detail = f" ({self._damage})" if self._damage else ""
                raise _Failure(f"frame {target}: does not decode{detail}")

    def idle(self) -> None:
        pass


class _ImageReader:
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
            raise _Failure(f"frame {k} ({name}): {_short(e)}") from None

    def idle(self) -> None:
        pass


@dataclass
class _ProbeResult:
    info: dict[str, Any]  # VideoInfo fields, less path/size/mtime for files
    timestamps: np.ndarray  # float64 [T]
    pts: np.ndarray  # int64 [T] presented pts (empty when the stream has none)
    key_index: np.ndarray  # int64, indices of keyframes in presentation order
    index_of: dict[int, int] | None  # pts -> frame index, None when pts do not identify frames
    rotation: int
    files: list[str] | None = None


def _frame_number(name: str) -> int | None:
    try:
        return int(os.path.splitext(name)[0])
    except ValueError:
        return None


def list_images(folder: str) -> list[str]:
    """Frame files: by integer stem when every stem is one (as SAM 2 sorts), else by name."""
    names = [
        n
        for n in os.listdir(folder)
        if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES
        and os.path.isfile(os.path.join(folder, n))
    ]
    numbers = [_frame_number(n) for n in names]
    if all(k is not None for k in numbers):
        names = [n for _, n in sorted(zip(numbers, names))]
    else:
        names.sort()
    return [os.path.join(folder, n) for n in names]


def _probe_images(folder: str) -> _ProbeResult:
    from PIL import Image

    try:
        files = list_images(folder)
    except OSError as e:
        raise _Failure(f"cannot list folder ({_short(e)})") from None
    if not files:
        raise _Failure(f"no frames (no {'/'.join(IMAGE_SUFFIXES)} files in the folder)")
    try:
        with Image.open(files[0]) as img:
            width, height = img.size
            codec = (img.format or "").lower()
    except (OSError, ValueError, SyntaxError) as e:
        raise _Failure(f"frame 0 ({os.path.basename(files[0])}): {_short(e)}") from None
    stats = [os.stat(f) for f in files]
    n = len(files)
    info = dict(
        size_bytes=sum(s.st_size for s in stats),
        mtime=max(s.st_mtime for s in stats),
        width=width,
        height=height,
        fps=0.0,
        frame_count=n,
        frame_count_declared=n,
        codec=codec,
        container="images",
        backend="images",
        backend_reason="image folder",
    )
    empty = np.zeros(0, np.int64)
    return _ProbeResult(info, np.arange(n, dtype=np.float64), empty, empty, None, 0, files)


def _probe_file(path: str, heartbeat: Callable[[], None]) -> _ProbeResult:
    """Probe with PyAV: stream, presented frames, decodable tail. No decord yet."""
    import av

    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, OSError, ValueError) as e:
        raise _Failure(f"not a readable video ({_short(e)})") from None
    with container:
        fmt = container.format.name
        if fmt in _IMAGE_DEMUXERS or fmt.endswith("_pipe"):
            raise _Failure(f"not a video (image file, {fmt})")
        if not container.streams.video:
            raise _Failure("no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        time_base = stream.time_base

        # Demux: which packets become presented frames (edit lists mark the rest
        # "discard"), and which are keyframes. Reads the file but decodes nothing.
        pts: list[int | None] = []
        keys: list[bool] = []
        discarded = corrupt = 0
        truncated = ""
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # flush packet at the end
                if packet.is_discard:
                    discarded += 1
                elif packet.is_corrupt:
                    corrupt += 1
                else:
                    pts.append(packet.pts)
                    keys.append(bool(packet.is_keyframe))
                heartbeat()
        except (av.FFmpegError, ValueError) as e:
            truncated = _short(e)
        start_time = stream.start_time
        promised = _promised_frames(container, stream, fmt, fps, discarded)

    if not pts:
        raise _Failure("no video frames" + (f" ({truncated})" if truncated else ""))
    has_pts = all(p is not None for p in pts)
    order = np.argsort(np.asarray(pts, np.int64), kind="stable") if has_pts else np.arange(len(pts))
    table = np.asarray(pts, np.int64)[order] if has_pts else np.zeros(0, np.int64)
    is_key = np.asarray(keys, bool)[order]

    first, rotation = _decode_first(path, heartbeat)
    if first is None:
        raise _Failure("no frame decodes" + (f" ({truncated})" if truncated else ""))
    width, height = first
    if rotation % 180 == 90:
        width, height = height, width

    # Decode the last GOP: frames listed in the index that do not decode (a truncated
    # file) are not part of the video. Also tells whether frame pts identify frames.
    n = len(pts)
    pts_ok = has_pts
    decoded: list[int | None] = []
    if has_pts:
        key_pts = int(table[is_key].max()) if is_key.any() else int(table[0])
        decoded = _decode_tail(path, key_pts, heartbeat) or []
        tail = [p for p in decoded if p is None or p >= key_pts]
        if not tail or any(p is None for p in tail) or any(b <= a for a, b in zip(tail, tail[1:])):
            pts_ok = False  # pts out of order (e.g. AVI): frames are identified by count
        else:
            missing = np.setdiff1d(table[table >= key_pts], np.asarray(tail, np.int64))
            if len(missing):
                keep = table < missing.min()
                table, is_key = table[keep], is_key[keep]
                n = len(table)
            hole = _hole_in_tail(table, is_key)
            if hole is not None:  # frames lost before the last ones that decode
                table, is_key = table[:hole], is_key[:hole]
                n = hole
    if not pts_ok:
        last_key = max((i for i, k in enumerate(keys) if k), default=0)  # in decode order
        expected = len(keys) - last_key
        if decoded and len(decoded) >= expected:
            pass  # the last GOP decodes in full
        elif decoded:
            n -= expected - len(decoded)
        else:
            n = min(n, _count_decodable(path, heartbeat))  # cannot seek: decode it all
        hole = _hole_in_tail(table[:n], is_key[:n]) if has_pts else None
        if hole is not None:
            n = hole
    if n == 0:
        raise _Failure("no frame decodes")
    # What the file promises: every frame packet it holds, or more where its index or
    # its stated length says so. More than decodes: the file is truncated or damaged.
    declared = max(len(pts) + corrupt, n)
    if promised is not None:
        count, exact = promised
        if exact or count > n + 1:  # a length in seconds is good to about a frame
            declared = max(declared, count)

    if has_pts and pts_ok:
        origin = start_time if start_time is not None else int(table[0])
        timestamps = (table[:n] - origin).astype(np.float64) * float(time_base)
        index_of: dict[int, int] | None = {int(p): i for i, p in enumerate(table[:n].tolist())}
    elif has_pts:
        origin = start_time if start_time is not None else int(table[0])
        timestamps = (table[:n] - origin).astype(np.float64) * float(time_base)
        index_of = None
    else:
        timestamps = (
            np.arange(n, dtype=np.float64) / fps if fps > 0 else np.arange(n, dtype=np.float64)
        )
        index_of = None
    key_index = np.flatnonzero(is_key[:n]).astype(np.int64)
    if len(key_index) == 0 or key_index[0] != 0:
        key_index = np.concatenate([[0], key_index]).astype(np.int64)

    if fmt not in _DECORD_FORMATS:
        reason = f"{fmt} container"
    elif discarded:
        reason = "edit list"
    elif not has_pts:
        reason = "no frame timestamps"
    else:
        reason = ""  # decord candidate, checked against decord next
    info = dict(
        width=width,
        height=height,
        fps=fps,
        frame_count=int(n),
        frame_count_declared=int(declared),
        codec=codec,
        container=fmt,
        backend="pyav",
        backend_reason=reason,
    )
    return _ProbeResult(info, timestamps, table[:n], key_index, index_of, rotation)


def _hole_in_tail(table: np.ndarray, is_key: np.ndarray) -> int | None:
    """Where the last GOP of a constant-rate stream skips presentation times: the index
    of the first frame after the hole, else None.

    A file cut inside a group of B-frames keeps the P-frame they precede in decode order
    and loses them: it presents ..., 22, 23, 27. Numbering by presentation order would
    call frame 27 frame 24, so the video ends at the hole. Only for a stream whose
    frames before the last keyframe are evenly spaced (a variable-rate stream may skip
    times on purpose); ``table`` holds the presented pts in order.
    """
    if len(table) < 4:
        return None
    keys = np.flatnonzero(is_key)
    last_key = int(keys.max()) if len(keys) else 0
    body = np.diff(table[:last_key])
    if len(body) < 2:
        return None
    step = int(np.median(body))
    if step <= 0 or int(np.abs(body - step).max()) > 1:  # 1 tick: rounded time bases
        return None
    gaps = np.diff(table[max(last_key - 1, 0) :]) > step + step // 2
    return max(last_key - 1, 0) + 1 + int(np.argmax(gaps)) if gaps.any() else None


def _promised_frames(
    container: Any, stream: Any, fmt: str, fps: float, discarded: int
) -> tuple[int, bool] | None:
    """The frame count a container states, and whether it is exact (a sample count)
    rather than derived from a stated length in seconds; None when it states neither.

    MP4/MOV: the sample table's count (less the frames an edit list hides; when the
    demuxer drops them without marking them, the edit list's length in frames), or for
    a fragmented file, which has none, the samples its fragments list. Matroska: the
    per-track ``NUMBER_OF_FRAMES`` or ``DURATION`` tag (mkvmerge, FFmpeg). AVI: the
    stream header's length. MPEG-TS and raw streams state nothing: FFmpeg's duration
    for them is estimated from what is there.
    """
    if stream.frames and stream.frames > discarded:
        count = int(stream.frames) - discarded
        if stream.duration and stream.time_base and fps > 0:
            shown = int(round(float(stream.duration * stream.time_base) * fps))
            if shown < count - 1:  # an edit list hides frames the demuxer drops unmarked
                return shown, False
        return count, True
    if fps <= 0:
        return None
    if fmt == "matroska,webm":
        tags = {str(k).upper(): str(v) for k, v in (stream.metadata or {}).items()}
        if tags.get("NUMBER_OF_FRAMES", "").isdigit():
            return int(tags["NUMBER_OF_FRAMES"]), True
        m = re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)", tags.get("DURATION", "").strip())
        if m:
            seconds = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
            return int(round(seconds * fps)), False
        return None
    if fmt == "mov,mp4,m4a,3gp,3g2,mj2":
        listed = _mp4_fragment_samples(container.name, stream.id)
        if listed > discarded:
            return listed - discarded, True
    return None


def _mp4_fragment_samples(path: str, track_id: int) -> int:
    """How many samples the movie fragments of an MP4 list for one track: the sum of
    ``sample_count`` over the ``moof/traf/trun`` boxes whose ``tfhd`` names the track.
    Reads the top-level box headers and each whole ``moof``; stops where the box
    structure ends (a truncated or zeroed tail)."""

    def boxes(data: bytes) -> Iterator[tuple[bytes, bytes]]:
        pos = 0
        while pos + 8 <= len(data):
            size, kind = struct.unpack_from(">I4s", data, pos)
            if size < 8 or pos + size > len(data):
                return
            yield kind, data[pos + 8 : pos + size]
            pos += size

    total = 0
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            pos = 0
            while pos + 8 <= end:
                f.seek(pos)
                head = f.read(16)
                size, kind = struct.unpack_from(">I4s", head)
                header = 8
                if size == 1 and len(head) == 16:
                    size, header = struct.unpack_from(">Q", head, 8)[0], 16
                if size < header or pos + size > end:
                    break  # zeros, garbage, or a box cut short: nothing more is listed
                if kind == b"moof":
                    f.seek(pos + header)
                    for kind2, traf in boxes(f.read(size - header)):
                        if kind2 != b"traf":
                            continue
                        track, count = None, 0
                        for kind3, body in boxes(traf):
                            if kind3 == b"tfhd" and len(body) >= 8:
                                track = struct.unpack_from(">I", body, 4)[0]
                            elif kind3 == b"trun" and len(body) >= 8:
                                count += struct.unpack_from(">I", body, 4)[0]
                        if track == track_id:
                            total += count
                pos += size
    except OSError:
        return 0
    return total


def _decode_first(path: str, heartbeat: Callable[[], None]) -> tuple[tuple[int, int] | None, int]:
    """Decode the first frame: its coded size and display rotation."""
    import av

    with av.open(path, metadata_errors="ignore") as c:
        stream = c.streams.video[0]
        try:
            for packet in c.demux(stream):
                try:
                    frames = packet.decode()
                except (av.FFmpegError, ValueError):
                    continue
                for frame in frames:
                    return (frame.width, frame.height), int(round(frame.rotation or 0))
                heartbeat()
        except (av.FFmpegError, ValueError):
            pass
    return None, 0


def _decode_tail(path: str, key_pts: int, heartbeat: Callable[[], None]) -> list[int | None] | None:
    """pts of the frames decoded from the keyframe at ``key_pts`` to the end (None when
    the stream cannot seek). Packets that fail to decode are skipped."""
    import av

    out: list[int | None] = []
    with av.open(path, metadata_errors="ignore") as c:
        stream = c.streams.video[0]
        try:
            c.seek(key_pts, stream=stream, backward=True)
        except (av.FFmpegError, ValueError, OSError):
            return None
        try:
            for packet in c.demux(stream):
                try:
                    frames = packet.decode()
                except (av.FFmpegError, ValueError):
                    continue
                out += [f.pts for f in frames]
                heartbeat()
        except (av.FFmpegError, ValueError):
            pass
    return out


def _count_decodable(path: str, heartbeat: Callable[[], None]) -> int:
    """Decode the whole stream and count its frames (streams that cannot seek)."""
    import av

    n = 0
    with av.open(path, metadata_errors="ignore") as c:
        stream = c.streams.video[0]
        try:
            for packet in c.demux(stream):
                try:
                    n += len(packet.decode())
                except (av.FFmpegError, ValueError):
                    continue
                heartbeat()
        except (av.FFmpegError, ValueError):
            pass
    return n


def _check_decord(path: str, probe: _ProbeResult, size: int | None) -> Any:
    """Open decord on a candidate file and compare it with the probe.

    Returns the VideoReader when decord agrees (and sets the backend to decord),
    otherwise None with the reason recorded.
    """
    import decord

    info = probe.info
    try:
        vr = decord.VideoReader(
            path,
            ctx=decord.cpu(0),
            width=size or -1,
            height=size or -1,
            fault_tol=_DECORD_FAULT_TOL,
        )
    except (RuntimeError, decord.DECORDError, decord.DECORDLimitReachedError) as e:
        info["backend_reason"] = f"decord cannot open it ({_short(e)})"
        return None
    n = info["frame_count"]
    if len(vr) != n:
        info["backend_reason"] = f"frame count mismatch (decord {len(vr)}, presented {n})"
        return None
    try:
        theirs = vr.get_frame_timestamp(list(range(n)))[:, 0].astype(np.float64)
    except (RuntimeError, decord.DECORDError, decord.DECORDLimitReachedError, IndexError) as e:
        info["backend_reason"] = f"decord timestamps unreadable ({_short(e)})"
        return None
    fps = info["fps"]
    tol = _TIMESTAMP_TOLERANCE_FRAMES / fps if fps > 0 else 1e-3
    if not np.allclose(theirs, probe.timestamps, rtol=0, atol=tol):
        info["backend_reason"] = "timestamp mismatch"
        return None
    info["backend"] = "decord"
    info["backend_reason"] = "decord agrees with the probe"
    return vr


def _child_main(
    conn: multiprocessing.connection.Connection,
    path: str,
    image_size: int | None,
    fault: str | None,
    readahead_budget: int,
) -> None:
    """Decoder process: probe, then (when image_size is given) serve read requests.

    ``image_size`` 0 (`_NATIVE`) serves single frames at their displayed size instead,
    through the pipe (``("frame", rid, k)`` -> ``("frame", rid, rgb)``).

    Messages to the parent: ``("alive",)`` heartbeats, ``("info", dict, timestamps)``
    or ``("error", text)`` for the probe, then ``("ok",)`` per buffer mapping and
    ``("done", rid)`` / ``("error", rid, text)`` per read.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import av
    import decord

    decord.logging.set_level(decord.logging.QUIET)  # FFmpeg's own log lines
    # numpy arrays from get_batch, whatever bridge a preloaded __main__ may have chosen
    # (SAM 2's loader, for one, switches decord to its torch bridge globally)
    decord.bridge.set_bridge("native")
    del av  # imported early so a broken install fails here; PyAV ignores FFmpeg logs

    last_beat = time.monotonic()

    def heartbeat() -> None:
        """Tell the parent a long probe is still making progress (rate-limited)."""
        nonlocal last_beat
        if time.monotonic() - last_beat > _HEARTBEAT_S:
            conn.send(("alive",))
            last_beat = time.monotonic()

    try:
        _apply_fault("probe", fault)
        try:
            size = None if image_size == _NATIVE else image_size
            if os.path.isdir(path):
                probe = _probe_images(path)
                reader: Any = None if image_size is None else _ImageReader(probe.files or [], size)
            else:
                probe = _probe_file(path, heartbeat)
                vr = None
                if probe.info["backend_reason"] == "" and image_size != _NATIVE:
                    vr = _check_decord(path, probe, image_size)
                reader = None
                if image_size == _NATIVE:
                    reader = _PyAVReader(path, probe, None)
                elif image_size is not None:
                    if vr is not None:
                        reader = _DecordReader(vr, readahead_budget)
                    else:
                        reader = _PyAVReader(path, probe, image_size)
                del vr
        except _Failure as e:
            conn.send(("error", str(e)))
            return
        except Exception as e:  # a library raised something unexpected: still one line
            conn.send(("error", f"probe failed ({type(e).__name__}: {_short(e)})"))
            return
        conn.send(("info", probe.info, probe.timestamps))
        if reader is None:
            return

        buf: mmap.mmap | None = None
        view: np.ndarray | None = None
        while True:
            while not conn.poll(0.05):
                reader.idle()
            msg = conn.recv()
            kind = msg[0]
            if kind == "close":
                return
            if kind == "map":
                _, buf_path, nbytes = msg
                view = None
                if buf is not None:
                    with contextlib.suppress(BufferError):
                        buf.close()
                with open(buf_path, "r+b") as f:
                    buf = mmap.mmap(f.fileno(), nbytes)
                view = np.frombuffer(buf, np.uint8).reshape(-1, 3, image_size, image_size)
                conn.send(("ok",))
            elif kind == "frame":
                _, rid, k = msg
                _apply_fault("read", fault)
                try:
                    conn.send(("frame", rid, reader.read_native(k)))
                except _Failure as e:
                    conn.send(("error", rid, str(e)))  # names the frame
                except Exception as e:
                    conn.send(("error", rid, f"frame {k}: {type(e).__name__}: {_short(e)}"))
            elif kind == "read":
                _, rid, first_slot, frames = msg
                _apply_fault("read", fault)
                assert view is not None
                try:
                    reader.read(frames, view[first_slot : first_slot + len(frames)])
                except _Failure as e:
                    conn.send(("error", rid, str(e)))
                except Exception as e:  # unexpected, from a library: report, keep serving
                    first, last = frames[0], frames[-1]
                    problem = f"frames {first}-{last}: {type(e).__name__}: {_short(e)}"
                    conn.send(("error", rid, problem))
                else:
                    conn.send(("done", rid))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent went away


def _frame_labels(index: int, frame: Any) -> np.ndarray:
    """A decoded mask-video frame as labels [H, W], pixel values exact: grey frames and
    palette indices as they are, RGB frames whose channels are equal by one channel,
    anything else (YUV) converted to grey."""
    name = frame.format.name
    if name in ("gray", "gray8", "gray16le", "gray16be"):
        return frame.to_ndarray()
    if name == "pal8":
        return frame.to_ndarray()[0]  # (indices, palette)
    if frame.format.is_rgb:
        rgb = frame.to_ndarray(format="rgb24")
        red = rgb[..., 0]
        if not (np.array_equal(red, rgb[..., 1]) and np.array_equal(red, rgb[..., 2])):
            raise _Failure(f"frame {index} is in colour; a mask video must hold grey label values")
        return red
    return frame.to_ndarray(format="gray")


def _iter_labels(path: str) -> Iterator[np.ndarray]:
    """Every frame of a mask video as labels [H, W], in order; `_Failure` on a problem."""
    import av

    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise _Failure(
            "unknown mask format (not a folder of PNGs, .npy, .npz, SA-V .json or a video "
            f"PyAV can decode: {_short(e)})"
        ) from None
    index = 0
    try:
        format_name = container.format.name
        if format_name.endswith("_pipe") or format_name == "image2":
            raise _Failure("a single image, not a mask video")
        if not container.streams.video:
            raise _Failure("no video stream")
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            yield _frame_labels(index, frame)
            index += 1
    except (av.FFmpegError, OSError, ValueError) as e:
        raise _Failure(f"cannot decode the mask video at frame {index} ({_short(e)})") from None
    finally:
        container.close()


def _scan_labels(path: str, heartbeat: Callable[[], None]) -> dict[str, Any]:
    """Decode a whole mask video: frame count, size, and the non-zero label values."""
    count = 0
    size: tuple[int, ...] | None = None
    values: set[int] = set()
    for labels in _iter_labels(path):
        if size is None:
            size = labels.shape
        elif labels.shape != size:
            raise _Failure(
                f"frame {count} is {labels.shape[1]}x{labels.shape[0]}, "
                f"frame 0 is {size[1]}x{size[0]}"
            )
        if labels.dtype == np.uint8:
            found = np.flatnonzero(np.bincount(labels.ravel(), minlength=256)[1:]) + 1
        else:
            found = np.unique(labels)
        values.update(int(v) for v in found if v != 0)
        count += 1
        heartbeat()
    if size is None:
        raise _Failure("the mask video has no frames")
    return {"frames": count, "height": size[0], "width": size[1], "values": sorted(values)}


def _label_child_main(
    conn: multiprocessing.connection.Connection, path: str, scan: bool, fault: str | None
) -> None:
    """Mask decoder process: (when ``scan``) decode the whole video once and report
    ``("info", dict)``, then serve ``("read", rid, frames)`` with ``("labels", rid,
    uint8/uint16 [n, H, W])``, decoding forward and restarting for an earlier frame.
    Errors are ``("error", text)`` / ``("error", rid, text)``; heartbeats as the video
    decoder's, during the scan and long reads."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    last_beat = time.monotonic()

    def heartbeat() -> None:
        nonlocal last_beat
        if time.monotonic() - last_beat > _HEARTBEAT_S:
            conn.send(("alive",))
            last_beat = time.monotonic()

    try:
        _apply_fault("mask-probe", fault)
        try:
            info = _scan_labels(path, heartbeat) if scan else None
        except _Failure as e:
            conn.send(("error", str(e)))
            return
        except Exception as e:
            conn.send(("error", f"cannot decode the mask video ({type(e).__name__}: {_short(e)})"))
            return
        conn.send(("info", info))
        frames_iter: Iterator[np.ndarray] | None = None
        position = 0  # index of the frame frames_iter yields next
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                return
            _, rid, frames = msg
            _apply_fault("mask-read", fault)
            out = []
            try:
                for frame in frames:
                    if frames_iter is None or frame < position:
                        frames_iter, position = _iter_labels(path), 0
                    labels = None
                    while position <= frame:
                        labels = next(frames_iter, None)
                        if labels is None:
                            frames_iter = None
                            raise _Failure(
                                f"frame {frame}: the mask video ended after frame {position - 1}"
                            )
                        position += 1
                        heartbeat()
                    out.append(labels)
            except _Failure as e:
                frames_iter = None  # its position is unknown now
                conn.send(("error", rid, str(e)))
            except Exception as e:
                frames_iter = None
                conn.send(("error", rid, f"{type(e).__name__}: {_short(e)}"))
            else:
                conn.send(("labels", rid, np.stack(out) if out else None))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return


# --------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------

_context_lock = threading.Lock()
_context: multiprocessing.context.BaseContext | None = None


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver (children fork from a small server that preloads this module), else spawn."""
    global _context
    with _context_lock:
        if _context is None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                ctx = multiprocessing.get_context("forkserver")
                # Only a hint: ignored if some other code already started the server.
                ctx.set_forkserver_preload(["__main__", __name__])
            else:
                ctx = multiprocessing.get_context("spawn")
            _context = ctx
        return _context


class _DecoderGone(VideoDecodeError):
    """The decoder process crashed, exited or stalled (and was killed)."""


class _Decoder:
    """The parent's handle on one decoder process: messages with deadlines."""

    def __init__(
        self,
        path: str,
        timeout_s: float,
        target: Callable[..., None],
        args: tuple[Any, ...],
        what: str = "decoder",
    ) -> None:
        """Start ``target(child_conn, *args)`` in a decoder process. ``what`` names the
        process in messages ("decoder", "mask decoder")."""
        self.path = path
        self.timeout_s = timeout_s
        self.what = what
        if multiprocessing.current_process().daemon:
            # multiprocessing refuses children of a daemonic process (a Dask worker);
            # a plain subprocess is not refused, and is driven the same way
            from memenc.pipeline import decoder_process

            try:
                self.proc, self.conn = decoder_process.start(target, args)
            except OSError as e:  # out of processes, memory or file descriptors
                raise VideoDecodeError(
                    f"{path}: cannot start a {what} process ({_short(e)})"
                ) from None
            return
        ctx = _mp_context()
        self.conn, child_conn = ctx.Pipe(duplex=True)
        try:
            self.proc = ctx.Process(
                target=target, args=(child_conn, *args), name="memenc-decoder", daemon=True
            )
            self.proc.start()
        except BaseException as e:
            self.conn.close()  # no process to talk to: nothing may keep this end open
            if isinstance(e, OSError):  # out of processes, memory or file descriptors
                raise VideoDecodeError(
                    f"{path}: cannot start a {what} process ({_short(e)})"
                ) from None
            raise
        finally:
            child_conn.close()

    def error(self, problem: str) -> VideoDecodeError:
        return VideoDecodeError(f"{self.path}: {problem}")

    def gone(self, problem: str) -> _DecoderGone:
        return _DecoderGone(f"{self.path}: {problem}")

    def send(self, msg: tuple[Any, ...]) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            raise self._died() from None

    def recv(self, since: float) -> tuple[Any, ...]:
        """The next message other than a heartbeat; the child has ``timeout_s`` from
        ``since`` (or its last heartbeat) to send it."""
        while True:
            remaining = since + self.timeout_s - time.monotonic()
            ready = multiprocessing.connection.wait(
                [self.conn, self.proc.sentinel], max(remaining, 0)
            )
            if self.conn in ready:
                try:
                    msg = self.conn.recv()
                except (EOFError, ConnectionResetError, OSError):
                    raise self._died() from None
                if msg[0] == "alive":
                    since = time.monotonic()
                    continue
                return msg
            if ready:  # the sentinel alone: the child is gone
                raise self._died()
            if time.monotonic() >= since + self.timeout_s:
                self.kill()
                raise self.gone(f"{self.what} timed out after {self.timeout_s:g}s")

    def _died(self) -> _DecoderGone:
        self.proc.join(timeout=5)
        code = self.proc.exitcode
        self.kill()
        if code is not None and code < 0:
            try:
                name = f" ({signal.Signals(-code).name})"
            except ValueError:
                name = ""
            return self.gone(f"{self.what} crashed (signal {-code}{name})")
        return self.gone(f"{self.what} exited unexpectedly (exit code {code})")

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def close(self) -> None:
        if self.proc.exitcode is None and not self.conn.closed:
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(("close",))
            self.proc.join(timeout=2)
        self.kill()


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
    path: str, image_size: int | None, timeout_s: float
) -> tuple[_Decoder, VideoInfo, np.ndarray]:
    st = _stat(path)
    args = (path, image_size, _CHILD_FAULT, _READAHEAD_BUDGET_BYTES)
    decoder = _Decoder(path, timeout_s, _child_main, args)
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
    decoder, info, _ = _start(path, _NATIVE, timeout_s)
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


class LabelVideo:
    """The label frames of a mask video, decoded in a child process under a deadline.

    Lossless: grey values and palette indices are returned as they are (see
    `_frame_labels`). Opening decodes the whole video once (``frame_count``, ``height``,
    ``width``, ``values``: the sorted non-zero labels); `read` decodes forward from
    where the previous read stopped and restarts for an earlier frame. Every wait has
    ``timeout_s`` as the limit on a stall. Not thread-safe.

    Raises:
        MaskError: ``"<path>: <problem>"`` — not a decodable video, frames of mixed
            size or in colour, a frame past the end, or the decoder crashed or stalled.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timeout_s: float = 60.0, scan: bool = True
    ) -> None:
        self.path = os.fspath(path)
        self.timeout_s = float(timeout_s)
        self.frame_count = self.height = self.width = 0
        self.values: list[int] = []
        self._decoder: _Decoder | None = None
        with self._as_mask_error():
            decoder = _Decoder(
                self.path,
                self.timeout_s,
                _label_child_main,
                (self.path, scan, _CHILD_FAULT),
                what="mask decoder",
            )
            try:
                msg = decoder.recv(time.monotonic())
                if msg[0] == "error":
                    raise decoder.error(msg[1])
            except BaseException:
                decoder.kill()
                raise
        self._decoder = decoder
        if msg[1] is not None:
            info = msg[1]
            self.frame_count, self.height, self.width = (
                info["frames"],
                info["height"],
                info["width"],
            )
            self.values = list(info["values"])

    @contextlib.contextmanager
    def _as_mask_error(self) -> Iterator[None]:
        from memenc.errors import MaskError

        try:
            yield
        except VideoDecodeError as e:
            self.close()
            raise MaskError(str(e)) from None

    def read(self, frames: Sequence[int]) -> np.ndarray:
        """Labels of the given frames (sorted, distinct) as ``[n, H, W]``."""
        if self._decoder is None:
            from memenc.errors import MaskError

            raise MaskError(f"{self.path}: mask decoder is closed")
        frames = [int(f) for f in frames]
        with self._as_mask_error():
            self._decoder.send(("read", 0, frames))
            msg = self._decoder.recv(time.monotonic())
            if msg[0] == "error":
                self.close()  # its position is unknown; the caller may open a new one
                raise VideoDecodeError(f"{self.path}: {msg[2]}")
        return msg[2]

    def close(self) -> None:
        """Stop the decoder process. Safe to call twice."""
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class _SharedBuffer:
    """A file-backed shared mapping for frames; unlinked once the child maps it."""

    def __init__(self, frames: int, image_size: int) -> None:
        nbytes = frames * 3 * image_size * image_size
        self.frames = frames
        self.nbytes = nbytes
        self.path = ""
        last_error: OSError | None = None
        for folder in ("/dev/shm", tempfile.gettempdir()):
            if not os.path.isdir(folder):
                continue
            fd, path = tempfile.mkstemp(prefix="memenc-frames-", dir=folder)
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, nbytes)  # fail now, not with SIGBUS later
                else:
                    os.ftruncate(fd, nbytes)
                self.map = mmap.mmap(fd, nbytes)
            except OSError as e:
                last_error = e
                os.close(fd)
                os.unlink(path)
                continue
            os.close(fd)
            self.path = path
            self.view = np.frombuffer(self.map, np.uint8).reshape(frames, 3, image_size, image_size)
            return
        raise OSError(f"cannot allocate {nbytes} bytes of shared memory for frames: {last_error}")

    def unlink(self) -> None:
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = ""

    def close(self) -> None:
        self.unlink()
        self.view = None  # type: ignore[assignment]
        with contextlib.suppress(BufferError):
            self.map.close()


class VideoSource:
    """Frames of one video (file or frame folder), decoded in a child process.

    Takes the path and the model's ``image_size`` S; ``timeout_s`` bounds every wait
    for the decoder (the probe, each batch). The probe runs at construction and its
    result is ``info``. Not thread-safe; use one source per thread.

    Raises:
        VideoDecodeError: from the constructor when the probe fails, and from the
            read methods when a frame does not decode or the decoder crashes or stalls
            (the source is then closed).
    """

    def __init__(
        self, path: str | os.PathLike[str], image_size: int, *, timeout_s: float = 60.0
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.path = os.fspath(path)
        self.image_size = int(image_size)
        self.timeout_s = float(timeout_s)
        self._decoder: _Decoder | None = None
        self._buffer: _SharedBuffer | None = None
        self._pending: deque[int] = deque()  # request ids sent and not yet answered
        self._next_rid = 0
        self._generation = 0
        self._decoder, self.info, self._timestamps = _start(
            self.path, self.image_size, self.timeout_s
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

    def _live(self) -> _Decoder:
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
        buffer = _SharedBuffer(frames, self.image_size)
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
        except _DecoderGone:
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
        except _DecoderGone:
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
        except _DecoderGone:
            self._fail()
            raise

    def _expect(self, msg: tuple[Any, ...], kind: str) -> None:
        if msg[0] != kind:
            raise RuntimeError(f"decoder protocol error: expected {kind!r}, got {msg!r}")

    def _fail(self) -> None:
        """The decoder is gone or unusable: release everything."""
        self.close()
