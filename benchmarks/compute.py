"""The encoders' compute alone, on one device: is a batch bound by the host's dispatch of
its kernels or by the device, and what would replaying it as a CUDA graph save?

    python -m benchmarks.compute --device cuda --image-size 1024 --batch-size 16 [--out DIR]

For each precision, one batch of random frames (uint8, S×S) and two objects' masks
(bool, 720×1280) goes through `image_features` + `encode_memory(pointers=True)` as the
engine's compute thread runs it (under `autocast_for`), with random sam2.1 weights:

- *host*: seconds until the calls return, before any synchronisation (the time the
  Python and the kernel launches take); *wall*: until the device has finished. Host far
  below wall means the device sets the pace, and launching faster cannot help.
- on CUDA, the same batch captured once as a CUDA graph and replayed (static inputs,
  autocast's weight cache off, as graph capture needs), with its results compared to the
  eager call's: replay skips the host entirely, so wall minus replay is the most that
  CUDA graphs (or `torch.compile`'s "reduce-overhead" mode) could save a batch.
- with `--profile`, torch.profiler's tables of the ops by host time and by device time
  (for CUDA: on the CPU the encoders run their frames in worker threads, whose ops the
  table leaves out).

Medians of `--repeats` after `--warmup` calls. A markdown table on stdout, and
`compute.md` / `compute.json` in `--out` when given.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import memenc
from memenc.pipeline.engine import autocast_for

MASK_HW = (720, 1280)


def inputs(device: torch.device, size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random frames `[B, 3, S, S]` uint8 and two objects' box masks `[B, 2, 720, 1280]`."""
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    masks = torch.zeros(batch, 2, *MASK_HW, dtype=torch.bool)
    masks[:, 0, 100:400, 200:600] = True
    masks[::2, 1, 300:600, 600:1200] = True  # object 2 absent from every other frame
    return frames.to(device), masks.to(device)


def _graph_autocast(device: torch.device, precision: str) -> Any:
    """`autocast_for`, with autocast's cache of cast weights off where it casts: a graph
    captured with the cache on would keep casts made outside it."""
    context = autocast_for(device, precision)
    if isinstance(context, torch.autocast):
        return torch.autocast(device.type, dtype=context.fast_dtype, cache_enabled=False)
    return context


def measure(
    model: Any,
    frames: torch.Tensor,
    masks: torch.Tensor,
    precision: str,
    *,
    repeats: int,
    warmup: int,
    profile: bool = False,
) -> dict[str, Any]:
    """Host, wall and (CUDA) graph-replay seconds for one batch at one precision."""
    device = frames.device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(fr: torch.Tensor, m: torch.Tensor) -> Any:
        with autocast_for(device, precision):
            return model.encode_memory(model.image_features(fr), m, pointers=True)

    row: dict[str, Any] = {"precision": precision}
    with torch.no_grad():
        for _ in range(warmup):
            eager = step(frames, masks)
        sync()
        host, wall = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            eager = step(frames, masks)
            host.append(time.perf_counter() - t)
            sync()
            wall.append(time.perf_counter() - t)
        row["host_s"], row["wall_s"] = statistics.median(host), statistics.median(wall)
        row["frames_per_s"] = frames.shape[0] / row["wall_s"]
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as profiler

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profiler(activities=activities) as prof:
                step(frames, masks)
                sync()
            table = prof.key_averages()
            row["profile"] = table.table(sort_by="self_cpu_time_total", row_limit=12)
            if cuda:
                row["profile"] += "\n" + table.table(sort_by="self_device_time_total", row_limit=12)
        if not cuda:
            return row
        # static inputs, warmed up on a side stream, then one capture (torch's recipe)
        static_frames, static_masks = frames.clone(), masks.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), _graph_autocast(device, precision):
            for _ in range(max(warmup, 1)):
                model.encode_memory(
                    model.image_features(static_frames), static_masks, pointers=True
                )
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), _graph_autocast(device, precision):
            captured = model.encode_memory(
                model.image_features(static_frames), static_masks, pointers=True
            )
        replay = []
        for _ in range(repeats):
            t = time.perf_counter()
            graph.replay()
            sync()
            replay.append(time.perf_counter() - t)
        row["graph_replay_s"] = statistics.median(replay)
        row["graph_vs_eager_features_max_abs"] = float(
            (captured.features.float() - eager.features.float()).abs().max()
        )
        row["graph_vs_eager_pointers_max_abs"] = float(
            (captured.obj_ptr.float() - eager.obj_ptr.float()).abs().max()
        )
        row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return row


def table(rows: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    lines = [
        f"### Compute alone ({facts['variant']}, S={facts['image_size']}, batches of "
        f"{facts['batch_size']}, {facts['device']}; medians of {facts['repeats']})",
        "",
        "| precision | host (ms/batch) | wall (ms/batch) | frames/s | host / wall "
        "| CUDA graph replay (ms/batch) | graph − eager, max abs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        graph = f"{r['graph_replay_s'] * 1e3:.1f}" if "graph_replay_s" in r else "–"
        diff = (
            f"{max(r['graph_vs_eager_features_max_abs'], r['graph_vs_eager_pointers_max_abs']):.3g}"
            if "graph_replay_s" in r
            else "–"
        )
        lines.append(
            f"| {r['precision']} | {r['host_s'] * 1e3:.1f} | {r['wall_s'] * 1e3:.1f} "
            f"| {r['frames_per_s']:.1f} | {r['host_s'] / r['wall_s']:.2f} | {graph} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variant", default="sam2.1_hiera_tiny")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's tables")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    model = memenc.load_model(
        None, weights="random", variant=args.variant, image_size=args.image_size, device=device
    )
    frames, masks = inputs(device, args.image_size, args.batch_size)
    rows = []
    for precision in args.precisions:
        row = measure(model, frames, masks, precision, repeats=args.repeats,
                      warmup=args.warmup, profile=args.profile)  # fmt: skip
        if "profile" in row:
            print(f"[{precision}]\n{row['profile']}", flush=True)
        rows.append(row)
    facts = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "variant": args.variant, "image_size": args.image_size,
        "batch_size": args.batch_size, "repeats": args.repeats,
        "torch": torch.__version__, "python": platform.python_version(),
    }  # fmt: skip
    text = table(rows, facts)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compute.md").write_text(text)
        (args.out / "compute.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
