"""What loading a checkpoint leaves in memory: the file memory-mapped (memenc's way for
zip-format checkpoints) against the file read, and what two processes that map the same
file share.

    python -m benchmarks.load --checkpoint sam2.1_hiera_tiny.pt [--image-size 1024] [--rounds 3]

Each measurement is a fresh process with `memenc encode`'s malloc settings
(`limit_malloc_arenas`, `keep_freed_memory`): `load_model`, then one frame of
`image_features`. "read" is the same call with the mapping turned off
(`memenc.encoders.checkpoint._is_zip` answering False). Per process: the load's seconds,
and right after it the RSS, glibc's heap and its live part (`mallinfo2`). Then two "mapped"
processes at once, once both have run their frame: the checkpoint mapping's RSS and
proportional share (Pss, from /proc/self/smaps), which is under the RSS when the pages
are shared.
Rounds alternate the two ways; medians. Linux with glibc only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = r"""
import ctypes, json, re, sys, time
import torch
import memenc.encoders.checkpoint as ckpt
from memenc.encoders import load_model
from memenc.pipeline.engine import keep_freed_memory, limit_malloc_arenas

path, size, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if how == "read":
    ckpt._is_zip = lambda _path: False


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
limit_malloc_arenas()
keep_freed_memory(torch.device("cpu"))
t = time.perf_counter()
model = load_model(path, image_size=size, device="cpu")
seconds = time.perf_counter() - t
rss = int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
info = libc.mallinfo2()
with torch.no_grad():
    model.image_features(torch.zeros(1, 3, size, size, dtype=torch.uint8))
if how == "pair":  # measure once the other process has loaded and run its frame too
    print("ready", flush=True)
    sys.stdin.readline()
mapped = {"Rss": 0, "Pss": 0}
inside = False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and not head.endswith(":"):
        inside = line.rstrip().endswith(path)
    elif inside and head[:-1] in mapped:
        mapped[head[:-1]] += int(line.split()[1]) / 1024
print(json.dumps({"load_s": seconds, "rss_mb": rss, "heap_mb": (info.arena + info.hblkhd) / 2**20,
                  "live_mb": (info.uordblks + info.hblkhd) / 2**20,
                  "mapped_rss_mb": mapped["Rss"], "mapped_pss_mb": mapped["Pss"]}), flush=True)
if how == "pair":
    sys.stdin.readline()  # hold the pages until the other process has measured too
"""


def _child(path: Path, size: int, how: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path.resolve()), str(size), how],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _result(proc: subprocess.Popen[str]) -> dict[str, float]:
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.wait()
        raise RuntimeError(f"load child failed (exit {proc.returncode})")
    return json.loads(line)


def measure(path: Path, size: int, rounds: int) -> dict[str, Any]:
    """Medians over `rounds` of each way's after-load figures, and one pair of mapped
    processes' shares of the file."""
    runs: dict[str, list[dict[str, float]]] = {"mapped": [], "read": []}
    for r in range(rounds):
        for how in ("mapped", "read") if r % 2 == 0 else ("read", "mapped"):
            proc = _child(path, size, how)
            runs[how].append(_result(proc))
            proc.wait()
    out: dict[str, Any] = {
        how: {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        for how, rows in runs.items()
    }
    pair = [_child(path, size, "pair") for _ in range(2)]
    try:
        for p in pair:  # both have loaded and run their frame
            if p.stdout is None or p.stdout.readline().strip() != "ready":
                p.wait()
                raise RuntimeError(f"load child failed (exit {p.returncode})")
        for p in pair:
            if p.stdin:
                p.stdin.write("\n")
                p.stdin.flush()
        shares = [_result(p) for p in pair]
    finally:
        for p in pair:
            if p.stdin:
                p.stdin.close()
            p.wait()
    out["pair"] = [{k: s[k] for k in ("mapped_rss_mb", "mapped_pss_mb")} for s in shares]
    return out


def table(got: dict[str, Any], path: Path, size: int, rounds: int) -> str:
    lines = [
        f"### Loading {path.name} (S={size}; medians of {rounds})",
        "",
        "| way | load (s) | RSS after load (MB) | heap (MB) | live (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for how in ("mapped", "read"):
        g = got[how]
        lines.append(f"| {how} | {g['load_s']:.3f} | {g['rss_mb']:.0f} | {g['heap_mb']:.0f} "
                     f"| {g['live_mb']:.0f} |")  # fmt: skip
    lines.append("")
    shares = ", ".join(
        f"{s['mapped_rss_mb']:.0f} MB resident, {s['mapped_pss_mb']:.0f} MB proportional share"
        for s in got["pair"]
    )
    lines.append(f"- two mapped processes at once, the file's pages in each: {shares}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    got = measure(args.checkpoint, args.image_size, args.rounds)
    print(table(got, args.checkpoint, args.image_size, args.rounds))
    if args.json:
        args.json.write_text(json.dumps(got, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
