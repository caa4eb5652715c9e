"""Decode throughput with K decoder processes, through the machinery `memenc encode` uses
(`memenc.pipeline.decoders.ParallelDecode`: K `VideoSource`s over contiguous row groups,
each in its own thread, with ``decoder_threads(K)`` FFmpeg threads each).

    python -m benchmarks.decode --video clip.mp4 --image-size 1024 --decoders 1 2 [--repeats 3]

Without --video it writes a 720p H.264 clip (`--clip-frames`, 24 fps, keyframe every 24
frames) to a temporary folder first. Runs alternate between the decoder counts (so drift
cancels); the table gives the medians. `decode_throughput` is the function
`benchmarks/run.py` calls.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memenc.pipeline.decoders import ParallelDecode, SpareSources, decoder_threads, split_rows
from memenc.pipeline.selection import parse_frames
from memenc.pipeline.video import VideoSource, probe_video


def decode_throughput(
    video: Path,
    image_size: int,
    frames: list[int],
    batch_size: int,
    decoders: int,
    *,
    timeout_s: float = 120.0,
    consumer_s: float = 0.0,
    rss: bool = False,
) -> dict[str, Any]:
    """Decode `frames` (sorted source frame numbers) of `video` at S=`image_size` in
    batches of `batch_size` with `decoders` decoder processes, as `run_chunks` does
    (rows split into `decoders` contiguous groups; chunks of `batch_size` rows here).

    Returns ``frames_per_second`` and ``seconds`` (from all decoders started to the last
    batch), plus ``open_seconds`` (starting and probing the K decoders, which a run
    does while it opens the masks and loads the model: `SpareSources`), ``frames``,
    ``decoders``, ``threads`` (FFmpeg threads each), ``image_size`` and, with `rss`,
    ``tree_peak_mb``: the peak summed RSS of this process and its children (decoders,
    forkserver; sampled every 100 ms, which costs some CPU; shared frame slots count in
    each process that maps them).
    `consumer_s`: seconds the consumer spends on each batch (sleeping), to see what the
    decoders hold while waiting for a slower stage such as a GPU's compute.
    """
    from benchmarks.memory import PeakTreeRss

    sampler = PeakTreeRss(os.getpid(), every=0.1) if rss else None
    t0 = time.perf_counter()
    with (
        sampler or contextlib.nullcontext(),
        VideoSource(
            video, image_size, timeout_s=timeout_s, threads=decoder_threads(decoders)
        ) as source,
        SpareSources(source, decoders - 1) as spares,
    ):
        spares.wait()
        t_open = time.perf_counter()
        groups = split_rows(range(len(frames)), batch_size, decoders)
        n = 0
        with ParallelDecode(
            source, frames.__getitem__, groups, batch_size, spares=spares
        ) as batches:
            for _, batch in batches:
                n += len(batch.frame_index)
                if consumer_s:
                    time.sleep(consumer_s)
        t_end = time.perf_counter()
    seconds = t_end - t_open
    return {
        "decoders": decoders,
        "threads": decoder_threads(decoders),
        "image_size": image_size,
        "frames": n,
        "seconds": seconds,
        "open_seconds": t_open - t0,
        "frames_per_second": n / seconds if seconds > 0 else 0.0,
        **({"tree_peak_mb": sampler.mb} if sampler else {}),
    }


def make_clip(folder: Path, frames: int, width: int = 1280, height: int = 720) -> Path:
    """A `frames`-frame H.264 clip (24 fps, a keyframe every 24 frames) with a moving
    scene, written with tests/media.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import media

    labels = media.moving_labels(frames, height, width)
    scene = media.scene_frames(labels)
    return media.write_video(folder / "clip720p.mp4", scene, options={"crf": "23", "g": "24"})


def table(results: dict[int, list[dict[str, Any]]]) -> str:
    """Markdown: one row per decoder count, medians over the repeats."""
    lines = [
        "| decoders | FFmpeg threads each | frames | seconds (median) | frames/s (median) "
        "| frames/s (min–max) | vs first | start s (median) | peak RSS, tree (MB, median) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = None
    for k, runs in results.items():
        fps = [r["frames_per_second"] for r in runs]
        med = statistics.median(fps)
        base = base or med
        threads = runs[0]["threads"] or "auto"
        lines.append(
            f"| {k} | {threads} | {runs[0]['frames']} "
            f"| {statistics.median(r['seconds'] for r in runs):.3f} | {med:.1f} "
            f"| {min(fps):.1f}–{max(fps):.1f} | {med / base:.2f}× "
            f"| {statistics.median(r['open_seconds'] for r in runs):.2f} "
            + (
                f"| {statistics.median(r['tree_peak_mb'] for r in runs):.0f} |"
                if "tree_peak_mb" in runs[0]
                else "| – |"
            )
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", type=Path, help="video file (default: a generated 720p clip)")
    ap.add_argument("--clip-frames", type=int, default=240, help="frames of the generated clip")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--decoders", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--frames", default=None, help="START:STOP:STEP (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--consumer-s",
        type=float,
        default=0.0,
        help="seconds the consumer sleeps per batch (a slower stage downstream)",
    )
    ap.add_argument("--rss", action="store_true", help="sample the process tree's peak RSS")  # fmt: skip
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="memenc-decode-") as tmp:
        video = args.video or make_clip(Path(tmp), args.clip_frames)
        info = probe_video(video)
        frames = list(range(info.frame_count))[parse_frames(args.frames)]
        results: dict[int, list[dict[str, Any]]] = {k: [] for k in args.decoders}
        for _ in range(args.repeats):
            for k in args.decoders:  # interleaved
                results[k].append(
                    decode_throughput(
                        video,
                        args.image_size,
                        frames,
                        args.batch_size,
                        k,
                        consumer_s=args.consumer_s,
                        rss=args.rss,
                    )  # fmt: skip
                )
    print(
        f"decode {info.width}×{info.height} {info.codec} ({info.backend}), S={args.image_size}, "
        f"batch {args.batch_size}, {len(frames)} frames, {args.repeats} repeats, "
        f"consumer {args.consumer_s} s a batch\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
