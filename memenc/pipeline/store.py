"""The memenc memory-cache store: one Zarr v3 group per video (schema memenc.memory-cache/2).

The schema — array names, dimension names, dtypes, chunking, codecs and attributes — is
declared once, in `ARRAYS` below, and everything else (creation, validation on open, the
reader) derives from it.

Who writes what (see RELIABILITY.md, Zarr section):

- The coordinator calls `CacheStore.prepare` once: it creates every array and the small
  ones' data, and writes the group attributes (status ``in_progress``). It is the only
  writer of metadata and attributes, and the only caller of `CacheStore.finalize`, which
  checks every ``chunk_done`` marker and then writes status ``complete``.
- Workers (in this process or others) call `CacheStore.open_for_write` and
  `CacheStore.write_chunk`: they write whole frame-chunks only, data first, then that
  chunk's ``chunk_done`` entry. ``chunk_done`` is chunked by 1, so two workers never
  share a Zarr chunk.
- Resume trusts only the markers: a chunk never written reads as the fill value without
  error, so data without its marker is redone.

Every array's codec chain ends with a CRC32C checksum, so a damaged chunk raises on read
instead of returning wrong numbers.

Paths are local directories, ``file://`` URLs or fsspec URLs (``s3://…``); the write lock
exists only for local paths (see `store_lock`).

Schema versions: ``/2`` added ``obj_ptr`` (SAM 2's object pointers). Stores of ``/1`` still
open for reading (`READABLE_SCHEMAS`; they have no pointers), never for writing or resuming.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import Crc32cCodec, ZstdCodec

from memenc.errors import StoreError, StoreLockedError
from memenc.pipeline.faults import kill_point

try:  # POSIX only; without it local stores are not locked.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ARRAYS",
    "ATTRS_KEY",
    "READABLE_SCHEMAS",
    "SCHEMA",
    "STORE_DTYPES",
    "ArraySpec",
    "CacheStore",
    "StoreLayout",
    "default_chunk_frames",
    "fingerprint",
    "store_lock",
]

SCHEMA = "memenc.memory-cache/2"
# --- issue 9 (obj_ptr): older schemas that still open read-only, and the version of each
READABLE_SCHEMAS = {"memenc.memory-cache/1": 1, SCHEMA: 2}
PTR_DIM = 256  # SAM 2's hidden_dim: one object pointer per frame and object
# --- end issue 9
ATTRS_KEY = "memenc"
"""Group attribute under which memenc keeps its attributes."""

STATUS_CREATING = "creating"  # prepare started but did not finish: nothing in it is usable
STATUS_IN_PROGRESS = "in_progress"
STATUS_COMPLETE = "complete"

STORE_DTYPES = ("float16", "float32")
MEM_DIM = 64  # SAM 2's memory channel count (mem_dim)
TPOS_SLOTS = 7  # SAM 2's num_maskmem
LOCK_FILE = ".memenc.lock"

# Attribute keys memenc writes itself; a caller's attrs may repeat them only with equal values.
_OWNED_KEYS = ("schema", "memenc_version", "status", "fingerprint", "storage_dtype", "chunk_frames")

_CHUNK_FRAMES = -1  # in ArraySpec.chunking: "this dimension is chunked by F frames"
_STORE_DTYPE = "store"  # in ArraySpec.dtype: "the layout's store_dtype"

# Zstd for size, then CRC32C over the compressed bytes: a flipped bit fails the read.
_COMPRESSORS = (ZstdCodec(level=3), Crc32cCodec())


@dataclass(frozen=True)
class ArraySpec:
    """One array of the schema.

    ``chunking`` maps a dimension to its chunk length (``_CHUNK_FRAMES`` for F); a
    dimension not named there is stored whole. ``written_by`` is ``"coordinator"`` (data
    written by `CacheStore.prepare`) or ``"worker"`` (written chunk by chunk).
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    chunking: Mapping[str, int] = field(default_factory=dict)
    written_by: str = "coordinator"
    optional: bool = False
    since: int = 1  # the schema version that added the array (issue 9)

    def resolved_dtype(self, store_dtype: str) -> np.dtype:
        return np.dtype(store_dtype if self.dtype == _STORE_DTYPE else self.dtype)

    def fill_value(self, store_dtype: str) -> float | int:
        """NaN for floats, so data never written is visibly missing to plain readers."""
        return math.nan if self.resolved_dtype(store_dtype).kind == "f" else 0

    def shape(self, layout: StoreLayout) -> tuple[int, ...]:
        return tuple(layout.dim_sizes[d] for d in self.dims)

    def chunks(self, layout: StoreLayout) -> tuple[int, ...]:
        out = []
        for dim, size in zip(self.dims, self.shape(layout), strict=True):
            c = self.chunking.get(dim, size)
            out.append(layout.chunk_frames if c == _CHUNK_FRAMES else c)
        return tuple(max(1, c) for c in out)


