"""`memenc batch`: many videos, one store each, on one process, local workers, a Slurm
array shard or a Dask cluster.

    summary = run_batch(["videos/*.mp4"], "caches/", weights="random", image_size=256)

Stages (DESIGN.md §7):

    inputs      files, globs, folders of frame folders, CSV / JSON Lines manifests
                -> `BatchInput`s, each with its store name under the output folder
    coordinator per video: probe, masks, plan, `CacheStore.prepare` (store lock held
                from here until the store is complete) -> `WorkUnit`s of frame-chunks
    executor    `run_unit` on the units: in this process, in N local processes, or on
                Dask workers; each returns a `UnitResult` (an error is a value)
    coordinator when every unit of a video succeeded, `CacheStore.finalize`

The coordinator alone creates and completes stores; workers open them with
`CacheStore.open_for_write` and fill disjoint chunk ranges. That split is also what keeps
writers apart on object storage, where there is no file lock.

Executors share one shape (`_Executor.submit(unit, done)`), chosen by an argument. A unit
skips chunks whose ``chunk_done`` marker is already set, so a retried or resumed unit never
recomputes finished work, and a rerun of the same batch skips complete stores.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import fnmatch
import glob
import io
import json
import os
import posixpath
import queue
import re
import string
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memenc.errors import MemencError, MemencWarning, StoreError, StoreLockedError, UsageError
from memenc.store.urls import check_kept_url, file_url_path
from memenc.store.urls import is_url as _is_url

__all__ = [
    "BatchInput",
    "BatchProgress",
    "BatchSettings",
    "BatchSummary",
    "InputResult",
    "UnitResult",
    "WorkUnit",
    "expand_inputs",
    "parse_shard",
    "run_batch",
    "run_unit",
]

SUMMARY_FILE = "batch-summary.json"
PLAN_FILE = "batch-plan.json"
DEFAULT_UNIT_FRAMES = 256
# how often a video whose store another process is writing is tried again (`_drive`)
LOCK_RETRY_S = 2.0
DASK_WORKER_WAIT_S = 120.0  # how long `--dask` waits for a cluster's first worker
DASK_CONNECT_S = 30.0  # how long `--dask ADDRESS` tries to reach the scheduler
VIDEO_SUFFIXES = frozenset(
    (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg")
    + (".flv", ".wmv", ".h264", ".264", ".hevc", ".265")
)
IMAGE_SUFFIXES = frozenset((".jpg", ".jpeg", ".png"))
MANIFEST_SUFFIXES = frozenset((".csv", ".jsonl", ".ndjson"))
MANIFEST_COLUMNS = ("video", "masks", "output", "objects", "frames")


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True)
class BatchSettings:
    """`encode`'s model and store options, the same for every video of a batch."""

    checkpoint: str | None = None
    weights: str = "checkpoint"
    variant: str | None = None
    seed: int = 0
    image_size: int | None = None
    batch_size: int | None = None  # None: `default_batch_size` of the device
    device: str = "auto"
    precision: str = "fp32"
    store_dtype: str = "float16"
    chunk_frames: int | None = None
    compile: bool = False  # torch.compile the encoders (`MemencModel.compile_encoders`)
    overwrite: bool = False
    skip_unmasked: bool = False
    decode_timeout_s: float = 120.0
    sav_step: int = 4  # SA-V annotation step, as `encode --sav-step`
    decoders: int | None = None  # decoder processes per video; None: each worker chooses

    def model_key(self) -> tuple[Any, ...]:
        return (
            self.checkpoint,
            self.weights,
            self.variant,
            self.seed,
            self.image_size,
            self.compile,
        )


@dataclass(frozen=True)
class BatchInput:
    """One video of the batch: where it is, its masks, and its store name (relative to the
    output folder). `error` is set for an input refused before it runs (a manifest row
    whose output leaves the folder, say). `row`: where a manifest gave it (``file:line``),
    named in the errors of its fields."""

    index: int
    video: str
    name: str
    masks: str | None = None
    objects: str | None = None
    frames: str | None = None
    error: str | None = None
    row: str | None = None


@dataclass(frozen=True)
class WorkUnit:
    """One work unit: frame-chunks `chunks` of one video's existing store."""

    input: int
    unit: int
    video: str
    masks: str
    store: str
    chunks: tuple[int, ...]
    objects: tuple[int, ...]
    frames: int  # rows the chunks cover


@dataclass(frozen=True)
class UnitResult:
    """What `run_unit` did. `error` is a one-line message; `transient` says whether it is
    worth retrying (I/O and store write errors, not a video that does not decode)."""

    input: int
    unit: int
    chunks_written: int = 0
    frames: int = 0
    seconds: float = 0.0
    error: str | None = None
    transient: bool = False
    worker: str = ""


@dataclass
class InputResult:
    """One line of the summary. status: ``complete`` (made complete by this run),
    ``skipped`` (complete before it, or made complete meanwhile by another process that
    held its store's lock while this run waited), ``failed`` (`error` says why; its store, if one
    was created, stays ``in_progress`` and a rerun resumes it), ``prepared`` (created by
    a `prepare_only` pass) or ``incomplete`` (a shard did its share of the video's units;
    other shards have the rest). units: work units run;
    workers: where they ran (host:pid)."""

    index: int
    input: str
    store: str
    status: str = "pending"
    masks: str | None = None
    frames: int = 0
    chunks_total: int = 0
    chunks_written: int = 0
    units: int = 0
    seconds: float = 0.0
    attempts: int = 0
    error: str | None = None
    workers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BatchSummary:
    """The whole batch: one `InputResult` per input, plus rates. `ok` is False when any
    input failed (the CLI exits 3)."""

    out: str
    executor: str
    workers: int
    shard: str | None
    inputs: list[InputResult]
    seconds: float = 0.0
    coordinator_seconds: float = 0.0
    frames_computed: int = 0

    @property
    def ok(self) -> bool:
        return all(
            r.status in ("complete", "skipped", "prepared", "incomplete") for r in self.inputs
        )

    @property
    def failed(self) -> list[InputResult]:
        return [r for r in self.inputs if r.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for r in self.inputs:
            counts[r.status] = counts.get(r.status, 0) + 1
        computed = sum(1 for r in self.inputs if r.status == "complete")
        n = len(self.inputs)
        return {
            "out": self.out,
            "executor": self.executor,
            "workers": self.workers,
            "shard": self.shard,
            "ok": self.ok,
            "counts": counts,
            "seconds": round(self.seconds, 3),
            "frames_computed": self.frames_computed,
            "videos_per_second": round(computed / self.seconds, 4) if self.seconds else 0.0,
            "frames_per_second": round(self.frames_computed / self.seconds, 3)
            if self.seconds
            else 0.0,
            "coordinator_seconds_per_video": round(self.coordinator_seconds / n, 4) if n else 0.0,
            "inputs": [r.to_dict() for r in self.inputs],
        }


@dataclass(frozen=True)
class BatchProgress:
    """A progress report: videos finished (complete, skipped or failed) and frames computed,
    out of the totals known so far (frames grow as videos are planned)."""

    videos_done: int
    videos_total: int
    frames_done: int
    frames_total: int
    elapsed_s: float
    waiting: int = 0  # videos whose store another process is writing: planned once it ends


# ---------------------------------------------------------------------------- inputs


def _has_images(folder: Path) -> bool:
    try:
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file())
    except OSError:
        return False


