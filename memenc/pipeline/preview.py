"""A picture of one frame of a memenc store, for ``memenc preview``.

    render_preview("clip.zarr", frame=12, out="frame12.png", object_id=1)

The PNG holds three panels side by side, each ``panel_height`` pixels high and as wide
as the source video's aspect ratio makes it, with a caption strip below:

    (a) the source video frame, decoded from the path in the store's attributes (in a
        child process with a deadline, as the encoder decodes);
    (b) the object's mask for that frame (from the store's mask source) in the object's
        colour over the dimmed frame;
    (c) the first three principal components of the object's memory features at that
        frame as RGB. The h×w feature grid covers the whole frame (the encoder sees the
        frame squeezed to S×S), so it is stretched to the frame's aspect to line up with
        (a) and (b).

The video and the masks are inputs the store only points at: when one is missing or
unreadable its panel is grey and says so, and the picture is still written. The store's
own data must be there: a frame, object or chunk the store does not hold is an error.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from memenc.errors import MemencError, StoreError, UsageError
from memenc.pipeline.video import read_frame
from memenc.store.location import describe_os_error
from memenc.store.reader import MemoryCache

__all__ = ["CAPTION_HEIGHT", "PANEL_GAP", "render_preview"]

PANEL_GAP = 4
"""Pixels between panels."""

CAPTION_HEIGHT = 18
"""Pixels of the caption strip under the panels."""

_BACKGROUND = (24, 24, 24)
_TEXT = (230, 230, 230)
_UNAVAILABLE = (128, 128, 128)
_DIM = 0.35  # brightness of the frame behind the mask
# Mask colours by object position in the store (DAVIS-like, bright enough on a dim frame).
_OBJECT_COLOURS = (
    (255, 64, 64),
    (64, 255, 64),
    (255, 255, 64),
    (64, 128, 255),
    (255, 64, 255),
    (64, 255, 255),
    (255, 160, 32),
    (160, 96, 255),
)


class _Unavailable(Exception):
    """A panel's input cannot be read; the message says why."""


def render_preview(
    store: str | os.PathLike[str] | MemoryCache,
    frame: int,
    out: str | os.PathLike[str],
    object_id: int | None = None,
    *,
    panel_height: int = 256,
    timeout_s: float = 60.0,
) -> Path:
    """Write a PNG of one stored frame: video frame, mask, and memory features.

    Args:
        store: a store path (directory, ``file://`` or fsspec URL) or an open `MemoryCache`.
        frame: a source frame number (as in the store's ``frame_index``), not a row.
        out: the PNG to write (replaced if it exists; its folder must exist).
        object_id: the object to show; None for the store's first object.
        panel_height: height of each panel in pixels (at least 16).
        timeout_s: the limit on a stall of the decoders (video frame, mask video); a
            decoder that stalls is killed and its panel says so.

    Returns:
        ``out`` as a Path. The image is ``3 * panel_width + 2 * PANEL_GAP`` wide and
        ``panel_height + CAPTION_HEIGHT`` high, where panel_width keeps the source video's
        aspect ratio (``source_video`` width/height in the store's attributes, else the
        decoded frame's or the mask's, else square).

    Raises:
        StoreError: ``store`` is not a readable memenc store; ``frame`` is not in it (the
            message gives the stored range); ``object_id`` is not in it (the message lists
            the ids); the frame's chunk is not written yet; its data is damaged; or ``out``
            cannot be written.
        UsageError: ``panel_height`` below 16, or ``out`` not named ``*.png``.

    A missing or unreadable video or mask source does not raise: its panel is grey and
    says "video unavailable" / "mask unavailable".
    """
    if panel_height < 16:
        raise UsageError(f"panel height must be at least 16 pixels, got {panel_height}")
    if Path(out).suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the preview is a PNG; give a path ending in .png")
    cache = store if isinstance(store, MemoryCache) else MemoryCache(store)
    if object_id is None:
        object_id = cache.object_ids[0]
    if int(object_id) not in cache.object_ids:
        raise StoreError(
            f"{cache.path}: object {object_id} is not in the store (objects {cache.object_ids})"
        )
    object_id = int(object_id)
    frame = int(frame)
    row = cache.row_of(frame)  # StoreError naming the frame and the stored range
    feats = cache.features(row, object_id)  # [64, h, w]; StoreError if the chunk is not done
    score = cache.score(row, object_id)

    attrs = cache.attrs
    video = attrs.get("source_video") if isinstance(attrs.get("source_video"), dict) else {}
    masks = attrs.get("masks") if isinstance(attrs.get("masks"), dict) else {}

    picture: np.ndarray | None = None
    video_error = ""
    try:
        picture = _decode_frame(video.get("path"), frame, timeout_s)
    except _Unavailable as exc:
        video_error = str(exc)

    width, height = _positive_int(video.get("width")), _positive_int(video.get("height"))
    if (width is None or height is None) and picture is not None:
        height, width = picture.shape[:2]

    mask: np.ndarray | None = None
    mask_error = ""
    try:
        mask = _read_mask(
            masks.get("path"), frame, object_id, video, width, height, cache, timeout_s
        )
    except _Unavailable as exc:
        mask_error = str(exc)
    if (width is None or height is None) and mask is not None:
        height, width = mask.shape
    if width is None or height is None:
        width = height = 1

    ph = panel_height
    pw = max(1, round(ph * width / height))
    colour = _OBJECT_COLOURS[cache.object_ids.index(object_id) % len(_OBJECT_COLOURS)]
    font = _font()

    frame_panel = (
        _resize_rgb(picture, pw, ph)
        if picture is not None
        else _unavailable_panel(pw, ph, "video unavailable", video_error, font)
    )
    if mask is not None:
        mask_small = np.asarray(
            Image.fromarray(mask.astype(np.uint8) * 255).resize((pw, ph), Image.NEAREST)
        ).astype(bool)
        base = frame_panel if picture is not None else np.zeros_like(frame_panel)
        mask_panel = np.round(base.astype(np.float32) * _DIM).astype(np.uint8)
        mask_panel[mask_small] = colour
    else:
        mask_panel = _unavailable_panel(pw, ph, "mask unavailable", mask_error, font)
    pca = _pca_rgb(feats)  # [h, w, 3]
    pca_panel = np.asarray(Image.fromarray(pca).resize((pw, ph), Image.NEAREST))

    canvas = Image.new("RGB", (3 * pw + 2 * PANEL_GAP, ph + CAPTION_HEIGHT), _BACKGROUND)
    captions = (
        f"frame {frame}",
        f"mask, object {object_id}",
        f"memory PCA, row {row}, score {score:+.1f}",
    )
    draw = ImageDraw.Draw(canvas)
    for i, (panel, caption) in enumerate(zip((frame_panel, mask_panel, pca_panel), captions)):
        x = i * (pw + PANEL_GAP)
        canvas.paste(Image.fromarray(panel), (x, 0))
        draw.text((x + 2, ph + 3), _fit(draw, caption, pw - 4, font), fill=_TEXT, font=font)

    return _save_png(canvas, Path(out))