# The schema, memenc.memory-cache/2. Frame-chunked arrays share F, so one frame-chunk is
# one Zarr chunk per object of maskmem_features plus one chunk each of the others.
ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec(
        "maskmem_features",
        ("frame", "object", "channel", "y", "x"),
        _STORE_DTYPE,
        {"frame": _CHUNK_FRAMES, "object": 1},
        written_by="worker",
    ),
    ArraySpec("maskmem_pos_enc", ("channel", "y", "x"), "float32"),
    ArraySpec(
        "object_score_logits",
        ("frame", "object"),
        "float32",
        {"frame": _CHUNK_FRAMES},
        written_by="worker",
    ),
    # issue 9: SAM 2's object pointer per frame and object, chunked like the scores. Its
    # channel dimension has its own name: xarray wants one size per dimension name.
    ArraySpec(
        "obj_ptr",
        ("frame", "object", "pointer_channel"),
        "float32",
        {"frame": _CHUNK_FRAMES},
        written_by="worker",
        since=2,
    ),
    ArraySpec("frame_index", ("frame",), "int64", {"frame": _CHUNK_FRAMES}),
    ArraySpec("timestamp", ("frame",), "float64", {"frame": _CHUNK_FRAMES}, written_by="worker"),
    ArraySpec("object_id", ("object",), "int32"),
    ArraySpec("maskmem_tpos_enc", ("slot", "channel"), "float32", optional=True),
    ArraySpec("chunk_done", ("chunk",), "uint8", {"chunk": 1}, written_by="worker"),
)
_SPECS = {spec.name: spec for spec in ARRAYS}


# --------------------------------------------------------------------------- helpers


def default_chunk_frames(num_objects: int, h: int, w: int, dtype: Any) -> int:
    """Frames per chunk F so that one chunk of ``maskmem_features`` is about 2 MB.

    Args:
        num_objects: number of objects O (a chunk holds one object, so O does not change F;
            it is checked to be at least 1).
        h, w: feature map size (S/16).
        dtype: the store dtype (``"float16"``, ``np.float32``, ``torch.float16`` …).

    Returns:
        F ≥ 1; a chunk of shape (F, 1, 64, h, w) is 1–4 MB unless one frame alone is larger.

    Raises:
        ValueError: on a non-positive size.
    """
    if num_objects < 1 or h < 1 or w < 1:
        raise ValueError(f"num_objects, h and w must be ≥ 1, got {num_objects}, {h}, {w}")
    itemsize = np.dtype(_dtype_name(dtype)).itemsize
    frame_bytes = MEM_DIM * h * w * itemsize
    return max(1, (2 * 1024 * 1024) // frame_bytes)


def _dtype_name(dtype: Any) -> str:
    """'float16' for "float16", np.float16, np.dtype("float16") or torch.float16."""
    text = str(dtype)
    if text.startswith("torch."):
        return text.removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return text


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"not JSON-serialisable: {value!r} ({type(value).__name__})")


def _canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default
    )


def _json_safe(value: Any) -> Any:
    """The value as it reads back from JSON (paths → str, tuples → lists, numpy → Python)."""
    return json.loads(_canonical_json(value))