def _is_mask_path(path: Path) -> bool:
    name = path.name
    return (
        name.endswith(("_masks", ".masks.npy", ".masks.npz", "_manual.json", "_auto.json"))
        or path.suffix == ".zarr"
    )


def _expand_folder(folder: Path) -> list[Path]:
    """A frame folder is one video; otherwise its video files and frame folders, sorted
    (mask sources and stores beside them are left out)."""
    if _has_images(folder):
        return [folder]
    found = []
    for child in sorted(folder.iterdir()):
        if _is_mask_path(child) or child.name.startswith("."):
            continue
        is_video = child.is_file() and child.suffix.lower() in VIDEO_SUFFIXES
        if is_video or (child.is_dir() and _has_images(child)):
            found.append(child)
    return found


def _no_unknown_fields(where: str, names: Sequence[str], kind: str) -> None:
    """UsageError for a manifest column or field memenc does not know: a misspelt one
    ("frame", "objcts") would otherwise be ignored, and the row encoded whole."""
    unknown = [n for n in names if n not in MANIFEST_COLUMNS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), MANIFEST_COLUMNS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UsageError(
            f"{where}: unknown {kind} '{unknown[0]}'; {hint}a manifest has "
            + ", ".join(f"'{c}'" for c in MANIFEST_COLUMNS)
        )


