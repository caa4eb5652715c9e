"""A downstream stage that consumes a memenc cache: SAM 2 predicts masks for the frames that
have no annotation, reading its memory bank from the store instead of recomputing it.

Needs the reference SAM 2 code beside memenc (`sam2`; on the CPU:
`SAM2_BUILD_CUDA=0 pip install --no-deps sam2==1.1.0 && pip install hydra-core iopath`).

    # the bundled sample with random weights (no checkpoint ships with memenc)
    python examples/propagate_from_cache.py samples/ball.mp4 --masks samples/ball_masks \\
        --random-reference --image-size 256 --annotate-every 12 -o /tmp/ball-pred

    # an official checkpoint and its config
    python examples/propagate_from_cache.py clip.mp4 --masks clip_masks \\
        --checkpoint sam2.1_hiera_tiny.pt --config configs/sam2.1/sam2.1_hiera_t.yaml

What it does:

1. `memenc encode` the annotated frames (every `--annotate-every`-th frame, float32 store)
   with the checkpoint: per frame and object the memory features, position encoding,
   object score and object pointer, exactly SAM 2's
   `track_step(mask_inputs=m, run_mem_encoder=True)` (see memenc's README).
2. For each frame without annotation and each object: SAM 2's own image encoder, then its
   `track_step(..., mask_inputs=None, run_mem_encoder=False)` with
   `output_dict = cache.sam2_output_dict(object_id)` — SAM 2's memory attention over the
   cached memories and pointers, then its mask decoder. The result equals what SAM 2 gives
   with its own in-memory outputs for the annotated frames (tests/test_bank.py).
3. Writes one label PNG per predicted frame (`-o`), and prints each object's score, its
   mask area and, where the mask source has that frame, the IoU with it (meaningless with
   random weights).

The bank holds only the cached (annotated) frames, as conditioning frames. SAM 2's video
predictor would also add each predicted frame's own memory to ``non_cond_frame_outputs``
as it goes; a stage that wants that encodes its predictions itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import memenc


def build_sam2_model(args: argparse.Namespace, workdir: Path) -> tuple[torch.nn.Module, Path]:
    """SAM 2 from `args.config` at `args.image_size`, and the checkpoint memenc reads: the
    one given, or (with --random-reference) the model's own seeded random init saved in
    SAM 2's checkpoint format."""
    from sam2.build_sam import build_sam2

    overrides = [f"++model.image_size={args.image_size}"]
    if args.random_reference:
        torch.manual_seed(args.seed)
        model = build_sam2(args.config, None, device="cpu", hydra_overrides_extra=overrides)
        ckpt = workdir / "random-reference.pt"
        torch.save({"model": model.state_dict()}, ckpt)
    else:
        ckpt = Path(args.checkpoint)
        model = build_sam2(args.config, str(ckpt), device="cpu", hydra_overrides_extra=overrides)
    return model.to(args.device).eval(), ckpt


def read_labels(masks: Path, frame: int) -> np.ndarray | None:
    """The label image of `frame` from a PNG mask folder, or None."""
    path = masks / f"{frame:05d}.png"
    return np.array(Image.open(path)) if masks.is_dir() and path.is_file() else None


