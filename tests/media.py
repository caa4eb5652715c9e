"""Synthetic media for end-to-end tests: videos written with PyAV, label masks in several
formats. Each frame carries its frame number as a pattern of coloured blocks, so a
decoded (even resized) frame can be identified."""

from __future__ import annotations

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


def write_video(path: Path, frames: np.ndarray, fps: int = 24, codec: str = "libx264",
                options: dict | None = None, container: str | None = None) -> Path:  # fmt: skip
    """Write RGB frames [T, h, w, 3] as a video file."""
    with av.open(str(path), "w", format=container) as c:
        s = c.add_stream(codec, rate=Fraction(fps))
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p" if codec != "ffv1" else "bgr0"
        s.options = options if options is not None else {"crf": "12", "g": "6"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


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


def write_label_video(path: Path, labels: np.ndarray) -> Path:
    """A lossless (FFV1, grey) video whose pixel values are the label ids."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=24)
        s.height, s.width = labels.shape[1:3]
        s.pix_fmt = "gray"
        for lab in labels:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(lab), format="gray")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
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
