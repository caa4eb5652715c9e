"""The store's schema, memenc.memory-cache/2: the `ARRAYS` table, `StoreLayout`, and how
an existing group is read back into a layout and checked against the table.

The schema — array names, dimension names, dtypes, chunking, codecs and attributes — is
declared once, in `ARRAYS` below, and everything else (creation, validation on open, the
reader, the report) derives from it.

Every array's codec chain ends with a CRC32C checksum, so a damaged chunk raises on read
instead of returning wrong numbers.

Schema versions: ``/2`` added ``obj_ptr`` (SAM 2's object pointers). Stores of ``/1`` still
open for reading (`READABLE_SCHEMAS`; they have no pointers), never for writing or resuming.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from memenc.errors import StoreError
from memenc.store.settings import json_safe, without_non_finite

if TYPE_CHECKING:
    from memenc.store.location import Location

__all__ = [
    "ARRAYS",
    "ATTRS_KEY",
    "CHUNK_KEY_ENCODING",
    "COMPRESSORS",
    "LOCK_FILE",
    "MEM_DIM",
    "PTR_DIM",
    "READABLE_SCHEMAS",
    "SCHEMA",
    "SPECS",
    "STATUS_COMPLETE",
    "STATUS_CREATING",
    "STATUS_IN_PROGRESS",
    "STORE_DTYPES",
    "TPOS_SLOTS",
    "ArraySpec",
    "StoreLayout",
    "chunk_ranges",
    "default_chunk_frames",
    "layout_from_group",
    "memenc_attrs",
    "settings_that_differ",
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

# Blosc (LZ4 over byte-shuffled values) for size, then CRC32C over the stored bytes: a
# flipped bit fails the read. LZ4 rather than Zstd because the writer shares the cores
# with the encoders: on float16 memories (random weights, bit-shuffled, 2 MB chunks) on this
# project's 2-core machine Zstd level 1 took 5.8-6.7 ms a chunk against 1.9-2.9 ms for LZ4,
# and stored them 1.070× against 1.079× on one clip, 2.09× against 1.81× on another.
# Byte-shuffle rather than bit-shuffle: on the benchmark clip's features (640×360 at 512,
# randn·0.1 weights) LZ4 stored them 1.69× against 1.83× in 1.8 ms a 2 MB chunk against
# 3.0-4.2 ms (1.85× against 2.08× at 1024, 1.4 against 2.6 ms), and compressing was most of
# a frame-chunk's write (3-4 ms of 6-8 ms). Stores made before keep bit-shuffle (it is in
# their metadata). Local chunks that would shrink by less than 1/8 are stored as
# uncompressed Blosc frames instead (memenc/store/chunkfiles.py).
COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec())

# Chunk files named ``c.<i>.<j>…`` side by side in the array's directory, instead of
# Zarr's default nested ``c/<i>/<j>/…``: a frame-chunk then creates no directories. With
# the nested keys a 2-object chunk at S=512 made ten, and its write took 10.9 ms against
# 8.2 ms (medians of 15, 2 cores). Both are Zarr v3's "default" chunk key encoding;
# stores made before keep theirs (it is in their metadata).
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}


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
    # one chunk: the coordinator writes it once, and every open reads it whole (stores made
    # before this chunked it by F, thousands of files for a long video; they still open)
    ArraySpec("frame_index", ("frame",), "int64"),
    ArraySpec("timestamp", ("frame",), "float64", {"frame": _CHUNK_FRAMES}, written_by="worker"),
    ArraySpec("object_id", ("object",), "int32"),
    ArraySpec("maskmem_tpos_enc", ("slot", "channel"), "float32", optional=True),
    ArraySpec("chunk_done", ("chunk",), "uint8", {"chunk": 1}, written_by="worker"),
)
SPECS = {spec.name: spec for spec in ARRAYS}


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


def _memenc_version() -> str:
    import memenc

    version = getattr(memenc, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("memenc")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


def chunk_ranges(chunks: Sequence[int]) -> str:
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
        attrs = json_safe(dict(self.attrs))
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


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def settings_that_differ(layout: StoreLayout, old: StoreLayout, attrs: dict[str, Any]) -> list[str]:
    """The dotted names of the settings in which a run (``layout``) and an existing store
    (its ``attrs`` and layout ``old``) differ: those the fingerprint covers, when the run
    says which (`StoreLayout.identity`), else all of them."""
    if layout.identity is not None:
        before = _flat(dict(layout.identity(attrs)))
        after = _flat(dict(layout.identity(layout.attrs)))
    else:
        before = _flat(old.attrs)
        after = _flat(layout.attrs)
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def memenc_attrs(group: zarr.Group) -> dict[str, Any] | None:
    attrs = group.attrs.asdict().get(ATTRS_KEY)
    if isinstance(attrs, dict) and str(attrs.get("schema", "")).startswith("memenc."):
        return attrs
    return None


def _missing_coordinates(layout: StoreLayout) -> str | None:
    """What a deleted chunk file of an array written once at creation looks like when read:
    Zarr gives the fill value, NaN for the position encodings (never NaN as written) and
    zeros for frame_index (every row frame 0, which no store of more than one row means).
    Duplicate object ids are refused by `StoreLayout` itself. None when none is seen."""
    for name, values in (
        ("maskmem_pos_enc", layout.pos_enc),
        ("maskmem_tpos_enc", layout.tpos_enc),
    ):
        if values is not None and np.isnan(values).any():
            return f"{name} holds NaN (what a deleted chunk file reads as, its fill value)"
    fi = layout.frame_index
    if fi.size > 1 and not fi.any():
        return "frame_index is missing (every row frame 0: a deleted chunk file reads as zeros)"
    return None


def layout_from_group(group: zarr.Group, loc: Location) -> StoreLayout:
    """Rebuild the layout of an existing store and check every array against the schema.

    Raises:
        StoreError: an array is missing, or its shape, dtype, chunks or dimension names do
            not match the schema, or an array written at creation shows a deleted chunk
            file (`_missing_coordinates`).
    """
    attrs = memenc_attrs(group) or {}
    _, not_finite = without_non_finite(attrs)
    if not_finite:  # Zarr reads NaN from zarr.json; the record is JSON, which has none
        where, value = not_finite[0]
        raise StoreError(f"{loc}: malformed store: attribute {where} is {value}")
    version = READABLE_SCHEMAS.get(attrs.get("schema"), READABLE_SCHEMAS[SCHEMA])
    arrays = {}
    for name, spec in SPECS.items():
        try:
            arrays[name] = group[name]
            if not isinstance(arrays[name], zarr.Array):
                raise StoreError(f"{loc}: malformed store: '{name}' is a group, not an array")
        except KeyError:
            if not (spec.optional or spec.since > version):
                raise StoreError(f"{loc}: malformed store: array '{name}' is missing") from None
        except (ValueError, TypeError, AttributeError) as exc:  # its zarr.json is damaged
            raise StoreError(
                f"{loc}: malformed store: array '{name}' has unreadable metadata ({exc})"
            ) from exc
    written_once = {}  # the arrays written at creation, each read whole
    for name in ("frame_index", "maskmem_pos_enc", "maskmem_tpos_enc", "object_id"):
        if name in arrays:
            try:
                written_once[name] = arrays[name][:]
            except (ValueError, RuntimeError, TypeError, OSError) as exc:  # checksum, codec, disk
                raise StoreError(f"{loc}: malformed or damaged store: {name}: {exc}") from exc
    try:
        features = arrays["maskmem_features"]
        frame_index = written_once["frame_index"]
        pos_enc = written_once["maskmem_pos_enc"]
        tpos = written_once.get("maskmem_tpos_enc")
        object_ids = written_once["object_id"]
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
    damage = _missing_coordinates(layout)
    if damage:
        raise StoreError(f"{loc}: malformed or damaged store: {damage}")
    for name, array in arrays.items():
        spec = SPECS[name]
        want = (
            spec.shape(layout),
            spec.chunks(layout),
            spec.resolved_dtype(layout.store_dtype),
            spec.dims,
        )
        chunks = array.chunks
        if name == "frame_index" and chunks == (layout.chunk_frames,):
            chunks = spec.chunks(layout)  # chunked by F, as stores made before were
        have = (
            array.shape,
            chunks,
            np.dtype(str(array.dtype)),
            array.metadata.dimension_names,
        )
        if want != have:
            raise StoreError(
                f"{loc}: malformed store: {name} has shape/chunks/dtype/dims {have}, "
                f"schema says {want}"
            )
    return layout
