"""Write the bundled sample: samples/ball.mp4 (48 frames, 320×240, 24 fps, H.264) with two
moving objects, and samples/ball_masks/NNNNN.png, palette label images (id 1: the ball,
id 2: the square, which leaves the picture for the last frames).

The output is committed; this script documents how it was made. Run:
    python scripts/make_sample.py samples
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

W, H, T, FPS = 320, 240, 48, 24


def scene(t: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame t: an RGB image [H, W, 3] uint8 and its label map [H, W] uint8."""
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = (xx * 255 // W).astype(np.uint8) // 3 + 40  # a soft gradient background
    rgb[..., 1] = (yy * 255 // H).astype(np.uint8) // 3 + 60
    rgb[..., 2] = 110
    labels = np.zeros((H, W), np.uint8)
    # object 1: a ball bouncing left to right
    cx, cy = 40 + 240 * t / (T - 1), 120 + 70 * np.sin(t / 5)
    ball = (xx - cx) ** 2 + (yy - cy) ** 2 <= 28**2
    rgb[ball] = (230, 60, 50)
    labels[ball] = 1
    # object 2: a square moving up and out of the picture (absent at the end)
    top = int(200 - 6 * t)
    if top + 40 > 0:
        sq = (xx >= 200) & (xx < 240) & (yy >= max(top, 0)) & (yy < top + 40)
        rgb[sq] = (40, 200, 90)
        labels[sq] = 2
    return rgb, labels


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    masks = out / "ball_masks"
    masks.mkdir(exist_ok=True)
    palette = [0, 0, 0, 230, 60, 50, 40, 200, 90] + [0] * (256 * 3 - 9)
    with av.open(str(out / "ball.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(FPS))
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"crf": "23", "preset": "slow"}
        for t in range(T):
            rgb, labels = scene(t)
            for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(p)
            img = Image.fromarray(labels, mode="P")
            img.putpalette(palette)
            img.save(masks / f"{t:05d}.png", optimize=True)
        for p in s.encode():
            c.mux(p)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "samples"))