@torch.inference_mode()
def predict_frame(model, image: torch.Tensor, t: int, banks: dict, num_frames: int):
    """SAM 2's track_step on frame t for every object's bank -> {object id: (logits [1, 1,
    S/4, S/4], object score)}."""
    backbone = model.forward_image(image[None])
    _, feats, pos, sizes = model._prepare_backbone_features(backbone)
    out = {}
    for oid, bank in banks.items():
        step = model.track_step(
            frame_idx=t,
            is_init_cond_frame=False,
            current_vision_feats=feats,
            current_vision_pos_embeds=pos,
            feat_sizes=sizes,
            point_inputs=None,
            mask_inputs=None,
            output_dict=bank,
            num_frames=num_frames,
            run_mem_encoder=False,
        )
        out[oid] = (step["pred_masks"], float(step["object_score_logits"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("video", type=Path)
    p.add_argument("--masks", type=Path, required=True, help="PNG label folder (or any source)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="an official-format SAM 2 checkpoint file")
    src.add_argument("--random-reference", action="store_true",
                     help="SAM 2's own random init (seeded), saved as a checkpoint")  # fmt: skip
    p.add_argument("--config", default="configs/sam2.1/sam2.1_hiera_t.yaml",
                   help="SAM 2 config of the checkpoint")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--annotate-every", type=int, default=8,
                   help="frames 0, N, 2N … are the annotated (cached) ones")  # fmt: skip
    p.add_argument("--predict", default="::",
                   help="START:STOP:STEP of the frames to predict (default: all)")  # fmt: skip
    p.add_argument("--store", type=Path, help="the memenc store (default: in -o)")
    p.add_argument("-o", "--out", type=Path, required=True, help="folder for predicted PNGs")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        import sam2  # noqa: F401
    except ImportError:
        print("this example needs SAM 2: pip install sam2 (see its docstring)", file=sys.stderr)
        return 1

    args.out.mkdir(parents=True, exist_ok=True)
    store = args.store or args.out / "cache.zarr"
    with tempfile.TemporaryDirectory() as tmp:
        model, ckpt = build_sam2_model(args, Path(tmp))
        # 1. the cache: memories and pointers of the annotated frames
        memenc.encode_video(
            args.video,
            masks=args.masks,
            checkpoint=ckpt,
            image_size=args.image_size,
            frames=f"0::{args.annotate_every}",
            store_dtype="float32",  # the numbers exactly as computed
            device=args.device,
            out=store,
            overwrite=True,  # a random reference is a new checkpoint on every run
        )
    cache = memenc.open_cache(store)
    annotated = set(cache.frame_index.tolist())
    banks = {oid: cache.sam2_output_dict(oid, device=args.device) for oid in cache.object_ids}

    # 2. the downstream stage: SAM 2's memory attention + mask decoder on the other frames
    from sam2.utils.misc import load_video_frames

    images, height, width = load_video_frames(
        str(args.video), args.image_size, offload_video_to_cpu=True
    )
    num_frames = len(images)
    selected = range(num_frames)[slice(*(int(x) if x else None for x in args.predict.split(":")))]
    todo = [t for t in selected if t not in annotated]
    ious = []
    for t in todo:
        preds = predict_frame(model, images[t].to(args.device), t, banks, num_frames)
        # as SAM 2's predictor: low-res logits resized to the video, > 0; overlaps go to the
        # object with the larger logit
        logits = torch.cat([m for m, _ in preds.values()], dim=1).float()
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        best = logits[0].argmax(0)
        labels = np.zeros((height, width), np.uint8)
        truth = read_labels(args.masks, t)
        parts = []
        for i, (oid, (_, score)) in enumerate(preds.items()):
            mask = ((best == i) & (logits[0, i] > 0)).cpu().numpy()
            labels[mask] = oid
            text = f"object {oid}: score {score:+.2f}, area {mask.mean():.3f}"
            if truth is not None:
                gt = truth == oid
                union = (mask | gt).sum()
                iou = float((mask & gt).sum() / union) if union else 1.0
                ious.append(iou)
                text += f", IoU {iou:.3f}"
            parts.append(text)
        Image.fromarray(labels).save(args.out / f"{t:05d}.png")
        print(f"frame {t}: " + "; ".join(parts))
    mean = f", mean IoU {np.mean(ious):.3f}" if ious else ""
    print(
        f"predicted {len(todo)} frames × {len(cache.object_ids)} objects "
        f"from {len(annotated)} cached frames{mean} -> {args.out}"
    )
    return 0


if __name__ == "__main__":  # memenc's decoder runs in a spawned child process
    sys.exit(main())
