"""Read a memenc store as torch tensors in the layout SAM 2's memory attention consumes.

    cache = open_cache("video.zarr")
    row = cache.row_of(120)                      # source frame 120 -> store row
    mem = cache.for_sam2(row, object_id=1, device="cuda")
    mem["maskmem_features"]   # bfloat16 [1, 64, h, w]
    mem["maskmem_pos_enc"]    # [float32 [1, 64, h, w]]

    # the whole memory bank of object 1 as SAM 2's `track_step` takes it (output_dict)
    bank = cache.sam2_output_dict(1, device="cuda")
    bank["cond_frame_outputs"][120]["obj_ptr"]   # float32 [1, 256]

What the entries are: SAM 2's `track_step(mask_inputs=m, run_mem_encoder=True)` (eval
mode) for each stored frame and its input mask m — `maskmem_features`, `maskmem_pos_enc`,
`obj_ptr`, `object_score_logits` — which is also what SAM 2's training code computes for
frames given as masks. `SAM2VideoPredictor.add_new_mask` keeps the same pointer and score
but a slightly different memory: it re-encodes it later from its low-resolution copy of
the mask (256² at S=1024) upsampled and binarized to ±10 (mask edges differ), and keeps
the features in bfloat16.

Stores of schema memenc.memory-cache/1 (made before object pointers) open too; asking
them for pointers (`pointer`, `sam2_output_dict`) raises `StoreError`.

A store still being written (status ``in_progress``) can be opened; rows whose frame-chunk
has no ``chunk_done`` marker yet raise `StoreError` instead of returning the fill value.
"""

from __future__ import annotations

import json
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from memenc.errors import StoreError
from memenc.store.location import Location, describe_os_error, open_existing
from memenc.store.schema import (
    ATTRS_KEY,
    READABLE_SCHEMAS,
    STATUS_COMPLETE,
    STATUS_IN_PROGRESS,
    layout_from_group,
)
from memenc.store.urls import storage_errors

__all__ = ["MemoryCache", "open_cache"]

_CACHE_BYTES = 64 * 1024 * 1024  # decoded feature chunks kept for sequential reads


