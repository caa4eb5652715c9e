"""The streaming engine: video + masks -> SAM 2 memories -> a memenc store.

    encode_video("clip.mp4", masks="clip_masks/", checkpoint="sam2.1_hiera_tiny", out="clip.zarr")

The stages overlap, joined by bounded queues so memory does not grow with the video
(`run_chunks`):

    decode          VideoSource batches, decoded in K child processes (one thread each
                    when K > 1) over disjoint chunk ranges, + the batch's masks
    stage (CUDA)    host copies into pinned buffers, then to the device
    compute         image_features + encode_memory (memories and object pointers) on the
                    device, in the calling thread; on the CPU, in fp32, uncompiled, with 2-4
                    torch threads and a stride-4 map of at most 8 MiB (tiny, small and
                    base_plus up to S=512), a batch's frames run side by side on the
                    model's frame workers (`MemencModel.frame_workers`)
    assemble        results from host memory into whole frame-chunks
    write           `default_writers` threads (1 on the CPU, 2 on CUDA): each frame-chunk
                    into the store (its files encoded and written by a shared pool),
                    followed by its chunk_done marker

`encode_video` is the coordinator: it plans the rows, creates or resumes the store, runs
the one work unit "all pending chunks", and marks the store complete. `run_chunks` is
that work unit on its own — a store that exists, a video and a set of frame-chunks — so
the same code can fill disjoint chunk ranges in other processes or on other machines.

What a row holds, per object: `maskmem_features`, `object_score_logits` and `obj_ptr` of
SAM 2's `track_step(mask_inputs=m, run_mem_encoder=True)` for the frame with its mask m
(eval mode; also SAM 2's training path). `SAM2VideoPredictor.add_new_mask` keeps the same
pointer and score but a slightly different memory: it re-encodes it later from its
low-resolution copy of the mask (256² at S=1024) upsampled and binarized to ±10 (so edges
differ), and stores the features in bfloat16.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memenc.encoders import DEFAULT_VARIANT, VARIANTS, MemencModel, get_variant, load_model
from memenc.errors import (
    CheckpointError,
    MaskError,
    MemencError,
    MemencWarning,
    UsageError,
    VideoDecodeError,
)
from memenc.pipeline.decoders import (
    ParallelDecode,
    SpareSources,
    check_decoders,
    choose_decoders,
    decoder_threads,
    split_rows,
)
from memenc.pipeline.masks import (
    SAV_STEP,
    MaskSource,
    find_masks_beside,
    open_masks,
)
from memenc.pipeline.selection import parse_frames, parse_objects
from memenc.pipeline.video import VideoInfo, VideoSource, list_images
from memenc.pipeline.video.process import start_plainly
from memenc.store import (
    NUMBERS_VERSION,
    CacheStore,
    RunSettings,
    StoreLayout,
    check_url,
    content_sha256,
    default_chunk_frames,
    is_url,
    store_lock,
)
from memenc.store.schema import MEM_DIM, PTR_DIM

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Blosc (the schema's compressor) takes at most 2**31 - 1 bytes less its 16-byte header
MAX_CHUNK_BYTES = 2**31 - 1 - 16
STORE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Progress:
    """One progress report: frames done out of total in this run, and the rate so far."""

    done: int
    total: int
    elapsed_s: float
    stage: str = "encode"  # "download" | "encode"

    @property
    def fps(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class EncodeResult:
    """What `encode_video` did. `already_complete` is True when the store was complete with
    the same settings and nothing was computed."""

    store: str
    video: str
    masks: str
    frames: int
    objects: list[int]
    chunks_total: int
    chunks_written: int
    already_complete: bool
    status: str
    device: str
    precision: str
    variant: str
    weights: str
    seconds: float
    frames_per_second: float
    # where the work unit's stages spent their time (`StageTimes.summary`); empty when
    # nothing was computed
    stages: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_device(device: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; otherwise `cpu`, `cuda` or `cuda:i`.
    Raises UsageError for an unknown or unavailable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device!r}: not a device (auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device!r}: memenc runs on cpu or cuda")
    return dev


def autocast_for(device: torch.device, precision: str):
    """The autocast context for a precision: none for fp32; bf16 on CPU or CUDA; fp16 on
    CUDA only. Raises UsageError otherwise. fp32 on CUDA also turns TF32 off for the
    process (`memenc.encoders.use_exact_fp32`), as DESIGN §3's 1e-5 needs."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: choose fp32, bf16 or fp16")
    dtype = PRECISIONS[precision]
    if dtype is None:
        if device.type == "cuda":
            from memenc.encoders import use_exact_fp32

            use_exact_fp32()
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device (use bf16 on the CPU)")
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX). Without it PyTorch
    emulates bf16 matrix products, far slower than float32: on an AVX2-only AMD EPYC a
    4096×768×768 bf16 matmul ran at under 1 GFLOP/s against 43 GFLOP/s in float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            continue
    return False


def _warn_if_slow_bf16(device: torch.device, precision: str) -> None:
    if device.type == "cpu" and precision == "bf16" and not cpu_has_native_bf16():
        warnings.warn(
            MemencWarning(
                "--precision bf16 on this CPU (no AVX512-BF16 or AMX) is emulated and runs "
                "several times slower than fp32; use --precision fp32 here"
            ),
            stacklevel=4,
        )


def check_decode_timeout(seconds: float) -> None:
    """Raise UsageError unless `seconds` is a finite number above 0."""
    if not 0 < seconds < math.inf:
        raise UsageError(f"--decode-timeout {seconds}: must be a finite number of seconds above 0")


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas for this process (no-op elsewhere).

    glibc gives each thread that allocates under contention an arena of its own and rarely
    returns their memory; with the decode, compute and writer threads that added ~100 MB
    of RSS and made it drift (measured at S=256: 557–599 MB, 460–474 MB with 2 arenas).
    Applies to arenas created from now on; MALLOC_ARENA_MAX in the environment wins.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc


