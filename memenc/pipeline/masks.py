"""Mask sources: the per-frame object masks that `--masks` points at.

`open_masks` detects the format of a mask path, validates it cheaply against the
video (frame count, aspect ratio, object ids) and returns a `MaskSource`, whose
`read` returns the masks of some frames as one tensor `[B, O, H, W]` at the
mask's own resolution (resizing to the model's image size happens later);
`read_to` makes the same tensor on a device, sending label maps `[B, H, W]`
rather than O planes where the format is one.

Formats (DESIGN.md §5):

- ``png``: a folder of per-frame PNGs (DAVIS style ``00000.png``; the frame
  number is the last integer in the file stem, or, when the video is a frame folder
  numbered other than 0, 1, 2 … such as YouTube-VOS's ``00000.jpg``, ``00005.jpg``,
  the position of the frame file of that number). Palette ("P") or grey ("L", 16-bit
  "I;16", ...) label images: every non-zero value is an object id. RGB(A) PNGs are
  accepted only when their three channels are equal. Object ids are the union over
  the folder, found by reading every PNG once at open.
- ``video``: a mask video PyAV can decode; frame k is the mask of video frame k.
  Label values are taken from grey or palette-index frames as they are, from RGB
  frames whose channels are equal, and otherwise from the frame converted to grey.
  The codec must be lossless (ffv1, png, utvideo, ...; H.264 only in its High 4:4:4
  Predictive profile): a lossy codec turns edges into stray values, which would read as
  extra object ids, so it is refused. Decoded in a child process with a deadline, like
  the video (`memenc.pipeline.video.LabelVideo`).
- ``npy`` / ``npz``: ``[T, H, W]`` integer (or bool) labels; ``[T, O, H, W]`` bool
  masks; ``[T, O, H, W]`` float logits (``is_logits``). Per-object arrays have ids
  ``1..O`` unless an ``.npz`` holds an ``object_ids`` array (refused beside labels,
  whose ids are their values). An ``.npz`` uses the
  array named ``masks``, ``labels`` or ``logits`` (in that order), else its first
  array. Arrays are read with bounded memory: ``.npy`` files and uncompressed
  ``.npz`` members with plain reads of the rows needed (no memory map, whose pages
  would stay resident), compressed members are streamed.
- ``sav-json``: an SA-V annotation file (``{video_id}_manual.json`` /
  ``_auto.json``) of COCO RLE masklets: annotation k is video frame ``k * step``
  (``step`` 4: SA-V annotates its 24 fps videos at 6 fps), so an N-frame video has
  exactly ``ceil(N / step)`` annotations.

Binary masks: a label source whose only non-zero value is 255 (0/255 images) is
object 1; one whose only non-zero value is 1 is object 1 anyway.

Every problem with the input raises `MaskError` with a one-line message
``"<path>: <problem>"`` that names the file and, where it matters, the frame.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import re
import struct
import zipfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memenc.errors import MaskError, MemencError, UsageError, VideoDecodeError
from memenc.pipeline.video.probe import frame_numbers

__all__ = [
    "ASPECT_TOLERANCE",
    "SAV_STEP",
    "ArrayMasks",
    "MaskSource",
    "MaskVideo",
    "PngFolderMasks",
    "SavJsonMasks",
    "conventional_mask_paths",
    "decode_rle",
    "find_masks_beside",
    "open_masks",
    "rle_string_to_counts",
]

#: Largest accepted relative difference between the mask's and the video's w/h.
ASPECT_TOLERANCE = 0.01

# Label scans over arrays and videos read about this many bytes at a time, and look at
# _SCAN_PIECE values at a time (bincount's intp copy of a piece: 8 MB).
_SCAN_BLOCK_BYTES = 16 << 20
_SCAN_PIECE = 1 << 20

_NPZ_ARRAY_NAMES = ("masks", "labels", "logits")
#: SA-V's annotation step: annotation k is video frame 4k (24 fps video, 6 fps masks).
SAV_STEP = 4

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
# The largest mask an SA-V JSON may declare: the size at which Pillow refuses a PNG as a
# decompression bomb (twice its default MAX_IMAGE_PIXELS), so both formats stop alike. A
# few hundred bytes of RLE can declare 60000x80000, ~9 GiB as the planes of two objects.
MAX_MASK_PIXELS = 2 * 89_478_485


# --------------------------------------------------------------------------- finding


def conventional_mask_paths(video_path: str | os.PathLike[str]) -> list[Path]:
    """The places `find_masks_beside` looks, in order.

    For ``dir/clip.mp4`` (or a frame folder ``dir/clip/``): ``dir/clip_masks/``,
    ``dir/clip.masks.npy``, ``dir/clip.masks.npz``, ``dir/clip_manual.json``.
    """
    video = Path(video_path)
    if video.name in ("", ".", ".."):
        video = video.resolve()
    stem = video.name if video.is_dir() else video.stem
    parent = video.parent
    return [
        parent / f"{stem}_masks",
        parent / f"{stem}.masks.npy",
        parent / f"{stem}.masks.npz",
        parent / f"{stem}_manual.json",
    ]


def find_masks_beside(video_path: str | os.PathLike[str]) -> Path:
    """Find the masks that sit beside a video under a conventional name.

    Takes the path of a video file or of a folder of frame images. Returns the
    first of `conventional_mask_paths` that exists (the ``_masks`` candidate must
    be a folder, the others files). Raises `MaskError` listing every place it
    looked when none exists.
    """
    candidates = conventional_mask_paths(video_path)
    for index, candidate in enumerate(candidates):
        if candidate.is_dir() if index == 0 else candidate.is_file():
            return candidate
    looked = ", ".join(f"{c}/" if i == 0 else str(c) for i, c in enumerate(candidates))
    raise MaskError(
        f"{video_path}: no masks found beside the video; looked for {looked} (pass --masks PATH)"
    )


# --------------------------------------------------------------------------- opening


def open_masks(
    path: str | os.PathLike[str],
    *,
    video_frame_count: int,
    video_width: int,
    video_height: int,
    objects: list[int] | None = None,
    video_path: str | os.PathLike[str] | None = None,
    video_frame_count_declared: int | None = None,
    timeout_s: float = 60.0,
    sav_step: int = SAV_STEP,
    whole_video_masks: bool = False,
) -> MaskSource:
    """Open a mask source and check that it fits the video.

    Takes the mask path (a folder of PNGs, a mask video, ``.npy``, ``.npz`` or an
    SA-V ``.json``; the format is detected from the suffix, else from the first
    bytes), the video's frame count and size, and optionally the object ids to
    keep (in the order they should appear; None keeps every object, sorted).
    ``video_path`` names the video in messages; ``video_frame_count_declared`` is the
    frame count the video file promises (`VideoInfo.frame_count_declared`), when more
    than the ``video_frame_count`` frames that decode. ``timeout_s`` bounds each wait
    for a mask video's decoder.
    `sav_step` is the SA-V annotation step (annotation k is video frame
    ``k * sav_step``; other formats ignore it).

    Returns a `MaskSource`. Raises `MaskError` ("<path>: <problem>") when the path
    is missing, unreadable or of an unknown format, when the masks' frame count or
    aspect ratio does not fit the video, when an array has the wrong dtype or
    shape, when an SA-V file's annotation count is not ``ceil(frames / sav_step)``,
    or when a requested object id does not exist (the message lists the ids that
    do) or does not fit in 32 bits. When the video is damaged (fewer frames decode
    than it promises) and the masks do not fit the frames that decode, raises
    `VideoDecodeError` naming the video as damaged, with both counts and the masks'
    own; with ``whole_video_masks`` (the run selects only frames that decode) masks
    for at least as many frames as the video promises are taken too. Raises
    `UsageError` when `objects` is empty or repeats an id, or when `sav_step` is below
    1.
    """
    if min(video_frame_count, video_width, video_height) < 1:
        raise ValueError(
            "video_frame_count, video_width and video_height must be positive, got "
            f"{video_frame_count}, {video_width}, {video_height}"
        )
    if operator.index(sav_step) < 1:
        raise UsageError(f"--sav-step must be at least 1, got {sav_step}")
    if objects is not None:
        objects = [operator.index(o) for o in objects]
        if not objects:
            raise UsageError("--objects selects no objects")
        if len(set(objects)) != len(objects):
            raise UsageError(f"--objects repeats an id: {objects}")
    source_path = Path(path)
    kind = _detect_kind(source_path)
    video = _VideoInfo(
        video_frame_count,
        video_width,
        video_height,
        None if video_path is None else os.fspath(video_path),
        video_frame_count_declared,
        whole_video_masks,
    )
    source: MaskSource
    if kind == "png":
        source = PngFolderMasks(source_path, video, objects)
    elif kind == "video":
        source = MaskVideo(source_path, video, objects, timeout_s=timeout_s)
    elif kind in ("npy", "npz"):
        source = ArrayMasks(source_path, video, objects, kind=kind)
    else:
        source = SavJsonMasks(source_path, video, objects, step=sav_step)
    too_big = [i for i in source.object_ids if not _ID_MIN <= i <= _ID_MAX]
    if too_big:
        source.close()
        raise MaskError(
            f"{source_path}: object id {too_big[0]} does not fit in 32 bits "
            "(the store keeps object ids as int32)"
        )
    return source


_ID_MIN, _ID_MAX = -(2**31), 2**31 - 1  # the store's object_id is int32


def _detect_kind(path: Path) -> str:
    if path.is_dir():
        return "png"
    if not path.exists():
        raise MaskError(f"{path}: no such file or folder")
    if not path.is_file():  # a FIFO would block the read below; a device never ends
        raise MaskError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return suffix[1:]
    if suffix == ".json":
        return "sav-json"
    if suffix in _IMAGE_SUFFIXES:
        raise MaskError(f"{path}: a single image; pass the folder of per-frame PNG masks instead")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise MaskError(f"{path}: cannot read ({e.strerror or e})") from e
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04"):
        return "npz"
    if head.lstrip().startswith(b"{"):
        return "sav-json"
    return "video"


class _VideoInfo:
    """What the mask source is checked against."""

    def __init__(
        self,
        frame_count: int,
        width: int,
        height: int,
        path: str | None = None,
        declared: int | None = None,
        whole_video_masks: bool = False,
    ) -> None:
        self.frame_count = frame_count
        self.width = width
        self.height = height
        self.path = path
        self.declared = max(declared or frame_count, frame_count)
        # masks may be made for the frames that decode, or (a damaged video whose selected
        # frames all decode) for at least every frame it promises: a damaged file's promise
        # can fall short of what was written (an mp4 cut short promised 15 of 24 frames)
        self.whole_video_masks = whole_video_masks and self.declared > frame_count
        # how messages name the video
        self.name = "the video" if path is None else f"the video {path}"

    @functools.cached_property
    def position_of(self) -> dict[int, int] | None:
        """For a frame folder whose files are numbered other than 0, 1, 2 … (YouTube-VOS:
        00000, 00005 …), each number's position: a PNG mask pairs with the frame of its
        number. None for any other video (listed only when a PNG folder asks)."""
        path, count = self.path, self.frame_count
        numbers = frame_numbers(path) if path is not None and os.path.isdir(path) else None
        if not numbers or len(numbers) != count or numbers == list(range(count)):
            return None
        return {number: k for k, number in enumerate(numbers)}

    def fits(self, count: int) -> bool:
        """Whether masks for `count` frames fit this video."""
        return count == self.frame_count or (self.whole_video_masks and count >= self.declared)

    def count_error(self, claim: str, mismatch: str) -> MemencError:
        """The error for masks whose frames do not fit the video's: ``claim`` says what
        the masks hold ("<mask path>: masks for 90 frames"), ``mismatch`` the message
        when the video is whole. A damaged video is named as such, not the masks."""
        if self.declared > self.frame_count:
            return VideoDecodeError(
                f"{self.path or 'the video'}: only {self.frame_count} of {self.declared} "
                f"frames decode; the file is truncated or damaged ({claim})"
            )
        return MaskError(mismatch)


def _check_aspect(where: object, width: int, height: int, video: _VideoInfo) -> None:
    if width < 1 or height < 1:
        raise MaskError(f"{where}: masks are empty ({width}x{height} pixels)")
    mask_aspect = width / height
    video_aspect = video.width / video.height
    if abs(mask_aspect - video_aspect) / video_aspect > ASPECT_TOLERANCE:
        raise MaskError(
            f"{where}: mask size {width}x{height} (aspect {mask_aspect:.3f}) does not match "
            f"the video's {video.width}x{video.height} (aspect {video_aspect:.3f})"
        )


def _select_objects(where: object, ids: list[int], objects: list[int] | None) -> list[int]:
    """Positions in `ids` of the selected objects (all of them when `objects` is None)."""
    if objects is None:
        return list(range(len(ids)))
    missing = [o for o in objects if o not in ids]
    if missing:
        raise MaskError(
            f"{where}: object id(s) {', '.join(map(str, missing))} not found; "
            f"ids present: {', '.join(map(str, ids)) or 'none'}"
        )
    return [ids.index(o) for o in objects]


def _label_objects(
    where: object, values: set[int], objects: list[int] | None
) -> tuple[list[int], list[int]]:
    """Turn the non-zero values of a label source into (object_ids, label_values)."""
    if not values:
        raise MaskError(
            f"{where}: every mask is empty (no non-zero label), so there are no objects"
        )
    if values == {255}:  # 0/255 binary masks are object 1
        ids, label_values = [1], [255]
    else:
        ids = label_values = sorted(values)
    chosen = _select_objects(where, ids, objects)
    return [ids[i] for i in chosen], [label_values[i] for i in chosen]


def _nonzero_values(where: object, labels: np.ndarray) -> set[int]:
    """The distinct non-zero values of an integer label array.

    Scans `_SCAN_PIECE` values at a time, so the temporaries stay small whatever the
    array's size (bincount casts its input to intp, 8 bytes a value; unique sorts a copy).
    """
    if labels.dtype == np.bool_:
        return {1} if labels.any() else set()
    flat = labels.reshape(-1)
    seen = np.zeros(256, np.bool_) if labels.dtype == np.uint8 else None
    values: set[int] = set()
    for start in range(0, flat.size, _SCAN_PIECE):
        piece = flat[start : start + _SCAN_PIECE]
        if seen is not None:
            seen |= np.bincount(piece, minlength=256) > 0
            continue
        found = np.unique(piece)
        if found.size and found[0] < 0:
            raise MaskError(f"{where}: negative label value {int(found[0])}; labels must be >= 0")
        values.update(int(v) for v in found if v != 0)
    if seen is not None:
        values = {int(v) for v in np.flatnonzero(seen[1:]) + 1}
    return values


def _labels_to_masks(labels: np.ndarray, label_values: list[int]) -> np.ndarray:
    """[n, H, W] labels -> bool [n, O, H, W], one channel per label value."""
    values = np.asarray(label_values, dtype=np.int64)
    return labels[:, None, :, :] == values[None, :, None, None]


def _compact_labels(labels: np.ndarray) -> np.ndarray | None:
    """[n, H, W] labels in the narrowest dtype torch compares that holds them (uint8,
    int16, int32, int64; bool as uint8), the same values; None when they do not fit
    int64."""
    if labels.dtype == np.bool_:
        return labels.view(np.uint8)
    if labels.dtype == np.uint8 or labels.size == 0:
        return labels
    lo, hi = int(labels.min()), int(labels.max())
    for dtype in (np.uint8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return labels.astype(dtype, copy=False)
    return None


def _file_stat(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except OSError:
        return {}
    return {"bytes": st.st_size, "mtime": st.st_mtime}


# --------------------------------------------------------------------------- base class


class MaskSource:
    """An opened, validated mask source.

    Attributes:
        path: the mask path as given (used in messages).
        kind: ``"png"``, ``"video"``, ``"npy"``, ``"npz"`` or ``"sav-json"``.
        object_ids: the objects `read` returns, in channel order: every id present
            (sorted), or the `--objects` selection in the order given.
        is_logits: True for float logit arrays (`read` returns float32), else
            False (`read` returns bool).
        annotated_frames: SA-V: the video frame numbers that carry annotations (the
            default frame set); None for the other formats (every frame).
        height, width: the masks' own resolution.

    A source keeps at most one open decoder or file handle; `close` releases it
    (the source can still be read afterwards, it reopens). Sources can be pickled
    (open handles are dropped). One source must not be read from two threads at
    once.
    """

    path: str
    kind: str
    object_ids: list[int]
    is_logits: bool = False
    annotated_frames: list[int] | None = None
    height: int
    width: int

    _frame_count: int  # frames of the video the source was checked against

    def read(self, frame_numbers: Sequence[int]) -> torch.Tensor:
        """Read the masks of some video frames.

        Takes video frame numbers (any order, repeats allowed). Returns
        ``[B, O, H, W]`` with B = len(frame_numbers) in that order and O =
        len(object_ids) in `object_ids` order: bool for binary formats, float32 for
        logits. Raises `MaskError` naming the path and the frame when a frame has no
        mask (outside the video, a missing PNG, a frame SA-V did not annotate) or
        its mask cannot be read.
        """
        frames, unique = self._checked(frame_numbers)
        if not unique:
            dtype = np.float32 if self.is_logits else np.bool_
            empty = np.zeros((0, len(self.object_ids), self.height, self.width), dtype=dtype)
            return torch.from_numpy(empty)
        masks = self._read_sorted(unique)  # [len(unique), O, H, W]
        if frames != unique:
            masks = masks[np.searchsorted(unique, frames)]
        return torch.from_numpy(np.ascontiguousarray(masks))

    def read_to(self, frame_numbers: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """`read`'s masks, made on `device`: equal to ``read(frame_numbers).to(device)``.

        Label-map sources (PNG folders, mask videos, ``[T, H, W]`` label arrays) send
        the ``[B, H, W]`` label maps (uint8 or int16 for the usual labels) and expand
        them there into the O planes, ``labels[:, None] == values`` (what `read` does on
        the host): O times fewer bytes to copy to a GPU, and no planes built on the
        host. Other sources send `read`'s planes. Raises as `read`.

        On the CPU this is `read`, built with numpy: a torch operation here would start
        an OpenMP thread team in the calling thread (the engine's decode thread), and
        while a second team exists libgomp stops the compute team's workers spinning
        between parallel regions (more OpenMP threads than cores), so every region of
        the model waits for a worker to wake: 60 frames at S=512 on 2 cores took 55.7 s
        with torch here and 46.7 s without, the model's own time back to what it takes
        alone.
        """
        if torch.device(device).type == "cpu":
            return self.read(frame_numbers)
        return self._expand_on(frame_numbers, device)

    def _expand_on(self, frame_numbers: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """`read_to` off the CPU: label maps sent to `device` and expanded there (any
        device; the tests run it on the CPU)."""
        frames, unique = self._checked(frame_numbers)
        labels = self._read_labels_sorted(unique) if unique else None
        labels = _compact_labels(labels) if labels is not None else None
        if labels is None:
            return self.read(frames).to(device)
        if frames != unique:
            labels = labels[np.searchsorted(unique, frames)]
        on_device = torch.from_numpy(np.ascontiguousarray(labels)).to(device)  # [B, H, W]
        values = torch.tensor(self._label_values, dtype=torch.int64, device=on_device.device)
        return on_device[:, None, :, :] == values[None, :, None, None]  # [B, O, H, W] bool

    def _checked(self, frame_numbers: Sequence[int]) -> tuple[list[int], list[int]]:
        """(the frame numbers as ints, the distinct ones sorted), each checked to have a
        mask; raises MaskError naming the first that has none."""
        frames = [operator.index(f) for f in frame_numbers]
        unique = sorted(set(frames))
        for frame in unique:
            if not 0 <= frame < self._frame_count:
                raise MaskError(
                    f"{self.path}: frame {frame} is outside the video "
                    f"(frames 0..{self._frame_count - 1})"
                )
            self._check_frame(frame)
        return frames, unique

    def has_mask(self, frame: int) -> bool:
        """Whether `read` can return a mask for this video frame number."""
        if not 0 <= frame < self._frame_count:
            return False
        try:
            self._check_frame(frame)
        except MaskError:
            return False
        return True

    def to_attrs(self) -> dict[str, Any]:
        """A JSON-safe description of the source for the store's attributes.

        Holds the absolute path, kind, object_ids, is_logits, the mask size, the
        file's size and mtime, and what is particular to the format (label values,
        the array used, the SA-V frame step).
        """
        attrs: dict[str, Any] = {
            "path": str(Path(self.path).absolute()),
            "kind": self.kind,
            "object_ids": list(self.object_ids),
            "is_logits": self.is_logits,
            "height": self.height,
            "width": self.width,
        }
        attrs.update(self._extra_attrs())
        return attrs

    def content_files(self) -> list[Path]:
        """The files whose bytes are the masks, in frame order (for the content hash)."""
        return [Path(self.path)]

    def close(self) -> None:
        """Release an open decoder or file handle, if any."""

    def __enter__(self) -> MaskSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.path!r} objects={self.object_ids}>"

    # Hooks for the formats.
    def _check_frame(self, frame: int) -> None:
        """Raise MaskError if `frame` (inside the video) has no mask."""

    def _read_sorted(self, frames: list[int]) -> np.ndarray:
        """Masks of sorted, distinct, checked frames: [n, O, H, W] bool or float32. By
        default the planes of `_read_labels_sorted`'s label maps (label-map sources);
        the other sources override it."""
        labels = self._read_labels_sorted(frames)
        if labels is None:
            raise NotImplementedError
        return _labels_to_masks(labels, self._label_values)

    def _read_labels_sorted(self, frames: list[int]) -> np.ndarray | None:
        """Label-map sources: the [n, H, W] label maps of sorted, distinct, checked frames;
        None for the others."""
        return None

    def _extra_attrs(self) -> dict[str, Any]:
        return {}


# --------------------------------------------------------------------------- PNG folder


_SCAN_THREADS = 4  # at most, for the opening scan of a PNG folder (one decoded PNG each)


def _scan_png(file: Path) -> tuple[Path, tuple[int, int], set[int]]:
    """One label PNG's size [H, W] and nonzero label values (the opening scan)."""
    labels = _read_png_labels(file)
    return file, labels.shape, _nonzero_values(file, labels)


