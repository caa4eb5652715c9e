"""Child side: probing a video file (PyAV: stream, presented frames, decodable tail,
declared count; then whether decord agrees) or an image folder. Every decode of the
probe goes through one generator, `decoded_frames`. Runs only in the decoder process."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from memenc.pipeline.video.fmp4 import mp4_fragment_samples
from memenc.pipeline.video.types import IMAGE_SUFFIXES, DecodeFailure, short_error

__all__ = ["ProbeResult", "check_decord", "decoded_frames", "list_images", "probe_file",
           "probe_images"]  # fmt: skip

# Containers decord reads correctly when the probe finds nothing else wrong; every
# other container is decoded with PyAV (MPEG-TS spins then fails, raw streams are
# refused, see RELIABILITY.md).
_DECORD_FORMATS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})

# FFmpeg demuxers that read a single picture: PyAV opens e.g. a PNG named .mp4 as a
# one-frame "video" through these.
_IMAGE_DEMUXERS = frozenset({"image2", "image2pipe", "gif", "apng", "ico", "tiff"})


# Timestamps from decord and from the probe agree within this many frame periods.
_TIMESTAMP_TOLERANCE_FRAMES = 0.25

# decord's fault_tol: a tiny float makes it raise on the first frame it would
# otherwise silently replace with a neighbour. A float >= 1 is a percentage and
# never fires for a short video; 0 disables the check.
_DECORD_FAULT_TOL = 1e-9


@dataclass
class ProbeResult:
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


def frame_numbers(folder: str) -> list[int] | None:
    """The numbers in a frame folder's file names, in frame order (`list_images`), when every
    name is a number (``00000.jpg``, ``00005.jpg`` …); None otherwise or when unreadable."""
    try:
        numbers = [_frame_number(os.path.basename(f)) for f in list_images(folder)]
    except OSError:
        return None
    return None if None in numbers else numbers  # type: ignore[return-value]


def probe_images(folder: str) -> ProbeResult:
    from PIL import Image

    try:
        files = list_images(folder)
    except OSError as e:
        raise DecodeFailure(f"cannot list folder ({short_error(e)})") from None
    if not files:
        raise DecodeFailure(f"no frames (no {'/'.join(IMAGE_SUFFIXES)} files in the folder)")
    names = [os.path.basename(f) for f in files]
    numbers = [_frame_number(n) for n in names]
    for k in range(1, len(files)):  # sorted by number: equal numbers are neighbours
        if numbers[k] is not None and numbers[k] == numbers[k - 1]:
            raise DecodeFailure(
                f"{names[k - 1]} and {names[k]} are both frame number {numbers[k]}; keep one"
            )
    try:
        with Image.open(files[0]) as img:
            width, height = img.size
            codec = (img.format or "").lower()
    except Image.DecompressionBombError:
        raise DecodeFailure(f"frame 0 ({names[0]}): image too large to read safely") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DecodeFailure(f"frame 0 ({names[0]}): {short_error(e)}") from None
    for k, f in enumerate(files[1:], 1):  # masks are one size: so must the frames be
        try:
            with Image.open(f) as img:  # reads the header only
                size = img.size
        except Image.DecompressionBombError:
            raise DecodeFailure(f"frame {k} ({names[k]}): image too large to read safely") from None
        except (OSError, ValueError, SyntaxError):
            continue  # named when (and if) the frame is read, as a damaged frame
        if size != (width, height):
            raise DecodeFailure(
                f"frame {k} ({os.path.basename(f)}) is {size[0]}x{size[1]}, frame 0 "
                f"({os.path.basename(files[0])}) {width}x{height}: a video's frames share a size"
            )
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
    return ProbeResult(info, np.arange(n, dtype=np.float64), empty, empty, None, 0, files)


def probe_file(path: str, heartbeat: Callable[[], None]) -> ProbeResult:
    """Probe with PyAV: stream, presented frames, decodable tail. No decord yet."""
    import av

    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, OSError, ValueError) as e:
        raise DecodeFailure(f"not a readable video ({short_error(e)})") from None
    with container:
        fmt = container.format.name
        if fmt in _IMAGE_DEMUXERS or fmt.endswith("_pipe"):
            raise DecodeFailure(f"not a video (image file, {fmt})")
        if not container.streams.video:
            raise DecodeFailure("no video stream")
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
            truncated = short_error(e)
        start_time = stream.start_time
        promised = _promised_frames(container, stream, fmt, fps, discarded)

    if not pts:
        raise DecodeFailure("no video frames" + (f" ({truncated})" if truncated else ""))
    has_pts = all(p is not None for p in pts)
    order = np.argsort(np.asarray(pts, np.int64), kind="stable") if has_pts else np.arange(len(pts))
    table = np.asarray(pts, np.int64)[order] if has_pts else np.zeros(0, np.int64)
    is_key = np.asarray(keys, bool)[order]

    first, rotation = _decode_first(path, heartbeat)
    if first is None:
        raise DecodeFailure("no frame decodes" + (f" ({truncated})" if truncated else ""))
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
        raise DecodeFailure("no frame decodes")
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
    return ProbeResult(info, timestamps, table[:n], key_index, index_of, rotation)


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
        listed = mp4_fragment_samples(container.name, stream.id)
        if listed > discarded:
            return listed - discarded, True
    return None


class CannotSeek(Exception):
    """`decoded_frames` was asked to start at a keyframe, and the stream cannot seek."""


def decoded_frames(
    path: str, heartbeat: Callable[[], None], seek_pts: int | None = None
) -> Iterator[Any]:
    """Every frame of the file's first video stream that decodes, in decode order: open,
    demux, decode; a packet that fails to decode is skipped, an error while demuxing
    ends the stream (a truncated file), and each decoded packet sends a heartbeat.

    With ``seek_pts``, decoding starts at the keyframe at or before that pts; raises
    `CannotSeek` when the stream cannot seek there.
    """
    import av

    with av.open(path, metadata_errors="ignore") as c:
        stream = c.streams.video[0]
        if seek_pts is not None:
            try:
                c.seek(seek_pts, stream=stream, backward=True)
            except (av.FFmpegError, ValueError, OSError):
                raise CannotSeek from None
        try:
            for packet in c.demux(stream):
                try:
                    frames = packet.decode()
                except (av.FFmpegError, ValueError):
                    continue
                yield from frames
                heartbeat()
        except (av.FFmpegError, ValueError):
            pass


def _decode_first(path: str, heartbeat: Callable[[], None]) -> tuple[tuple[int, int] | None, int]:
    """Decode the first frame: its coded size and display rotation."""
    with contextlib.closing(decoded_frames(path, heartbeat)) as frames:
        for frame in frames:
            return (frame.width, frame.height), int(round(frame.rotation or 0))
    return None, 0


def _decode_tail(path: str, key_pts: int, heartbeat: Callable[[], None]) -> list[int | None] | None:
    """pts of the frames decoded from the keyframe at ``key_pts`` to the end (None when
    the stream cannot seek). Packets that fail to decode are skipped."""
    try:
        return [frame.pts for frame in decoded_frames(path, heartbeat, seek_pts=key_pts)]
    except CannotSeek:
        return None


def _count_decodable(path: str, heartbeat: Callable[[], None]) -> int:
    """Decode the whole stream and count its frames (streams that cannot seek)."""
    return sum(1 for _ in decoded_frames(path, heartbeat))


def check_decord(path: str, probe: ProbeResult, size: int | None, threads: int = 0) -> Any:
    """Open decord on a candidate file and compare it with the probe (``threads``: its
    decoding threads, 0 for FFmpeg's automatic choice).

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
            num_threads=threads,
            fault_tol=_DECORD_FAULT_TOL,
        )
    except (RuntimeError, decord.DECORDError, decord.DECORDLimitReachedError) as e:
        info["backend_reason"] = f"decord cannot open it ({short_error(e)})"
        return None
    n = info["frame_count"]
    if len(vr) != n:
        info["backend_reason"] = f"frame count mismatch (decord {len(vr)}, presented {n})"
        return None
    try:
        theirs = vr.get_frame_timestamp(list(range(n)))[:, 0].astype(np.float64)
    except (RuntimeError, decord.DECORDError, decord.DECORDLimitReachedError, IndexError) as e:
        info["backend_reason"] = f"decord timestamps unreadable ({short_error(e)})"
        return None
    fps = info["fps"]
    tol = _TIMESTAMP_TOLERANCE_FRAMES / fps if fps > 0 else 1e-3
    if not np.allclose(theirs, probe.timestamps, rtol=0, atol=tol):
        info["backend_reason"] = "timestamp mismatch"
        return None
    info["backend"] = "decord"
    info["backend_reason"] = "decord agrees with the probe"
    return vr