# --------------------------------------------------------------------------- panel (a)


def _decode_frame(path: Any, frame: int, timeout_s: float) -> np.ndarray:
    """Source frame ``frame`` as uint8 RGB [H, W, 3], rotated for display.

    Decoded like every other frame memenc reads: in a child process with a deadline
    (`memenc.pipeline.video.read_frame`), numbered as the encoder numbers frames, so a
    video file or frame folder gives the frame the store holds. Raises `_Unavailable`
    with the reason on any failure.
    """
    if not isinstance(path, str) or not path:
        raise _Unavailable("the store records no video path")
    if not os.path.exists(path):
        raise _Unavailable(f"{path}: no such file")
    try:
        return read_frame(path, frame, timeout_s=timeout_s)
    except MemencError as exc:
        raise _Unavailable(str(exc)) from exc


# --------------------------------------------------------------------------- panel (b)


def _read_mask(
    path: Any,
    frame: int,
    object_id: int,
    video: dict[str, Any],
    width: int | None,
    height: int | None,
    cache: MemoryCache,
    timeout_s: float,
) -> np.ndarray:
    """The object's mask at ``frame`` as bool [H, W] (logits: ``> 0``); `_Unavailable`
    with the reason on any failure. A mask video decodes under the deadline."""
    from memenc.pipeline.masks import open_masks

    if not isinstance(path, str) or not path:
        raise _Unavailable("the store records no mask path")
    frame_count = _positive_int(video.get("frame_count"))
    if frame_count is None:
        frame_count = int(cache.frame_index.max()) + 1
    if width is None or height is None:
        raise _Unavailable("the video size is unknown")
    try:
        with open_masks(
            path,
            video_frame_count=frame_count,
            video_width=width,
            video_height=height,
            objects=[object_id],
            timeout_s=timeout_s,
        ) as source:
            data = source.read([frame])[0, 0].numpy()
    except (MemencError, OSError, ValueError) as exc:
        raise _Unavailable(str(exc)) from exc
    return data > 0 if data.dtype != np.bool_ else data


# --------------------------------------------------------------------------- panel (c)


def _pca_rgb(feats: torch.Tensor) -> np.ndarray:
    """Features [C, h, w] -> uint8 RGB [h, w, 3]: the top three principal components over
    the h*w positions, each min-max scaled to 0..255 (a component with no variance is
    mid-grey). Signs are fixed so that each component's largest magnitude is positive."""
    c, h, w = feats.shape
    x = feats.reshape(c, h * w).T.to(torch.float64)  # [h*w, C]: positions are the samples
    x = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    k = min(3, s.numel())
    comps = u[:, :k] * s[:k]  # [h*w, k], the positions' coordinates on the components
    rgb = torch.full((h * w, 3), 0.5, dtype=torch.float64)
    top = float(s[0]) if s.numel() else 0.0
    for i in range(k):
        if top == 0.0 or float(s[i]) <= 1e-6 * top:
            continue  # no variance along this component: leave it mid-grey
        v = comps[:, i]
        if v[v.abs().argmax()] < 0:
            v = -v
        lo, hi = v.min(), v.max()
        rgb[:, i] = (v - lo) / (hi - lo)
    out = (rgb * 255).round().clamp(0, 255).to(torch.uint8)
    return out.reshape(h, w, 3).numpy()  # [h*w, 3] -> [h, w, 3]


# --------------------------------------------------------------------------- drawing


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if value >= 1 and int(value) == value else None


def _resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    image = Image.fromarray(rgb)
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> str:
    """The text, cut with '...' to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def _unavailable_panel(width: int, height: int, title: str, reason: str, font: Any) -> np.ndarray:
    """A grey panel with ``title`` in the middle and the reason below it."""
    image = Image.new("RGB", (width, height), _UNAVAILABLE)
    draw = ImageDraw.Draw(image)
    lines = [title] + ([_fit(draw, reason, width - 8, font)] if reason else [])
    y = height // 2 - 8 * len(lines)
    for line in lines:
        x = max(0, (width - int(draw.textlength(line, font=font))) // 2)
        draw.text((x, y), line, fill=(255, 255, 255), font=font)
        y += 16
    return np.asarray(image)


def _save_png(image: Image.Image, out: Path) -> Path:
    """Write the PNG through a temp file in the same folder, so ``out`` is whole or
    untouched."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # umask applies
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StoreError(f"{out}: cannot write the preview: {describe_os_error(exc)}") from exc
    return out
