"""What the object pointers cost: `memenc encode` end to end with and without them.

    python benchmarks/pointers.py --image-sizes 256 512 --repeats 5 --frames 0:48:2

The bundled sample (samples/ball.mp4, 48 frames, 2 objects, PNG masks), seeded random
sam2.1 tiny weights (the smallest image encoder, so the largest share for the pointers),
fp32 on the CPU, a float16 store. "without" runs the same `encode_video` with
`encode_memory(pointers=False)` and zeros in `obj_ptr` (what memenc did before it stored
pointers). Runs alternate (with/without, then without/with) after one warm-up run of each;
the table gives medians of the whole run, of this process's CPU time (all its threads;
the decoder child's is the same both ways) and of the time spent in `encode_memory`, and
the median of the per-round ratios with/without (each round's two runs are adjacent in
time, so slow drift of a shared machine cancels in the pair).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from memenc import encode_video
from memenc.encoders.model import MemencModel, MemoryOutput

ROOT = Path(__file__).resolve().parents[1]
_original = MemencModel.encode_memory
spent = [0.0]  # seconds in encode_memory during the current run


def _timed(self, pix_feat, masks, object_score_logits=None, *, pointers=True):
    t0 = time.perf_counter()
    out = _original(self, pix_feat, masks, object_score_logits, pointers=pointers)
    spent[0] += time.perf_counter() - t0
    return out


def _without_pointers(self, pix_feat, masks, object_score_logits=None, *, pointers=True):
    t0 = time.perf_counter()
    out = _original(self, pix_feat, masks, object_score_logits, pointers=False)
    spent[0] += time.perf_counter() - t0
    b, o = out.object_score_logits.shape
    zeros = out.features.new_zeros(b, o, self.no_obj_ptr.shape[-1])
    return MemoryOutput(out.features, out.pos_enc, out.object_score_logits, zeros)


def run(mode: str, size: int, frames: str, out: Path) -> tuple[float, float, float]:
    """(wall seconds, seconds in encode_memory, CPU seconds of this process)."""
    MemencModel.encode_memory = _timed if mode == "with" else _without_pointers
    spent[0] = 0.0
    c0 = time.process_time()
    t0 = time.perf_counter()
    encode_video(
        ROOT / "samples" / "ball.mp4",
        masks=ROOT / "samples" / "ball_masks",
        weights="random",
        variant="sam2.1_hiera_tiny",
        image_size=size,
        frames=frames,
        device="cpu",
        out=out,
        overwrite=True,
    )
    return time.perf_counter() - t0, spent[0], time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--frames", default="0:48:2")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, frames {args.frames}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.zarr"
        for size in args.image_sizes:
            times: dict[str, list[tuple[float, float, float]]] = {"with": [], "without": []}
            for mode in ("with", "without"):  # warm-up, not counted
                run(mode, size, args.frames, out)
            for r in range(args.repeats):
                for mode in ("with", "without") if r % 2 == 0 else ("without", "with"):
                    times[mode].append(run(mode, size, args.frames, out))
            med = {
                m: [statistics.median(x[i] for x in t) for i in (0, 1, 2)] for m, t in times.items()
            }
            total = med["with"][0] / med["without"][0] - 1
            cpu = med["with"][2] / med["without"][2] - 1
            pairs = list(zip(times["with"], times["without"]))
            wall_ratios = [w[0] / wo[0] - 1 for w, wo in pairs]
            pw = statistics.median(wall_ratios)
            pc = statistics.median(w[2] / wo[2] - 1 for w, wo in pairs)
            print(
                f"S={size}: end to end with {med['with'][0]:.2f} s, without "
                f"{med['without'][0]:.2f} s ({total:+.1%}; paired rounds {pw:+.1%}); CPU "
                f"{med['with'][2]:.2f} s vs {med['without'][2]:.2f} s ({cpu:+.1%}; paired "
                f"{pc:+.1%}); encode_memory with {med['with'][1]:.2f} s, without "
                f"{med['without'][1]:.2f} s; wall per run "
                + ", ".join(f"{m}: " + " ".join(f"{x[0]:.2f}" for x in t) for m, t in times.items())
                + "; per-round wall ratios "
                + " ".join(f"{x:+.1%}" for x in wall_ratios)
            )
    MemencModel.encode_memory = _original


if __name__ == "__main__":  # the decoder is a spawned child process
    main()
