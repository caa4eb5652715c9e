"""The examples run: examples/propagate_from_cache.py on the bundled sample, random weights."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_propagate_from_cache_on_the_sample(tmp_path):
    assert importlib.util.find_spec("sam2"), "the oracle sam2 is part of the test environment"
    out = tmp_path / "pred"
    every = 16  # frames 0, 16, 32 cached; 8 of the others predicted
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "propagate_from_cache.py"),
            str(ROOT / "samples" / "ball.mp4"),
            "--masks",
            str(ROOT / "samples" / "ball_masks"),
            "--random-reference",
            "--image-size",
            "128",
            "--annotate-every",
            str(every),
            "--predict",
            "1:48:6",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.match(r"predicted 8 frames × 2 objects from 3 cached frames, mean IoU", last), last
    pngs = sorted(int(p.stem) for p in out.glob("*.png"))
    assert pngs == list(range(1, 48, 6))  # frames without annotation: between and after
    labels = np.array(Image.open(out / "00001.png"))
    assert labels.shape == (240, 320) and set(np.unique(labels)) <= {0, 1, 2}
    cache_arrays = {p.name for p in (out / "cache.zarr").iterdir()}
    assert "obj_ptr" in cache_arrays