_INT_MAX = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory(device: torch.device) -> None:
    """On the CPU, have glibc keep freed memory for reuse instead of returning it to the
    kernel (no-op on other devices, other C libraries, or when MALLOC_MMAP_MAX_ or
    MALLOC_TRIM_THRESHOLD_ is in the environment).

    By default glibc serves large allocations (past a threshold that grows up to 32 MB)
    with a fresh mmap and unmaps them on free, so every frame's big activations touched new
    pages: at 1024, 78 thousand page faults a frame (180-260 thousand and 0.6-0.7 s of
    kernel time before the image encoder ran in pieces). With mmap off (M_MMAP_MAX 0) and
    trimming off (M_TRIM_THRESHOLD at its maximum) later frames reuse the first frame's
    memory, with the same numbers. Measured on the
    short clip at 1024 (sam2.1 tiny, 6 frames, whole `memenc encode`, alternating): 22.6 and
    23.6 s against 25.5 and 25.7 s; the main process's peak 884-926 MB against 830-847 MB,
    since the heap keeps its high-water mark. It stays flat over long runs (240 frames at
    512: 596-631 MB from the 9th second to the end). Process-wide and for the rest of the
    process, like `limit_malloc_arenas`.
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    if os.environ.get("MALLOC_MMAP_MAX_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no allocation gets its own mapping
        libc.mallopt(-1, _INT_MAX)  # M_TRIM_THRESHOLD: the heap's top is kept
    except (OSError, AttributeError):
        pass  # not glibc


# ---------------------------------------------------------------------------- planning


def plan_frames(
    total: int, selection: slice, masks: MaskSource, skip_unmasked: bool = False
) -> list[int]:
    """Source frame numbers to encode: the selection, restricted to annotated frames for
    sources that annotate only some (SA-V). Every planned frame must have a mask, unless
    `skip_unmasked`, which drops frames without one. Raises MaskError / UsageError."""
    frames = list(range(total))[selection]
    if not frames:  # 5:2, or a start past the video's end
        raise UsageError(
            f"frame selection {_slice_text(selection)} selects no frames of the video's {total}"
        )
    if masks.annotated_frames is not None:
        annotated = set(masks.annotated_frames)
        frames = [f for f in frames if f in annotated]
    missing = [f for f in frames if not masks.has_mask(f)]
    if missing:
        if not skip_unmasked:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MaskError(
                f"{masks.path}: no mask for frame {missing[0]}{more}; "
                "pass --skip-unmasked to encode only frames that have masks"
            )
        frames = [f for f in frames if masks.has_mask(f)]
    if not frames:
        raise UsageError(f"frame selection {_slice_text(selection)} selects no frames with masks")
    return frames


def _slice_text(s: slice) -> str:
    parts = ["" if v is None else str(v) for v in (s.start, s.stop, s.step)]
    return ":".join(parts)


def store_layout(
    model: MemencModel,
    frames: Sequence[int],
    masks: MaskSource,
    *,
    video_attrs: dict[str, Any],
    video_content: str,
    masks_content: str,
    selection: slice,
    store_dtype: str,
    chunk_frames: int | None,
    precision: str,
    batch_size: int = 4,
    device: str = "cpu",
    decoders: int | None = 1,
    compile: bool = False,
) -> StoreLayout:
    """The store's layout for a run. Its attributes and fingerprint both come from one
    `RunSettings` (which declares what is stored and what is fingerprinted); the
    contents are `content_sha256` strings of the video's and the masks' files."""
    if store_dtype not in STORE_DTYPES:
        raise UsageError(f"--store-dtype {store_dtype!r}: choose float16 or float32")
    h = w = model.feat_size
    o = len(masks.object_ids)
    # default: ~1–4 MB chunks, but no chunk longer than the video
    f = chunk_frames or min(default_chunk_frames(o, h, w, store_dtype), len(frames))
    if f < 1:
        raise UsageError(f"--chunk-frames must be at least 1, got {f}")
    # the largest chunk: one object's features, or every object's pointers (float32)
    frame_bytes = max(MEM_DIM * h * w * np.dtype(store_dtype).itemsize, o * PTR_DIM * 4)
    if frame_bytes > MAX_CHUNK_BYTES:
        raise UsageError(
            f"--image-size {model.image_size}: one frame's features would take "
            f"{frame_bytes / 2**30:.1f} GiB, more than a chunk can hold (2 GiB); use a "
            "smaller --image-size"
        )
    if f * frame_bytes > MAX_CHUNK_BYTES:
        raise UsageError(
            f"--chunk-frames {f}: a chunk would hold {f * frame_bytes / 2**30:.1f} GiB, more "
            f"than Blosc compresses in one piece (2 GiB); choose at most "
            f"{MAX_CHUNK_BYTES // frame_bytes}"
        )
    v = model.variant
    settings = RunSettings(
        numbers_version=NUMBERS_VERSION,
        source_video=dict(video_attrs),
        video_content=video_content,
        frame_selection={"spec": _slice_text(selection), "frames": len(frames)},
        frames=tuple(map(int, frames)),
        model={
            "variant": v.name,
            "image_size": model.image_size,
            "weights": model.weights,
            "checkpoint": model.checkpoint,
            "checkpoint_sha256": model.checkpoint_sha256,
            "seed": model.seed if model.weights == "random" else None,
        },
        masks=masks.to_attrs(),
        masks_content=masks_content,
        memory={
            "sigmoid_scale": v.sigmoid_scale,
            "sigmoid_bias": v.sigmoid_bias,
            "binarize": not masks.is_logits,
        },
        precision=precision,
        storage_dtype=store_dtype,
        chunk_frames=f,
        batch_size=batch_size,
        device=device,
        decoders=decoders,
        compile=compile,
    )
    pos = model.position_encoding.encode(h, w).cpu().numpy()
    return StoreLayout(
        num_frames=len(frames),
        object_ids=masks.object_ids,
        feat_hw=(h, w),
        store_dtype=store_dtype,
        chunk_frames=f,
        frame_index=np.asarray(frames, dtype=np.int64),
        pos_enc=pos,
        tpos_enc=model.maskmem_tpos_enc.detach().cpu().numpy(),
        attrs=settings.attrs(),
        fingerprint=settings.fingerprint(),
        identity=RunSettings.stored_identity,
    )


def open_run_masks(
    mask_path: Path,
    video_path: Path,
    info: VideoInfo,
    *,
    objects: list[int] | None,
    sav_step: int,
    timeout_s: float,
    selection: slice = slice(None),
) -> MaskSource:
    """A run's mask source, checked against the probed video (`encode` and `batch` alike).
    Raises MaskError, or VideoDecodeError when the masks show the video to be damaged. On
    a damaged video whose `selection` (of the frames it promises) holds only frames that
    decode, masks for at least every promised frame are taken too: the run asks for
    nothing past the damage."""
    # whether the video is damaged at all, open_masks judges from the two counts
    promised = range(info.frame_count_declared)[selection]
    inside = len(promised) > 0 and max(promised) < info.frame_count
    return open_masks(
        mask_path,
        video_frame_count=info.frame_count,
        video_width=info.width,
        video_height=info.height,
        objects=objects,
        video_path=video_path,
        video_frame_count_declared=info.frame_count_declared,
        timeout_s=timeout_s,
        sav_step=sav_step,
        whole_video_masks=inside,
    )


def plan_layout(
    model: MemencModel,
    frames: Sequence[int],
    video_path: Path,
    info: VideoInfo,
    masks: MaskSource,
    *,
    selection: slice,
    store_dtype: str,
    chunk_frames: int | None,
    precision: str,
    batch_size: int,
    device: str,
    decoders: int | None = 1,
    compile: bool = False,
) -> StoreLayout:
    """The store layout of one video's run (`encode` and `batch` alike): hashes the inputs,
    then `store_layout`. Raises VideoDecodeError / MaskError when an input cannot be read."""
    video_content, masks_content = hash_inputs(video_path, masks)
    return store_layout(
        model,
        frames,
        masks,
        # absolute, so `preview` does not depend on the working folder
        video_attrs={**info.to_attrs(), "path": str(video_path.resolve())},
        video_content=video_content,
        masks_content=masks_content,
        selection=selection,
        store_dtype=store_dtype,
        chunk_frames=chunk_frames,
        precision=precision,
        batch_size=batch_size,
        device=device,
        decoders=decoders,
        compile=compile,
    )


def hash_inputs(video_path: Path, masks: MaskSource) -> tuple[str, str]:
    """`content_sha256` of the video (its file, or a frame folder's images in order) and
    of the mask source's files. Raises VideoDecodeError / MaskError when one cannot be
    read."""
    try:
        files = list_images(str(video_path)) if video_path.is_dir() else [video_path]
        video_content = content_sha256(files)
    except OSError as e:
        raise VideoDecodeError(f"{video_path}: cannot read ({e.strerror or e})") from e
    try:
        masks_content = content_sha256(masks.content_files())
    except OSError as e:
        raise MaskError(f"{masks.path}: cannot read ({e.strerror or e})") from e
    return video_content, masks_content


# ---------------------------------------------------------------------------- work unit


class _Stop(Exception):
    """Raised in a stage when another stage failed."""


class StageTimes:
    """Where each stage of a work unit spent its wall time: its own work, or waiting, for
    its input (the stage before it was slower), for room downstream (the stage after it
    was slower: a full queue, or on CUDA no free pinned result buffer), or, on CUDA, for
    the device (the assembler for a batch's results, the stage for a pinned slot's last
    copy). The decode stage's input is its decoder processes; the writers' work is the
    store's writes. On CUDA the compute stage only launches work: the device's own time
    shows as the assembler's wait for it.

    `run_chunks` fills one when given (`encode_video` does, for its JSON summary): read
    the waits to find what bounds a run. Stages running in several threads (the writers)
    are summed over their threads."""

    KINDS = ("input", "output", "device")
    ORDER = ("decode", "stage", "compute", "assemble", "write")  # the pipeline's

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # per stage, one account per thread: a thread adds to its own only (the writers'
        # `+=` on one shared float could lose time to each other)
        self._stages: dict[str, list[dict[str, float]]] = {}

    def _account(self, stage: str) -> dict[str, float]:
        """A new account of one thread of `stage`, for it alone to add to."""
        account = dict.fromkeys(("wall", *self.KINDS), 0.0)
        with self._lock:
            self._stages.setdefault(stage, []).append(account)
        return account

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage, in seconds: ``seconds`` (wall, summed over its threads), ``busy``
        (the rest of it once the waits are taken out), ``waiting_for_input``,
        ``waiting_for_output``, ``waiting_for_device``; and ``threads``."""
        out = {}
        rank = {name: i for i, name in enumerate(self.ORDER)}
        with self._lock:
            for name, accounts in sorted(self._stages.items(), key=lambda kv: rank.get(kv[0], 99)):
                a = {k: sum(t[k] for t in accounts) for k in ("wall", *self.KINDS)}
                waits = sum(a[k] for k in self.KINDS)
                out[name] = {
                    "threads": len(accounts),
                    "seconds": round(a["wall"], 3),
                    "busy": round(max(0.0, a["wall"] - waits), 3),
                    **{f"waiting_for_{k}": round(a[k], 3) for k in self.KINDS},
                }
        return out


def busiest_stage(stages: dict[str, dict[str, float]]) -> tuple[str, float] | None:
    """The stage (or "device", the assembler's wait for it on CUDA) that worked longest in
    a `StageTimes.summary`, with that time's share of the work unit's wall time (the
    compute stage's, which spans it); None when nothing ran. Writers are summed over their
    threads, so theirs is per thread."""
    span = stages.get("compute", {}).get("seconds", 0.0)
    if span <= 0:
        return None
    work = {name: s["busy"] / max(1, s["threads"]) for name, s in stages.items()}
    work["device"] = stages.get("assemble", {}).get("waiting_for_device", 0.0)
    name = max(work, key=lambda k: work[k])
    return name, min(1.0, work[name] / span)


_clock = threading.local()  # .account: the running stage's `StageTimes` entry, if any


@contextlib.contextmanager
def _waiting(kind: str) -> Any:
    """Count the time spent in this block as the current stage's wait of `kind`."""
    account = getattr(_clock, "account", None)
    if account is None:
        yield
        return
    t = time.perf_counter()
    try:
        yield
    finally:
        account[kind] += time.perf_counter() - t


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    with _waiting("output"):  # for room in the next stage's queue
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
    raise _Stop


def _get(q: queue.Queue, stop: threading.Event, wait: str = "input") -> Any:
    """The next item of `q` (`wait`: what the current stage counts the wait as)."""
    with _waiting(wait):
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    raise _Stop from None


_DONE = object()


class _Stages:
    """The stages of a work unit, each in its own thread, and their coordinator.

    A stage that raises `_Stop` ends quietly (another stage failed); any other error is
    recorded and sets `stop`, which ends the other stages; `join` re-raises the first.
    """

    def __init__(self, times: StageTimes | None = None) -> None:
        self.stop = threading.Event()
        self._errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._times = times

    def run(self, stage: Callable[[], None], name: str = "compute") -> None:
        """Run `stage` in this thread as the stage `name`, handing its error to the
        coordinator."""
        account = self._times._account(name) if self._times is not None else None
        _clock.account = account
        t = time.perf_counter()
        try:
            stage()
        except _Stop:
            pass
        except BaseException as e:  # handed to the coordinator
            self._errors.append(e)
            self.stop.set()
        finally:
            _clock.account = None
            if account is not None:
                account["wall"] += time.perf_counter() - t

    def start(self, stage: Callable[[], None], name: str, thread: str | None = None) -> None:
        """Run `stage` in a new (daemon) thread (`thread`, default memenc-`name`) as the
        stage `name`."""
        thread = threading.Thread(
            target=self.run, args=(stage, name), name=thread or f"memenc-{name}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def join(self) -> None:
        """Wait for the stage threads; raise the first error any stage raised."""
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise self._errors[0]


class _ChunkBuffer:
    """Host arrays for one frame-chunk, filled row by row as batches finish. Features are
    kept in the store dtype, and beside them each row's largest |x| before the cast
    (`peaks`), which is all `CacheStore.write_chunk` needs to check them."""

    def __init__(
        self, rows: int, row_shape: tuple[int, ...], ptr_dim: int, dtype: np.dtype
    ) -> None:
        self.features = np.empty((rows, *row_shape), dtype)  # [n, O, 64, h, w]
        self.scores = np.empty((rows, row_shape[0]), np.float32)  # [n, O]
        self.timestamps = np.empty(rows, np.float64)
        self.pointers = np.empty((rows, row_shape[0], ptr_dim), np.float32)  # [n, O, 256]
        self.peaks = np.empty(rows, np.float32)
        self.missing = rows

    def put(
        self,
        k: int,
        features: np.ndarray,
        scores: np.ndarray,
        timestamp: float,
        pointers: np.ndarray,
        peak: float,
    ) -> bool:
        """Fill row k (features cast to the store dtype as they are copied, numpy's cast);
        True once every row is filled."""
        with np.errstate(over="ignore", invalid="ignore"):  # the writer checks the peaks
            self.features[k] = features
        self.scores[k], self.timestamps[k], self.pointers[k] = scores, timestamp, pointers
        self.peaks[k] = peak
        self.missing -= 1
        return self.missing == 0

    def chunk(self, c: int) -> tuple:
        """`CacheStore.write_chunk`'s arguments for frame-chunk c."""
        # np.max keeps a NaN: a chunk with a non-finite row has a non-finite peak
        peak = float(np.max(self.peaks))
        return (c, self.features, self.scores, self.timestamps, self.pointers), {"peak": peak}


def row_peaks(features: torch.Tensor) -> torch.Tensor:
    """The largest |x| of each row of `features` `[B, ...]` (float32 `[B]`), NaN for a row
    with a NaN and inf for one with an infinity: one pass (`aminmax`), no |x| temporary.
    On the device; `host_row_peaks` is the same for host arrays."""
    lo, hi = torch.aminmax(features.flatten(1), dim=1)
    return torch.maximum(-lo, hi)


def host_row_peaks(features: np.ndarray) -> np.ndarray:
    """`row_peaks` of a host array, with numpy (single-threaded: the assembler does not
    compete with the compute thread's kernels for the cores' thread pool)."""
    rows = features.reshape(len(features), -1)
    return np.maximum(-rows.min(axis=1), rows.max(axis=1))  # min/max propagate NaN


def default_batch_size(device: torch.device) -> int:
    """Frames per batch when none is given: 4 on the CPU, 16 on CUDA.

    On the CPU the kernels take one frame at a time (`MemencModel.frame_batch`, for the
    reference's rounding), so the batch only sets how much work each hand-off between the
    stages carries; 4 keeps the queues' memory small. On CUDA each kernel takes the whole
    batch, and a frame of hiera_t at 1024 is worth well under a millisecond of an H100's
    compute, so at 4 frames launches and per-batch copies dominate; 16 frames amortise
    them while the activations stay within a few GB at 1024 (an estimate from the stage
    widths, with attention through SDPA that does not materialise its scores; not
    measured here: lower --batch-size if a smaller GPU runs out of memory). On an H200,
    hiera_t at 1024 with batches of 16 took 10.4 GB of GPU memory in fp32 (whole GPU,
    nvidia-smi) and 7.2 GB in bf16 over 512 frames; other batch sizes were not compared.
    """
    return 16 if device.type == "cuda" else 4


def default_writers(device: torch.device) -> int:
    """Writer threads when none are given: 1 on the CPU, 2 on CUDA.

    On the 2-core development machine (cores shared) a second writer gained nothing:
    96 float16 chunks of S=512 features (8 frames × 2 objects each) took 2.7 s with two
    writers against 2.8 s with one (medians of 4, interleaved), and whole 16-frame runs at
    S=512 differed by less than their noise (0.25 and 0.25 frames/s against 0.26 and 0.20);
    writing a frame there takes milliseconds against seconds of compute, so the cores
    stay with compute. On CUDA the device outruns one writer, and Blosc compression and
    file writes run outside the GIL, so two overlap. On an H200 one writer alone wrote
    409 frames/s (hiera_t at 1024, float16, 2 objects), while whole runs went ~80 (fp32)
    and ~180 (bf16) frames/s once started (their time from 64 to 512 frames); one writer
    against two was not compared there."""
    return 2 if device.type == "cuda" else 1


class _Staging:
    """Pinned host tensors that carry batches to a CUDA device, reused batch after batch.

    `to_device` copies its tensors into the next of `slots` pinned slots and from there to
    the device without blocking (a tensor already on the device, such as masks that
    `MaskSource.read_to` expanded there from label maps, passes through); a slot is written again only after the event recorded
    behind its last copy has passed, so a copy in flight never sees its source change.
    """

    def __init__(self, device: torch.device, slots: int = 3) -> None:
        self.device = device
        self._buffers: list[dict[int, torch.Tensor]] = [{} for _ in range(slots)]
        self._events: list[Any] = [None] * slots
        self._next = 0

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        i = self._next
        self._next = (i + 1) % len(self._buffers)
        if self._events[i] is not None:
            with _waiting("device"):
                self._events[i].synchronize()  # the last copy out of this slot has finished
        slot = self._buffers[i]
        out = []
        for j, t in enumerate(tensors):
            if t.device.type != "cpu":  # already there (label maps expanded on the device)
                out.append(t)
                continue
            buf = slot.get(j)
            if buf is None or buf.dtype != t.dtype or buf.numel() < t.numel():
                buf = slot[j] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
            host = buf[: t.numel()].view(t.shape)
            host.copy_(t)
            out.append(host.to(self.device, non_blocking=True))
        event = torch.cuda.Event(blocking=True)  # a waiting thread sleeps, not spins
        event.record(torch.cuda.current_stream(self.device))
        self._events[i] = event
        return out


@dataclass
class _Computed:
    """One batch's results on their way to the host: `rows` (store rows), `timestamps`,
    `features` `[b, O, 64, h, w]` (store dtype on CUDA; float32 on the CPU, cast as the
    chunk buffers are filled), `scores` `[b, O]`, `pointers` `[b, O, 256]`, `peaks` `[b]`
    (None on the CPU: computed by the assembler), the `event` after which the host tensors
    hold the data (None on the CPU), and `release`, which hands pinned buffers back."""

    rows: Sequence[int]
    timestamps: np.ndarray
    features: torch.Tensor
    scores: torch.Tensor
    pointers: torch.Tensor
    peaks: torch.Tensor | None = None
    event: Any = None
    release: Callable[[], None] | None = None


class _Results:
    """Device results to host memory. On CUDA: cast to the store dtype and each frame's
    peak |x| on the device, then copied into pinned host buffers without blocking, with
    an event behind the copies; a buffer set is reused once the assembler releases it.
    On the CPU: handed on as they are (float32)."""

    def __init__(
        self, device: torch.device, store_dtype: torch.dtype, slots: int, stop: threading.Event
    ) -> None:
        self.device = device
        self.store_dtype = store_dtype
        self.stop = stop
        self._free: queue.Queue = queue.Queue()
        for _ in range(slots):
            self._free.put({})

    def hand_on(self, rows: Sequence[int], timestamps: np.ndarray, out: Any) -> _Computed:
        n = len(rows)
        features = out.features[:n].float()  # bf16/fp16 autocast: via float32, as numpy
        scores = out.object_score_logits[:n].float()
        pointers = out.obj_ptr[:n].float()
        if self.device.type != "cuda":
            return _Computed(rows, timestamps, features, scores, pointers)
        peaks = row_peaks(features)
        stored = features.to(self.store_dtype)  # round to nearest even, as numpy's astype
        slot = _get(self._free, self.stop, "output")  # the assembler frees them
        host = []
        for name, t in (("f", stored), ("s", scores), ("p", pointers), ("k", peaks)):
            buf = slot.get(name)
            if buf is None or buf.shape[1:] != t.shape[1:] or buf.shape[0] < n:
                buf = slot[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.append(buf[:n].copy_(t, non_blocking=True))
        event = torch.cuda.Event(blocking=True)  # a waiting thread sleeps, not spins
        event.record(torch.cuda.current_stream(self.device))
        return _Computed(rows, timestamps, *host, event=event, release=lambda: self._free.put(slot))


def run_chunks(
    store: CacheStore,
    video: VideoSource,
    masks: MaskSource,
    model: MemencModel,
    chunks: Sequence[int],
    *,
    batch_size: int | None = None,
    precision: str = "fp32",
    progress: Callable[[int], None] | None = None,
    queue_depth: int = 2,
    decoders: int = 1,
    spares: SpareSources | None = None,
    writers: int | None = None,
    decoded_all: Callable[[], None] | None = None,
    times: StageTimes | None = None,
) -> int:
    """Compute and write `chunks` of an existing store (one work unit).

    Rows of the chunks are decoded and encoded in batches of `batch_size` frames (default
    `default_batch_size`; a batch may span two chunks); each chunk is written whole as soon
    as its last row is computed, by one of `writers` threads (default `default_writers`).
    `decoders` K > 1 splits the rows into K contiguous groups of whole chunks, each
    decoded by its own decoder process (`ParallelDecode`; `video` decodes the first, the
    others are `spares` started earlier, or opened on its path; all closed before this
    returns); the chunks then finish in any order, about one per group being filled at
    a time.
    `decoded_all()`, when given, is called in the decode thread once every frame and mask
    has been read, while the last batches are still computed: the caller closes its video
    and mask sources there, so their decoder processes do not outlive their work (at 1024 a
    decoder process held 115 MB through the computing of a 6-frame clip).
    `times`, when given, is filled with each stage's work and waits (`StageTimes`).
    `progress(n)` is called with the frames finished by each batch. `chunks` may be in any
    order and repeat a chunk; each is computed once, in order (within each decoder's
    group when K > 1). Returns the number of chunks written. Raises UsageError for a
    chunk outside the store or K < 1, and whatever a stage raised (VideoDecodeError,
    MaskError, StoreError ...); chunks written before the error keep their markers.

    Stages: decode (a thread) → on CUDA, stage (a thread: frames and masks into pinned
    buffers and on to the device) → compute (this thread: only launches the device work and
    hands each batch's results on) → assemble (a thread: waits for a batch's copies,
    fills the chunk buffers in the store dtype) → write (a pool of threads, whole chunks).
    On the CPU no stage but compute runs a torch operation: one in another thread would
    start a second OpenMP team, and libgomp then lets the compute team's workers sleep
    between parallel regions (see `MaskSource.read_to`).
    On CUDA frames and masks reach the device from pinned buffers and results come back
    into pinned buffers, both without blocking this thread. With a compiled model whose
    kernels take whole batches (`MemencModel.compiled`), a short last batch is padded to
    `batch_size` (its last frame repeated) and the padding's results dropped, so the
    compiled graphs see one shape.
    """
    device = model.device
    if batch_size is None:
        batch_size = default_batch_size(device)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    decoders = check_decoders(decoders) or 1
    writers = default_writers(device) if writers is None else writers
    if writers < 1:
        raise UsageError(f"writers must be at least 1, got {writers}")
    layout = store.layout
    chunks = sorted({int(c) for c in chunks})
    outside = [c for c in chunks if not 0 <= c < layout.num_chunks]
    if outside:
        raise UsageError(
            f"chunk {outside[0]} is outside the store (chunks 0..{layout.num_chunks - 1})"
        )
    rows = [r for c in chunks for r in store.chunk_rows(c)]
    if not rows:
        return 0
    frame_of = layout.frame_index
    autocast = autocast_for(device, precision)
    store_dtype = np.dtype(layout.store_dtype)
    stages = _Stages(times)
    stop = stages.stop
    decoded: queue.Queue = queue.Queue(maxsize=queue_depth)
    computed: queue.Queue = queue.Queue(maxsize=queue_depth)
    finished: queue.Queue = queue.Queue(maxsize=queue_depth)
    staging = _Staging(device) if device.type == "cuda" else None
    results = _Results(device, getattr(torch, layout.store_dtype), slots=queue_depth + 2, stop=stop)
    pad_to = batch_size if model.compiled and model.frame_batch is None else None

    def decode() -> None:
        # Masks are read here, in this one thread, whichever decoder a batch came from:
        # a MaskSource must not be read from two threads at once (a mask video is one
        # child serving one request at a time, an .npz one open zip file), and a source
        # per decoder would scan a mask video once more each. Reading here overlaps the
        # K decoders' work anyway.
        # Label maps go to the device as [B, H, W] and become O planes there (read_to).
        groups = split_rows(rows, layout.chunk_frames, decoders)
        with ParallelDecode(
            video, lambda r: int(frame_of[r]), groups, batch_size, cancel=stop, spares=spares
        ) as batches:
            coming = iter(batches)
            while True:
                with _waiting("input"):  # on the decoder processes
                    got = next(coming, None)
                if got is None:
                    break
                batch_rows, batch = got
                m = masks.read_to(batch.frame_index.tolist(), model.device)
                _put(decoded, (batch_rows, batch, m), stop)
        if decoded_all is not None and not stop.is_set():
            decoded_all()
        _put(decoded, _DONE, stop)

    written = 0

    def assemble() -> None:
        nonlocal written
        buffers: dict[int, _ChunkBuffer] = {}  # chunks being filled, by chunk index
        while (item := _get(computed, stop)) is not _DONE:
            if item.event is not None:
                with _waiting("device"):
                    item.event.synchronize()  # this batch's copies to the host have finished
            features, scores, ptrs = (
                t.numpy() for t in (item.features, item.scores, item.pointers)
            )
            peaks = item.peaks.numpy() if item.peaks is not None else host_row_peaks(features)
            for i, r in enumerate(item.rows):
                c = r // layout.chunk_frames
                if c not in buffers:
                    n = len(store.chunk_rows(c))
                    shape = features.shape[1:]
                    buffers[c] = _ChunkBuffer(n, shape, ptrs.shape[-1], store_dtype)
                buf = buffers[c]
                k = r - c * layout.chunk_frames
                if buf.put(k, features[i], scores[i], item.timestamps[i], ptrs[i], peaks[i]):
                    _put(finished, buf.chunk(c), stop)
                    del buffers[c]
                    written += 1
            if item.release is not None:
                item.release()
            if progress:
                progress(len(item.rows))
        for _ in range(writers):
            _put(finished, _DONE, stop)

    def write() -> None:
        while (item := _get(finished, stop)) is not _DONE:
            args, kwargs = item
            store.write_chunk(*args, **kwargs)

    def stage() -> None:  # CUDA: host copies into pinned memory off the compute thread
        while (item := _get(decoded, stop)) is not _DONE:
            batch_rows, batch, m = item
            frames, m = staging.to_device(batch.frames, m)
            _put(staged, (batch_rows, batch, frames, m), stop)
        _put(staged, _DONE, stop)

    stages.start(decode, "decode")
    staged = decoded
    if staging is not None:
        staged = queue.Queue(maxsize=1)
        stages.start(stage, "stage")
    stages.start(assemble, "assemble")
    for i in range(writers):
        stages.start(write, "write", f"memenc-write-{i}")

    def compute() -> None:
        while (item := _get(staged, stop)) is not _DONE:
            if staging is None:
                batch_rows, batch, m = item
                frames = batch.frames
            else:
                batch_rows, batch, frames, m = item
            if pad_to is not None and len(batch_rows) < pad_to:
                frames, m = _pad(frames, pad_to), _pad(m, pad_to)
            with autocast:
                pix = model.image_features(frames)
                out = model.encode_memory(pix, m, pointers=True)
            _put(computed, results.hand_on(batch_rows, batch.timestamps, out), stop)
        _put(computed, _DONE, stop)

    stages.run(compute, "compute")  # the coordinator's own stage, in this thread
    stages.join()
    return written


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """`x` `[b, ...]` grown to `[size, ...]` by repeating its last row."""
    return torch.cat([x, x[-1:].expand(size - x.shape[0], *x.shape[1:])])


# ---------------------------------------------------------------------------- the command

# The checkpoint used when none is given: SAM 2's training configs use base_plus.
DEFAULT_CHECKPOINT = "sam2.1_hiera_base_plus"
IMAGE_SIZE_STEP = 32


def choose_checkpoint(
    checkpoint: str | os.PathLike | None, weights: str
) -> str | os.PathLike | None:
    """The checkpoint a run uses: the one given; with none and `weights="checkpoint"`,
    $MEMENC_CHECKPOINT when set, else the official `DEFAULT_CHECKPOINT` (downloaded once).
    Raises UsageError for unknown `weights` or a checkpoint given with random weights."""
    if weights not in ("checkpoint", "random"):
        raise UsageError(f"--weights {weights!r}: choose checkpoint or random")
    if weights == "random":
        if checkpoint is not None:
            raise UsageError("--checkpoint and --weights random exclude each other; give one")
        return None
    if checkpoint is not None:
        return checkpoint
    return os.environ.get("MEMENC_CHECKPOINT") or DEFAULT_CHECKPOINT


def check_image_size(image_size: int | None) -> None:
    """Raise UsageError unless `image_size` is None (the variant's 1024) or a positive
    multiple of 32: the patch embedding has stride 4 and Hiera's first windows are 8×8
    (the window position embedding is tiled over the S/4 grid), and the FPN doubles the
    stride-32 map back onto the stride-16 one."""
    if image_size is None:
        return
    if image_size < IMAGE_SIZE_STEP or image_size % IMAGE_SIZE_STEP:
        raise UsageError(
            f"--image-size {image_size}: not a size the model takes; it takes a positive "
            f"multiple of {IMAGE_SIZE_STEP} (e.g. 256, 512, 1024)"
        )


def _warn_if_damaged(info: VideoInfo) -> None:
    """A video that promises more frames than decode, with masks that fit the frames
    that do: those are encoded, and a `MemencWarning` says what is skipped (the store's
    ``source_video`` attributes hold both counts)."""
    m, n = info.frame_count, info.frame_count_declared
    if n > m:
        skipped = f"frame {m}" if n - m == 1 else f"frames {m}-{n - 1}"
        warnings.warn(
            MemencWarning(
                f"{info.path}: only {m} of {n} frames decode (the file is truncated or "
                f"damaged); encoding those {m}, {skipped} skipped"
            ),
            stacklevel=3,
        )


def encode_video(
    video: str | os.PathLike,
    *,
    masks: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    weights: str = "checkpoint",
    variant: str | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    image_size: int | None = None,
    frames: str | None = None,
    objects: str | Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    store_dtype: str = "float16",
    chunk_frames: int | None = None,
    compile: bool = False,
    overwrite: bool = False,
    skip_unmasked: bool = False,
    sav_step: int = SAV_STEP,
    decode_timeout_s: float = 120.0,
    decoders: int | None = None,
    progress: ProgressFn | None = None,
) -> EncodeResult:
    """Encode one video's memories into a memenc store (the `memenc encode` command).

    video: a video file decord or PyAV reads, or a folder of frame images.
    masks: a mask source (PNG folder, mask video, .npy/.npz, SA-V JSON); default: the
        conventionally named source beside the video.
    checkpoint / weights / variant / seed / image_size: the model (see `load_model`);
        with no checkpoint and weights="checkpoint", $MEMENC_CHECKPOINT or the official
        sam2.1_hiera_base_plus. image_size: a positive multiple of 32 (default 1024).
    out: the store path (default `<video stem>.zarr` beside the video).
    frames: "START:STOP:STEP" over source frame numbers. objects: ids or "1,2".
    batch_size (default: `default_batch_size`, 4 on the CPU, 16 on CUDA), device ("auto",
    "cpu", "cuda[:i]"), precision ("fp32", "bf16", "fp16"), store_dtype ("float16",
    "float32"), chunk_frames (default: ~1–4 MB chunks). compile: `torch.compile` the image
    and memory encoders (`MemencModel.compile_encoders`; recorded, not fingerprinted).
    overwrite: replace any memenc store at `out`, starting anew (even one made with the
    same settings: no resume); a local store replaced is kept aside until the new one is
    complete, and comes back if this run fails. skip_unmasked: drop frames
    without a mask instead of failing. sav_step: SA-V annotation step (annotation k is
    video frame k * sav_step). decoders: decoder processes K over disjoint chunk ranges
    of the video (None: 1 on the CPU, from the cores on CUDA; see `choose_decoders`);
    like batch_size and device, recorded in the store but not in its fingerprint.
    progress: called with `Progress` reports.

    Every argument is checked first (UsageError) before a decoder starts or a store is
    touched. Returns an `EncodeResult`. A complete store with the same settings is a no-op; an
    in-progress one is resumed (only chunks without markers are computed). Raises
    MemencError subclasses (VideoDecodeError, MaskError, CheckpointError, StoreError,
    UsageError) with one-line messages naming the input and the problem. A video that
    decodes fewer frames than it promises is encoded when the masks fit the frames
    that decode, with a `MemencWarning` (through `warnings`); otherwise it is a
    VideoDecodeError naming the video as damaged.
    """
    t0 = time.monotonic()
    # every argument is checked before anything starts: no decoder, no store, no download
    checkpoint = choose_checkpoint(checkpoint, weights)
    if variant is not None:
        try:
            get_variant(variant)
        except CheckpointError as e:
            raise UsageError(f"--variant: {e}") from None
    check_image_size(image_size)
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    if chunk_frames is not None and chunk_frames < 1:
        raise UsageError(f"--chunk-frames {chunk_frames}: must be at least 1")
    check_decode_timeout(decode_timeout_s)
    dev = pick_device(device)
    batch_size = default_batch_size(dev) if batch_size is None else batch_size
    autocast_for(dev, precision)
    k_decoders = choose_decoders(decoders, dev)
    if store_dtype not in STORE_DTYPES:
        raise UsageError(f"--store-dtype {store_dtype!r}: choose float16 or float32")
    selection = parse_frames(frames)
    if out is not None and not os.fspath(out).strip():  # '' would mean the current folder
        raise UsageError("-o/--out: an empty path; name the store")
    if out is not None and is_url(os.fspath(out)):
        check_url(os.fspath(out))  # a URL whose fsspec backend is missing: the extra to install
    object_ids = (
        parse_objects(objects) if isinstance(objects, str) or objects is None else list(objects)
    )
    limit_malloc_arenas()
    keep_freed_memory(dev)
    start_plainly(dev.type == "cpu")  # no forkserver kept through a CPU run's peak
    video_path = Path(video)

    def on_download(done: int, total: int | None) -> None:
        if progress:
            progress(Progress(done, total or 0, time.monotonic() - t0, stage="download"))

    load = partial(
        load_model, checkpoint, variant=variant, weights=weights, seed=seed,
        image_size=image_size, device=dev, progress=on_download,
    )  # fmt: skip
    with ExitStack() as stack:
        # A local checkpoint (or random weights) loads in a thread while the video is
        # opened and probed and the masks are scanned: those steps wait on the decoder
        # process and on PNG reads. A bad video or mask source is still reported first: its
        # error leaves this block, which waits for the load and drops it. A checkpoint that
        # must be downloaded loads after them, so a bad video never waits for a download.
        loading = None
        if checkpoint is None or Path(checkpoint).is_file():
            loader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="memenc-load"))
            loading = loader.submit(load)
        # every released variant runs at 1024 unless --image-size says otherwise
        size = image_size or VARIANTS[DEFAULT_VARIANT].image_size
        source = stack.enter_context(
            VideoSource(
                video_path, size, timeout_s=decode_timeout_s, threads=decoder_threads(k_decoders)
            )
        )
        info = source.info
        mask_path = Path(masks) if masks is not None else find_masks_beside(video_path)
        mask_source = open_run_masks(
            mask_path, video_path, info, objects=object_ids, sav_step=sav_step,
            timeout_s=decode_timeout_s, selection=selection,
        )  # fmt: skip
        stack.callback(mask_source.close)
        _warn_if_damaged(info)
        planned = plan_frames(info.frame_count, selection, mask_source, skip_unmasked)
        # decoders 2..K start now, in the background, while the model loads (no more than
        # frames; a decoder past the number of pending chunks is closed unused)
        spares = stack.enter_context(SpareSources(source, min(k_decoders, len(planned)) - 1))
        model = loading.result() if loading is not None else load()
        if compile:
            model.compile_encoders()
        layout = plan_layout(
            model, planned, video_path, info, mask_source, selection=selection,
            store_dtype=store_dtype, chunk_frames=chunk_frames, precision=precision,
            batch_size=batch_size, device=str(dev), decoders=k_decoders, compile=compile,
        )  # fmt: skip
        # a str, not a Path: an fsspec URL (s3://…) must reach the store intact
        out_path = os.fspath(out) if out is not None else str(video_path.with_suffix(".zarr"))
        # the lock is held from before the store is created or resumed until it is complete
        with store_lock(out_path):
            store = CacheStore.prepare(out_path, layout, overwrite=overwrite)
            pending = store.pending_chunks()
            already = store.status == "complete"
            todo = sum(len(store.chunk_rows(c)) for c in pending)
            if todo:  # said only when there is something to compute
                _warn_if_slow_bf16(dev, precision)
            done = 0
            times = StageTimes()
            t_run = time.monotonic()

            def on_batch(n: int) -> None:
                nonlocal done
                done += n
                if progress:
                    progress(Progress(done, todo, time.monotonic() - t_run))

            try:
                written = run_chunks(
                    store,
                    source,
                    mask_source,
                    model,
                    pending,
                    batch_size=batch_size,
                    precision=precision,
                    progress=on_batch,
                    decoders=k_decoders,
                    spares=spares,
                    decoded_all=lambda: (source.close(), mask_source.close()),
                    times=times,
                )
                store.finalize()
            except Exception:
                # The replacement failed: the store it replaced comes back (every stage
                # thread has ended by now). Not on Ctrl-C, which may land while they run:
                # the old store then stays aside until a run completes or fails.
                if overwrite:
                    with contextlib.suppress(MemencError):
                        store.bring_back_replaced()
                raise
            seconds = time.monotonic() - t0
            run_s = time.monotonic() - t_run
    return EncodeResult(
        store=str(out_path),
        video=str(video_path),
        masks=str(mask_path),
        frames=layout.num_frames,
        objects=list(layout.object_ids),
        chunks_total=layout.num_chunks,
        chunks_written=written,
        already_complete=already,
        status=store.status,
        device=str(dev),
        precision=precision,
        variant=model.variant.name,
        weights=model.weights,
        seconds=round(seconds, 3),
        frames_per_second=round(todo / run_s, 3) if todo and run_s > 0 else 0.0,
        stages=times.summary(),
    )
