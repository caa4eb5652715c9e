"""memenc against the reference, one command: `python -m benchmarks.run --device cpu|cuda`.

    python -m benchmarks.run --device cpu --out bench-out          # this machine's suite
    python -m benchmarks.run --device cuda --suite gpu --out DIR   # what benchmarks/gpu.sh runs
    python -m benchmarks.run --device cuda --suite gpu --dry-run   # everything short of CUDA

Everything is measured in one run, the two sides interleaved (A B, B A, ...) so drift on a
noisy machine cancels; the tables give medians, min–max and ratios, and DIR/benchmark.json
holds every sample with the machine's facts (CPU, GPU, torch and package versions).

What it measures (same checkpoint, written by the reference with randn·0.1 weights; same
clip: generated 1280×720 H.264 with two moving objects and PNG label masks):

- `image_features` against the reference's `forward_image`; `encode_memory` (B frames × 2
  objects, memories only) against `_encode_new_memory` per frame and object.
- Whole runs, each in a fresh process, timed from outside (interpreter start, imports and
  model build included on both sides), with the peak RSS of the process tree sampled every
  50 ms: `memenc encode` (the CLI) against the reference loop of REFERENCE.md. The
  reference loop computes what memenc stores: sam2's `load_video_frames`, then per frame
  `forward_image` and per object `track_step(mask_inputs=m, run_mem_encoder=True)`
  (memory, object pointer, score), keeping the bank in RAM (bfloat16 features, as SAM 2's
  predictor does). A second reference, "memories only", runs `_encode_new_memory` instead
  (no pointers), REFERENCE.md's first loop.
- memenc's stages alone on the same frames, in batches of the engine's default size for
  the device: decode-only (K decoders; the gpu suite's on a longer clip of its own,
  `Suite.decode_frames`), compute-only
  (`image_features` + `encode_memory` on decoded frames and read masks), write-only
  (`CacheStore.write_chunk` of the computed chunks into a fresh store), and the end-to-end
  run against the slowest of them.
- Zarr against `np.save` for the same bytes (each chunk's stored features, interleaved):
  the median of the chunks' ratios, and the same pairs as one throughput; and each side's
  wall and CPU milliseconds per frame-chunk (CPU: user + system, all the process's
  threads), which show what bounds the ratio.
- bf16: memenc's `--precision bf16` run against the reference's fp32 loop, and the relative
  L2 distance of its stored features from the fp32 store's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchmarks.memory import PeakTreeRss  # noqa: E402

OBJECTS = (3, 7)  # the label ids tests/media.py draws


@dataclass(frozen=True)
class Case:
    """One whole-run comparison: a clip, a model size, the frames encoded, and the runs
    (``memenc <precision> [compiled]``, ``reference <precision>``, ``reference fp32
    (memories only)``), each repeated `repeats` times (compiled runs once: they include
    the compilation)."""

    name: str
    variant: str
    image_size: int
    frames: int
    runs: tuple[str, ...]
    repeats: int
    width: int = 1280
    height: int = 720


@dataclass(frozen=True)
class Suite:
    cases: tuple[Case, ...]
    decoders: tuple[int, ...]
    micro_size: int
    micro_variant: str
    repeats: int  # kernels and stages
    stages_case: str  # which case the stage breakdown runs on
    # > 0: the decode stage reads a clip of its own, this many frames of 1280×720 H.264
    # (`benchmarks.decode.make_clip`: CRF 23, a keyframe every 24 frames), instead of the
    # stages case's clip (CRF 12, a keyframe every 6 frames)
    decode_frames: int = 0


_CPU_SHORT = ("memenc fp32", "reference fp32", "reference fp32 (memories only)")
# the compiled run last: its compilation is the longest and least certain step
_GPU_RUNS = ("memenc fp32", "reference fp32", "memenc bf16", "reference bf16",
             "memenc bf16 compiled")  # fmt: skip
_TINY = "sam2.1_hiera_tiny"
SUITES = {
    "cpu": Suite(
        cases=(
            Case("short clip at 1024", _TINY, 1024, 6, _CPU_SHORT, 3),
            Case(
                "240 frames at 512",
                _TINY,
                512,
                240,
                ("memenc fp32", "reference fp32"),
                2,
                width=640,
                height=360,
            ),  # fmt: skip
            # bf16 kept small: on CPUs without native bf16 (AVX2 only) it is emulated, slow
            Case(
                "bf16 at 256",
                _TINY,
                256,
                8,
                ("memenc fp32", "memenc bf16", "reference fp32"),
                1,
                width=320,
                height=240,
            ),  # fmt: skip
        ),
        decoders=(1, 2),
        micro_size=1024,
        micro_variant=_TINY,
        repeats=3,
        stages_case="240 frames at 512",
    ),
    "gpu": Suite(
        cases=(
            # gpu.sh gives the benchmark about 5 minutes: every run is a fresh process
            # (CUDA start, model build, and for "compiled" the compilation), so base_plus
            # runs once
            Case("tiny at 1024", _TINY, 1024, 64, _GPU_RUNS, 2),
            Case("base_plus at 1024", "sam2.1_hiera_base_plus", 1024, 64, _GPU_RUNS, 1),
        ),
        decoders=(1, 2, 4, 8),
        micro_size=1024,
        micro_variant=_TINY,
        repeats=3,
        stages_case="tiny at 1024",
        # the third run measured K = 2 at 2.3x K = 1 on the case's 64 frames, the fourth at
        # 0.98x, while decoding alone on its machine gave 1.43x (64 frames) and 1.64x (256):
        # a longer clip, whose decoders each seek back to a keyframe once, with less noise
        decode_frames=256,
    ),
    # long runs, where start-up no longer dominates: each run once, the default K (half the
    # cores, at most 4) against K = 8; `gpu.sh` runs it with GPU_SH_BENCH_ARGS="--suite
    # gpu512 --only whole"
    "gpu512": Suite(
        cases=(
            Case(
                "tiny at 1024, 512 frames",
                _TINY,
                1024,
                512,
                (
                    "memenc fp32",
                    "memenc fp32 K=8",
                    "reference fp32",
                    "memenc bf16",
                    "memenc bf16 K=8",
                ),
                1,
            ),  # fmt: skip
            Case(
                "base_plus at 1024, 512 frames",
                "sam2.1_hiera_base_plus",
                1024,
                512,
                ("memenc fp32", "reference fp32", "memenc bf16"),
                1,
            ),  # fmt: skip
        ),
        decoders=(1, 2, 4, 8),
        micro_size=1024,
        micro_variant=_TINY,
        repeats=3,
        stages_case="tiny at 1024, 512 frames",
    ),
    "quick": Suite(  # a smoke test of the whole benchmark (minutes on 2 cores)
        cases=(
            Case(
                "quick at 256",
                _TINY,
                256,
                8,
                (*_CPU_SHORT, "memenc bf16", "reference bf16"),
                1,
                width=320,
                height=240,
            ),  # fmt: skip
        ),
        decoders=(1, 2),
        micro_size=256,
        micro_variant="sam2.1_hiera_tiny",
        repeats=1,
        stages_case="quick at 256",
    ),
}


# ---------------------------------------------------------------------------- statistics


@dataclass
class Measure:
    """Samples of one quantity (seconds unless `unit` says otherwise)."""

    unit: str = "s"
    samples: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.samples.append(float(value))

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def to_dict(self) -> dict[str, Any]:
        s = self.samples
        return {
            "unit": self.unit,
            "median": self.median,
            "min": min(s) if s else None,
            "max": max(s) if s else None,
            "samples": s,
        }

    def span(self, fmt: str = "{:.2f}") -> str:
        if not self.samples:
            return "–"
        return f"{fmt.format(self.median)} ({fmt.format(min(self.samples))}–" + (
            f"{fmt.format(max(self.samples))})"
        )


class Results:
    """Every measure by name, the markdown lines so far, and the facts."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.measures: dict[str, Measure] = {}
        self.ratios: dict[str, float] = {}
        self.facts: dict[str, Any] = {}
        self.lines: list[str] = []
        self.failures: dict[str, str] = {}  # what did not run or failed, and why

    def m(self, name: str, unit: str = "s") -> Measure:
        return self.measures.setdefault(name, Measure(unit))

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        self.save()

    def save(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "benchmark.md").write_text("\n".join(self.lines) + "\n")
        data = {
            "facts": self.facts,
            "measures": {k: v.to_dict() for k, v in self.measures.items()},
            "ratios": self.ratios,
            "failures": self.failures,
        }
        (self.out / "benchmark.json").write_text(json.dumps(data, indent=1, default=str))


