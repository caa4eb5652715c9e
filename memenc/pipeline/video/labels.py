"""Child side: the frames of a mask video as label images, pixel values exact. Runs only
in the mask decoder process (`memenc.pipeline.video.child.label_child_main`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from memenc.pipeline.video.probe import _promised_frames
from memenc.pipeline.video.types import DecodeFailure, short_error

__all__ = ["iter_labels", "scan_labels"]


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
            raise DecodeFailure(
                f"frame {index} is in colour; a mask video must hold grey label values"
            )
        return red
    return frame.to_ndarray(format="gray")


# Codecs that store every pixel value exactly. H.264 is lossless only with qp 0, which
# needs its High 4:4:4 Predictive profile (`libx264 -qp 0`), so that profile is taken too.
_LOSSLESS = frozenset((
    "ffv1", "png", "apng", "rawvideo", "huffyuv", "ffvhuff", "utvideo", "magicyuv", "qtrle",
    "zlib", "zmbv", "gif", "bmp", "tiff", "pam", "pgm", "pgmyuv", "ppm", "pbm", "targa", "sgi",
    "qoi",
))  # fmt: skip


def _check_lossless(codec: Any) -> None:
    """DecodeFailure for a lossy codec: its edges and noise would read as extra ids (an
    H.264 mask video of the bundled sample read as 119 objects)."""
    name = codec.name
    if name in _LOSSLESS or (name == "h264" and "4:4:4 Predictive" in str(codec.profile)):
        return
    raise DecodeFailure(
        f"the mask video is {name}, a lossy codec: its edges would read as stray object "
        "ids; store the masks losslessly (ffv1 or png video, or a folder of PNGs)"
    )


def iter_labels(path: str, promised: dict[str, Any] | None = None) -> Iterator[np.ndarray]:
    """Every frame of a mask video as labels [H, W], in order; `DecodeFailure` on a problem.
    `promised`, when given, gets ``count`` and ``exact`` once the file opens: the frame
    count the container states, as `probe._promised_frames` reads it for a video (0 when
    it states none)."""
    import av

    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise DecodeFailure(
            "unknown mask format (not a folder of PNGs, .npy, .npz, SA-V .json or a video "
            f"PyAV can decode: {short_error(e)})"
        ) from None
    index = 0
    try:
        format_name = container.format.name
        if format_name.endswith("_pipe") or format_name == "image2":
            raise DecodeFailure("a single image, not a mask video")
        if not container.streams.video:
            raise DecodeFailure("no video stream")
        stream = container.streams.video[0]
        _check_lossless(stream.codec_context)
        if promised is not None:
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            stated = _promised_frames(container, stream, container.format.name, fps, 0)
            promised["count"], promised["exact"] = stated or (0, True)
        for frame in container.decode(stream):
            yield _frame_labels(index, frame)
            index += 1
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DecodeFailure(
            f"cannot decode the mask video at frame {index} ({short_error(e)})"
        ) from None
    finally:
        container.close()


def scan_labels(path: str, heartbeat: Callable[[], None]) -> dict[str, Any]:
    """Decode a whole mask video: frame count, size, the non-zero label values, and what
    the file promises (``declared``: more frames than decode, by more than a length in
    seconds could be off, means the file is truncated or damaged)."""
    count = 0
    size: tuple[int, ...] | None = None
    values: set[int] = set()
    promised: dict[str, Any] = {}
    for labels in iter_labels(path, promised):
        if size is None:
            size = labels.shape
        elif labels.shape != size:
            raise DecodeFailure(
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
        raise DecodeFailure("the mask video has no frames")
    declared, exact = promised.get("count", 0), promised.get("exact", True)
    if declared <= count or (not exact and declared <= count + 1):
        declared = count
    return {
        "frames": count,
        "declared": declared,
        "height": size[0],
        "width": size[1],
        "values": sorted(values),
    }