def _read_manifest(path: Path) -> list[dict[str, str | None]]:
    """Rows of a CSV (header row) or JSON Lines manifest; relative paths are taken from the
    manifest's folder. Raises UsageError naming the file and line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read manifest ({e.strerror or e})") from None
    try:  # a byte-order mark (spreadsheets write one) is not part of the first column's name
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: manifest is not UTF-8 text") from None
    rows: list[dict[str, Any]] = []
    lines: list[int] = []  # each row's line number
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text), strict=True)  # e.g. an unclosed quote
        try:
            if not reader.fieldnames or "video" not in reader.fieldnames:
                raise UsageError(f"{path}: manifest has no 'video' column")
            _no_unknown_fields(f"{path}:1", reader.fieldnames, "column")
            for r in reader:
                if r.get(None):  # more fields than the header names: a comma not quoted?
                    raise UsageError(
                        f"{path}:{reader.line_num}: {len(r[None])} more field(s) than the "
                        'header has (quote a field that holds commas, e.g. "3,7")'
                    )
                rows.append(dict(r))
                lines.append(reader.line_num)
        except csv.Error as e:  # line_num counts the lines before the failing row's
            raise UsageError(f"{path}:{reader.line_num + 1}: not CSV ({e})") from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "video" not in row:
                raise UsageError(f"{path}:{n}: a manifest line needs a 'video' field")
            _no_unknown_fields(f"{path}:{n}", list(row), "field")
            for key in MANIFEST_COLUMNS:  # strings; objects also an id or a list of ids
                value = row.get(key)
                ids = key == "objects"
                allowed = (str, int, list) if ids else (str,)
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, allowed)
                ):
                    kind = "a string, an id or a list of ids" if ids else "a string"
                    raise UsageError(
                        f"{path}:{n}: '{key}' must be {kind}, not {json.dumps(value)[:40]}"
                    )
                listed = value if isinstance(value, list) else []
                if not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
                    raise UsageError(f"{path}:{n}: 'objects' must list whole numbers")
            rows.append(row)
            lines.append(n)
    out = []
    for row, at in zip(rows, lines):
        where = f"{path}:{at}"
        clean = {k: (None if row.get(k) in (None, "") else str(row[k])) for k in MANIFEST_COLUMNS}
        if clean["objects"] is not None and isinstance(row.get("objects"), list):
            clean["objects"] = ",".join(str(i) for i in row["objects"])
        for key in ("video", "masks", "output"):
            if "\x00" in (clean[key] or ""):
                raise UsageError(f"{where}: the row's '{key}' holds a NUL byte")
        for key in ("video", "masks"):
            value = clean[key]
            if value is not None and not os.path.isabs(value):
                clean[key] = str(path.parent / value)
        if clean["video"] is None:
            raise UsageError(f"{where}: the row's 'video' is empty")
        out.append({**clean, "row": where})
    return out


def _safe_name(output: str) -> str | None:
    """A manifest `output` as a relative store name, or None when it would leave the output
    folder (absolute, a URL, or `..` anywhere)."""
    if _is_url(output) or output.startswith(("/", "\\", "file://")) or os.path.isabs(output):
        return None
    parts = [p for p in re.split(r"[\\/]+", output) if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def _stays_inside(out: str, path: str) -> bool:
    """Whether a local store path, its symbolic links resolved, lies in the output folder
    (a manifest output in a subfolder could lead elsewhere through a link); URLs do."""
    if _is_url(out):
        return True
    root, real = os.path.realpath(out), os.path.realpath(path)
    return real.startswith(root.rstrip(os.sep) + os.sep)


def _is_batch_file(name: str) -> bool:
    """A name batch gives its own files in the output folder."""
    return name in (SUMMARY_FILE, PLAN_FILE) or fnmatch.fnmatch(name, "batch-summary-shard-*.json")


# A manifest row's fields besides the video; rows equal in all of them are one input.
_ROW_SETTINGS = ("masks", "output", "objects", "frames")


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[BatchInput]:
    """Turn the command line's INPUTS into videos, in a deterministic order.

    Each input is a video file, a glob (each match taken as if given), a folder (a frame
    folder, or a folder of videos and frame folders), or a manifest (``.csv``, ``.jsonl``, ``.ndjson``) with the column
    ``video`` and optional ``masks``, ``output``, ``objects``, ``frames``. A video listed
    twice with the same settings (e.g. by a folder and a glob) is kept once; manifest rows
    that give one video other settings or another output are inputs of their own. Store
    names are the video's stem (a frame folder's name) plus ``.zarr``, with ``-2``,
    ``-3`` … appended when stems collide; a manifest's ``output`` is used as given unless
    it is absolute, has ``..`` or names the output folder itself (that input is refused,
    its error naming the manifest's ``file:line``).

    Raises:
        UsageError: an input that does not exist, a glob that matches nothing, a malformed
            manifest, or no videos at all (the message names what each input held).
    """
    rows: list[dict[str, str | None]] = []
    empty: list[str] = []  # inputs that gave no video, for the message when none did
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.exists():
            matches = [path]
        elif glob.has_magic(text):
            matches = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
            if not matches:
                raise UsageError(f"{text}: the pattern matches nothing")
        else:
            raise UsageError(f"{text}: no such file or folder")
        before = len(rows)
        for m in matches:  # a glob's matches are taken as if each had been given
            if m.is_file() and m.suffix.lower() in MANIFEST_SUFFIXES:
                rows.extend(_read_manifest(m))
                continue
            for video in _expand_folder(m) if m.is_dir() else [m]:
                rows.append({"video": str(video)})
        if len(rows) == before:
            empty.append(
                f"{text}: a manifest with no rows" if path.is_file()
                else f"{text}: no video files or frame folders" if path.is_dir()
                else f"{text}: the pattern matches no videos"
            )  # fmt: skip
    seen: set[tuple[str | None, ...]] = set()
    taken: set[str] = set()
    result: list[BatchInput] = []
    for row in rows:
        video = str(row["video"])
        key = (os.path.realpath(video), *(row.get(k) for k in _ROW_SETTINGS))
        if key in seen:
            continue
        seen.add(key)
        error = None
        output = row.get("output")
        if output is not None:
            name = _safe_name(output)
            if name is None and re.fullmatch(r"[\\/.]+", output) and ".." not in output:
                error = f"manifest output {output!r} is the output folder itself, not a store in it"
                name = f"<refused:{len(result)}>"
            elif name is None:
                error = f"manifest output {output!r} is outside the output folder; refused"
                name = f"<refused:{len(result)}>"
            elif _is_batch_file(name.split("/")[0]):
                error = f"manifest output {output!r} is a file batch writes itself; refused"
                name = f"<refused:{len(result)}>"
        else:
            p = Path(video)
            stem = p.name if p.is_dir() or not p.suffix else p.stem
            base = stem or "video"
            name, k = f"{base}.zarr", 1
            while name in taken:
                k += 1
                name = f"{base}-{k}.zarr"
        if error is None and name in taken:
            error = f"manifest output {output!r} is used by another input; refused"
        elif error is None and any(
            n.startswith(f"{name}/") or name.startswith(f"{n}/") for n in taken
        ):
            # one store inside another: --overwrite of the outer one would delete the inner
            error = f"manifest output {output!r} nests with another input's store; refused"
        taken.add(name)
        result.append(
            BatchInput(
                index=len(result),
                video=video,
                name=name,
                masks=row.get("masks"),
                objects=row.get("objects"),
                frames=row.get("frames"),
                error=error if error is None or not row.get("row") else f"{row['row']}: {error}",
                row=row.get("row"),
            )
        )
    if not result:
        raise UsageError("no videos among the inputs (" + "; ".join(empty) + ")")
    return result


def store_path(out: str, name: str) -> str:
    """The store for `name` under the output folder `out` (a path or an fsspec URL)."""
    if _is_url(out):
        return out.rstrip("/") + "/" + name
    return os.path.join(out, *name.split("/"))


def masks_for(inp: BatchInput, template: str | None) -> str:
    """The mask source of an input: the manifest's, `template` filled in ({parent}, {stem},
    {name}, {video}), or the conventional one beside the video. Raises MaskError."""
    from memenc.pipeline.masks import find_masks_beside

    if inp.masks is not None:
        return inp.masks
    video = Path(inp.video)
    if template is not None:
        stem = video.name if video.is_dir() else video.stem
        fields = {"parent": str(video.parent), "stem": stem, "name": video.name, "video": inp.video}
        return template.format(**fields)
    return str(find_masks_beside(video))


def parse_shard(spec: str | None, environ: dict[str, str] | None = None) -> tuple[int, int] | None:
    """``I/N`` -> (I, N); ``auto`` reads SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT,
    SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_STEP (an array 1-10 is shards 0..9 of 10;
    0-10:2 is shards 0..5 of 6). Raises UsageError; for an array given as a list of
    indices (1,3,7), which the environment does not place, it says to pass I/N."""
    if spec is None:
        return None
    env = os.environ if environ is None else environ
    if spec == "auto":
        got = {}
        defaults = {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "1"}
        for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", *defaults):
            text = env.get(name, defaults.get(name))
            if text is None:
                raise UsageError(f"--shard auto: {name} is not set (not a Slurm array?)")
            try:
                got[name] = int(text)
            except ValueError:
                raise UsageError(f"--shard auto: {name}={text!r} is not a number") from None
        count = got["SLURM_ARRAY_TASK_COUNT"]
        offset = got["SLURM_ARRAY_TASK_ID"] - got["SLURM_ARRAY_TASK_MIN"]
        step = max(1, got["SLURM_ARRAY_TASK_STEP"])
        index = offset // step
        if offset % step or not 0 <= index < count:
            raise UsageError(
                f"--shard auto: task {got['SLURM_ARRAY_TASK_ID']} is not one of an array of "
                f"{count} tasks from {got['SLURM_ARRAY_TASK_MIN']} in steps of {step}; for an "
                "array given as a list of indices, pass --shard I/N"
            )
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not m:
            raise UsageError(f"--shard {spec!r}: expected I/N (e.g. 0/4) or auto")
        index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {spec}: shard {index} of {count} does not exist")
    return index, count


# ---------------------------------------------------------------------------- the worker

_models: dict[tuple[Any, ...], Any] = {}
_models_lock = threading.Lock()
_worker_device: str | None = None  # set by a local worker process's initializer


def _worker_model(settings: BatchSettings, device: Any) -> Any:
    """The model for these settings on this device, loaded once per process and kept."""
    from memenc.encoders import load_model
    from memenc.pipeline.engine import choose_checkpoint

    key = (*settings.model_key(), str(device))
    with _models_lock:
        model = _models.get(key)
        if model is None:
            model = load_model(
                choose_checkpoint(settings.checkpoint, settings.weights),
                variant=settings.variant,
                weights=settings.weights,
                seed=settings.seed,
                image_size=settings.image_size,
                device=device,
            )
            if settings.compile:
                model.compile_encoders()
            _models.clear()  # one model per process
            _models[key] = model
        return model


def run_unit(
    unit: WorkUnit,
    settings: BatchSettings,
    progress: Callable[[int], None] | None = None,
) -> UnitResult:
    """Run one work unit where this function is called (this process, a local worker, a
    Dask worker): load the model once per process, open the store for writing, and
    compute the unit's chunks that have no ``chunk_done`` marker yet.

    Never raises for a bad input: the error comes back in the `UnitResult` (transient for
    store I/O, which is worth retrying).
    """
    from memenc.pipeline.decoders import SpareSources, choose_decoders, decoder_threads
    from memenc.pipeline.engine import (
        keep_freed_memory,
        limit_malloc_arenas,
        pick_device,
        run_chunks,
    )
    from memenc.pipeline.faults import kill_point
    from memenc.pipeline.masks import open_masks
    from memenc.pipeline.video import VideoSource
    from memenc.pipeline.video.process import start_plainly
    from memenc.store import CacheStore

    t0 = time.monotonic()
    worker = f"{os.uname().nodename}:{os.getpid()}"
    done = dict(input=unit.input, unit=unit.unit, worker=worker)
    try:
        limit_malloc_arenas()
        kill_point("unit-start", unit.unit)
        device = pick_device(_worker_device or settings.device)
        keep_freed_memory(device)
        start_plainly(device.type == "cpu")
        try:
            store = CacheStore.open_for_write(unit.store)
        except StoreError:
            if _is_complete(unit.store):  # another shard finished it: nothing to do
                return UnitResult(**done, seconds=time.monotonic() - t0)
            raise
        pending = set(store.pending_chunks())
        todo = [c for c in unit.chunks if c in pending]
        if not todo:
            return UnitResult(**done, seconds=time.monotonic() - t0)
        model = _worker_model(settings, device)
        decoders = choose_decoders(settings.decoders, device)
        with (
            VideoSource(
                unit.video,
                model.image_size,
                timeout_s=settings.decode_timeout_s,
                threads=decoder_threads(decoders),
            ) as source,
            SpareSources(source, decoders - 1) as spares,
        ):
            info = source.info
            masks = open_masks(
                unit.masks,
                video_frame_count=info.frame_count,
                video_width=info.width,
                video_height=info.height,
                objects=list(unit.objects),
            )
            try:
                written = run_chunks(
                    store,
                    source,
                    masks,
                    model,
                    todo,
                    batch_size=settings.batch_size,
                    precision=settings.precision,
                    progress=progress,
                    decoders=decoders,
                    spares=spares,
                    decoded_all=lambda: (source.close(), masks.close()),
                )
            finally:
                masks.close()
        frames = sum(len(store.chunk_rows(c)) for c in todo)
        return UnitResult(
            **done, chunks_written=written, frames=frames, seconds=time.monotonic() - t0
        )
    except StoreLockedError as e:
        return UnitResult(**done, error=_one_line(e), seconds=time.monotonic() - t0)
    except (StoreError, OSError) as e:
        return UnitResult(**done, error=_one_line(e), transient=True, seconds=time.monotonic() - t0)
    except MemencError as e:
        return UnitResult(**done, error=_one_line(e), seconds=time.monotonic() - t0)
    except Exception as e:  # a bug or a library's surprise: still one unit's failure
        return UnitResult(
            **done, error=f"{type(e).__name__}: {_one_line(e)}", seconds=time.monotonic() - t0
        )


def _is_complete(path: str) -> bool:
    from memenc.store import open_cache

    try:
        return open_cache(path).status == "complete"
    except MemencError:
        return False


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _process_alive(pid: int, started: str | None) -> bool:
    """Whether process `pid` runs: not gone, not a zombie, and (on Linux, where `started`
    is its start time from /proc) not another process that took its number."""
    if started is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z" and stat[1] == started


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command's name
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def _end_worker(signum: int, frame: Any) -> None:
    """A worker's SIGTERM (the coordinator abandoning the run), or its coordinator gone:
    run multiprocessing's finalizers, so that what the worker registered with the
    resource tracker is released instead of reported as leaked, then end at once."""
    from multiprocessing import util

    with contextlib.suppress(Exception):
        util._run_finalizers(0)
        util._run_finalizers()
    os._exit(1)


def _init_local_worker(devices: Any, threads: int, coordinator: int = 0) -> None:
    """Initializer of a local worker process: its device (one GPU each) and thread count.

    The coordinator alone answers Ctrl-C (the terminal sends it to the whole process
    group), and ends its workers itself. A worker checks every quarter second whether its
    coordinator is gone (killed without that chance) and then ends: left running, it
    would go on writing a store whose lock died with the coordinator."""
    global _worker_device
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _end_worker)
    if coordinator:  # not the parent: the forkserver's children keep it alive
        stat = _proc_stat(coordinator)
        started = stat[1] if stat is not None else None

        def watch() -> None:
            while _process_alive(coordinator, started):
                time.sleep(0.25)
            _end_worker(0, None)  # as if killed: chunk files are renamed in, markers last

        threading.Thread(target=watch, name="memenc-coordinator-watch", daemon=True).start()

    with contextlib.suppress(queue.Empty):
        _worker_device = devices.get_nowait()
    # CPU workers share the cores (unless OMP_NUM_THREADS says otherwise). The thread count
    # changes a float's last bits (the reductions' order), not more.
    if threads > 0 and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- executors

DoneFn = Callable[[WorkUnit, "Future[UnitResult] | Any"], None]


class _Executor:
    """Runs units somewhere and calls `done(unit, future)` when each finishes (from any
    thread). `future.result()` returns a `UnitResult` or raises when the worker was lost."""

    name = "local"
    workers = 1

    def submit(self, unit: WorkUnit, done: DoneFn) -> None:
        raise NotImplementedError

    def close(self, abort: bool = False) -> None:
        """Release the workers; with `abort` (the run is being abandoned) without
        waiting for units in progress where the executor can."""


class _InlineExecutor(_Executor):
    """Runs each unit at once, in this process (the model is loaded once and kept)."""

    def __init__(self, settings: BatchSettings, on_frames: Callable[[int], None]) -> None:
        self.settings = settings
        self.on_frames = on_frames

    def submit(self, unit: WorkUnit, done: DoneFn) -> None:
        future: Future[UnitResult] = Future()
        future.set_result(run_unit(unit, self.settings, progress=self.on_frames))
        done(unit, future)


class _ProcessExecutor(_Executor):
    """N local worker processes (forkserver, else spawn; never fork, torch is loaded).
    With several GPUs each process takes one. A lost process breaks the pool: it is
    rebuilt, and its units come back as failed futures to be retried."""

    name = "processes"

    def __init__(self, settings: BatchSettings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self._pool: Any = None
        self._lock = threading.Lock()

    def _make_pool(self) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import torch

        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        devices = ctx.Queue()
        gpus = torch.cuda.device_count() if self.settings.device in ("auto", "cuda") else 0
        for i in range(self.workers):
            devices.put(f"cuda:{i % gpus}" if gpus > 1 else self.settings.device)
        threads = 0 if gpus else max(1, (os.cpu_count() or 1) // self.workers)
        return ProcessPoolExecutor(
            self.workers,
            mp_context=ctx,
            initializer=_init_local_worker,
            initargs=(devices, threads, os.getpid()),
        )

    def submit(self, unit: WorkUnit, done: DoneFn) -> None:
        from concurrent.futures.process import BrokenProcessPool

        with self._lock:
            if self._pool is None:
                self._pool = self._make_pool()
            try:
                future = self._pool.submit(run_unit, unit, self.settings)
            except BrokenProcessPool:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._make_pool()
                future = self._pool.submit(run_unit, unit, self.settings)
        future.add_done_callback(lambda f: done(unit, f))

    def close(self, abort: bool = False) -> None:
        if self._pool is None:
            return
        if not abort:
            self._pool.shutdown(wait=True, cancel_futures=True)
            return
        # Ctrl-C or an error: end the units in progress instead of awaiting them, and let
        # a second Ctrl-C not break off this cleanup
        import signal

        main = threading.current_thread() is threading.main_thread()
        before = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            for process in list(getattr(self._pool, "_processes", {}).values()):
                process.terminate()
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            if main:
                signal.signal(signal.SIGINT, before)


class _DaskExecutor(_Executor):
    """Units as Dask tasks (`--dask ADDRESS` or `local[:N]`). On a cluster whose workers
    declare a ``GPU`` resource, each unit asks for one."""

    name = "dask"

    def __init__(self, settings: BatchSettings, address: str, verbose: bool) -> None:
        try:
            import distributed
        except ImportError:
            raise UsageError(
                "--dask needs dask's distributed scheduler: pip install 'memenc[dask]'"
            ) from None
        import logging

        self.settings = settings
        self._cluster = None
        m = re.fullmatch(r"local(?::(\d+))?", address)
        if m:
            n = int(m.group(1)) if m.group(1) else None
            if n == 0:
                raise UsageError(f"--dask {address}: a local cluster needs at least 1 worker")
            self._cluster = distributed.LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                silence_logs=logging.INFO if verbose else logging.CRITICAL,
                dashboard_address=None,
            )
            self.client = distributed.Client(self._cluster)
        else:
            try:
                self.client = distributed.Client(address, timeout=f"{DASK_CONNECT_S:g}s")
            except ValueError as e:  # not an address
                raise UsageError(f"--dask {address}: {_one_line(e)}") from None
            except (OSError, TimeoutError) as e:  # nobody there: not a mistyped option
                raise MemencError(f"--dask {address}: cannot connect ({_one_line(e)})") from None
        try:  # a cluster without workers would take units and never run them
            self.client.wait_for_workers(1, timeout=DASK_WORKER_WAIT_S)
        except (TimeoutError, OSError) as e:
            self.close()
            raise MemencError(
                f"--dask {address}: no worker joined the cluster within "
                f"{DASK_WORKER_WAIT_S:g}s ({_one_line(e)})"
            ) from None
        workers = self.client.scheduler_info().get("workers", {})
        self.workers = len(workers)
        has_gpu = any("GPU" in (w.get("resources") or {}) for w in workers.values())
        self.resources = {"GPU": 1} if has_gpu else None

    def submit(self, unit: WorkUnit, done: DoneFn) -> None:
        future = self.client.submit(
            run_unit,
            unit,
            self.settings,
            key=f"memenc-unit-{unit.input}-{unit.unit}-{time.monotonic_ns()}",
            resources=self.resources,
            pure=False,
        )
        future.add_done_callback(lambda f: done(unit, f))

    def close(self, abort: bool = False) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


# ---------------------------------------------------------------------------- coordinator


@dataclass
class _Video:
    """The coordinator's state for one video being run."""

    result: InputResult
    units: dict[int, WorkUnit] = field(default_factory=dict)
    open_units: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    lock: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    shared: bool = False  # a share of a planned video's units (other shards run the rest)
    chunk_frames: int = 0
    per_unit: int = 0  # chunks per unit