def fingerprint(settings: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of everything that determines a store's data.

    Canonical: keys sorted, no whitespace; paths become strings, numpy scalars and arrays
    Python values, tuples lists. Equal settings give equal fingerprints whatever the key
    order.

    Raises:
        TypeError: a value that has no JSON form.
        ValueError: a NaN or infinite float.
    """
    return hashlib.sha256(_canonical_json(dict(settings)).encode()).hexdigest()


def _memenc_version() -> str:
    import memenc

    version = getattr(memenc, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("memenc")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


def _describe_os_error(exc: OSError) -> str:
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.ENOTDIR:
        return "a parent of this path is not a directory"
    return exc.strerror or str(exc)


def _chunk_ranges(chunks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts: list[str] = []
    start = prev = None
    for c in chunks:
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = c
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True, eq=False)
class StoreLayout:
    """Everything needed to create a store's metadata.

    Attributes:
        num_frames: T, rows of the store.
        object_ids: the O object ids, in store order.
        feat_hw: (h, w) of the feature maps (S/16, S/16).
        store_dtype: ``"float16"`` or ``"float32"`` for ``maskmem_features``.
        chunk_frames: F, frames per chunk.
        frame_index: int64 [T], the source frame number of each row.
        pos_enc: float32 [64, h, w].
        tpos_enc: float32 [7, 64] (the checkpoint's [7, 1, 1, 64] is accepted), or None.
        attrs: JSON-safe settings stored under the ``memenc`` attribute (source video, frame
            selection, model, masks, memory settings …).
        fingerprint: `fingerprint` of the settings that determine the data.
        identity: optional; maps stored attributes to the fingerprinted settings among them
            (`RunSettings.stored_identity`), so a refusal names the settings that differ.
            Without it every attribute is compared.

    Raises:
        ValueError: on inconsistent sizes or shapes (a bug in the caller).
    """

    num_frames: int
    object_ids: Sequence[int]
    feat_hw: tuple[int, int]
    store_dtype: str
    chunk_frames: int
    frame_index: np.ndarray
    pos_enc: np.ndarray
    tpos_enc: np.ndarray | None
    attrs: Mapping[str, Any]
    fingerprint: str
    identity: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once
        set_(self, "object_ids", tuple(int(i) for i in self.object_ids))
        set_(self, "feat_hw", (int(self.feat_hw[0]), int(self.feat_hw[1])))
        set_(self, "store_dtype", _dtype_name(self.store_dtype))
        set_(self, "frame_index", np.asarray(self.frame_index))
        set_(self, "pos_enc", np.asarray(self.pos_enc, dtype=np.float32))
        h, w = self.feat_hw
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be ≥ 1, got {self.num_frames}")
        if not self.object_ids:
            raise ValueError("object_ids is empty")
        if len(set(self.object_ids)) != len(self.object_ids):
            raise ValueError(f"object_ids has duplicates: {list(self.object_ids)}")
        if h < 1 or w < 1:
            raise ValueError(f"feat_hw must be positive, got {self.feat_hw}")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {self.store_dtype}")
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be ≥ 1, got {self.chunk_frames}")
        if self.frame_index.shape != (self.num_frames,) or self.frame_index.dtype.kind not in "iu":
            raise ValueError(
                f"frame_index must be integers of shape ({self.num_frames},), "
                f"got {self.frame_index.dtype} {self.frame_index.shape}"
            )
        set_(self, "frame_index", self.frame_index.astype(np.int64))
        if self.pos_enc.shape != (MEM_DIM, h, w):
            raise ValueError(f"pos_enc must be [{MEM_DIM}, {h}, {w}], got {self.pos_enc.shape}")
        if self.tpos_enc is not None:
            tpos = np.asarray(self.tpos_enc, dtype=np.float32)
            if tpos.size != TPOS_SLOTS * MEM_DIM:
                raise ValueError(f"tpos_enc must be [{TPOS_SLOTS}, {MEM_DIM}], got {tpos.shape}")
            set_(self, "tpos_enc", tpos.reshape(TPOS_SLOTS, MEM_DIM))  # [7,1,1,64] -> [7,64]
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise ValueError("fingerprint must be a non-empty string")
        attrs = _json_safe(dict(self.attrs))
        for key, ours in self._owned_attrs(STATUS_IN_PROGRESS).items():
            if key in attrs and attrs[key] != ours:
                raise ValueError(f"attrs[{key!r}] = {attrs[key]!r} conflicts with {ours!r}")
        set_(self, "attrs", attrs)

    @property
    def num_objects(self) -> int:
        return len(self.object_ids)

    @property
    def num_chunks(self) -> int:
        """ceil(T / F)."""
        return -(-self.num_frames // self.chunk_frames)

    @property
    def dim_sizes(self) -> dict[str, int]:
        h, w = self.feat_hw
        return {
            "frame": self.num_frames,
            "object": self.num_objects,
            "channel": MEM_DIM,
            "pointer_channel": PTR_DIM,
            "y": h,
            "x": w,
            "slot": TPOS_SLOTS,
            "chunk": self.num_chunks,
        }

    def chunk_rows(self, chunk: int) -> range:
        """Rows of frame-chunk ``chunk``; IndexError outside [0, num_chunks)."""
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} out of range [0, {self.num_chunks})")
        start = chunk * self.chunk_frames
        return range(start, min(start + self.chunk_frames, self.num_frames))

    def _owned_attrs(self, status: str) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "memenc_version": _memenc_version(),
            "status": status,
            "fingerprint": self.fingerprint,
            "storage_dtype": self.store_dtype,
            "chunk_frames": self.chunk_frames,
        }

    def group_attrs(self, status: str) -> dict[str, Any]:
        """The ``memenc`` group attribute for this layout with the given status."""
        return {**self.attrs, **self._owned_attrs(status)}


# --------------------------------------------------------------------------- locations


class _Location:
    """A store path: a local directory, or an fsspec URL."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        text = os.fspath(path)
        self.text = text
        if "://" in text and not text.startswith("file://"):
            import fsspec

            from memenc.pipeline.urls import check_url

            check_url(text)  # a missing backend is a usage error naming the extra
            self.local: Path | None = None
            self.fs, self.fs_path = fsspec.core.url_to_fs(text)
        else:
            self.local = Path(text.removeprefix("file://"))

    def __str__(self) -> str:
        return self.text

    def lock_key(self) -> str | None:
        return os.path.realpath(self.local) if self.local is not None else None

    def zarr_store(self, *, read_only: bool) -> zarr.storage.StoreLike:
        if self.local is not None:
            return zarr.storage.LocalStore(self.local, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.text, read_only=read_only)

    def kind(self) -> str:
        """'absent', 'empty' (a directory with nothing but a lock file), 'zarr' (has a
        zarr.json), 'file' (not a directory) or 'other' (a directory of something else)."""
        try:
            if self.local is not None:
                if not self.local.exists() and not self.local.is_symlink():
                    return "absent"
                if not self.local.is_dir():
                    return "file"
                names = {p.name for p in self.local.iterdir()}
            else:
                if not self.fs.exists(self.fs_path):
                    return "absent"
                if self.fs.isfile(self.fs_path):
                    return "file"
                names = {
                    p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.fs_path, detail=False)
                }
        except OSError as exc:
            raise StoreError(f"{self}: cannot read: {_describe_os_error(exc)}") from exc
        names.discard(LOCK_FILE)
        if "zarr.json" in names:
            return "zarr"
        return "other" if names else "empty"

    def make_dir(self) -> None:
        try:
            if self.local is not None:
                self.local.mkdir(parents=True, exist_ok=True)
            else:
                self.fs.makedirs(self.fs_path, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self}: cannot create store: {_describe_os_error(exc)}") from exc

    def clear(self) -> None:
        """Delete everything in the store directory except the lock file."""
        try:
            if self.local is not None:
                for child in self.local.iterdir():
                    if child.name == LOCK_FILE:
                        continue
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            elif self.fs.exists(self.fs_path):
                self.fs.rm(self.fs_path, recursive=True)
        except OSError as exc:
            raise StoreError(f"{self}: cannot delete old store: {_describe_os_error(exc)}") from exc

    def remove_partials(self) -> int:
        """Delete zarr's ``*.partial`` temp files left by killed writers; return the count."""
        if self.local is None:
            return 0  # object stores write whole objects; no temp files
        removed = 0
        try:
            for tmp in self.local.rglob("*.partial"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
                    removed += 1
        except OSError as exc:
            raise StoreError(
                f"{self}: cannot remove leftover temp files: {_describe_os_error(exc)}"
            ) from exc
        return removed


def _open_group(loc: _Location, mode: str) -> zarr.Group:
    """Open an existing group with an explicit mode ('r' or 'r+'), never creating one."""
    assert mode in ("r", "r+")
    try:
        group = zarr.open_group(store=loc.zarr_store(read_only=mode == "r"), mode=mode)
    except OSError as exc:
        raise StoreError(f"{loc}: cannot open store: {_describe_os_error(exc)}") from exc
    except (ValueError, KeyError, TypeError) as exc:  # zarr's errors are ValueErrors
        raise StoreError(f"{loc}: not a memenc store ({exc})") from exc
    return group


def _memenc_attrs(group: zarr.Group) -> dict[str, Any] | None:
    attrs = group.attrs.asdict().get(ATTRS_KEY)
    if isinstance(attrs, dict) and str(attrs.get("schema", "")).startswith("memenc."):
        return attrs
    return None


def _open_existing(loc: _Location, mode: str) -> tuple[zarr.Group, dict[str, Any]]:
    """Open a store memenc made, read-only (`mode` "r") or for chunk writes ("r+"), and
    return its group and ``memenc`` attributes. Raises StoreError when there is no store,
    the path is something else, or its schema is not this version's (for reading: not
    one of `READABLE_SCHEMAS`)."""
    kind = _check_memenc_location(loc)
    if kind in ("absent", "empty"):
        raise StoreError(f"{loc}: no memenc store here")
    group = _open_group(loc, mode)
    attrs = _memenc_attrs(group) or {}
    if attrs.get("schema") != SCHEMA and (
        mode != "r" or attrs.get("schema") not in READABLE_SCHEMAS
    ):
        raise StoreError(
            f"{loc}: store schema {attrs.get('schema')!r} is not {SCHEMA!r} "
            "(made by another memenc version)"
        )
    return group, attrs


def _check_memenc_location(loc: _Location) -> str:
    """Return the location's kind, refusing anything that is not absent/empty/a memenc store."""
    kind = loc.kind()
    if kind == "file":
        raise StoreError(f"{loc}: exists and is not a directory, so not a memenc store")
    if kind == "other":
        raise StoreError(f"{loc}: is a directory without zarr.json, not a memenc store")
    if kind == "zarr" and _memenc_attrs(_open_group(loc, "r")) is None:
        raise StoreError(f"{loc}: is a Zarr store but not a memenc cache (no '{ATTRS_KEY}' schema)")
    return kind


# --------------------------------------------------------------------------- lock


@dataclass
class _HeldLock:
    fd: int
    thread: int
    depth: int


_held_locks: dict[str, _HeldLock] = {}
_held_guard = threading.Lock()


def _read_lock_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def store_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the store's exclusive write lock for the duration of the ``with`` block.

    The lock is ``flock`` on ``<store>/.memenc.lock``; the kernel releases it when the
    holder dies, however it dies. It does not wait: a lock held elsewhere raises at once.
    Re-entrant within one thread, so `CacheStore.prepare` (which locks itself) can run
    inside it. For full protection take it before `CacheStore.prepare`::

        with store_lock(path):
            store = CacheStore.prepare(path, layout)
            ...
            store.finalize()

    A path that does not exist yet is created (as an empty directory holding the lock
    file). fsspec URLs and systems without ``fcntl`` are not locked.

    Raises:
        StoreLockedError: another process (or another thread of this one) holds the lock.
        StoreError: the path is not a memenc store, or the lock file cannot be created.
    """
    loc = path if isinstance(path, _Location) else _Location(path)
    key = loc.lock_key()
    if key is None or fcntl is None:
        yield
        return
    _check_memenc_location(loc)  # never drop a lock file into someone else's directory
    loc.make_dir()
    me = threading.get_ident()
    with _held_guard:
        held = _held_locks.get(key)
        if held is not None:
            if held.thread != me:
                raise StoreLockedError(
                    f"{loc}: store is being written by another process (pid {os.getpid()}, "
                    "another thread of this process)"
                )
            held.depth += 1
        else:
            lock_path = os.path.join(key, LOCK_FILE)
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise StoreError(
                    f"{loc}: cannot create lock file: {_describe_os_error(exc)}"
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_lock_pid(fd)
                os.close(fd)
                raise StoreLockedError(
                    f"{loc}: store is being written by another process (pid {pid})"
                ) from None
            except OSError as exc:
                os.close(fd)
                raise StoreError(f"{loc}: cannot lock: {_describe_os_error(exc)}") from exc
            with contextlib.suppress(OSError):  # the pid is only for the message
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            held = _HeldLock(fd=fd, thread=me, depth=1)
            _held_locks[key] = held
    try:
        yield
    finally:
        with _held_guard:
            held.depth -= 1
            if held.depth == 0:
                del _held_locks[key]
                fcntl.flock(held.fd, fcntl.LOCK_UN)
                os.close(held.fd)


# --------------------------------------------------------------------------- the store


def _layout_from_group(group: zarr.Group, loc: _Location) -> StoreLayout:
    """Rebuild the layout of an existing store and check every array against the schema.

    Raises:
        StoreError: an array is missing, or its shape, dtype, chunks or dimension names do
            not match the schema.
    """
    attrs = _memenc_attrs(group) or {}
    version = READABLE_SCHEMAS.get(attrs.get("schema"), READABLE_SCHEMAS[SCHEMA])
    try:
        arrays = {
            name: group[name]
            for name, spec in _SPECS.items()
            if name in group or not (spec.optional or spec.since > version)
        }
    except KeyError as exc:
        raise StoreError(f"{loc}: malformed store: array {exc} is missing") from exc
    try:
        features = arrays["maskmem_features"]
        frame_index = arrays["frame_index"][:]
        pos_enc = arrays["maskmem_pos_enc"][:]
        tpos = arrays["maskmem_tpos_enc"][:] if "maskmem_tpos_enc" in arrays else None
        object_ids = arrays["object_id"][:]
        layout = StoreLayout(
            num_frames=features.shape[0],
            object_ids=object_ids.tolist(),
            feat_hw=(features.shape[3], features.shape[4]),
            store_dtype=str(features.dtype),
            chunk_frames=features.chunks[0],
            frame_index=frame_index,
            pos_enc=pos_enc,
            tpos_enc=tpos,
            attrs={k: v for k, v in attrs.items() if k not in _OWNED_KEYS},
            fingerprint=str(attrs.get("fingerprint") or "?"),
        )
    except (ValueError, IndexError, TypeError, OSError) as exc:
        raise StoreError(f"{loc}: malformed or damaged store: {exc}") from exc
    for name, array in arrays.items():
        spec = _SPECS[name]
        want = (
            spec.shape(layout),
            spec.chunks(layout),
            spec.resolved_dtype(layout.store_dtype),
            spec.dims,
        )
        have = (
            array.shape,
            array.chunks,
            np.dtype(str(array.dtype)),
            array.metadata.dimension_names,
        )
        if want != have:
            raise StoreError(
                f"{loc}: malformed store: {name} has shape/chunks/dtype/dims {have}, "
                f"schema says {want}"
            )
    return layout


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


class CacheStore:
    """Write access to one memenc store. Make it with `prepare` (coordinator) or
    `open_for_write` (workers), not directly."""

    def __init__(self, loc: _Location, group: zarr.Group, layout: StoreLayout) -> None:
        self._loc = loc
        self._group = group
        self._layout = layout
        self._attrs: dict[str, Any] = dict(_memenc_attrs(group) or {})
        self._arrays = {name: group[name] for name in _SPECS if name in group}

    # ---- making one

    @classmethod
    def prepare(
        cls, path: str | os.PathLike[str], layout: StoreLayout, *, overwrite: bool = False
    ) -> CacheStore:
        """Create the store, or resume it (coordinator side; takes the lock while it works).

        - New path (or an empty directory): creates every array, writes ``frame_index``,
          ``maskmem_pos_enc``, ``object_id``, ``maskmem_tpos_enc`` (when given), and the
          ``memenc`` attributes with status ``in_progress``.
        - ``in_progress`` store with the same fingerprint and layout: resumed, data kept;
          `pending_chunks` lists what is left.
        - ``complete`` store with the same fingerprint and layout: returned as is, nothing
          pending (`finalize` is then a no-op).
        - Anything else memenc made (other fingerprint, layout or schema version, or a
          creation that was cut short) is deleted and recreated when ``overwrite`` is true.

        Leftover ``*.partial`` temp files (from killed writers) are removed.

        Args:
            path: a directory path, ``file://`` or fsspec URL.
            layout: the store's layout, attributes and fingerprint.
            overwrite: replace an existing memenc store made with other settings.

        Returns:
            The store, open for writing.

        Raises:
            StoreError: the store was made with other settings (without ``overwrite``); the
                path exists but is not a memenc store (never touched, even with
                ``overwrite``); the path cannot be created or written (permission denied …).
            StoreLockedError: another process holds the store's lock.
        """
        loc = _Location(path)
        with store_lock(loc):
            kind = _check_memenc_location(loc)
            if kind == "zarr":
                group = _open_group(loc, "r+")
                attrs = _memenc_attrs(group) or {}
                if overwrite or attrs.get("status") == STATUS_CREATING:
                    loc.clear()
                else:
                    store = cls._resume(loc, group, attrs, layout)
                    loc.remove_partials()
                    return store
            loc.remove_partials()
            return cls._create(loc, layout)

    @classmethod
    def _resume(
        cls, loc: _Location, group: zarr.Group, attrs: dict[str, Any], layout: StoreLayout
    ) -> CacheStore:
        differs: list[str] = []
        if attrs.get("schema") != SCHEMA:
            differs.append(f"schema {attrs.get('schema')!r}")
        try:
            old = _layout_from_group(group, loc)
        except StoreError as exc:
            raise StoreError(f"{exc}; use --overwrite") from exc
        for name in ("num_frames", "object_ids", "feat_hw", "store_dtype", "chunk_frames"):
            if getattr(old, name) != getattr(layout, name):
                differs.append(name)
        if old.num_frames == layout.num_frames and not np.array_equal(
            old.frame_index, layout.frame_index
        ):
            differs.append("frame_index")
        if attrs.get("fingerprint") != layout.fingerprint:
            if layout.identity is not None:  # only the settings the fingerprint covers
                before = _flat(dict(layout.identity(attrs)))
                after = _flat(dict(layout.identity(layout.attrs)))
            else:
                before = _flat(old.attrs)
                after = _flat(layout.attrs)
            keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            differs.extend(keys or ["fingerprint"])
        if attrs.get("status") not in (STATUS_IN_PROGRESS, STATUS_COMPLETE):
            differs.append(f"status {attrs.get('status')!r}")
        if differs:
            shown = ", ".join(differs[:8]) + (", …" if len(differs) > 8 else "")
            raise StoreError(
                f"{loc}: store was made with other settings ({shown} differ); use --overwrite"
            )
        return cls(loc, group, old)

    @classmethod
    def _create(cls, loc: _Location, layout: StoreLayout) -> CacheStore:
        loc.make_dir()
        try:
            group = zarr.create_group(
                loc.zarr_store(read_only=False),
                zarr_format=3,
                attributes={ATTRS_KEY: layout.group_attrs(STATUS_CREATING)},
            )
            for spec in ARRAYS:
                if spec.optional and layout.tpos_enc is None:
                    continue
                group.create_array(
                    spec.name,
                    shape=spec.shape(layout),
                    dtype=spec.resolved_dtype(layout.store_dtype),
                    chunks=spec.chunks(layout),
                    compressors=_COMPRESSORS,
                    fill_value=spec.fill_value(layout.store_dtype),
                    dimension_names=spec.dims,
                )
            group["frame_index"][:] = layout.frame_index
            group["maskmem_pos_enc"][:] = layout.pos_enc
            group["object_id"][:] = np.asarray(layout.object_ids, dtype=np.int32)
            if layout.tpos_enc is not None:
                group["maskmem_tpos_enc"][:] = layout.tpos_enc
            # Written last: until here the store says "creating" and a rerun starts over.
            group.attrs[ATTRS_KEY] = layout.group_attrs(STATUS_IN_PROGRESS)
        except OSError as exc:
            raise StoreError(f"{loc}: cannot create store: {_describe_os_error(exc)}") from exc
        return cls(loc, group, layout)

    @classmethod
    def open_for_write(cls, path: str | os.PathLike[str]) -> CacheStore:
        """Open an ``in_progress`` store to write chunks (worker side; no metadata writes,
        no lock — the coordinator holds it).

        Raises:
            StoreError: the path is not a memenc store, is malformed, is not
                ``in_progress`` (creation unfinished, or already complete), or has another
                schema version.
        """
        loc = _Location(path)
        group, attrs = _open_existing(loc, "r+")
        status = attrs.get("status")
        if status != STATUS_IN_PROGRESS:
            raise StoreError(f"{loc}: store is {status!r}, not in_progress; nothing to write")
        return cls(loc, group, _layout_from_group(group, loc))

    # ---- properties

    @property
    def path(self) -> str:
        return str(self._loc)

    @property
    def layout(self) -> StoreLayout:
        return self._layout

    @property
    def status(self) -> str:
        """``in_progress`` or ``complete`` (as this object last wrote or read it)."""
        return str(self._attrs.get("status"))

    @property
    def attrs(self) -> dict[str, Any]:
        """A copy of the ``memenc`` group attribute."""
        return json.loads(json.dumps(self._attrs))

    @property
    def num_chunks(self) -> int:
        return self._layout.num_chunks

    # ---- work

    @contextlib.contextmanager
    def lock(self) -> Iterator[CacheStore]:
        """`store_lock` on this store: ``with store.lock(): …``. Yields the store.

        Raises:
            StoreLockedError: another process holds the lock.
        """
        with store_lock(self._loc):
            yield self

    def _done_markers(self) -> np.ndarray:
        try:
            return np.asarray(self._arrays["chunk_done"][:])
        except OSError as exc:
            raise StoreError(
                f"{self._loc}: cannot read chunk_done: {_describe_os_error(exc)}"
            ) from exc
        except (ValueError, RuntimeError) as exc:
            raise StoreError(f"{self._loc}: chunk_done is damaged: {exc}") from exc

    def pending_chunks(self) -> list[int]:
        """Frame-chunks whose ``chunk_done`` marker is not set, ascending.

        Raises:
            StoreError: the markers cannot be read.
        """
        return [int(i) for i in np.flatnonzero(self._done_markers() != 1)]

    def chunk_rows(self, chunk: int) -> range:
        """Store rows covered by frame-chunk ``chunk`` (the last one may be short).

        Raises:
            IndexError: ``chunk`` outside [0, num_chunks).
        """
        return self._layout.chunk_rows(chunk)

    def write_chunk(
        self,
        chunk: int,
        features: np.ndarray,
        scores: np.ndarray,
        timestamps: np.ndarray,
        pointers: np.ndarray,
    ) -> None:
        """Write one whole frame-chunk, then set its ``chunk_done`` marker.

        Args:
            chunk: the frame-chunk index.
            features: [n, O, 64, h, w] float, n = len(chunk_rows(chunk)); cast to the store
                dtype.
            scores: [n, O] object score logits.
            timestamps: [n] seconds.
            pointers: [n, O, 256] object pointers (``obj_ptr``), stored as float32.

        Raises:
            IndexError: ``chunk`` out of range.
            ValueError: an argument has the wrong shape.
            StoreError: non-finite features or pointers, features that overflow float16, the store is
                already complete, or the write failed (disk full, permission …). The marker
                stays unset in every such case.
        """
        rows = self.chunk_rows(chunk)
        layout = self._layout
        n, h, w = len(rows), *layout.feat_hw
        features = np.asarray(features)
        scores = np.asarray(scores)
        timestamps = np.asarray(timestamps)
        pointers = np.asarray(pointers, dtype=np.float32)
        expected = {
            "features": (features, (n, layout.num_objects, MEM_DIM, h, w)),
            "scores": (scores, (n, layout.num_objects)),
            "timestamps": (timestamps, (n,)),
            "pointers": (pointers, (n, layout.num_objects, PTR_DIM)),
        }
        for name, (value, shape) in expected.items():
            if value.shape != shape:
                raise ValueError(
                    f"chunk {chunk}: {name} must have shape {shape}, got {value.shape}"
                )
        if self.status == STATUS_COMPLETE:
            raise StoreError(f"{self._loc}: store is complete; refusing to rewrite chunk {chunk}")
        with np.errstate(over="ignore", invalid="ignore"):
            stored = features.astype(layout.store_dtype, copy=False)
        if not np.isfinite(stored).all():
            where = f"rows {rows.start}-{rows.stop - 1} (chunk {chunk})"
            if np.isfinite(features).all():
                peak = float(np.abs(features).max())
                raise StoreError(
                    f"{self._loc}: features in {where} exceed the float16 range "
                    f"(max |x| = {peak:.4g}); use --store-dtype float32"
                )
            raise StoreError(f"{self._loc}: non-finite (NaN/inf) features in {where}")
        if not np.isfinite(pointers).all():
            raise StoreError(
                f"{self._loc}: non-finite (NaN/inf) object pointers in rows "
                f"{rows.start}-{rows.stop - 1} (chunk {chunk})"
            )
        sel = slice(rows.start, rows.stop)
        try:
            self._arrays["maskmem_features"][sel] = stored
            self._arrays["object_score_logits"][sel] = scores.astype(np.float32, copy=False)
            self._arrays["obj_ptr"][sel] = pointers
            self._arrays["timestamp"][sel] = timestamps.astype(np.float64, copy=False)
            kill_point("chunk-data", chunk)
            # The marker goes last: a chunk counts as written only once its data is.
            self._arrays["chunk_done"][chunk] = 1
            kill_point("chunk-done", chunk)
        except OSError as exc:
            raise StoreError(
                f"{self._loc}: writing chunk {chunk} failed: {_describe_os_error(exc)}"
            ) from exc

    def finalize(self) -> None:
        """Mark the store complete once every ``chunk_done`` marker is set (coordinator).

        Also writes consolidated metadata (so xarray and zarr open it without listing).
        A no-op on a store that is already complete.

        Raises:
            StoreError: chunks are missing (listed), or the attributes cannot be written.
        """
        missing = self.pending_chunks()
        if missing:
            raise StoreError(
                f"{self._loc}: cannot mark complete: {len(missing)} of {self.num_chunks} "
                f"chunks not written (chunks {_chunk_ranges(missing)})"
            )
        if self.status == STATUS_COMPLETE:
            return
        kill_point("before-complete")
        attrs = {**self._attrs, "status": STATUS_COMPLETE}
        try:
            with warnings.catch_warnings():
                # "consolidated metadata is not in the v3 spec", and the lock file is
                # "not a component of a Zarr hierarchy": both expected here.
                warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
                zarr.consolidate_metadata(self._group.store)
            group = _open_group(self._loc, "r+")
            group.attrs[ATTRS_KEY] = attrs  # status "complete" is the last write
        except OSError as exc:
            raise StoreError(
                f"{self._loc}: cannot mark complete: {_describe_os_error(exc)}"
            ) from exc
        self._group = group
        self._attrs = attrs

    def __repr__(self) -> str:
        return f"CacheStore({self.path!r}, status={self.status!r}, chunks={self.num_chunks})"