def interleave(rounds: int, runs: dict[str, Callable[[], None]], res: Results, prefix: str):
    """Run each callable `rounds` times, alternating the order each round (after one
    untimed warm-up of each), recording wall seconds under `prefix/name`."""
    for fn in runs.values():
        fn()
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            runs[name]()
            res.m(f"{prefix}/{name}").add(time.perf_counter() - t)


class Deadline:
    """The benchmark's time budget (`--budget-s`): work that would start past it is skipped
    and said so in the tables, instead of the whole run being killed by an outer timeout
    with its last table unwritten (benchmarks/gpu.sh runs it inside a fixed budget)."""

    def __init__(self, seconds: float | None) -> None:
        self.end = time.monotonic() + seconds if seconds else float("inf")

    def left(self) -> float:
        return self.end - time.monotonic()

    def timeout(self) -> float | None:
        """Seconds left as a subprocess timeout: None without a budget (subprocess cannot
        wait an infinite timeout: its selector raises OverflowError)."""
        return None if self.end == float("inf") else max(self.left(), 0.0)


DEADLINE = Deadline(None)


# ---------------------------------------------------------------------------- facts


def machine_facts(device: str) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    from importlib import metadata

    for pkg in ("memenc", "zarr", "numcodecs", "decord", "av", "sam2", "numpy"):
        try:
            mod = __import__(pkg)
        except ImportError:
            facts[pkg] = None
            continue
        version = getattr(mod, "__version__", None)
        if version is None:  # sam2 has no __version__; its distribution says it
            try:
                version = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                version = "?"
        facts[pkg] = version
    return facts


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def gpu_facts() -> dict[str, Any]:
    import torch

    p = torch.cuda.get_device_properties(0)
    return {
        "gpu": p.name,
        "gpu_memory_gb": round(p.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
    }


# ---------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    video: Path
    masks: Path
    checkpoint: Path | None  # None: no reference here (memenc's seeded random weights)
    case: Case


def make_inputs(tmp: Path, case: Case, have_reference: bool) -> Inputs:
    import media

    folder = tmp / f"clip_{case.frames}_{case.width}x{case.height}"  # shared by like cases
    video, masks = folder / "clip.mp4", folder / "clip_masks"
    if not video.exists():
        folder.mkdir(parents=True, exist_ok=True)
        labels = media.moving_labels(case.frames, case.height, case.width)
        media.write_png_labels(masks, labels)
        media.write_video(video, media.scene_frames(labels))  # last: it marks the folder whole
    ckpt = None
    if have_reference:
        ckpt = tmp / f"{case.variant}_{case.image_size}.pt"
        if not ckpt.exists():
            import oracle

            oracle.save_checkpoint(oracle.reference_model(case.variant, case.image_size), ckpt)
            oracle.reference_model.cache_clear()
    return Inputs(video, masks, ckpt, case)


def has_reference() -> bool:
    try:
        import sam2  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------- whole runs


def timed_process(
    cmd: list[str], gpu: bool = False, timeout: float | None = None
) -> dict[str, Any]:
    """Run `cmd`; wall seconds from start to exit, and the peak summed RSS of its process
    tree (sampled every 50 ms); with `gpu`, the GPU's mean utilisation over the run
    (nvidia-smi, every 100 ms). The child's last stdout line, when JSON, is merged in
    (where a key is in both, this function's measure stands).
    Past `timeout` seconds the child's process group is killed and RuntimeError raised."""
    smi = None
    if gpu and shutil.which("nvidia-smi"):
        smi = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             "-i", "0", "-lms", "100"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        with PeakTreeRss(proc.pid) as peak:
            out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the decoder processes too
        proc.communicate()
        if smi is not None:
            smi.kill()
            smi.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f} s: the benchmark's budget") from None
    seconds = time.perf_counter() - t
    busy: list[float] = []
    gpu_mb = 0.0
    if smi is not None:
        smi.terminate()
        text, _ = smi.communicate()
        for line in text.splitlines():
            try:
                util, used = (float(v) for v in line.split(","))
            except ValueError:
                continue
            busy.append(util)
            gpu_mb = max(gpu_mb, used)
    if proc.returncode != 0:
        raise RuntimeError(f"exited {proc.returncode}: {err.strip()[-1500:]}")
    result: dict[str, Any] = {"seconds": seconds, "tree_peak_mb": peak.mb}
    if busy:
        result["gpu_busy"] = statistics.mean(busy)
        result["gpu_peak_mb"] = gpu_mb  # the whole GPU's memory in use (nvidia-smi)
    lines = out.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        # what the child says of itself, under what this measured (memenc's summary has
        # its own `seconds`, from inside the process)
        result = {**json.loads(lines[-1]), **result}
    return result