class _Coordinator:
    def __init__(
        self,
        settings: BatchSettings,
        out: str,
        *,
        masks_template: str | None,
        unit_frames: int,
        frames: str | None,
        objects: str | None,
        retries: int,
        progress: Callable[[BatchProgress], None] | None,
    ) -> None:
        self.settings = settings
        self.out = out
        self.masks_template = masks_template
        self.unit_frames = unit_frames
        self.frames = frames
        self.objects = objects
        self.retries = retries
        self.progress = progress
        self.model: Any = None
        self.coordinator_s = 0.0
        self.t0 = time.monotonic()
        self.videos_total = 0
        self.videos_done = 0
        self.frames_total = 0
        self.frames_done = 0
        self.frames_computed = 0
        self.waiting = 0
        self._report_lock = threading.Lock()

    # ---- progress

    def report(self) -> None:
        if self.progress:
            self.progress(
                BatchProgress(
                    self.videos_done,
                    self.videos_total,
                    self.frames_done,
                    self.frames_total,
                    time.monotonic() - self.t0,
                    self.waiting,
                )
            )

    def add_frames(self, n: int) -> None:
        with self._report_lock:
            self.frames_done += n
        self.report()

    # ---- planning (one video)

    def plan(self, inp: BatchInput) -> _Video:
        """Probe, open masks, lay out and prepare the store; the lock stays held until
        `finish`. A failure is recorded on the result, never raised. A store whose lock
        another process holds gets status ``waiting`` (`_drive` plans it again later)."""
        from memenc.store import CacheStore, store_lock

        t = time.monotonic()
        path = store_path(self.out, inp.name)
        v = _Video(InputResult(inp.index, inp.video, path))
        if inp.error is None and "/" in inp.name and not _stays_inside(self.out, path):
            link = "leaves the output folder through a symbolic link; refused"
            inp = dataclasses.replace(inp, error=f"{inp.row}: manifest output {inp.name!r} {link}")
        if inp.error is not None:
            v.result.status, v.result.error = "failed", inp.error
            v.result.store = ""
            return v
        try:
            layout, masks = self._layout(inp)
            v.result.masks = masks
            try:
                v.lock.enter_context(store_lock(path))
            except StoreLockedError as e:
                v.result.status, v.result.error = "waiting", _one_line(e)
                return v
            store = CacheStore.prepare(path, layout, overwrite=self.settings.overwrite)
            pending = store.pending_chunks()
        except MemencError as e:
            v.lock.close()
            v.result.status, v.result.error = "failed", _one_line(e)
            return v
        except Exception as e:  # a library's surprise on one input: that input fails
            v.lock.close()
            v.result.status, v.result.error = "failed", f"{type(e).__name__}: {_one_line(e)}"
            return v
        finally:
            self.coordinator_s += time.monotonic() - t
        v.result.frames = layout.num_frames
        v.result.chunks_total = layout.num_chunks
        if store.status == "complete":
            v.result.status = "skipped"
            return v
        per_unit = max(1, -(-self.unit_frames // layout.chunk_frames))
        v.chunk_frames, v.per_unit = layout.chunk_frames, per_unit
        groups: dict[int, list[int]] = {}
        for c in pending:
            groups.setdefault(c // per_unit, []).append(c)
        for k, chunks in groups.items():
            v.units[k] = WorkUnit(
                input=inp.index,
                unit=k,
                video=inp.video,
                masks=str(masks),
                store=path,
                chunks=tuple(chunks),
                objects=tuple(layout.object_ids),
                frames=sum(len(layout.chunk_rows(c)) for c in chunks),
            )
        v.open_units = set(v.units)
        v.result.units = len(v.units)
        v.result.status = "running"
        self.frames_total += sum(u.frames for u in v.units.values())
        return v

    def lock_held_elsewhere(self, inp: BatchInput) -> bool:
        """Whether another process (or thread) holds the lock of `inp`'s store, tried by
        taking and releasing it: far cheaper than `plan`, which probes the video and reads
        every mask before it reaches the lock."""
        from memenc.store import store_lock

        try:
            with store_lock(store_path(self.out, inp.name)):
                return False
        except StoreLockedError:
            return True
        except MemencError:  # anything else is for `plan` to report
            return False

    def attach(self, inp: BatchInput, entry: dict[str, Any], unit_ids: list[int]) -> _Video:
        """This shard's share (`unit_ids`) of a video a `prepare_only` pass created."""
        r = InputResult(inp.index, inp.video, entry["store"], masks=entry["masks"])
        r.frames, r.chunks_total = entry["frames"], entry["chunks"]
        v = _Video(r, shared=True)
        per_unit, f, t = entry["per_unit"], entry["chunk_frames"], entry["frames"]
        for k in unit_ids:
            chunks = tuple(range(k * per_unit, min((k + 1) * per_unit, entry["chunks"])))
            v.units[k] = WorkUnit(
                input=inp.index,
                unit=k,
                video=inp.video,
                masks=entry["masks"],
                store=entry["store"],
                chunks=chunks,
                objects=tuple(entry["objects"]),
                frames=sum(min((c + 1) * f, t) - c * f for c in chunks),
            )
        v.open_units = set(v.units)
        r.units, r.status = len(v.units), "running"
        self.frames_total += sum(u.frames for u in v.units.values())
        return v

    def _layout(self, inp: BatchInput) -> tuple[Any, str]:
        # the same planning as encode_video, so a batch store equals an encode store
        from memenc.pipeline.engine import (
            default_batch_size,
            open_run_masks,
            pick_device,
            plan_frames,
            plan_layout,
        )
        from memenc.pipeline.selection import parse_frames, parse_objects
        from memenc.pipeline.video import probe_video

        s = self.settings
        try:  # the command line's values were checked before: a failure here is the row's
            selection = parse_frames(inp.frames if inp.frames is not None else self.frames)
            object_ids = parse_objects(inp.objects if inp.objects is not None else self.objects)
        except UsageError as e:
            text = (
                str(e).replace("--frames ", "'frames' ", 1).replace("--objects ", "'objects' ", 1)
            )
            raise UsageError(f"{inp.row or 'manifest'}: the row's {text}") from None
        video_path = Path(inp.video)
        info = probe_video(video_path, timeout_s=s.decode_timeout_s)
        masks = masks_for(inp, self.masks_template)
        mask_source = open_run_masks(
            Path(masks), video_path, info, objects=object_ids, sav_step=s.sav_step,
            timeout_s=s.decode_timeout_s, selection=selection,
        )  # fmt: skip
        try:
            planned = plan_frames(info.frame_count, selection, mask_source, s.skip_unmasked)
            layout = plan_layout(
                self._model(), planned, video_path, info, mask_source, selection=selection,
                store_dtype=s.store_dtype, chunk_frames=s.chunk_frames, precision=s.precision,
                batch_size=s.batch_size or default_batch_size(pick_device(s.device)),
                device=s.device, decoders=s.decoders, compile=s.compile,
            )  # fmt: skip
        finally:
            mask_source.close()
        return layout, masks

    def _model(self) -> Any:
        """The model the coordinator lays stores out with (on the CPU; workers load their
        own on their device). Loaded on first use; downloads the checkpoint once."""
        if self.model is None:
            import torch

            self.model = _worker_model(self.settings, torch.device("cpu"))
        return self.model

    # ---- results

    def unit_done(self, v: _Video, unit: WorkUnit, result: UnitResult) -> None:
        v.result.chunks_written += result.chunks_written
        v.result.seconds += result.seconds
        self.frames_computed += result.frames
        v.open_units.discard(unit.unit)
        if result.worker and result.worker not in v.result.workers:
            v.result.workers.append(result.worker)
        if result.error:
            v.errors.append(result.error)

    def finish(self, v: _Video) -> None:
        """All units of a video are in: mark the store complete (or record the failure) and
        release its lock."""
        from memenc.store import CacheStore

        t = time.monotonic()
        try:
            if v.result.status == "running":
                if v.errors:
                    v.result.status, v.result.error = "failed", v.errors[0]
                elif v.shared:
                    v.result.status = _finalize_if_done(v.result.store)
                else:
                    try:
                        CacheStore.open_for_write(v.result.store).finalize()
                        v.result.status = "complete"
                    except MemencError as e:
                        v.result.status, v.result.error = "failed", _one_line(e)
        finally:
            v.lock.close()
            self.coordinator_s += time.monotonic() - t
            v.result.seconds = round(v.result.seconds, 3)
            self.videos_done += 1
            self.report()


def _finalize_if_done(path: str) -> str:
    """After a shard's share of a planned video: mark the store complete when every chunk
    is written (by whichever shard); ``complete`` or ``incomplete``."""
    from memenc.store import CacheStore, open_cache, store_lock

    try:
        with store_lock(path):
            if open_cache(path).status == "complete":
                return "complete"
            store = CacheStore.open_for_write(path)
            if store.pending_chunks():
                return "incomplete"
            store.finalize()
            return "complete"
    except StoreLockedError:  # another shard is finalizing it right now
        return "incomplete"


def _check_settings(settings: BatchSettings, frames: str | None, objects: str | None) -> None:
    """Every option checked before anything starts (as `encode_video` does)."""
    from memenc.encoders import get_variant
    from memenc.errors import CheckpointError
    from memenc.pipeline.decoders import check_decoders
    from memenc.pipeline.engine import (
        STORE_DTYPES,
        autocast_for,
        check_decode_timeout,
        check_image_size,
        choose_checkpoint,
        pick_device,
    )
    from memenc.pipeline.selection import parse_frames, parse_objects

    choose_checkpoint(settings.checkpoint, settings.weights)
    if settings.variant is not None:
        try:
            get_variant(settings.variant)
        except CheckpointError as e:
            raise UsageError(f"--variant: {e}") from None
    check_image_size(settings.image_size)
    if settings.batch_size is not None and settings.batch_size < 1:
        raise UsageError(f"--batch-size {settings.batch_size}: must be at least 1")
    if settings.chunk_frames is not None and settings.chunk_frames < 1:
        raise UsageError(f"--chunk-frames {settings.chunk_frames}: must be at least 1")
    check_decode_timeout(settings.decode_timeout_s)
    check_decoders(settings.decoders)
    autocast_for(pick_device(settings.device), settings.precision)
    if settings.store_dtype not in STORE_DTYPES:
        raise UsageError(f"--store-dtype {settings.store_dtype!r}: choose float16 or float32")
    parse_frames(frames)
    parse_objects(objects)


def _check_out(out: str) -> None:
    """A URL's fsspec backend must be installed (a usage error naming the extra) and keep
    what is written (not memory://, `check_kept_url`); a local
    --out must be a folder, or not exist yet under one, that this process can write in."""
    if _is_url(out):
        check_kept_url(out)  # workers in other processes: memory:// would not reach them
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a folder")
    there = Path(out).absolute()  # the folder, or the nearest of its parents that exists
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir():
        raise UsageError(f"--out {out}: {there} is not a folder")
    if not os.access(there, os.W_OK | os.X_OK):  # a read-only file system too
        read_only = bool(os.statvfs(there).f_flag & os.ST_RDONLY)
        why = "a read-only file system" if read_only else "permission denied"
        raise StoreError(f"--out {out}: cannot write in {there} ({why})")


def _check_masks_template(template: str) -> None:
    """Raise UsageError unless the template's fields are {parent}, {stem}, {name} and
    {video} alone (no attribute or index) and it formats."""
    known = ("parent", "stem", "name", "video")
    if not template.strip():
        raise UsageError(f"--masks-template {template!r}: empty; e.g. '{{parent}}/{{stem}}_masks'")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        unknown = [f for f in fields if f not in known]
        if not unknown:
            template.format(parent="p", stem="s", name="n", video="v")
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--masks-template {template!r}: {_one_line(e)}") from None
    if unknown:
        raise UsageError(
            f"--masks-template {template!r}: {{{unknown[0]}}} is not one of "
            "{parent}, {stem}, {name}, {video}"
        )


def run_batch(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    settings: BatchSettings | None = None,
    masks_template: str | None = None,
    frames: str | None = None,
    objects: str | None = None,
    unit_frames: int = DEFAULT_UNIT_FRAMES,
    workers: int | None = None,
    shard: str | tuple[int, int] | None = None,
    dask: str | None = None,
    retries: int = 2,
    finalize_only: bool = False,
    prepare_only: bool = False,
    verbose: bool = False,
    progress: Callable[[BatchProgress], None] | None = None,
) -> BatchSummary:
    """Encode every video of `inputs` into its own store under `out` (`memenc batch`).

    inputs: see `expand_inputs`. out: a folder or an fsspec URL (``s3://bucket/prefix``).
    settings: encode's model and store options (`BatchSettings`). masks_template: where
    masks are when not beside each video, e.g. ``"{parent}/{stem}_masks"``. frames /
    objects: the default selection (a manifest row may give its own).
    unit_frames: frames per work unit (rounded up to whole chunks); a longer video is
    split into several units. workers: local processes (None: one per GPU when there are
    several, else 1 = this process). shard: ``"I/N"``, ``"auto"`` (Slurm array) or
    (I, N): run only the videos with index ≡ I (mod N) — or, after a `prepare_only` pass
    (``<out>/batch-plan.json``), every N-th work unit of the planned videos, so a long
    video is shared by the shards too; the shard that writes a store's last chunk marks
    it complete. dask: a scheduler address or ``local[:N]``. retries: extra attempts for
    units that failed in a way that may be transient (a lost worker, I/O).
    finalize_only: run nothing; mark complete every store whose chunks are all written,
    and summarise. prepare_only: create every store (and the plan), compute nothing.
    progress: called with `BatchProgress`.

    Returns a `BatchSummary` (also written to ``<out>/batch-summary.json``, or
    ``batch-summary-shard-I-of-N.json`` for a shard). A bad video fails only itself.
    Raises UsageError for bad options or inputs, before any store is touched.
    """
    t0 = time.monotonic()
    settings = settings or BatchSettings()
    out = file_url_path(os.fspath(out))  # file:///data/caches -> /data/caches
    _check_out(out)
    if unit_frames < 1:
        raise UsageError(f"--unit-frames {unit_frames}: must be at least 1")
    if masks_template is not None:
        _check_masks_template(masks_template)
    if retries < 0:
        raise UsageError(f"--retries {retries}: must be 0 or more")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    if dask is not None and workers is not None and workers > 1:
        raise UsageError("--dask and --workers exclude each other (Dask has its own workers)")
    shard_ix = parse_shard(shard) if isinstance(shard, str) or shard is None else tuple(shard)
    if shard_ix is not None:
        parse_shard(f"{shard_ix[0]}/{shard_ix[1]}")
    all_inputs = expand_inputs(inputs)
    if finalize_only:
        return _finalize_all(all_inputs, out, t0)
    _check_settings(settings, frames, objects)
    shares: dict[int, tuple[dict[str, Any], list[int]]] = {}
    if prepare_only:
        shard_ix = None
    elif shard_ix is not None:
        shares = _plan_shares(out, all_inputs, shard_ix)
    chosen = [
        i
        for i in all_inputs
        if shard_ix is None or i.index in shares or i.index % shard_ix[1] == shard_ix[0]
    ]
    if shard_ix is not None:  # a planned video none of whose units fell to this shard
        chosen = [i for i in chosen if i.index not in shares or shares[i.index][1]]
    shard_text = f"{shard_ix[0]}/{shard_ix[1]}" if shard_ix else None

    coord = _Coordinator(
        settings,
        out,
        masks_template=masks_template,
        unit_frames=unit_frames,
        frames=frames,
        objects=objects,
        retries=retries,
        progress=progress,
    )
    coord.videos_total = len(chosen)
    if prepare_only:
        return _prepare_all(coord, chosen, t0)
    if workers is None and dask is None:
        workers = _default_workers(settings.device)
    executor: _Executor
    if dask is not None:
        executor = _DaskExecutor(settings, dask, verbose)
    elif workers and workers > 1:
        executor = _ProcessExecutor(settings, workers)
    else:
        executor = _InlineExecutor(settings, coord.add_frames)
    try:
        results = _drive(coord, executor, chosen, shares)
    except BaseException:
        executor.close(abort=True)
        raise
    executor.close()
    summary = BatchSummary(
        out=out,
        executor=executor.name,
        workers=executor.workers,
        shard=shard_text,
        inputs=results,
        seconds=time.monotonic() - t0,
        coordinator_seconds=coord.coordinator_s,
        frames_computed=coord.frames_computed,
    )
    name = (
        SUMMARY_FILE
        if shard_ix is None
        else f"batch-summary-shard-{shard_ix[0]}-of-{shard_ix[1]}.json"
    )
    _write_summary(out, name, summary)
    return summary


def _default_workers(device: str) -> int:
    if device not in ("auto", "cuda"):
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def _drive(
    coord: _Coordinator,
    executor: _Executor,
    chosen: list[BatchInput],
    shares: dict[int, tuple[dict[str, Any], list[int]]],
) -> list[InputResult]:
    """Plan videos a few ahead of the workers (or take this shard's share of a planned
    one), hand their units out, retry what may be transient, and finalize each video as
    its last unit comes back.

    A video whose store another process is writing (its lock held: a second batch or
    `memenc encode` on the same output) is set aside; its lock is tried every
    `LOCK_RETRY_S`, and once it is free the video is planned again: found complete
    (``skipped``) or resumed here. The wait holds no lock of this run, so two runs waiting
    on each other's stores both go on."""
    finished: queue.Queue[tuple[WorkUnit, Any]] = queue.Queue()
    videos: dict[int, _Video] = {}
    attempts: dict[tuple[int, int], int] = {}
    results: dict[int, InputResult] = {}
    # inline: one video at a time, finalized before the next starts
    ahead = 1 if isinstance(executor, _InlineExecutor) else max(2, 2 * executor.workers)
    todo = list(chosen)
    in_flight = 0
    waiting: dict[int, tuple[BatchInput, float]] = {}  # input, when to plan it again
    told: set[int] = set()  # inputs whose wait has been said

    def on_done(unit: WorkUnit, future: Any) -> None:
        finished.put((unit, future))

    def submit(unit: WorkUnit) -> None:
        nonlocal in_flight
        key = (unit.input, unit.unit)
        attempts[key] = attempts.get(key, 0) + 1
        in_flight += 1
        executor.submit(unit, on_done)

    coord.report()
    while todo or in_flight or not finished.empty() or waiting:
        now = time.monotonic()
        for index, (inp, at) in list(waiting.items()):
            if at > now:
                continue
            if coord.lock_held_elsewhere(inp):  # not planned again (probe, masks) until free
                waiting[index] = (inp, now + LOCK_RETRY_S)
            else:
                del waiting[index]
                todo.append(inp)
        # keep enough videos planned that no worker waits for the coordinator
        while todo and sum(len(v.open_units) for v in videos.values()) < ahead:
            inp = todo.pop(0)
            v = coord.attach(inp, *shares[inp.index]) if inp.index in shares else coord.plan(inp)
            if v.result.status == "waiting":
                if inp.index not in told:  # once a video: it may wait long, silently
                    told.add(inp.index)
                    warnings.warn(
                        f"{v.result.error}; waiting for it, then finishing or skipping it",
                        MemencWarning,
                        stacklevel=2,
                    )
                waiting[inp.index] = (inp, time.monotonic() + LOCK_RETRY_S)
                continue
            if not v.units:
                coord.finish(v)
                results[inp.index] = v.result
                continue
            videos[inp.index] = v
            for unit in v.units.values():
                submit(unit)
        if coord.waiting != len(waiting):
            coord.waiting = len(waiting)
            coord.report()
        if not in_flight and finished.empty():
            if waiting and not todo:  # nothing to do but wait for another process's lock
                time.sleep(max(0.0, min(at for _, at in waiting.values()) - time.monotonic()))
            continue
        try:  # a video set aside is planned again on time even while units run
            unit, future = finished.get(timeout=LOCK_RETRY_S if waiting else None)
        except queue.Empty:
            continue
        in_flight -= 1
        v = videos[unit.input]
        result, retry = _unit_outcome(unit, future, executor)
        key = (unit.input, unit.unit)
        if retry and attempts[key] <= coord.retries:
            submit(unit)
            continue
        v.result.attempts = max(v.result.attempts, attempts[key])
        coord.unit_done(v, unit, result)
        if not isinstance(executor, _InlineExecutor):
            coord.add_frames(result.frames)
        if not v.open_units:
            coord.finish(v)
            results[unit.input] = videos.pop(unit.input).result
    return [results[i.index] for i in chosen]


def _unit_outcome(unit: WorkUnit, future: Any, executor: _Executor) -> tuple[UnitResult, bool]:
    """(result, worth retrying): a lost worker or a transient error may be retried."""
    try:
        result = future.result()
    except Exception as e:  # the worker process died, or the cluster lost the task
        text = f"worker lost ({type(e).__name__}: {_one_line(e)})"
        return UnitResult(unit.input, unit.unit, error=text, transient=True), True
    return result, result.transient


def _prepare_all(coord: _Coordinator, chosen: list[BatchInput], t0: float) -> BatchSummary:
    """The prepare pass: create (or resume) every store and write the plan shards split
    units by: each planned video's store, masks, objects, chunks and unit size."""
    results, entries = [], []
    for inp in chosen:
        v = coord.plan(inp)
        v.lock.close()
        r = v.result
        if r.status == "waiting":  # a prepare pass does not wait: rerun it once that ends
            r.status = "failed"
        if r.status == "running":
            r.status = "prepared"
            first = next(iter(v.units.values()))
            entries.append(
                {
                    "index": inp.index,
                    "video": inp.video,
                    "store": r.store,
                    "masks": r.masks,
                    "objects": list(first.objects),
                    "frames": r.frames,
                    "chunks": r.chunks_total,
                    "chunk_frames": v.chunk_frames,
                    "per_unit": v.per_unit,
                }
            )
        results.append(r)
    summary = BatchSummary(
        out=coord.out,
        executor="prepare",
        workers=0,
        shard=None,
        inputs=results,
        seconds=time.monotonic() - t0,
        coordinator_seconds=coord.coordinator_s,
    )
    _write_json(coord.out, PLAN_FILE, {"inputs": entries})
    _write_summary(coord.out, SUMMARY_FILE, summary)
    return summary


# a plan entry's fields, as `_prepare_all` writes them, and their JSON types
_PLAN_FIELDS: dict[str, type | tuple[type, ...]] = {
    "index": int, "video": str, "store": str, "masks": (str, type(None)), "objects": list,
    "frames": int, "chunks": int, "chunk_frames": int, "per_unit": int,
}  # fmt: skip


def _check_plan(plan: Any, where: str) -> None:
    """Raise UsageError unless `plan` has the shape `_prepare_all` writes."""
    entries = plan.get("inputs") if isinstance(plan, dict) else None
    problem = None if isinstance(entries, list) else "no list of 'inputs'"
    for n, entry in enumerate(entries or []):
        if not isinstance(entry, dict):
            problem = f"input {n} is not an object"
        else:
            bad = [k for k, t in _PLAN_FIELDS.items() if not isinstance(entry.get(k, ...), t)]
            least = {"chunks": 0, "per_unit": 1, "chunk_frames": 1}
            bad += [k for k, m in least.items() if k not in bad and entry[k] < m]
            if bad:
                problem = f"input {n} has a missing or wrong {bad[0]!r}"
        if problem:
            break
    if problem:
        raise UsageError(
            f"{where}: not a batch plan memenc wrote ({problem}); run --prepare-only again"
        )


def _plan_shares(
    out: str, inputs: list[BatchInput], shard: tuple[int, int]
) -> dict[int, tuple[dict[str, Any], list[int]]]:
    """This shard's units of the planned videos: units are numbered across the plan, video
    by video, and shard I takes those numbered ≡ I (mod N). Empty without a plan."""
    plan = _read_json(out, PLAN_FILE)
    if plan is None:
        return {}
    _check_plan(plan, store_path(out, PLAN_FILE))
    by_index = {i.index: i for i in inputs}
    shares: dict[int, tuple[dict[str, Any], list[int]]] = {}
    g = 0
    for entry in plan["inputs"]:
        inp = by_index.get(entry["index"])
        if inp is None or inp.video != entry["video"]:
            raise UsageError(
                f"{store_path(out, PLAN_FILE)} was made for other inputs; "
                "run --prepare-only again with these inputs"
            )
        mine = []
        for k in range(-(-entry["chunks"] // entry["per_unit"])):
            if g % shard[1] == shard[0]:
                mine.append(k)
            g += 1
        shares[inp.index] = (entry, mine)
    return shares


def _finalize_all(inputs: list[BatchInput], out: str, t0: float) -> BatchSummary:
    """The finalize pass: mark complete every store whose markers are all set."""
    from memenc.store import CacheStore, store_lock

    results = []
    t = time.monotonic()
    for inp in inputs:
        path = store_path(out, inp.name)
        r = InputResult(inp.index, inp.video, path)
        if inp.error is not None:
            r.status, r.error, r.store = "failed", inp.error, ""
            results.append(r)
            continue
        try:
            with store_lock(path):
                from memenc.store import open_cache

                cache = open_cache(path)
                r.frames = cache.num_frames
                r.chunks_total = -(-cache.num_frames // cache.chunk_frames)
                if cache.status == "complete":
                    r.status = "skipped"
                else:
                    CacheStore.open_for_write(path).finalize()
                    r.status = "complete"
        except MemencError as e:
            r.status, r.error = "failed", _one_line(e)
        results.append(r)
    summary = BatchSummary(
        out=out,
        executor="finalize",
        workers=0,
        shard=None,
        inputs=results,
        seconds=time.monotonic() - t0,
        coordinator_seconds=time.monotonic() - t,
    )
    _write_summary(out, SUMMARY_FILE, summary, merge_shards=True)
    return summary


def _files(out: str) -> tuple[Callable[[str], str], Callable[..., Any], Callable[[str], list]]:
    """(join, open, glob) for files in the output folder, local or an fsspec URL."""
    if _is_url(out):
        import fsspec

        fs, root = fsspec.core.url_to_fs(out)
        return (lambda n: posixpath.join(root, n)), fs.open, fs.glob
    return (lambda n: os.path.join(out, n)), open, glob.glob


def _write_json(out: str, name: str, data: Any) -> None:
    join, opener, _ = _files(out)
    try:
        if not _is_url(out):
            Path(out).mkdir(parents=True, exist_ok=True)
        with opener(join(name), "w") as f:
            json.dump(data, f, indent=1)
    except OSError as e:
        from memenc.store.location import describe_os_error

        raise StoreError(f"{store_path(out, name)}: cannot write ({describe_os_error(e)})") from e


def _read_json(out: str, name: str) -> Any:
    """The JSON file `name` in the output folder, or None when there is none."""
    join, opener, _ = _files(out)
    try:
        with opener(join(name), "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"{store_path(out, name)}: cannot read ({_one_line(e)})") from None


def _write_summary(
    out: str, name: str, summary: BatchSummary, *, merge_shards: bool = False
) -> None:
    """Write the summary JSON into the output folder (local or fsspec URL). The finalize
    pass carries over the shards' error messages for stores it could not complete."""
    data = summary.to_dict()
    join, opener, lister = _files(out)
    if merge_shards:
        shard_errors: dict[str, str] = {}
        for p in sorted(lister(join("batch-summary-shard-*.json"))):
            with contextlib.suppress(OSError, ValueError), opener(p, "r") as f:
                for r in json.load(f).get("inputs", []):
                    if r.get("error"):
                        shard_errors[r["input"]] = r["error"]
        for r in data["inputs"]:
            if r["status"] == "failed" and r["input"] in shard_errors:
                r["error"] = shard_errors[r["input"]]
    _write_json(out, name, data)