def _read_png_labels(file: Path) -> np.ndarray:
    """A label PNG as a 2-D integer array [H, W]."""
    from PIL import Image, UnidentifiedImageError
    from PIL.Image import DecompressionBombError

    try:
        with Image.open(file) as image:
            if image.format != "PNG":
                raise MaskError(
                    f"{file}: a {image.format} image, not a PNG (masks must be lossless)"
                )
            image.load()
            mode = image.mode
            if mode in ("P", "L") or mode.startswith("I"):
                return np.asarray(image)
            if mode == "1":
                return np.asarray(image).astype(np.uint8)
            if mode in ("LA", "PA"):
                return np.asarray(image)[..., 0]
            if mode in ("RGB", "RGBA"):
                rgb = np.asarray(image)
                red = rgb[..., 0]
                if not (np.array_equal(red, rgb[..., 1]) and np.array_equal(red, rgb[..., 2])):
                    raise MaskError(
                        f"{file}: a colour ({mode}) PNG; masks must be palette (P) or grey (L) "
                        "label images whose values are object ids"
                    )
                return red
            raise MaskError(f"{file}: unsupported PNG mode {mode}; use palette (P) or grey (L)")
    except MaskError:
        raise
    except DecompressionBombError as e:  # not an OSError: PIL's guard against huge images
        raise MaskError(f"{file}: image too large to read safely ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MaskError(f"{file}: cannot read PNG ({e})") from e


class PngFolderMasks(MaskSource):
    """A folder of per-frame label PNGs; see the module docstring."""

    kind = "png"

    def __init__(self, folder: Path, video: _VideoInfo, objects: list[int] | None) -> None:
        self.path = str(folder)
        self._frame_count = video.frame_count
        try:
            entries = sorted(folder.iterdir())
        except OSError as e:
            raise MaskError(f"{folder}: cannot list folder ({e.strerror or e})") from e
        self._files: dict[int, Path] = {}
        for entry in entries:
            if entry.suffix.lower() != ".png" or not entry.is_file():
                continue
            digits = re.findall(r"[0-9]+", entry.stem)
            if not digits:
                raise MaskError(
                    f"{entry}: no frame number in the file name (expected e.g. 00000.png)"
                )
            frame = int(digits[-1])
            if video.position_of is not None:
                if frame not in video.position_of:
                    raise MaskError(
                        f"{entry}: no frame numbered {frame} in {video.path} (a mask pairs "
                        "with the frame file of its number)"
                    )
                frame = video.position_of[frame]
            if frame in self._files:
                raise MaskError(
                    f"{entry}: frame {frame} is also given by {self._files[frame].name}"
                )
            self._files[frame] = entry
        if not self._files:
            raise MaskError(f"{folder}: no .png mask files in this folder")
        last = max(self._files)
        if last >= video.frame_count and not video.whole_video_masks:
            claim = f"{self._files[last]}: mask for frame {last}"
            raise video.count_error(
                claim,
                f"{claim}, but {video.name} has {video.frame_count} frames "
                f"(0..{video.frame_count - 1})",
            )
        # Read every PNG once for its size and labels; keep none of them. The files are
        # read by a few threads (PIL decodes without the GIL: 256 label PNGs at 1280x720
        # took 1.2 s one by one and 0.7 s with 2 threads on 2 cores) and checked in frame
        # order, so the first bad file in that order is the one reported.
        values: set[int] = set()
        size: tuple[int, int] | None = None
        from memenc.pipeline.decoders import available_cores

        ordered = [self._files[frame] for frame in sorted(self._files)]
        first = ordered[0]
        total_bytes, mtime = 0, 0.0
        workers = min(_SCAN_THREADS, len(ordered), available_cores())
        pool = ThreadPoolExecutor(workers, thread_name_prefix="memenc-masks")
        try:
            for file, (height, width), found in pool.map(_scan_png, ordered):
                if size is None:
                    _check_aspect(file, width, height, video)
                    size = (height, width)
                elif (height, width) != size:
                    raise MaskError(
                        f"{file}: size {width}x{height} differs from {first.name} "
                        f"({size[1]}x{size[0]})"
                    )
                values |= found
                stat = _file_stat(file)
                total_bytes += stat.get("bytes", 0)
                mtime = max(mtime, stat.get("mtime", 0.0))
        finally:  # after a bad file, the files not yet read are not read
            pool.shutdown(wait=True, cancel_futures=True)
        assert size is not None
        self.height, self.width = size
        self.object_ids, self._label_values = _label_objects(folder, values, objects)
        self._stat = {"files": len(self._files), "bytes": total_bytes, "mtime": mtime}

    def _check_frame(self, frame: int) -> None:
        if frame not in self._files:
            raise MaskError(f"{self.path}: no mask file for frame {frame}")

    def content_files(self) -> list[Path]:
        return [self._files[frame] for frame in sorted(self._files)]

    def _read_labels_sorted(self, frames: list[int]) -> np.ndarray:
        maps = []
        for frame in frames:
            file = self._files[frame]
            labels = _read_png_labels(file)
            if labels.shape != (self.height, self.width):
                raise MaskError(
                    f"{file}: size {labels.shape[1]}x{labels.shape[0]} differs from the "
                    f"folder's {self.width}x{self.height}"
                )
            maps.append(labels)
        return np.stack(maps)  # [n, H, W]

    def _extra_attrs(self) -> dict[str, Any]:
        return {"label_values": list(self._label_values), **self._stat}


# --------------------------------------------------------------------------- mask video


class MaskVideo(MaskSource):
    """A label video, decoded in a child process; see the module docstring.

    Open decodes the whole video once (to count frames and collect ids). `read`
    decodes forward from where the previous read stopped and restarts from the
    beginning when asked for an earlier frame, so reading in increasing order costs
    one pass; only the requested frames are kept. Every wait for the decoder has
    ``timeout_s`` as the limit on a stall: a decoder that hangs or crashes is a
    `MaskError` naming the file.
    """

    kind = "video"

    def __init__(
        self,
        file: Path,
        video: _VideoInfo,
        objects: list[int] | None,
        *,
        timeout_s: float = 60.0,
    ) -> None:
        from memenc.pipeline.video import LabelVideo

        self.path = str(file)
        self._frame_count = video.frame_count
        self._timeout_s = float(timeout_s)
        self._labels: LabelVideo | None = LabelVideo(self.path, timeout_s=self._timeout_s)
        try:
            count, size = self._labels.frame_count, (self._labels.height, self._labels.width)
            _check_aspect(file, size[1], size[0], video)
            if not video.fits(count):
                declared = self._labels.frame_count_declared
                if declared > count:  # the masks are what is short: name the mask file
                    raise MaskError(
                        f"{file}: only {count} of the mask video's {declared} frames decode; "
                        f"the file is truncated or damaged ({video.name} has "
                        f"{video.frame_count} frames)"
                    )
                claim = f"{file}: the mask video has {count} frames"
                raise video.count_error(claim, f"{claim}, {video.name} has {video.frame_count}")
            self.height, self.width = size
            values = set(self._labels.values)
            self.object_ids, self._label_values = _label_objects(file, values, objects)
        except BaseException:
            self.close()
            raise
        self._stat = _file_stat(file)

    def _read_labels_sorted(self, frames: list[int]) -> np.ndarray:
        from memenc.pipeline.video import LabelVideo

        if self._labels is None:  # closed, pickled, or after an error: a fresh decoder
            self._labels = LabelVideo(self.path, timeout_s=self._timeout_s, scan=False)
        try:
            labels = self._labels.read(frames)  # [n, H, W]
        except MaskError:
            self.close()  # its position is unknown now; the next read starts afresh
            raise
        if labels.shape[1:] != (self.height, self.width):
            self.close()
            raise MaskError(f"{self.path}: frame {frames[0]} changed size since open")
        return labels

    def close(self) -> None:
        if self._labels is not None:
            self._labels.close()
        self._labels = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_labels"] = None
        return state

    def _extra_attrs(self) -> dict[str, Any]:
        return {"label_values": list(self._label_values), **self._stat}


# --------------------------------------------------------------------------- arrays


def _read_rows(
    file: Any, offset: int, shape: tuple[int, ...], dtype: np.dtype, frames: list[int], where: str
) -> np.ndarray:
    """Rows `frames` of a C-order [T, ...] array whose data starts at byte `offset` of
    `file`, read with seek + readinto (no memory map: a map's pages stay in the process's
    RSS as a run reads through the file)."""
    out = np.empty((len(frames), *shape[1:]), dtype=dtype)
    row_bytes = out[0].nbytes if len(frames) else 0
    for i, frame in enumerate(frames):
        file.seek(offset + frame * row_bytes)
        if file.readinto(memoryview(out[i]).cast("B")) != row_bytes:
            raise MaskError(f"{where}: the array is truncated at frame {frame}")
    return out


class _NpyArray:
    """An .npy file, read row by row with plain reads (Fortran-order files: memory-mapped)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: Any = None
        self._array: np.ndarray | None = None  # Fortran order only
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version in ((2, 0), (3, 0)):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
                self._offset = f.tell()
                size = os.fstat(f.fileno()).st_size
        except (ValueError, OSError, EOFError) as e:
            raise MaskError(f"{path}: not a readable .npy array ({e})") from e
        if dtype.hasobject:
            raise MaskError(f"{path}: not a readable .npy array (holds Python objects)")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype: np.dtype = dtype
        self._fortran = bool(fortran) and len(shape) > 1
        if self._offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > size:
            raise MaskError(f"{path}: not a readable .npy array (the file is truncated)")

    def rows(self, frames: list[int]) -> np.ndarray:
        if self._fortran:
            if self._array is None:
                self._array = np.load(self._path, mmap_mode="r", allow_pickle=False)
            return np.asarray(self._array[frames])
        if self._file is None:
            try:
                self._file = open(self._path, "rb")  # noqa: SIM115 - kept open until close()
            except OSError as e:
                raise MaskError(f"{self._path}: cannot read ({e.strerror or e})") from e
        return _read_rows(self._file, self._offset, self.shape, self.dtype, frames, str(self._path))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._array = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None, "_file": None}


class _NpzMember:
    """One array of an .npz file, read without loading it whole.

    Uncompressed members are read with plain reads at their offset in the file;
    compressed ones by seeking in the decompressed stream (forward seeks decompress,
    backward seeks restart).
    """

    def __init__(self, path: Path, zf: zipfile.ZipFile, name: str) -> None:
        self._path = path
        self._name = name
        info = zf.getinfo(name)
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            self._header_len = f.tell()
        if dtype.hasobject:
            raise ValueError("holds Python objects (pickles are not loaded)")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype: np.dtype = dtype
        self._fortran = fortran
        self._stored = info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1
        self._header_offset = info.header_offset
        self._array: np.ndarray | None = None  # memory map, or whole array (Fortran order)
        self._file: Any = None  # stored, C order: the .npz file, read at _data_offset
        self._data_offset = 0
        self._zip: zipfile.ZipFile | None = None
        self._stream: Any = None

    def _row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def rows(self, frames: list[int]) -> np.ndarray:
        if self._stored and not self._fortran:
            if self._file is None:
                self._data_offset = self._stored_offset()
                self._file = open(self._path, "rb")  # noqa: SIM115 - kept open until close()
            where = f"{self._path}[{self._name[: -len('.npy')]}]"
            return _read_rows(self._file, self._data_offset, self.shape, self.dtype, frames, where)
        if self._array is None and (self._stored or self._fortran):
            self._array = self._load()
        if self._array is not None:
            return np.asarray(self._array[frames])
        if self._stream is None:
            self._zip = zipfile.ZipFile(self._path)
            self._stream = self._zip.open(self._name)
        row_bytes = self._row_bytes()
        out = np.empty((len(frames), *self.shape[1:]), dtype=self.dtype)
        for i, frame in enumerate(frames):
            self._stream.seek(self._header_len + frame * row_bytes)
            data = self._stream.read(row_bytes)
            if len(data) != row_bytes:
                raise MaskError(f"{self._path}: array {self._name!r} is truncated at frame {frame}")
            out[i] = np.frombuffer(data, dtype=self.dtype).reshape(self.shape[1:])
        return out

    def _load(self) -> np.ndarray:
        if not self._stored:  # compressed and Fortran order: no way around loading it
            with np.load(self._path, allow_pickle=False) as npz:
                return npz[self._name[: -len(".npy")]]
        order = "F" if self._fortran else "C"
        return np.memmap(
            self._path,
            dtype=self.dtype,
            mode="r",
            offset=self._stored_offset(),
            shape=self.shape,
            order=order,
        )

    def _stored_offset(self) -> int:
        """Where an uncompressed member's array data starts in the .npz file."""
        with open(self._path, "rb") as f:
            f.seek(self._header_offset)
            local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise MaskError(f"{self._path}: damaged zip entry {self._name!r}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return self._header_offset + 30 + name_len + extra_len + self._header_len

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._zip is not None:
            self._zip.close()
        if self._file is not None:
            self._file.close()
        self._array = self._stream = self._zip = self._file = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None, "_stream": None, "_zip": None, "_file": None}


def _open_npz(path: Path) -> tuple[_NpzMember, str, np.ndarray | None]:
    """The mask array of an .npz, its key, and its object_ids array if any."""
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]
            candidates = [k for k in keys if k != "object_ids"]
            named = [k for k in _NPZ_ARRAY_NAMES if k in candidates]
            if not candidates:
                raise MaskError(
                    f"{path}: no mask array in the .npz (keys: {', '.join(keys) or 'none'})"
                )
            key = named[0] if named else candidates[0]
            member = _NpzMember(path, zf, key + ".npy")
            object_ids = None
            if "object_ids" in keys:
                with zf.open("object_ids.npy") as f:
                    object_ids = np.lib.format.read_array(f, allow_pickle=False)
    except MaskError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise MaskError(f"{path}: not a readable .npz file ({e})") from e
    return member, key, object_ids