def memenc_cmd(
    inp: Inputs, out: Path, device: str, precision: str, compiled: bool, decoders: int | None
) -> list[str]:
    c = inp.case
    cmd = [sys.executable, "-m", "memenc", "encode", str(inp.video), "--masks", str(inp.masks)]
    cmd += ["--checkpoint", str(inp.checkpoint)] if inp.checkpoint else ["--weights", "random"]
    cmd += ["--variant", c.variant, "--image-size", str(c.image_size), "--device", device]
    # --json: no progress, and the summary's last line (with the stages' waits) is merged
    cmd += ["--precision", precision, "-o", str(out), "--overwrite", "--json"]
    cmd += ["--compile"] if compiled else []
    cmd += ["--decoders", str(decoders)] if decoders else []
    return cmd


def reference_cmd(inp: Inputs, device: str, precision: str, kind: str) -> list[str]:
    c = inp.case
    return [
        sys.executable, "-m", "benchmarks.run", "--child", kind, str(inp.video), str(inp.masks),
        str(inp.checkpoint), c.variant, str(c.image_size), device, precision,
    ]  # fmt: skip


def child_reference(
    kind: str, video: str, masks: str, ckpt: str | None, variant: str, size: str, device: str,
    precision: str,
) -> dict[str, Any]:  # fmt: skip
    """The reference loop in this (fresh) process: build from the checkpoint (None: the
    config's own random initialisation), load the whole video, then per frame and object
    `track_step` ("bank") or `_encode_new_memory` ("memories"), keeping every result in
    RAM as SAM 2 does."""
    from contextlib import nullcontext

    import oracle
    import torch
    from PIL import Image
    from sam2.build_sam import build_sam2
    from sam2.utils.misc import load_video_frames

    s = int(size)
    t0 = time.perf_counter()
    ref = build_sam2(
        oracle.CONFIGS[variant], ckpt_path=ckpt, device=device,
        hydra_overrides_extra=[f"++model.image_size={s}"],
    ).eval()  # fmt: skip
    t_build = time.perf_counter() - t0
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    cast = torch.autocast(device.split(":")[0], dtype=dtype) if dtype else nullcontext()
    images, _, _ = load_video_frames(
        video, s, offload_video_to_cpu=device == "cpu", compute_device=torch.device(device)
    )
    bank = []
    empty = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    with torch.inference_mode(), cast:
        for f in range(images.shape[0]):
            bo = ref.forward_image(images[f][None].to(device))
            _, vf, vpos, fs = ref._prepare_backbone_features(bo)
            labels = torch.from_numpy(np.array(Image.open(Path(masks) / f"{f:05d}.png")))
            for obj in OBJECTS:
                m = oracle.resize_binary((labels == obj).to(device), s)[None, None]
                if kind == "bank":
                    out = ref.track_step(
                        frame_idx=f, is_init_cond_frame=True, current_vision_feats=vf,
                        current_vision_pos_embeds=vpos, feat_sizes=fs, point_inputs=None,
                        mask_inputs=m, output_dict=empty, num_frames=images.shape[0],
                        run_mem_encoder=True,
                    )  # fmt: skip
                    bank.append((out["maskmem_features"].to(torch.bfloat16), out["obj_ptr"].cpu()))
                else:
                    score = torch.tensor([[10.0 if m.any() else -10.0]], device=device)
                    mem, _ = ref._encode_new_memory(vf, fs, m * 20 - 10, score, False)
                    bank.append(mem.to(torch.bfloat16))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"build_s": t_build, "loop_s": time.perf_counter() - t0 - t_build}


def decoders_in(run: str) -> int | None:
    """The K of a memenc run's name ("memenc bf16 K=4" -> 4; None: memenc's default)."""
    k = [int(w[2:]) for w in run.split() if w.startswith("K=")]
    return k[0] if k else None


def stage_batch(device: str) -> int:
    """Frames per batch in the stages measured alone (decode, compute): the engine's
    default for the device (4 on the CPU, 16 on CUDA), so a stage runs as in `memenc
    encode`. (It was 4 everywhere: on the H200 the compute stage then measured 45.6
    frames/s in fp32, while `benchmarks/compute.py` timed the encoders alone, without
    this stage's host copies, at 94 frames/s in batches of 16; the stage itself has not
    been timed at 16 yet.)"""
    import torch

    from memenc.pipeline.engine import default_batch_size

    return default_batch_size(torch.device(device))


