"""Synthetic media for end-to-end tests: videos written with PyAV, label masks in several
formats. Each frame carries its frame number as a pattern of coloured blocks, so a
decoded (even resized) frame can be identified."""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

IDS = (3, 7)


def frame_pattern(t: int, h: int, w: int) -> np.ndarray:
    """RGB [h, w, 3] uint8: a 4×4 grid of blocks coding t in binary (bright/dark), over a
    smooth background."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 200 // w + 20, yy * 200 // h + 20, np.full_like(xx, 90)], -1)
    rgb = rgb.astype(np.uint8)
    bh, bw = h // 4, w // 4
    for bit in range(16):
        r, c = divmod(bit, 4)
        if (t >> bit) & 1:
            rgb[r * bh : (r + 1) * bh, c * bw : c * bw + bw // 2] = (250, 250, 250)
        else:
            rgb[r * bh : (r + 1) * bh, c * bw : c * bw + bw // 2] = (5, 5, 5)
    return rgb


def decode_pattern(rgb: np.ndarray) -> int:
    """Inverse of `frame_pattern` on a (possibly resized, compressed) frame."""
    h, w = rgb.shape[:2]
    bh, bw = h / 4, w / 4
    t = 0
    for bit in range(16):
        r, c = divmod(bit, 4)
        y0, y1 = int(r * bh + bh * 0.3), int(r * bh + bh * 0.7)
        x0, x1 = int(c * bw + bw * 0.1), int(c * bw + bw * 0.4)
        if rgb[y0:y1, x0:x1].mean() > 128:
            t |= 1 << bit
    return t


def moving_labels(t_count: int, h: int, w: int) -> np.ndarray:
    """[T, h, w] uint8 labels: object 3 a disc moving right, object 7 a box present only in
    even frames."""
    yy, xx = np.mgrid[0:h, 0:w]
    labels = np.zeros((t_count, h, w), np.uint8)
    for t in range(t_count):
        cx, cy = w * (0.2 + 0.6 * t / max(t_count - 1, 1)), h * 0.5
        labels[t][(xx - cx) ** 2 + (yy - cy) ** 2 <= (h * 0.2) ** 2] = 3
        if t % 2 == 0:
            labels[t][int(h * 0.6) : int(h * 0.9), int(w * 0.05) : int(w * 0.3)] = 7
    return labels


def scene_frames(labels: np.ndarray) -> np.ndarray:
    """[T, h, w, 3] frames: the pattern of each frame with its objects painted in."""
    t_count, h, w = labels.shape
    frames = np.stack([frame_pattern(t, h, w) for t in range(t_count)])
    frames[labels == 3] = (220, 40, 40)
    frames[labels == 7] = (30, 200, 60)
    # keep the frame-number code readable: repaint the blocks' left halves over objects
    for t in range(t_count):
        code = frame_pattern(t, h, w)
        bh, bw = h // 4, w // 4
        for bit in range(16):
            r, c = divmod(bit, 4)
            sl = (slice(r * bh, (r + 1) * bh), slice(c * bw, c * bw + bw // 2))
            frames[t][sl] = code[sl]
    return frames


def write_frames(path: Path, frames: Iterable, *, codec: str = "libx264", fps: int = 24,
                 pix_fmt: str = "yuv420p", frame_format: str = "rgb24",
                 options: dict | None = None, gop: int | None = None, rotation: int = 0,
                 container: str | None = None, container_options: dict | None = None,
                 ) -> Path:  # fmt: skip
    """Encode frames into a video file; every synthetic video of the tests comes from here.

    ``frames``: arrays [h, w, 3] or [h, w] in ``frame_format`` (for ``"pal8"``, pairs of
    indices [h, w] and palette [256, 4]). ``options`` are the encoder's, ``gop`` its
    keyframe interval, ``rotation`` the display rotation in degrees; ``container`` and
    ``container_options`` the muxer's format name and options (e.g. ``movflags``).
    """
    frames = list(frames)
    first = frames[0][0] if frame_format == "pal8" else frames[0]
    with av.open(str(path), "w", format=container, options=container_options or {}) as c:
        s = c.add_stream(codec, rate=Fraction(fps))
        s.height, s.width = first.shape[:2]
        s.pix_fmt = pix_fmt
        if options:
            s.options = options
        if gop:
            s.codec_context.gop_size = gop
        if rotation:
            s.set_display_rotation(rotation)
        for f in frames:
            data = f if frame_format == "pal8" else np.ascontiguousarray(f)
            c.mux(s.encode(av.VideoFrame.from_ndarray(data, format=frame_format)))
        c.mux(s.encode())
    return path


def write_video(path: Path, frames: np.ndarray, fps: int = 24, codec: str = "libx264",
                options: dict | None = None, container: str | None = None) -> Path:  # fmt: skip
    """Write RGB frames [T, h, w, 3] as a video file."""
    return write_frames(
        path,
        frames,
        codec=codec,
        fps=fps,
        pix_fmt="yuv420p" if codec != "ffv1" else "bgr0",
        options=options if options is not None else {"crf": "12", "g": "6"},
        container=container,
    )


def write_png_labels(folder: Path, labels: np.ndarray) -> Path:
    """Palette PNGs NNNNN.png, one per frame."""
    folder.mkdir(parents=True, exist_ok=True)
    palette = [0, 0, 0] + [
        v for i in range(1, 256) for v in (i * 37 % 256, i * 91 % 256, i * 53 % 256)
    ]
    for t, lab in enumerate(labels):
        img = Image.fromarray(lab, mode="P")
        img.putpalette(palette)
        img.save(folder / f"{t:05d}.png")
    return folder


def write_clip(folder: Path, frames: int, h: int = 60, w: int = 80) -> tuple[Path, np.ndarray]:
    """The usual test clip in `folder`: `moving_labels` drawn into `clip.mp4`, with their
    palette PNGs beside it in `clip_masks/` (found by name). Returns (video, labels)."""
    labels = moving_labels(frames, h, w)
    video = write_video(folder / "clip.mp4", scene_frames(labels))
    write_png_labels(folder / "clip_masks", labels)
    return video, labels


def write_label_video(path: Path, labels: np.ndarray) -> Path:
    """A lossless (FFV1, grey) video whose pixel values are the label ids."""
    return write_frames(path, labels, codec="ffv1", pix_fmt="gray", frame_format="gray")


def write_audio(path: Path) -> Path:
    """A file with one audio stream (a second of a 440 Hz tone, AAC) and no video."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        t = np.arange(16000, dtype=np.float32) / 16000
        samples = (0.3 * np.sin(2 * np.pi * 440 * t))[None, :].astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