class ArrayMasks(MaskSource):
    """Masks in an .npy or .npz array; see the module docstring."""

    def __init__(
        self, file: Path, video: _VideoInfo, objects: list[int] | None, *, kind: str
    ) -> None:
        self.path = str(file)
        self.kind = kind
        self._frame_count = video.frame_count
        self._key: str | None = None
        npz_ids: np.ndarray | None = None
        if kind == "npy":
            self._array: _NpyArray | _NpzMember = _NpyArray(file)
        else:
            self._array, self._key, npz_ids = _open_npz(file)
        where = file if self._key is None else f"{file}[{self._key}]"
        shape, dtype = self._array.shape, self._array.dtype
        if len(shape) == 3 and (dtype.kind in "iu" or dtype == np.bool_):
            self._layout = "labels"
        elif len(shape) == 4 and dtype == np.bool_:
            self._layout = "masks"
        elif len(shape) == 4 and dtype.kind == "f":
            self._layout = "logits"
        elif len(shape) in (3, 4):
            wanted = "integer labels" if len(shape) == 3 else "bool masks or float logits"
            raise MaskError(f"{where}: dtype {dtype} for shape {list(shape)}; expected {wanted}")
        else:
            raise MaskError(
                f"{where}: shape {list(shape)}; expected [T, H, W] labels or [T, O, H, W] masks"
            )
        if not video.fits(shape[0]):
            claim = f"{where}: masks for {shape[0]} frames"
            raise video.count_error(claim, f"{claim}, {video.name} has {video.frame_count}")
        self.height, self.width = shape[-2], shape[-1]
        _check_aspect(where, self.width, self.height, video)
        self.is_logits = self._layout == "logits"
        if self._layout == "labels":
            if npz_ids is not None:  # a label's id is its value: ids given apart would be lost
                raise MaskError(
                    f"{where}: an object_ids array beside [T, H, W] labels; a label image's "
                    "ids are its values (object_ids names the channels of [T, O, H, W] masks)"
                )
            self.object_ids, self._label_values = _label_objects(
                where, self._scan_labels(where), objects
            )
            self._channels: list[int] = []
        else:
            ids = self._per_object_ids(where, shape[1], npz_ids)
            order = sorted(range(len(ids)), key=ids.__getitem__)
            sorted_ids = [ids[i] for i in order]
            chosen = _select_objects(where, sorted_ids, objects)
            self.object_ids = [sorted_ids[i] for i in chosen]
            self._channels = [order[i] for i in chosen]
            self._label_values = []
        self._stat = _file_stat(file)

    @staticmethod
    def _per_object_ids(where: object, count: int, npz_ids: np.ndarray | None) -> list[int]:
        if count < 1:
            raise MaskError(f"{where}: the array has no objects (O = 0)")
        if npz_ids is None:
            return list(range(1, count + 1))
        if npz_ids.ndim != 1 or npz_ids.dtype.kind not in "iu":
            raise MaskError(
                f"{where}: object_ids must be a 1-D integer array, got {npz_ids.dtype} "
                f"of shape {list(npz_ids.shape)}"
            )
        ids = [int(i) for i in npz_ids]
        if len(ids) != count:
            raise MaskError(f"{where}: {len(ids)} object_ids for {count} objects")
        if len(set(ids)) != len(ids) or min(ids) < 0:
            raise MaskError(f"{where}: object_ids must be distinct and >= 0, got {ids}")
        return ids

    def _scan_labels(self, where: object) -> set[int]:
        frame_bytes = max(1, self.height * self.width * self._array.dtype.itemsize)
        block = max(1, _SCAN_BLOCK_BYTES // frame_bytes)
        values: set[int] = set()
        for start in range(0, self._frame_count, block):
            frames = list(range(start, min(start + block, self._frame_count)))
            values |= _nonzero_values(where, self._array.rows(frames))
        return values

    def _read_labels_sorted(self, frames: list[int]) -> np.ndarray | None:
        return self._array.rows(frames) if self._layout == "labels" else None

    def _read_sorted(self, frames: list[int]) -> np.ndarray:
        rows = self._array.rows(frames)
        if self._layout == "labels":
            return _labels_to_masks(rows, self._label_values)
        rows = rows[:, self._channels]
        if self._layout == "masks":
            return rows
        rows = rows.astype(np.float32, copy=False)
        finite = np.isfinite(rows)
        if not finite.all():  # ±inf would come out of the mask's resize as NaN features
            bad = frames[int(np.flatnonzero(~finite.reshape(len(frames), -1).all(1))[0])]
            what = "NaN" if np.isnan(rows).any() else "an infinity"
            raise MaskError(
                f"{self.path}: frame {bad}: the logits contain {what}; logits must be finite "
                "(e.g. clipped to ±20)"
            )
        return rows

    def close(self) -> None:
        self._array.close()

    def _extra_attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"layout": self._layout, **self._stat}
        if self._key is not None:
            attrs["array"] = self._key
        if self._layout == "labels":
            attrs["label_values"] = list(self._label_values)
        return attrs