def compute_inputs(
    video: str, masks: str, ckpt: str | None, variant: str, size: int, device: str, frames: int
) -> tuple[Any, list[Any], list[Any]]:
    """The model, and frames 0..frames-1 decoded and their masks read, in memory, in
    batches of `stage_batch(device)`: the compute stage's inputs. The process's malloc is set as
    `encode_video` sets it, so the stage runs alone as it runs in the pipeline."""
    import torch

    import memenc
    from memenc.pipeline.engine import keep_freed_memory, limit_malloc_arenas
    from memenc.pipeline.masks import open_masks
    from memenc.pipeline.video import VideoSource

    limit_malloc_arenas()
    keep_freed_memory(torch.device(device))

    model = (
        memenc.load_model(ckpt, image_size=size, device=device)
        if ckpt
        else memenc.load_model(
            None, weights="random", variant=variant, image_size=size, device=device
        )
    )
    rows = list(range(frames))
    batch = stage_batch(device)
    with VideoSource(Path(video), size) as src:
        info = src.info
        batches = [b.frames for b in src.iter_batches(rows, batch)]
    msrc = open_masks(Path(masks), video_frame_count=info.frame_count, video_width=info.width,
                      video_height=info.height)  # fmt: skip
    try:
        mask_batches = [msrc.read(rows[i : i + batch]) for i in range(0, frames, batch)]
    finally:
        msrc.close()
    return model, batches, mask_batches


def compute_alone(
    model: Any, batches: list[Any], mask_batches: list[Any], device: str
) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds for `image_features` + `encode_memory` over the batches, each result brought
    to the host as float32; and the results (features, pointers, scores)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    feats, ptrs, scores = [], [], []
    t = time.perf_counter()
    for fr, m in zip(batches, mask_batches):
        out = model.encode_memory(model.image_features(fr), m)
        feats.append(out.features.float().cpu().numpy())
        ptrs.append(out.obj_ptr.float().cpu().numpy())
        scores.append(out.object_score_logits.float().cpu().numpy())
    sync()
    seconds = time.perf_counter() - t
    arrays = {"features": np.concatenate(feats), "pointers": np.concatenate(ptrs),
              "scores": np.concatenate(scores)}  # fmt: skip
    return seconds, arrays


def child_compute(
    video: str, masks: str, ckpt: str, variant: str, size: str, device: str, frames: str,
    dump: str,
) -> dict[str, Any]:  # fmt: skip
    """The compute stage alone, in this (fresh) process, for the whole-run rotation: inputs
    in memory first, then one timed pass; its results saved to `dump` (.npz) for the
    write-only stage."""
    model, batches, mask_batches = compute_inputs(
        video, masks, ckpt or None, variant, int(size), device, int(frames)
    )
    seconds, arrays = compute_alone(model, batches, mask_batches, device)
    np.savez(dump, **arrays)
    return {"compute_s": seconds}


COMPUTE_RUN = "memenc compute alone"  # the whole-run rotation's compute-only process


