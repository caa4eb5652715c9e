"""Parent side: `LabelVideo`, the label frames of a mask video decoded in a child process
(`memenc.pipeline.video.child.label_child_main`) under a deadline."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np

from memenc.errors import VideoDecodeError
from memenc.pipeline.video.child import label_child_main
from memenc.pipeline.video.process import Decoder

__all__ = ["LabelVideo"]


class LabelVideo:
    """The label frames of a mask video, decoded in a child process under a deadline.

    Lossless: grey values and palette indices are returned as they are (see
    `memenc.pipeline.video.labels`). Opening decodes the whole video once
    (``frame_count``, ``height``, ``width``, ``values``: the sorted non-zero labels;
    ``frame_count_declared``: what the file promises, more than ``frame_count`` when it is
    truncated or damaged);
    `read` decodes forward from where the previous read stopped and restarts for an
    earlier frame. Every wait has
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
        self.frame_count = self.frame_count_declared = self.height = self.width = 0
        self.values: list[int] = []
        self._decoder: Decoder | None = None
        with self._as_mask_error():
            decoder = Decoder(
                self.path,
                self.timeout_s,
                label_child_main,
                (self.path, scan),
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
            self.frame_count_declared = info["declared"]

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
