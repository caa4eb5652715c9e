"""Peak memory and time of memenc against the reference loop, by video length.

    python benchmarks/memory.py --lengths 60 600 --image-size 256
    python benchmarks/memory.py --lengths 60 600 --image-size 128 --size 640x360 \
        --masks npy png video --runs memenc

`--masks` picks the mask sources memenc reads: ``png`` (a folder of palette PNGs),
``npy`` (a [T, H, W] uint8 label array) and ``video`` (a lossless ffv1 label video);
the reference loop always reads the PNGs.

For each length it writes a synthetic clip (320×240, two objects, PNG masks), then runs,
each in a fresh process: `memenc.encode_video` (fp32, float16 store) and the reference loop
of shared/REFERENCE.md (sam2's load_video_frames, then per frame forward_image and
_encode_new_memory per object, keeping every memory in RAM as SAM 2's predictor does).
Peak RSS: the measured process's own VmHWM, and the peak of the summed RSS of its
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
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))  # benchmarks.run, when run as a script


def make_clip(
    folder: Path, length: int, width: int, height: int, sources: list[str]
) -> tuple[Path, dict[str, Path]]:
    """The clip and its labels in each mask source asked for."""
    import media

    labels = media.moving_labels(length, height, width)
    video = media.write_video(folder / f"clip{length}.mp4", media.scene_frames(labels))
    masks = {"png": media.write_png_labels(folder / f"clip{length}_masks", labels)}
    if "npy" in sources:
        masks["npy"] = folder / f"clip{length}.masks.npy"
        np.save(masks["npy"], labels)
    if "video" in sources:
        masks["video"] = media.write_label_video(folder / f"clip{length}_masks.mkv", labels)
    return video, masks


def child_memenc(video: str, size: int, out: str, masks: str | None = None) -> dict:
    import memenc

    t = time.perf_counter()
    memenc.encode_video(
        video, masks=masks, weights="random", image_size=size, out=out, overwrite=True
    )
    return {"seconds": time.perf_counter() - t}


def child_reference(video: str, size: int, out: str, masks: str | None = None) -> dict:
    """The reference's memories-only loop (`benchmarks.run.child_reference`), random
    sam2.1 tiny weights, on the clip's PNG masks."""
    from benchmarks.run import child_reference as reference_loop

    masks_dir = Path(video).with_name(Path(video).stem + "_masks")
    got = reference_loop(
        "memories", video, str(masks_dir), None, "sam2.1_hiera_tiny", str(size), "cpu", "fp32"
    )
    return {"seconds": got["loop_s"]}


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
                # VmRSS = RssAnon + RssFile + RssShmem: file-backed (mapped) pages count too
                total += next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")), 0)
        except OSError:
            continue
    return total / 1024


class PeakTreeRss:
    """The peak of `_tree_rss_mb(root)`, sampled every `every` seconds in a thread while
    the `with` block runs (`.mb` after it). Sampling scans /proc: it costs some CPU."""

    def __init__(self, root: int, every: float = 0.05) -> None:
        self.root, self.every, self.mb = root, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.mb = max(self.mb, _tree_rss_mb(self.root))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakTreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _own_peak_mb() -> float:
    """This process's peak RSS since it was exec'd: VmHWM. (ru_maxrss starts at the forking
    parent's RSS, which the clips made before inflate.)"""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(kind: str, video: Path, size: int, out: Path, masks: Path | None = None) -> dict:
    """One measurement in a fresh process, sampling its process tree's RSS every 50 ms."""
    cmd = [sys.executable, __file__, "--child", kind, str(video), str(size), str(out)]
    cmd += [str(masks)] if masks is not None else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakTreeRss(proc.pid) as peak:
        out_text, err_text = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed: {err_text[-2000:]}")
    result = json.loads(out_text.strip().splitlines()[-1])
    result["tree_peak_mb"] = peak.mb
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[60, 600])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--size", default="320x240", help="clip and mask size WxH")
    ap.add_argument("--masks", nargs="+", default=["png"], choices=["png", "npy", "video"])
    ap.add_argument("--runs", nargs="+", default=["memenc", "reference"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        kind, video, size, out, *masks = args.child
        child = child_memenc if kind == "memenc" else child_reference
        result = child(video, int(size), out, *masks)
        result["peak_mb"] = _own_peak_mb()
        print(json.dumps(result))
        return

    width, height = map(int, args.size.split("x"))
    print(
        f"clip {width}x{height}, image size {args.image_size}, random weights, CPU, fp32; "
        f"medians of {args.repeats}"
    )
    print("| run | frames | peak RSS main (MB) | peak RSS tree (MB) | seconds | frames/s |")
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = {n: make_clip(tmp, n, width, height, args.masks) for n in args.lengths}
        plan = [("memenc", m) for m in args.masks if "memenc" in args.runs]
        plan += [("reference", "png")] if "reference" in args.runs else []
        for kind, source in plan:  # each source at every length, so pairs finish early
            for n in args.lengths:
                video, masks = clips[n]
                runs = [
                    run_child(
                        kind,
                        video,
                        args.image_size,
                        tmp / f"{kind}{n}.zarr",
                        masks[source] if kind == "memenc" else None,
                    )
                    for _ in range(args.repeats)
                ]
                main_mb = statistics.median(r["peak_mb"] for r in runs)
                tree_mb = statistics.median(r["tree_peak_mb"] for r in runs)
                secs = statistics.median(r["seconds"] for r in runs)
                row = (f"{kind} ({source})", n, main_mb, tree_mb, secs, n / secs)
                rows.append(row)
                print(
                    f"| {row[0]} | {n} | {main_mb:.0f} | {tree_mb:.0f} | {secs:.1f} | "
                    f"{n / secs:.2f} |",
                    flush=True,
                )
    lo, hi = min(args.lengths), max(args.lengths)
    by = {(r[0], r[1]): r for r in rows}
    for kind in dict.fromkeys(r[0] for r in rows):
        if (kind, lo) in by and (kind, hi) in by and lo != hi:
            main_ratio = by[(kind, hi)][2] / by[(kind, lo)][2]
            tree_ratio = by[(kind, hi)][3] / by[(kind, lo)][3]
            print(
                f"{kind}: peak at {hi} / peak at {lo} frames = {main_ratio:.3f} (main process), "
                f"{tree_ratio:.3f} (process tree)"
            )


if __name__ == "__main__":
    main()
