"""Where a `memenc encode` process's memory goes over a run: glibc's heap against the
allocations live in it, and the process's anonymous and file-backed resident memory.

    python -m benchmarks.heap VIDEO [memenc encode options…] [--every 0.25]

Runs `memenc encode VIDEO …` in a fresh process (`-q` and `--overwrite` added) with a
thread that samples, every `--every` seconds, `mallinfo2` (the heap's size over all
arenas, and its live part) and /proc/self/status (RssAnon, RssFile). Prints the series
(one line per change of the heap's size) and the sample where anonymous memory peaked.
A heap much larger than its live part at that peak is memory glibc keeps after it was
freed (`memenc.pipeline.engine.keep_freed_memory`), not data. Linux with glibc only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

CHILD = r"""
import ctypes, json, re, sys, threading, time


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
every = float(sys.argv[1])
samples = []
t0 = time.perf_counter()


def sample():
    status = open("/proc/self/status").read()
    kb = lambda key: int(re.search(key + r":\s+(\d+)", status).group(1)) / 1024
    info = libc.mallinfo2()
    samples.append({"t": time.perf_counter() - t0, "anon_mb": kb("RssAnon"),
                    "file_mb": kb("RssFile"), "heap_mb": (info.arena + info.hblkhd) / 2**20,
                    "live_mb": (info.uordblks + info.hblkhd) / 2**20})


def sampler():
    while True:
        sample()
        time.sleep(every)


if __name__ == "__main__":  # the decoders' forkserver imports __main__ too
    threading.Thread(target=sampler, daemon=True).start()
    from memenc.cli.app import main
    sys.argv = ["memenc", "encode", *sys.argv[2:]]
    try:
        main()
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    sample()
    print("HEAP " + json.dumps({"exit": code, "samples": samples}), flush=True)
"""


def run(encode_args: list[str], every: float = 0.25) -> dict[str, Any]:
    """The child's samples (`samples`, `exit`) for `memenc encode *encode_args`."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(every), *encode_args, "-q", "--overwrite"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    line = next((x for x in out.stdout.splitlines() if x.startswith("HEAP ")), None)
    if line is None:
        raise RuntimeError(f"memenc encode failed: {out.stderr.strip()[-2000:]}")
    return json.loads(line[5:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=float, default=0.25, help="seconds between samples")
    args, encode_args = ap.parse_known_args(argv)
    got = run(encode_args, args.every)
    samples = got["samples"]
    print("| s | anon MB | file MB | heap MB | live MB |")
    print("|---:|---:|---:|---:|---:|")
    shown = None
    for s in samples:
        if round(s["heap_mb"]) != shown:
            shown = round(s["heap_mb"])
            print(f"| {s['t']:.1f} | {s['anon_mb']:.0f} | {s['file_mb']:.0f} | "
                  f"{s['heap_mb']:.0f} | {s['live_mb']:.0f} |")  # fmt: skip
    peak = max(samples, key=lambda s: s["anon_mb"])
    print(f"\nanonymous memory peaked at {peak['anon_mb']:.0f} MB ({peak['t']:.1f} s): heap "
          f"{peak['heap_mb']:.0f} MB of which {peak['live_mb']:.0f} MB live; file-backed "
          f"{peak['file_mb']:.0f} MB; highest live over the run "
          f"{max(s['live_mb'] for s in samples):.0f} MB; exit {got['exit']}")  # fmt: skip
    return 0 if got["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