# --------------------------------------------------------------------------- SA-V JSON


def rle_string_to_counts(s: str | bytes) -> list[int]:
    """Decode the counts string of a COCO compressed RLE into run lengths.

    Each run length is written in 5-bit groups, least significant first, one
    character per group (``chr(48 + group)``, with bit 0x20 set when more groups
    follow and bit 0x10 of the last group giving the sign); from the fourth run on
    the value stored is the difference to the run two places back. Raises
    ValueError on a malformed string.
    """
    text = s.decode("ascii") if isinstance(s, bytes) else s
    counts: list[int] = []
    pos, end = 0, len(text)
    while pos < end:
        value, shift, more = 0, 0, True
        while more:
            if pos >= end:
                raise ValueError("the counts string ends inside a run length")
            code = ord(text[pos]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"invalid character {text[pos]!r} in the counts string")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            pos += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE dict (``size`` [h, w], ``counts`` string or list) to bool [h, w].

    The runs alternate background / foreground, start with background, and cover
    the mask in column-major (Fortran) order. Raises ValueError when the dict is
    malformed or the runs do not cover exactly h*w pixels.
    """
    size = rle.get("size")
    counts = rle.get("counts")
    if not (
        isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)
    ):
        raise ValueError(f"RLE 'size' must be [height, width], got {size!r}")
    height, width = size
    if isinstance(counts, (str, bytes)):
        runs = rle_string_to_counts(counts)
    elif isinstance(counts, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in counts
    ):
        runs = counts
    else:
        raise ValueError("RLE 'counts' must be a string or a list of integers")
    if any(v < 0 for v in runs):
        raise ValueError("RLE has a negative run length")
    covered = sum(runs)  # in Python ints: a run too long for int64 is no error here
    if covered != height * width:
        raise ValueError(
            f"RLE runs cover {covered} pixels, size {height}x{width} has {height * width}"
        )
    runs_array = np.asarray(runs, dtype=np.int64)
    flat = np.repeat(np.arange(runs_array.size) % 2 == 1, runs_array)
    return np.ascontiguousarray(flat.reshape(width, height).T)  # column-major runs


def _json_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


class SavJsonMasks(MaskSource):
    """An SA-V annotation file; see the module docstring.

    Annotation k is the mask of video frame ``k * step`` (SA-V: step 4, 24 fps video
    annotated at 6 fps), so a video of N frames has exactly ``ceil(N / step)``
    annotations, frames 0, step, ... up to N - 1; any other count is refused rather
    than paired with the wrong frames. `annotated_frames` lists those frames. RLEs
    are decoded only when their frame is read.
    """

    kind = "sav-json"

    def __init__(
        self, file: Path, video: _VideoInfo, objects: list[int] | None, *, step: int = SAV_STEP
    ) -> None:
        self.path = str(file)
        self._frame_count = video.frame_count
        try:
            doc = json.loads(file.read_bytes())
        except OSError as e:
            raise MaskError(f"{file}: cannot read ({e.strerror or e})") from e
        except UnicodeDecodeError as e:
            raise MaskError(f"{file}: not a text file ({e.reason})") from e
        except json.JSONDecodeError as e:
            raise MaskError(
                f"{file}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})"
            ) from e
        except RecursionError:
            raise MaskError(
                f"{file}: not an SA-V annotation file (JSON nested too deeply)"
            ) from None
        if not isinstance(doc, dict) or "masklet" not in doc:
            raise MaskError(f"{file}: not an SA-V annotation file (no 'masklet' key)")
        masklet = doc["masklet"]
        if not isinstance(masklet, list) or not all(isinstance(m, list) for m in masklet):
            raise MaskError(f"{file}: 'masklet' must be a list (frames) of lists (objects) of RLEs")
        if not masklet:
            raise MaskError(f"{file}: 'masklet' has no annotated frames")
        count = len(masklet[0])
        if count == 0:
            raise MaskError(f"{file}: annotation 0 has no objects")
        ids_value = doc.get("masklet_id", list(range(count)))
        ids = [_json_int(v) for v in ids_value] if isinstance(ids_value, list) else [None]
        if any(i is None or i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise MaskError(f"{file}: 'masklet_id' must be a list of distinct ids >= 0")
        if len(ids) != count:
            raise MaskError(
                f"{file}: {len(ids)} masklet_id entries for {count} objects in annotation 0"
            )

        size: tuple[int, int] | None = None
        for k, objs in enumerate(masklet):
            if len(objs) != count:
                raise MaskError(
                    f"{file}: annotation {k} has {len(objs)} objects, annotation 0 has {count}"
                )
            for o, rle in enumerate(objs):
                rle_size = rle.get("size") if isinstance(rle, dict) else None
                if (
                    not isinstance(rle, dict)
                    or "counts" not in rle
                    or not (
                        isinstance(rle_size, list)
                        and len(rle_size) == 2
                        and all(_json_int(v) is not None for v in rle_size)
                    )
                ):
                    raise MaskError(
                        f"{file}: annotation {k}, object {ids[o]}: not an RLE dict with 'size' [h, w] and 'counts'"
                    )
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in rle_size):
                    # decode_rle takes integers only: refuse 16.0 here, not mid-run
                    raise MaskError(
                        f"{file}: annotation {k}, object {ids[o]}: RLE 'size' {rle_size} must be "
                        "two integers [h, w]"
                    )
                hw = (int(rle_size[0]), int(rle_size[1]))
                where = f"{file}: annotation {k}, object {ids[o]}"
                if min(hw) < 1:
                    raise MaskError(f"{where}: RLE 'size' {rle_size} must be positive")
                if hw[0] * hw[1] > MAX_MASK_PIXELS:  # each frame becomes planes of that size
                    raise MaskError(
                        f"{where}: RLE 'size' {hw[1]}x{hw[0]} is too large to read safely "
                        f"(over {MAX_MASK_PIXELS:,} pixels)"
                    )
                if size is None:
                    size, first = hw, f"annotation {k}, object {ids[o]}"
                elif hw != size:
                    raise MaskError(
                        f"{where}: size {hw[1]}x{hw[0]} differs from {first}'s "
                        f"({size[1]}x{size[0]})"
                    )
        assert size is not None
        self.height, self.width = size
        _check_aspect(file, self.width, self.height, video)

        annotations = len(masklet)
        json_frames = doc.get("video_frame_count")
        if json_frames is not None:
            json_frames = _json_int(json_frames)
            if json_frames is None or json_frames < 1:
                raise MaskError(f"{file}: 'video_frame_count' must be a positive integer")
            if not video.fits(json_frames):
                claim = f"{file}: annotated for a video of {json_frames} frames"
                raise video.count_error(claim, f"{claim}, {video.name} has {video.frame_count}")
        expected = -(-video.frame_count // step)  # frames 0, step, ... <= N - 1
        if annotations > expected and video.fits(annotations * step):
            # made for every frame the video promises: those past the decoded ones go
            annotations = expected
            masklet = masklet[:expected]
        if annotations != expected:
            raise MaskError(
                f"{file}: {annotations} annotations do not fit a video of {video.frame_count} "
                f"frames annotated every {step} frames (that needs {expected}); "
                "pass --sav-step N if the file uses another annotation step"
            )
        self._step = step
        self._masklet = masklet
        self.annotated_frames = [k * step for k in range(annotations)]

        order = sorted(range(count), key=ids.__getitem__)
        sorted_ids = [ids[i] for i in order]
        chosen = _select_objects(file, sorted_ids, objects)
        self.object_ids = [sorted_ids[i] for i in chosen]
        self._columns = [order[i] for i in chosen]
        self._stat = _file_stat(file)

    def _check_frame(self, frame: int) -> None:
        if frame % self._step or frame // self._step >= len(self._masklet):
            last = self.annotated_frames[-1]
            raise MaskError(
                f"{self.path}: frame {frame} has no annotation (annotated: every {self._step} "
                f"frames from 0 to {last})"
            )

    def _read_sorted(self, frames: list[int]) -> np.ndarray:
        out = np.empty((len(frames), len(self.object_ids), self.height, self.width), dtype=np.bool_)
        for row, frame in enumerate(frames):
            k = frame // self._step
            for channel, column in enumerate(self._columns):
                try:
                    out[row, channel] = decode_rle(self._masklet[k][column])
                except ValueError as e:
                    raise MaskError(
                        f"{self.path}: frame {frame} (annotation {k}), object "
                        f"{self.object_ids[channel]}: bad RLE ({e})"
                    ) from e
        return out

    def _extra_attrs(self) -> dict[str, Any]:
        return {
            "frame_step": self._step,
            "annotation_count": len(self._masklet),
            **self._stat,
        }
