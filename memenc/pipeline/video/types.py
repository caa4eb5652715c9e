"""Data types and small helpers shared by both sides of the decoder process boundary:
`VideoInfo`, `FrameBatch`, the frame-folder suffixes, and the one-line form of a decoder
library's error (`DecodeFailure`, `short_error`)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["IMAGE_SUFFIXES", "NATIVE", "DecodeFailure", "FrameBatch", "VideoInfo", "short_error"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""File suffixes (any case) that make up a frame folder."""


# image_size that asks a decoder child for frames at their own size (`read_frame`).
NATIVE = 0


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


class DecodeFailure(Exception):
    """A problem with the input, reported to the parent as one line."""


# decord prefixes its messages with "[hh:mm:ss] /source/file.cc:123: " (sometimes
# twice) and the file name in brackets.
_DECORD_NOISE = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: |\[[^\]]*\] ?")


def short_error(e: BaseException) -> str:
    """One line for an exception from a decoder library, without the file name."""
    strerror = getattr(e, "strerror", None)  # PyAV: the message without the file name
    text = strerror if isinstance(strerror, str) and strerror else str(e)
    text = " ".join(_DECORD_NOISE.sub("", text).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