def rle_encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a binary [h, w] mask (column-major runs, starting with 0s)."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    out = []
    for i, x in enumerate(counts):
        x = int(x) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(out)}


def sav_json(labels: np.ndarray, step: int) -> dict:
    """SA-V style annotations of every `step`-th frame of `labels`."""
    annotated = labels[::step]
    return {
        "masklet": [[rle_encode(lab == i) for i in IDS] for lab in annotated],
        "masklet_id": list(IDS),
        "video_frame_count": int(labels.shape[0]),
    }


def remux(src: Path, dst: Path, *, fmt: str | None = None, shift_frames: int = 0) -> Path:
    """Copy a video's packets into another container (`fmt`, e.g. "mpegts"). With
    shift_frames > 0 the first frames get negative times, which the MP4 muxer writes as an
    edit list: what `ffmpeg -ss … -c copy` makes, and what players skip."""
    with av.open(str(src)) as i, av.open(str(dst), "w", format=fmt) as o:
        si = i.streams.video[0]
        so = o.add_stream_from_template(si)
        shift = shift_frames * int(1 / (si.average_rate * si.time_base))
        for p in i.demux(si):
            if p.size == 0:
                continue
            p.pts -= shift
            p.dts -= shift
            p.stream = so
            o.mux(p)
    return dst
