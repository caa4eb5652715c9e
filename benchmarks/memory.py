"""Peak memory and time of memenc against the reference loop, by video length.

    python benchmarks/memory.py --lengths 60 600 --image-size 256

For each length it writes a synthetic clip (320×240, two objects, PNG masks), then runs,
each in a fresh process: `memenc.encode_video` (fp32, float16 store) and the reference loop
of shared/REFERENCE.md (sam2's load_video_frames, then per frame forward_image and
_encode_new_memory per object, keeping every memory in RAM as SAM 2's predictor does).
Peak RSS: the measured process's own ru_maxrss, and the peak of the summed RSS of its
whole process tree (memenc's decoder child included), sampled every 50 ms. Prints a Markdown table; medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def make_clip(folder: Path, length: int) -> Path:
    import media

    labels = media.moving_labels(length, 240, 320)
    video = media.write_video(folder / f"clip{length}.mp4", media.scene_frames(labels))
    media.write_png_labels(folder / f"clip{length}_masks", labels)
    return video


def child_memenc(video: str, size: int, out: str) -> dict:
    import memenc

    t = time.perf_counter()
    memenc.encode_video(video, weights="random", image_size=size, out=out, overwrite=True)
    return {"seconds": time.perf_counter() - t}


def child_reference(video: str, size: int, out: str) -> dict:
    import torch
    from PIL import Image
    from sam2.build_sam import build_sam2
    from sam2.utils.misc import load_video_frames

    ref = build_sam2(
        "configs/sam2.1/sam2.1_hiera_t.yaml",
        ckpt_path=None,
        device="cpu",
        hydra_overrides_extra=[f"++model.image_size={size}"],
    ).eval()
    masks_dir = Path(video).with_name(Path(video).stem + "_masks")
    t = time.perf_counter()
    images, _, _ = load_video_frames(video, size, offload_video_to_cpu=True, compute_device="cpu")
    bank = []  # the memory bank SAM 2 keeps for every frame (bf16, as its predictor stores it)
    with torch.inference_mode():
        for f in range(images.shape[0]):
            backbone = ref.forward_image(images[f][None])
            _, feats, _, sizes = ref._prepare_backbone_features(backbone)
            labels = np.array(Image.open(masks_dir / f"{f:05d}.png"))
            for obj in (3, 7):
                m = torch.from_numpy(labels == obj)[None, None].float()
                m = torch.nn.functional.interpolate(
                    m, size=(size, size), mode="bilinear", align_corners=False, antialias=True
                )
                m = (m >= 0.5).float()
                score = torch.tensor([[10.0 if m.any() else -10.0]])
                mem, _ = ref._encode_new_memory(feats, sizes, m * 20 - 10, score, False)
                bank.append(mem.to(torch.bfloat16))
    return {"seconds": time.perf_counter() - t}


def _tree_rss_mb(root: int) -> float:
    """Summed VmRSS of `root` and all its descendants (memenc's decoder is a child of the
    forkserver, which is a child of the encoding process)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")), 0)
        except OSError:
            continue
    return total / 1024


def run_child(kind: str, video: Path, size: int, out: Path) -> dict:
    """One measurement in a fresh process, sampling its process tree's RSS every 50 ms."""
    cmd = [sys.executable, __file__, "--child", kind, str(video), str(size), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree_peak = 0.0
    while proc.poll() is None:
        tree_peak = max(tree_peak, _tree_rss_mb(proc.pid))
        time.sleep(0.05)
    out_text, err_text = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed: {err_text[-2000:]}")
    result = json.loads(out_text.strip().splitlines()[-1])
    result["tree_peak_mb"] = tree_peak
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[60, 600])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", nargs=4)
    args = ap.parse_args()
    if args.child:
        kind, video, size, out = args.child
        result = (child_memenc if kind == "memenc" else child_reference)(video, int(size), out)
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in args.lengths:
            video = make_clip(tmp, n)
            for kind in ("memenc", "reference"):
                runs = [
                    run_child(kind, video, args.image_size, tmp / f"{kind}{n}.zarr")
                    for _ in range(args.repeats)
                ]
                main_mb = statistics.median(r["peak_mb"] for r in runs)
                tree_mb = statistics.median(r["tree_peak_mb"] for r in runs)
                secs = statistics.median(r["seconds"] for r in runs)
                rows.append((kind, n, main_mb, tree_mb, secs, n / secs))
    print(f"image size {args.image_size}, sam2.1_hiera_tiny, CPU, fp32; medians of {args.repeats}")
    print("| run | frames | peak RSS main (MB) | peak RSS tree (MB) | seconds | frames/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, n, main_mb, tree_mb, secs, fps in rows:
        print(f"| {kind} | {n} | {main_mb:.0f} | {tree_mb:.0f} | {secs:.1f} | {fps:.2f} |")
    lo, hi = min(args.lengths), max(args.lengths)
    for col, name in ((2, "main process"), (3, "process tree")):
        by = {(r[0], r[1]): r[col] for r in rows}
        for kind in ("memenc", "reference"):
            ratio = by[(kind, hi)] / by[(kind, lo)]
            print(f"{kind}, {name}: peak at {hi} frames / peak at {lo} frames = {ratio:.3f}")


if __name__ == "__main__":
    main()