def whole_runs(
    res: Results, inp: Inputs, device: str, suite: Suite, tmp: Path, with_compute: bool = False
) -> None:
    """memenc encode (each precision / compile setting) against the reference loops, each
    a fresh process, interleaved. `with_compute`: memenc's compute stage alone joins the
    rotation (`child_compute`, timed inside its process), for the stages table."""
    c = inp.case
    key = f"whole/{c.name}"
    runs: dict[str, list[str]] = {}
    if with_compute:
        runs[COMPUTE_RUN] = [
            sys.executable, "-m", "benchmarks.run", "--child", "compute", str(inp.video),
            str(inp.masks), str(inp.checkpoint or ""), c.variant, str(c.image_size), device,
            str(c.frames), str(tmp / "compute_alone.npz"),
        ]  # fmt: skip
    stores: dict[str, Path] = {}
    for name in c.runs:
        words = name.split()
        if words[0] == "memenc":
            stores[name] = tmp / f"{c.name}_{name}.zarr".replace(" ", "_")
            runs[name] = memenc_cmd(
                inp, stores[name], device, words[1], "compiled" in words, decoders_in(name)
            )
        elif inp.checkpoint is not None:
            kind = "memories" if "memories" in name else "bank"
            runs[name] = reference_cmd(inp, device, words[1], kind)
    names = list(runs)
    failed: dict[str, str] = {}  # a run that failed once is not repeated
    for r in range(c.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            if (r and "compiled" in name) or name in failed:
                continue
            if DEADLINE.left() < 15:
                failed.setdefault(name, "not run: the benchmark's time budget was spent")
                continue
            try:
                got = timed_process(
                    runs[name], gpu=device.startswith("cuda"), timeout=DEADLINE.timeout()
                )
            except RuntimeError as e:
                failed[name] = str(e) if str(e).startswith("timed out") else f"failed: {e}"
                print(f"[{c.name}] {name}: {failed[name]}", file=sys.stderr, flush=True)
                continue
            print(f"[{c.name}] {name} (round {r + 1}): {got['seconds']:.2f} s, "
                  f"{got['tree_peak_mb']:.0f} MB", flush=True)  # fmt: skip
            res.m(f"{key}/{name}").add(got["seconds"])
            res.m(f"{key}/{name}/peak_mb", "MB").add(got["tree_peak_mb"])
            if "compute_s" in got:
                res.m(f"stages/{c.name}/compute").add(got["compute_s"])
            for part in ("build_s", "loop_s"):  # the reference's own split
                if part in got:
                    res.m(f"{key}/{name}/{part}").add(got[part])
            for stage, spent in got.get("stages", {}).items():  # memenc's `StageTimes`
                for part in STAGE_PARTS:
                    res.m(f"{key}/{name}/stage/{stage}/{part}").add(spent[part])
            if got.get("stages") and got.get("frames_per_second"):
                # the process's wall time less the stages': imports, probe, model, store
                run_s = got["frames"] / got["frames_per_second"]
                res.m(f"{key}/{name}/outside_stages").add(got["seconds"] - run_s)
            if "gpu_busy" in got:
                res.m(f"{key}/{name}/gpu_busy", "%").add(got["gpu_busy"])
                res.m(f"{key}/{name}/gpu_peak_mb", "MB").add(got["gpu_peak_mb"])
            res.save()
    res.failures.update({f"{key}/{name}": why for name, why in failed.items()})
    res.say(f"### Whole runs: {c.name} ({c.variant}, {c.frames} frames of {c.width}×{c.height}, "
            f"S={c.image_size}, {device}; medians of {c.repeats}, min–max)")  # fmt: skip
    res.say("")
    busy = device.startswith("cuda")
    res.say("| run | seconds | frames/s | peak RSS, process tree (MB) |"
            + (" GPU busy | GPU memory (MB) |" if busy else ""))  # fmt: skip
    res.say("|---|---:|---:|---:|" + ("---:|---:|" if busy else ""))
    for name in names:
        t = res.m(f"{key}/{name}")
        if not t.samples:
            res.say(f"| {name} | {failed.get(name, 'no result')[:300]} | – | – |"
                    + (" – | – |" if busy else ""))  # fmt: skip
            continue
        mb = res.m(f"{key}/{name}/peak_mb", "MB")
        gb = res.measures.get(f"{key}/{name}/gpu_busy")
        gm = res.measures.get(f"{key}/{name}/gpu_peak_mb")
        extra = (
            (f" {gb.median:.0f}% | {gm.median:.0f} |" if gb and gm else " – | – |") if busy else ""
        )
        res.say(f"| {name} | {t.span()} | {c.frames / t.median:.2f} | {mb.span('{:.0f}')} |{extra}")
    res.say("")
    stage_table(res, key, names)
    if with_compute:
        res.say(f"- {COMPUTE_RUN}: a fresh process that loads the model and holds every frame "
                "decoded and every mask read, then times one pass of `image_features` + "
                "`encode_memory` (the stages table's `compute`), in this rotation so the "
                "end-to-end ratio compares runs made side by side")  # fmt: skip
    ref = res.measures.get(f"{key}/reference fp32")
    if ref is not None and ref.samples:
        for name in names:
            if name == COMPUTE_RUN:  # not an encode: its time is in the stages table
                continue
            if name.startswith("memenc") and res.m(f"{key}/{name}").samples:
                speed = ref.median / res.m(f"{key}/{name}").median
                rss = (
                    res.m(f"{key}/{name}/peak_mb").median
                    / res.m(f"{key}/reference fp32/peak_mb").median
                )
                only_m = res.measures.get(f"{key}/reference fp32 (memories only)")
                only = only_m.median if only_m else float("nan")
                res.ratios[f"{key}/{name}/speed_vs_reference_fp32"] = speed
                res.ratios[f"{key}/{name}/rss_vs_reference_fp32"] = rss
                res.ratios[f"{key}/{name}/speed_vs_memories_only"] = (
                    only / res.m(f"{key}/{name}").median
                )
                vs_only = (
                    f" ({only / res.m(f'{key}/{name}').median:.2f}× the memories-only loop)"
                    if only_m
                    else ""
                )
                res.say(f"- {name}: {speed:.2f}× the reference fp32 loop's speed{vs_only}, "
                        f"peak RSS {rss:.2f}× the reference's")  # fmt: skip
    for name in names:
        words = name.split()
        same = res.measures.get(f"{key}/reference {words[1]}")
        ok = res.m(f"{key}/{name}").samples and same is not None and same.samples
        if words[0] == "memenc" and words[1] != "fp32" and name != COMPUTE_RUN and ok:
            speed = same.median / res.m(f"{key}/{name}").median
            res.ratios[f"{key}/{name}/speed_vs_reference_{words[1]}"] = speed
            res.say(f"- {name}: {speed:.2f}× the reference {words[1]} loop's speed")
    if "memenc fp32" in stores and res.m(f"{key}/memenc fp32").samples:
        for name, path in stores.items():
            if name != "memenc fp32" and res.m(f"{key}/{name}").samples:
                d = stored_distance(stores["memenc fp32"], path)
                res.ratios[f"{key}/{name}/rel_l2_vs_memenc_fp32"] = d
                res.say(f"- {name}: stored features at relative L2 {d:.2e} from memenc fp32's")
    res.say("")


STAGE_PARTS = ("busy", "waiting_for_input", "waiting_for_output", "waiting_for_device")


def stage_table(res: Results, key: str, names: list[str]) -> None:
    """Where each memenc run's stages spent it (medians over its runs): what bounds it is
    the stage that is busy while the others wait on it."""
    rows = []
    for name in names:
        prefix = f"{key}/{name}/stage/"
        # in the order memenc's summary gives them (the pipeline's), as first recorded
        stages = dict.fromkeys(k[len(prefix) :].split("/")[0] for k in res.measures
                               if k.startswith(prefix))  # fmt: skip
        for stage in stages:
            parts = [res.measures.get(f"{prefix}{stage}/{p}") for p in STAGE_PARTS]
            if all(m is not None and m.samples for m in parts):
                rows.append(f"| {name} | {stage} | " + " | ".join(f"{m.median:.2f}" for m in parts)
                            + " |")  # fmt: skip
    if not rows:
        return
    res.say("Where memenc's stages spent the run (seconds, medians; `memenc encode --json`'s "
            "`stages`; decode's input is its decoder processes, assemble's device wait is the "
            "GPU's work and copies; writers summed over their threads):")  # fmt: skip
    res.say("")
    res.say("| run | stage | busy | waiting for input | waiting for output | waiting for device |")
    res.say("|---|---|---:|---:|---:|---:|")
    for row in rows:
        res.say(row)
    res.say("")
    for name in names:
        up = res.measures.get(f"{key}/{name}/outside_stages")
        whole = res.measures.get(f"{key}/{name}")
        if up is not None and up.samples and whole is not None:
            res.say(f"- {name}: outside the stages (the process's wall time less the stages' "
                    f"run: imports, probe, model, store, exit) {up.span()} s of "
                    f"{whole.median:.2f} s")  # fmt: skip
    res.say("")


def stored_distance(a: Path, b: Path) -> float:
    import zarr

    x = np.asarray(zarr.open_group(str(a), mode="r")["maskmem_features"][:], np.float64)
    y = np.asarray(zarr.open_group(str(b), mode="r")["maskmem_features"][:], np.float64)
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


# ---------------------------------------------------------------------------- kernels


def micro(res: Results, suite: Suite, device: str, tmp: Path) -> None:
    """`image_features` vs `forward_image`; `encode_memory` vs `_encode_new_memory`."""
    import oracle
    import torch

    import memenc

    s, variant = suite.micro_size, suite.micro_variant
    ref = oracle.reference_model(variant, s).to(device)
    ckpt = oracle.save_checkpoint(ref, tmp / "micro.pt")
    model = memenc.load_model(ckpt, image_size=s, device=device)
    b = 4
    frames = torch.randint(
        0, 256, (b, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    masks = torch.zeros(b, len(OBJECTS), s, s, dtype=torch.bool)
    masks[:, 0, s // 4 : s // 2, s // 4 : s // 2] = True
    masks[::2, 1, s // 2 :, : s // 3] = True
    images = oracle.normalize(frames).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    with torch.inference_mode():
        pix = model.image_features(frames[:1])
        bo = ref.forward_image(images[:1])
        _, vf, _, fs = ref._prepare_backbone_features(bo)
        logits = masks.float() * 20 - 10

        def mem_image() -> None:
            model.image_features(frames[:1])
            sync()

        def ref_image() -> None:
            ref._prepare_backbone_features(ref.forward_image(images[:1]))
            sync()

        pix4 = pix.expand(b, -1, -1, -1).contiguous()

        def mem_memory() -> None:
            model.encode_memory(pix4, masks, pointers=False)
            sync()

        def ref_memory() -> None:
            for f in range(b):
                for o in range(len(OBJECTS)):
                    score = torch.tensor([[10.0 if masks[f, o].any() else -10.0]], device=device)
                    ref._encode_new_memory(
                        vf, fs, logits[f, o][None, None].to(device), score, False
                    )
            sync()

        interleave(
            suite.repeats + 2, {"memenc": mem_image, "reference": ref_image}, res, "image_features"
        )
        interleave(
            suite.repeats + 2, {"memenc": mem_memory, "reference": ref_memory}, res, "encode_memory"
        )
    res.say(f"### Kernels ({variant}, S={s}, {device}, fp32; medians of {suite.repeats + 2})")
    res.say("")
    res.say("| measure | memenc (s) | reference (s) | memenc speed-up |")
    res.say("|---|---:|---:|---:|")
    for what, label in (("image_features", "`image_features` vs `forward_image`, 1 frame"),
                        ("encode_memory", f"`encode_memory` vs `_encode_new_memory`, {b} frames × {len(OBJECTS)} objects")):  # fmt: skip
        a, r = res.m(f"{what}/memenc"), res.m(f"{what}/reference")
        res.ratios[f"{what}/speedup"] = r.median / a.median
        res.say(
            f"| {label} | {a.span('{:.3f}')} | {r.span('{:.3f}')} | {r.median / a.median:.2f}× |"
        )
    res.say("")
    oracle.reference_model.cache_clear()


# ---------------------------------------------------------------------------- stages


def _seconds(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    return _wall_and_cpu(fn, *args, **kwargs)[0]


def _wall_and_cpu(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, float]:
    """Wall seconds of the call, and the CPU seconds (user + system) this whole process
    spent meanwhile: its threads too, such as the store's writer threads."""
    t, c = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - t, time.process_time() - c


def _np_save_pair(path_a: Path, a: np.ndarray, path_b: Path, b: np.ndarray) -> None:
    np.save(path_a, a)
    np.save(path_b, b)


def stages(res: Results, inp: Inputs, suite: Suite, device: str, tmp: Path) -> None:
    """memenc's stages alone on the case's frames, then Zarr against np.save."""

    from memenc.pipeline.video import VideoSource
    from memenc.store import CacheStore
    from memenc.store.location import Location, open_existing
    from memenc.store.schema import layout_from_group

    c = inp.case
    key = f"stages/{c.name}"
    frames = list(range(c.frames))
    batch = stage_batch(device)
    # decode-only, K decoders, on the case's clip or (suite.decode_frames) a clip of its own
    try:
        from benchmarks.decode import decode_throughput, make_clip
    except ImportError:
        decode_throughput = make_clip = None
    decode_video, decode_frames = inp.video, frames
    if suite.decode_frames and make_clip is not None:
        folder = tmp / f"decode_clip_{suite.decode_frames}"
        folder.mkdir(exist_ok=True)
        decode_video = make_clip(folder, suite.decode_frames)
        decode_frames = list(range(suite.decode_frames))
    threads: dict[int, Any] = {}
    for r in range(suite.repeats):
        for k in suite.decoders if r % 2 == 0 else suite.decoders[::-1]:
            if decode_throughput is not None:
                got = decode_throughput(decode_video, c.image_size, decode_frames, batch, k)
                res.m(f"{key}/decode K={k}").add(got["seconds"])
                threads[k] = got["threads"] or "auto"
            elif k == 1:
                t = time.perf_counter()
                with VideoSource(inp.video, c.image_size) as src:
                    for _ in src.iter_batches(frames, batch):
                        pass
                res.m(f"{key}/decode K=1").add(time.perf_counter() - t)
    # compute-only: decoded frames and read masks in memory first. The stages case's whole
    # runs already timed it, in a fresh process interleaved with them (`child_compute`),
    # so drift between sections does not enter the end-to-end ratio; otherwise here.
    dump = tmp / "compute_alone.npz"
    if not res.m(f"{key}/compute").samples or not dump.exists():
        res.m(f"{key}/compute").samples.clear()
        model, batches, mask_batches = compute_inputs(
            str(inp.video), str(inp.masks), str(inp.checkpoint) if inp.checkpoint else None,
            c.variant, c.image_size, device, c.frames,
        )  # fmt: skip
        for _r in range(suite.repeats):
            seconds, arrays = compute_alone(model, batches, mask_batches, device)
            res.m(f"{key}/compute").add(seconds)
        np.savez(dump, **arrays)
        del model, batches, mask_batches
    with np.load(dump) as arrays:
        features, pointers, score_arr = arrays["features"], arrays["pointers"], arrays["scores"]
    # write-only: the chunks of the memenc fp32 store's layout, into fresh stores
    made = sorted(tmp.glob(f"{c.name.replace(' ', '_')}_memenc_fp32*.zarr"))
    if not made:  # `--only stages`: no whole run made that store, so make it here
        made = [tmp / f"{c.name.replace(' ', '_')}_memenc_fp32_for_stages.zarr"]
        timed_process(memenc_cmd(inp, made[0], device, "fp32", False, None),
                      gpu=device.startswith("cuda"), timeout=DEADLINE.timeout())  # fmt: skip
    done = made[0]
    group, _ = open_existing(Location(str(done)), "r")
    layout = layout_from_group(group, Location(str(done)))
    npsave = tmp / "npsave"
    pairs: list[float] = []  # np.save's time over write_chunk's, chunk by chunk
    total_np = total_zarr = 0.0  # all repeats' seconds on each side: the same pairs summed
    for r in range(suite.repeats):
        path = tmp / f"write_only_{r}.zarr"
        store = CacheStore.prepare(str(path), layout)
        spent_zarr = spent_np = 0.0
        nbytes = 0
        for ch in range(layout.num_chunks):
            rows = store.chunk_rows(ch)
            sel = slice(rows.start, rows.stop)
            stored = features[sel].astype(layout.store_dtype)
            peak = float(np.abs(features[sel]).max())  # the assembler's, before the writer
            npsave.mkdir(exist_ok=True)
            zarr_args = (ch, stored, score_arr[sel], np.zeros(len(rows)), pointers[sel])
            np_args = (npsave / f"{ch}.npy", stored, npsave / f"{ch}_p.npy", pointers[sel])
            if ch % 2:  # each goes first every other chunk
                spent_n, cpu_n = _wall_and_cpu(_np_save_pair, *np_args)
                spent_z, cpu_z = _wall_and_cpu(store.write_chunk, *zarr_args, peak=peak)
            else:
                spent_z, cpu_z = _wall_and_cpu(store.write_chunk, *zarr_args, peak=peak)
                spent_n, cpu_n = _wall_and_cpu(_np_save_pair, *np_args)
            if r or ch:  # not the first write_chunk of the process: it probes the codecs
                res.m(f"{key}/write CPU ms per chunk", "ms").add(cpu_z * 1e3)
                res.m(f"{key}/write wall ms per chunk", "ms").add(spent_z * 1e3)
                res.m(f"{key}/np.save CPU ms per chunk", "ms").add(cpu_n * 1e3)
                res.m(f"{key}/np.save wall ms per chunk", "ms").add(spent_n * 1e3)
            spent_zarr += spent_z
            spent_np += spent_n
            pairs.append(spent_n / spent_z)
            nbytes += stored.nbytes + pointers[sel].nbytes
        total_np, total_zarr = total_np + spent_np, total_zarr + spent_zarr
        res.m(f"{key}/write").add(spent_zarr)
        res.m(f"{key}/write MB/s", "MB/s").add(nbytes / spent_zarr / 1e6)
        res.m(f"{key}/np.save MB/s", "MB/s").add(nbytes / spent_np / 1e6)
        shutil.rmtree(path)
        shutil.rmtree(npsave)
    n_compute = len(res.m(f"{key}/compute").samples)
    res.say(f"### Stages alone: {c.name} ({c.frames} frames, S={c.image_size}, {device}, fp32, "
            f"batches of {batch}; medians of {suite.repeats}; compute: {n_compute}, from the "
            "whole-run rotation when it ran there)")  # fmt: skip
    res.say("")
    res.say("| stage | seconds | frames/s |")
    res.say("|---|---:|---:|")
    stage_names = [f"decode K={k}" for k in suite.decoders] + ["compute", "write"]
    for name in stage_names:
        mm = res.measures.get(f"{key}/{name}")
        n_frames = len(decode_frames) if name.startswith("decode") else c.frames
        if mm and mm.samples:
            res.say(f"| {name} | {mm.span()} | {n_frames / mm.median:.1f} |")
    if threads:
        clip = "the case's clip" if decode_video == inp.video else (
            f"a clip of its own, {len(decode_frames)} frames of 1280×720 H.264 (CRF 23, a "
            "keyframe every 24 frames)")  # fmt: skip
        res.say(f"- decode: {clip}; FFmpeg threads each: "
                + ", ".join(f"K={k} {t}" for k, t in sorted(threads.items())))  # fmt: skip
    whole = res.measures.get(f"whole/{c.name}/memenc fp32")
    # the slowest stage over the case's frames (a decode clip of its own is scaled to them)
    decode_s = res.m(f"{key}/decode K=1").median * c.frames / len(decode_frames)
    slowest = max(decode_s, *(res.m(f"{key}/{n}").median for n in ("compute", "write")))
    if whole:
        res.ratios[f"{key}/end_to_end_over_slowest_stage"] = whole.median / slowest
        res.say(f"- end to end (`memenc encode`, whole process) {whole.median:.2f} s = "
                f"{whole.median / slowest:.3f} × the slowest stage alone")  # fmt: skip
    z, n = res.m(f"{key}/write MB/s"), res.m(f"{key}/np.save MB/s")
    # np.save's rate swung 535-1917 MB/s between repeats (the page cache's state), so the
    # ratio pairs each chunk's write with the np.save right after it
    paired = float(np.median(pairs))
    res.ratios[f"{key}/zarr_over_npsave"] = paired
    # The same pairs as one throughput: all their bytes over all their time, on each side.
    # Unlike the median it counts the slow writes (np.save's rate swung 382-1560 MB/s
    # between repeats in one run), which is what a throughput is made of.
    over_total = total_np / total_zarr
    res.ratios[f"{key}/zarr_over_npsave_throughput"] = over_total
    res.say(f"- Zarr (`write_chunk`, {layout.store_dtype} features + pointers + marker) "
            f"{z.span('{:.0f}')} MB/s; `np.save` of the same arrays {n.span('{:.0f}')} MB/s; "
            f"chunk by chunk, Zarr at {paired:.0%} of `np.save`'s speed (median of "
            f"{len(pairs)} pairs; {min(pairs):.0%}–{max(pairs):.0%}); over all those pairs "
            f"together (bytes over seconds, each side), {over_total:.0%}")  # fmt: skip
    cz, wz = res.m(f"{key}/write CPU ms per chunk"), res.m(f"{key}/write wall ms per chunk")
    cn, wn = res.m(f"{key}/np.save CPU ms per chunk"), res.m(f"{key}/np.save wall ms per chunk")
    if cz.samples and cn.samples:
        # What bounds the ratio: np.save's time is the kernel copying into the page cache;
        # Zarr's adds compression, and its CPU time cannot be spread over more than the
        # writer threads (one per core)
        res.say(f"- per frame-chunk ({nbytes / layout.num_chunks / 1e6:.1f} MB; every write "
                f"but the process's first, which probes the codecs): Zarr {wz.span()} ms wall, "
                f"{cz.span()} ms CPU (all threads); `np.save` {wn.span()} ms wall, "
                f"{cn.span()} ms CPU")  # fmt: skip
    k1 = res.measures.get(f"{key}/decode K=1")
    for k in suite.decoders[1:]:
        mk = res.measures.get(f"{key}/decode K={k}")
        if k1 and mk and mk.samples:
            res.ratios[f"{key}/decode K={k} speed-up"] = k1.median / mk.median
            res.say(f"- decode with K={k}: {k1.median / mk.median:.2f}× K=1")
    res.say("")


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--suite", choices=sorted(SUITES), help="default: cpu, or gpu with cuda")
    ap.add_argument("--out", type=Path, help="folder for benchmark.md and benchmark.json")
    ap.add_argument("--repeats", type=int, help="override the suite's repeats (kernels, stages)")
    ap.add_argument("--whole-repeats", type=int, help="override every case's whole-run repeats")
    ap.add_argument("--only", nargs="+", choices=["micro", "whole", "stages"],
                    default=["micro", "whole", "stages"])  # fmt: skip
    ap.add_argument("--cases", nargs="+", help="only the cases whose name contains one of these")
    ap.add_argument(
        "--runs", nargs="+", help="only the whole runs whose name contains one of these"
    )
    ap.add_argument("--dry-run", action="store_true",
                    help="make the inputs and print the plan; stop before the first CUDA call")  # fmt: skip
    ap.add_argument("--frames", type=int, help="override every case's frame count")
    ap.add_argument("--budget-s", type=float,
                    help="skip (and say so) work that would start after this many seconds")  # fmt: skip
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global DEADLINE
    DEADLINE = Deadline(args.budget_s)
    if args.child:
        if args.child[0] == "compute":
            print(json.dumps(child_compute(*args.child[1:])))
        else:
            print(json.dumps(child_reference(*args.child)))
        return 0
    suite = SUITES[args.suite or ("gpu" if args.device.startswith("cuda") else "cpu")]
    if args.repeats:
        suite = Suite(**{**suite.__dict__, "repeats": args.repeats})
    if args.whole_repeats:
        cases = tuple(Case(**{**c.__dict__, "repeats": args.whole_repeats}) for c in suite.cases)
        suite = Suite(**{**suite.__dict__, "cases": cases})
    if args.frames:
        cases = tuple(Case(**{**c.__dict__, "frames": args.frames}) for c in suite.cases)
        suite = Suite(**{**suite.__dict__, "cases": cases})
    if args.cases:
        picked = tuple(c for c in suite.cases if any(w in c.name for w in args.cases))
        suite = Suite(**{**suite.__dict__, "cases": picked})
    if args.runs:
        cases = tuple(
            Case(
                **{**c.__dict__, "runs": tuple(r for r in c.runs if any(w in r for w in args.runs))}
            )
            for c in suite.cases
        )
        suite = Suite(**{**suite.__dict__, "cases": cases})
    res = Results(args.out)
    res.facts = machine_facts(args.device)
    reference = has_reference()
    res.say(f"# memenc benchmark — suite {args.suite or 'default'}, device {args.device}")
    res.say("")
    with tempfile.TemporaryDirectory(prefix="memenc-bench-") as tmp_s:
        tmp = Path(tmp_s)
        inputs = [make_inputs(tmp, c, reference) for c in suite.cases]
        if args.dry_run:
            for inp in inputs:
                res.say(f"- {inp.case}: clip {inp.video.stat().st_size} bytes, "
                        f"checkpoint {inp.checkpoint.name if inp.checkpoint else 'random'}")  # fmt: skip
            res.say(f"- dry run: inputs made, reference {'present' if reference else 'absent'}; "
                    "stopping before the first device call")  # fmt: skip
            return 0
        if args.device.startswith("cuda"):
            res.facts.update(gpu_facts())
        res.say("Machine: " + ", ".join(f"{k} {v}" for k, v in res.facts.items()))
        res.say("")
        # in order of what matters most, so that a run cut short by its budget keeps it:
        # the first case's whole runs, its stages, the kernels, then the other cases (every
        # table is written to --out as soon as it is complete; a section that fails is
        # reported in its place and the rest still run)
        sections: list[tuple[str, Callable[[], None]]] = []
        for i, inp in enumerate(inputs):
            if "whole" in args.only:
                rotate = "stages" in args.only and inp.case.name == suite.stages_case
                sections.append((f"whole runs: {inp.case.name}",
                                 lambda inp=inp, rotate=rotate: whole_runs(
                                     res, inp, args.device, suite, tmp, with_compute=rotate)))  # fmt: skip
            if "stages" in args.only and inp.case.name == suite.stages_case:
                sections.append((f"stages: {inp.case.name}",
                                 lambda inp=inp: stages(res, inp, suite, args.device, tmp)))  # fmt: skip
            if i == 0 and "micro" in args.only and reference:
                sections.append(("kernels", lambda: micro(res, suite, args.device, tmp)))
        for title, run_section in sections:
            if DEADLINE.left() < 30:
                res.failures[title] = "not run: the benchmark's time budget was spent"
                res.say(f"### {title}: not run, the benchmark's time budget was spent")
                res.say("")
                continue
            try:
                run_section()
            except Exception as e:  # noqa: BLE001 - report it in place, run the rest
                import traceback

                traceback.print_exc()
                res.failures[title] = f"{type(e).__name__}: {e}"
                res.say(f"### {title}: failed ({type(e).__name__}: {str(e)[:500]})")
                res.say("")
    res.save()
    spent = ("not run", "timed out")  # the budget, not a fault
    return 1 if any(not why.startswith(spent) for why in res.failures.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