def _whole(value: Any, what: str) -> int:
    """``value`` as an int when it is one (Python, numpy or torch integer); TypeError for a
    float or anything else, which `int()` would silently truncate to another row."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {value!r}") from None


def open_cache(path: str | os.PathLike[str]) -> MemoryCache:
    """Open a memenc store for reading.

    Args:
        path: the store (a directory, ``file://`` or fsspec URL).

    Returns:
        A `MemoryCache`. The frame index, object ids and position encodings are read now;
        timestamps when first asked for, each frame-chunk's marker and data when its rows
        are.

    Raises:
        StoreError: the path does not exist, is not a memenc store, has another schema
            version, was never fully created, or is damaged; or the storage service of a
            URL failed (no credentials, an endpoint that does not answer).
    """
    with storage_errors(os.fspath(path)):
        return MemoryCache(path)


class MemoryCache:
    """A memenc store opened read-only (see `open_cache`).

    Attributes:
        path: the store's path.
        status: ``in_progress`` or ``complete``, as read when opened.
        attrs: the ``memenc`` group attribute (settings, fingerprint, schema, status).
        object_ids: the object ids, in store order.
        frame_index: int64 [T], source frame number of each row.
        timestamps: float64 [T] seconds (NaN for rows not written yet; re-read while
            any is NaN).
        pos_enc: float32 [64, h, w], the same for every frame and object.
        tpos_enc: float32 [7, 64] from the checkpoint, or None (SAM 2 holds it as
            [7, 1, 1, 64]).
        has_pointers: whether the store holds object pointers (``obj_ptr``; schema
            memenc.memory-cache/2 and later).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        loc = Location(path)
        group, attrs = open_existing(loc, "r")
        self.status: str = str(attrs.get("status"))
        if self.status not in (STATUS_IN_PROGRESS, STATUS_COMPLETE):
            raise StoreError(f"{loc}: store creation did not finish (status {self.status!r})")
        layout = layout_from_group(group, loc)

        self._loc = loc
        self._layout = layout
        self._features = group["maskmem_features"]
        self._scores = group["object_score_logits"]
        self.has_pointers: bool = READABLE_SCHEMAS[attrs["schema"]] >= 2
        self._pointers = group["obj_ptr"] if self.has_pointers else None
        self._chunk_done_array = group["chunk_done"]
        self.path = str(loc)
        # what was opened: a local store replaced since (another run's --overwrite) must
        # not serve its chunks under this one's frame index (`_check_same_store`)
        self._fingerprint = attrs.get("fingerprint")
        self._group_file = None if loc.local is None else loc.local / "zarr.json"
        self._group_seen = self._group_stat()
        self.attrs: dict[str, Any] = dict(group.attrs.asdict()[ATTRS_KEY])
        self.object_ids: list[int] = list(layout.object_ids)
        self.frame_index: np.ndarray = layout.frame_index
        self.pos_enc: torch.Tensor = torch.from_numpy(layout.pos_enc.copy())
        self.tpos_enc: torch.Tensor | None = (
            None if layout.tpos_enc is None else torch.from_numpy(layout.tpos_enc.copy())
        )
        # timestamps and markers are read when first asked for (a marker per frame-chunk, as
        # its rows are read): a long video's store has thousands of each, a file apiece
        self._timestamp_array = group["timestamp"]
        self._timestamps: np.ndarray = np.full(layout.num_frames, np.nan)
        self._done = np.zeros(layout.num_chunks, np.uint8)  # 1 once read as set
        self._object_index = {oid: i for i, oid in enumerate(self.object_ids)}
        # frame -> row: a binary search of frame_index when it increases (every store memenc
        # writes), else a dict (first row of each frame); a dict of every frame of a long
        # video would take ~100 bytes a frame
        fi = self.frame_index
        self._increasing = bool(fi.size < 2 or (fi[1:] > fi[:-1]).all())
        self._row_of: dict[int, int] = {}
        if not self._increasing:
            for row, frame in enumerate(fi.tolist()):
                self._row_of.setdefault(frame, row)

        h, w = layout.feat_hw
        chunk_bytes = layout.chunk_frames * 64 * h * w * np.dtype(layout.store_dtype).itemsize
        self._cache_size = max(1, _CACHE_BYTES // chunk_bytes)
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def timestamps(self) -> np.ndarray:
        """float64 [T] seconds; NaN for rows not written yet. Rows that were NaN are read
        again on each access, so a reader opened on an in-progress store sees rows
        finished after it was opened. StoreError when a complete store has a NaN row: NaN
        is the fill value, so that chunk's timestamp file was deleted."""
        if np.isnan(self._timestamps).any():
            self._timestamps = self._read("timestamp", lambda: self._timestamp_array[:])
            missing = np.flatnonzero(np.isnan(self._timestamps))
            if missing.size and self.status == STATUS_COMPLETE:
                chunk = int(missing[0]) // self.chunk_frames
                raise StoreError(
                    f"{self.path}: timestamp chunk {chunk} is missing (NaN, the fill value, "
                    "in a complete store: its file was deleted or replaced); recompute the store"
                )
        return self._timestamps

    # ---- shape of the store

    @property
    def num_frames(self) -> int:
        return self._layout.num_frames

    @property
    def chunk_frames(self) -> int:
        return self._layout.chunk_frames

    @property
    def store_dtype(self) -> str:
        return self._layout.store_dtype

    @property
    def feat_hw(self) -> tuple[int, int]:
        return self._layout.feat_hw

    def __len__(self) -> int:
        return self.num_frames

    def __repr__(self) -> str:
        return (
            f"MemoryCache({self.path!r}, status={self.status!r}, frames={self.num_frames}, "
            f"objects={self.object_ids})"
        )

    # ---- lookups

    def row_of(self, frame_number: int) -> int:
        """Store row of source frame ``frame_number``.

        Raises:
            StoreError: the frame is not in the store.
            TypeError: ``frame_number`` is not an integer.
        """
        frame_number = _whole(frame_number, "frame_number")
        if self._increasing:
            row = int(np.searchsorted(self.frame_index, frame_number))
            if row < self.num_frames and int(self.frame_index[row]) == frame_number:
                return row
        try:
            return self._row_of[frame_number]
        except KeyError:
            first, last = int(self.frame_index[0]), int(self.frame_index[-1])
            raise StoreError(
                f"{self.path}: frame {frame_number} is not in the store "
                f"({self.num_frames} frames from {first} to {last})"
            ) from None

    def _object(self, object_id: int) -> int:
        object_id = _whole(object_id, "object_id")
        try:
            return self._object_index[object_id]
        except KeyError:
            raise StoreError(
                f"{self.path}: object {object_id} is not in the store (objects {self.object_ids})"
            ) from None

    def _chunk_of(self, row: int) -> int:
        """The frame-chunk holding ``row``, checking that its marker is set."""
        if not 0 <= row < self.num_frames:
            raise IndexError(f"row {row} out of range [0, {self.num_frames})")
        chunk = row // self.chunk_frames
        if self._done[chunk] != 1:
            # Read when first needed, and again while unset: the writer may have finished it
            # since (markers only go 0 -> 1).
            self._done[chunk] = self._read("chunk_done", lambda: self._chunk_done_array[chunk])
            if self._done[chunk] not in (0, 1):
                raise StoreError(
                    f"{self.path}: chunk_done is damaged (chunk {chunk}'s marker is "
                    f"{int(self._done[chunk])}, not 0 or 1); recompute the store"
                )
            if self._done[chunk] != 1:
                raise StoreError(
                    f"{self.path}: row {row} (frame {int(self.frame_index[row])}) is in chunk "
                    f"{chunk}, which is not written yet (store {self.status})"
                )
        return chunk

    def _group_stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._group_file) if self._group_file is not None else None
        except OSError:
            return None
        return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)

    def _check_same_store(self) -> None:
        """Raise StoreError when this local store was replaced since it was opened by one
        of other settings (its group zarr.json changed and names another fingerprint). A
        store that only went on (chunks, `complete`) or was redone with the same settings,
        and so the same data, reads on. Called after each read of a chunk, marker or
        timestamps (one stat), so a replacement that lands during the read is seen too;
        object stores are not checked."""
        if self._group_file is None:
            return
        now = self._group_stat()
        if now is not None and now == self._group_seen:
            return
        try:
            meta = json.loads(self._group_file.read_bytes())
            fingerprint = meta["attributes"][ATTRS_KEY]["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            fingerprint = None  # gone or half-written: being replaced
        if fingerprint != self._fingerprint:
            raise StoreError(
                f"{self.path}: the store was replaced since it was opened (another run's "
                "--overwrite?): its chunks no longer belong to this reader's frames; open it "
                "again"
            )
        self._group_seen = now

    def _read(self, what: str, read: Any) -> Any:
        with storage_errors(self.path):  # a URL's service (botocore is not an OSError)
            try:
                data = read()
            except OSError as exc:
                self._check_same_store()  # a store being replaced is not a damaged one
                why = describe_os_error(exc)
                raise StoreError(f"{self.path}: cannot read {what}: {why}") from exc
            except (ValueError, RuntimeError) as exc:
                # Crc32c mismatch ("checksum do not match") or a codec failing on damaged bytes.
                self._check_same_store()
                fix = (
                    "running the same encode again redoes that chunk"
                    if what == "chunk_done"
                    else "recompute the store (the same encode with --overwrite)"
                )
                raise StoreError(
                    f"{self.path}: {what} is damaged (checksum or decode error: {exc}); {fix}"
                ) from exc
        self._check_same_store()  # after the read: what it read is this store's
        return data

    def _feature_chunk(self, chunk: int, obj: int) -> np.ndarray:
        """Decoded maskmem_features of one frame-chunk and object: [n, 64, h, w] store dtype."""
        rows = self._layout.chunk_rows(chunk)
        what = f"maskmem_features chunk {chunk} object {self.object_ids[obj]}"
        return self._cached(
            (chunk, obj),
            what,
            lambda: self._written(what, self._features[rows.start : rows.stop, obj]),
        )

    def _written(self, what: str, data: np.ndarray) -> np.ndarray:
        """`data` read from a chunk marked written, or StoreError when it holds NaN: the
        writer refuses non-finite features, pointers and scores, and NaN is the arrays' fill
        value, so NaN there means the chunk's file is missing (deleted after it was written)."""
        if np.isnan(data).any():
            raise StoreError(
                f"{self.path}: {what} is missing (NaN, the fill value, in a chunk marked "
                "written: its file was deleted or replaced); recompute the store"
            )
        return data

    def _cached(self, key: tuple[int, int], what: str, read: Any) -> np.ndarray:
        """`read()` through the LRU chunk cache (``key``: chunk, object or -1 for pointers)."""
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        data = self._read(what, read)
        with self._cache_lock:
            self._cache[key] = data
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return data

    # ---- data

    def features(self, row: int, object_id: int) -> torch.Tensor:
        """Memory features of one row and object.

        Returns:
            float32 [64, h, w] (float16 storage is upcast exactly).

        Raises:
            IndexError: ``row`` out of range.
            StoreError: unknown object, the row's chunk not written yet, or damaged data.
            TypeError: ``row`` or ``object_id`` is not an integer.
        """
        row = _whole(row, "row")
        obj = self._object(object_id)
        chunk = self._chunk_of(row)
        block = self._feature_chunk(chunk, obj)
        return torch.from_numpy(block[row - chunk * self.chunk_frames].astype(np.float32))

    def score(self, row: int, object_id: int) -> float:
        """Object score logit of one row and object (+10 present, −10 absent for mask input).

        Raises:
            IndexError, StoreError, TypeError: as `features`.
        """
        row = _whole(row, "row")
        obj = self._object(object_id)
        self._chunk_of(row)
        what = f"object_score_logits row {row} object {object_id}"
        return float(self._written(what, self._read(what, lambda: self._scores[row, obj])))

    def for_sam2(
        self, row: int, object_id: int, device: str | torch.device = "cpu"
    ) -> dict[str, Any]:
        """One object's memory at one row, as SAM 2's video predictor keeps it per object.

        Returns:
            ``{"maskmem_features": bfloat16 [1, 64, h, w],
            "maskmem_pos_enc": [float32 [1, 64, h, w]],
            "object_score_logits": float32 [1, 1]}`` on ``device``.

        Raises:
            IndexError, StoreError, TypeError: as `features`.
        """
        feats = self.features(row, object_id)
        score = self.score(row, object_id)
        return {
            "maskmem_features": feats.to(device=device, dtype=torch.bfloat16).unsqueeze(0),
            "maskmem_pos_enc": [self.pos_enc.to(device).unsqueeze(0)],
            "object_score_logits": torch.tensor([[score]], dtype=torch.float32, device=device),
        }

    # ---- object pointers and the memory bank (issue 9)

    def _pointer_chunk(self, chunk: int) -> np.ndarray:
        """Decoded obj_ptr of one frame-chunk: float32 [n, O, 256] (kept in the chunk cache)."""
        if self._pointers is None:
            video = (self.attrs.get("source_video") or {}).get("path") or "VIDEO"
            raise StoreError(
                f"{self.path}: store has no object pointers (schema {self.attrs.get('schema')!r}, "
                f"made by an older memenc); recompute it with `memenc encode {video} "
                f"-o {self.path} --overwrite` and the options it was made with"
            )
        rows = self._layout.chunk_rows(chunk)
        pointers = self._pointers
        what = f"obj_ptr chunk {chunk}"
        return self._cached(
            (chunk, -1), what, lambda: self._written(what, pointers[rows.start : rows.stop])
        )

    def pointer(self, row: int, object_id: int) -> torch.Tensor:
        """Object pointer of one row and object (SAM 2's ``obj_ptr``).

        Returns:
            float32 [256].

        Raises:
            IndexError: ``row`` out of range.
            StoreError: unknown object, the row's chunk not written yet, damaged data, or
                a store without pointers (schema memenc.memory-cache/1; the message says how
                to recompute it).
            TypeError: ``row`` or ``object_id`` is not an integer.
        """
        row = _whole(row, "row")
        obj = self._object(object_id)
        if self._pointers is None:
            self._pointer_chunk(0)  # raises: no pointers
        chunk = self._chunk_of(row)
        block = self._pointer_chunk(chunk)
        return torch.from_numpy(block[row - chunk * self.chunk_frames, obj].copy())

    def sam2_output_dict(
        self,
        object_id: int,
        frames: Iterable[int] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, dict[int, dict[str, Any]]]:
        """One object's memory bank in the form of SAM 2's ``output_dict``.

        SAM 2's `track_step` (and `_prepare_memory_conditioned_features`) takes the result
        as its ``output_dict`` unchanged: every stored frame is a conditioning frame, as a
        frame given with a mask is in SAM 2, keyed by its *source* frame number, so pass
        `track_step` the source frame number as ``frame_idx`` and the video's frame count
        as ``num_frames``.

        Args:
            object_id: the object.
            frames: source frame numbers to include (each must be in the store); None: every
                stored frame.
            device: where the tensors go.
            dtype: the dtype of every tensor (float32 keeps the stored numbers exactly).

        Returns:
            ``{"cond_frame_outputs": {frame: {"maskmem_features": [1, 64, h, w],
            "maskmem_pos_enc": [[1, 64, h, w]], "obj_ptr": [1, 256],
            "object_score_logits": [1, 1]}}, "non_cond_frame_outputs": {}}``; the position
            encoding is one tensor shared by every frame.

        Raises:
            StoreError: unknown object or frame, a chunk not written yet, damaged data, or a
                store without pointers (schema memenc.memory-cache/1: recompute it with
                ``memenc encode … --overwrite``; the message names the command).
            TypeError: ``object_id`` or a frame is not an integer.
        """
        obj = self._object(object_id)
        if self._pointers is None:
            self._pointer_chunk(0)  # raises: no pointers
        wanted = (
            self.frame_index.tolist() if frames is None else [_whole(f, "frame") for f in frames]
        )
        pos = [self.pos_enc.to(device=device, dtype=dtype).unsqueeze(0)]
        cond: dict[int, dict[str, Any]] = {}
        for frame in wanted:
            if frame in cond:
                continue
            row = self.row_of(frame)
            chunk = self._chunk_of(row)
            k = row - chunk * self.chunk_frames
            feats = self._feature_chunk(chunk, obj)[k]
            ptr = self._pointer_chunk(chunk)[k, obj]
            what = f"object_score_logits row {row} object {object_id}"
            score = self._written(what, self._read(what, lambda r=row: self._scores[r, obj]))
            cond[frame] = {
                "maskmem_features": torch.from_numpy(feats.astype(np.float32))
                .to(device=device, dtype=dtype)
                .unsqueeze(0),
                "maskmem_pos_enc": pos,
                "obj_ptr": torch.from_numpy(ptr.copy()).to(device=device, dtype=dtype)[None],
                "object_score_logits": torch.tensor([[float(score)]], dtype=dtype, device=device),
            }
        return {"cond_frame_outputs": cond, "non_cond_frame_outputs": {}}
