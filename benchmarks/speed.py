"""Throughput of memenc against the reference loop, side by side in one process run.

    python benchmarks/speed.py --frames 48 --image-size 512 --repeats 3 [--device cuda --precision bf16]

Both use the same checkpoint (written by the reference with spread random weights) and the
same clip (320×240, two objects, PNG masks). The reference loop is REFERENCE.md's: sam2's
load_video_frames, then per frame forward_image and _encode_new_memory per object (under
autocast when --precision is not fp32, as SAM 2's demos run it). memenc runs the whole
`encode_video` (decode, compute, write to a float16 store). Runs alternate; the table gives
medians and the ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference_loop(ref, video: Path, masks: Path, size: int, device: str, precision: str) -> None:
    from PIL import Image
    from sam2.utils.misc import load_video_frames

    dtype = DTYPES[precision]
    cast = torch.autocast(device.split(":")[0], dtype=dtype) if dtype else nullcontext()
    images, _, _ = load_video_frames(
        str(video), size, offload_video_to_cpu=device == "cpu", compute_device=torch.device(device)
    )
    with torch.inference_mode(), cast:
        for f in range(images.shape[0]):
            backbone = ref.forward_image(images[f][None].to(device))
            _, feats, _, sizes = ref._prepare_backbone_features(backbone)
            labels = np.array(Image.open(masks / f"{f:05d}.png"))
            for obj in (3, 7):
                m = torch.from_numpy(labels == obj)[None, None].float().to(device)
                m = torch.nn.functional.interpolate(
                    m, size=(size, size), mode="bilinear", align_corners=False, antialias=True
                )
                m = (m >= 0.5).float()
                score = torch.tensor([[10.0 if m.any() else -10.0]], device=device)
                mem, _ = ref._encode_new_memory(feats, sizes, m * 20 - 10, score, False)
                mem.to("cpu", torch.bfloat16)  # SAM 2 keeps the bank on the storage device
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    import media
    import oracle

    import memenc

    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--variant", default="sam2.1_hiera_tiny")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labels = media.moving_labels(args.frames, 240, 320)
        video = media.write_video(tmp / "clip.mp4", media.scene_frames(labels))
        masks = media.write_png_labels(tmp / "clip_masks", labels)
        ref = oracle.reference_model(args.variant, args.image_size)
        ckpt = oracle.save_checkpoint(ref, tmp / "ckpt.pt")
        ref = ref.to(args.device)
        times: dict[str, list[float]] = {"reference": [], "memenc": []}
        for i in range(args.repeats + 1):  # the first round warms both up and is dropped
            t = time.perf_counter()
            reference_loop(ref, video, masks, args.image_size, args.device, args.precision)
            ref_s = time.perf_counter() - t
            t = time.perf_counter()
            memenc.encode_video(
                video, checkpoint=ckpt, image_size=args.image_size, out=tmp / "out.zarr",
                device=args.device, precision=args.precision,
                batch_size=args.batch_size,
            )  # fmt: skip
            mem_s = time.perf_counter() - t
            shutil.rmtree(tmp / "out.zarr")  # a complete store would make the next run a no-op
            if i:
                times["reference"].append(ref_s)
                times["memenc"].append(mem_s)

    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"{args.variant}, S={args.image_size}, {args.frames} frames × 2 objects, {dev}, "
          f"{args.precision}, memenc batch {args.batch_size}; medians of {args.repeats}")  # fmt: skip
    print("| run | seconds (median) | frames/s |")
    print("|---|---:|---:|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, s in med.items():
        print(f"| {k} | {s:.2f} | {args.frames / s:.2f} |")
    print(f"memenc speed-up over the reference: {med['reference'] / med['memenc']:.2f}×")


if __name__ == "__main__":
    main()
