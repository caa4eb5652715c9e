"""Writing a memenc store: `CacheStore` (prepare, open_for_write, write_chunk, finalize).

Who writes what (see RELIABILITY.md, Zarr section):

- The coordinator calls `CacheStore.prepare` once: it creates every array and the small
  ones' data, and writes the group attributes (status ``creating``, then ``in_progress``
  as its last write, so a store cut short while ``creating`` is rebuilt on rerun). It is
  the only writer of metadata and attributes, and the only caller of
  `CacheStore.finalize`, which checks every ``chunk_done`` marker and then writes status
  ``complete``.
- Workers (in this process or others) call `CacheStore.open_for_write` and
  `CacheStore.write_chunk`: they write whole frame-chunks only, data first, then that
  chunk's ``chunk_done`` entry (chunked by 1, so two workers never share a Zarr chunk).
- Resume redoes each chunk whose marker is unset or (local) whose file is gone, in a
  store marked complete too: a chunk never written reads as the fill value, no error.
- In a local store a worker's chunks go straight to their files (`ChunkFiles`: Zarr's
  format, each through a ``*.partial`` file renamed into place), each chunk encoded and
  written in one of a shared pool of threads (one per core, 2 to 8); elsewhere, and for
  any array whose bytes `ChunkFiles` cannot vouch for, through Zarr.

Paths are local directories, ``file://`` URLs or fsspec URLs (``s3://…``); the write lock
exists only for local paths (see `store_lock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import Future
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from memenc.errors import StoreError
from memenc.pipeline.faults import kill_point
from memenc.store.chunkfiles import ChunkFiles, missing_chunk_files, read_markers
from memenc.store.location import (
    Location,
    check_memenc_location,
    describe_os_error,
    open_existing,
    open_group,
)
from memenc.store.lock import store_lock
from memenc.store.schema import (
    ARRAYS,
    ATTRS_KEY,
    CHUNK_KEY_ENCODING,
    COMPRESSORS,
    MEM_DIM,
    PTR_DIM,
    SCHEMA,
    SPECS,
    STATUS_COMPLETE,
    STATUS_CREATING,
    STATUS_IN_PROGRESS,
    StoreLayout,
    chunk_ranges,
    layout_from_group,
    memenc_attrs,
    settings_that_differ,
)

__all__ = ["CacheStore"]
# what a frame-chunk's write fills besides its marker
_FRAME_CHUNKED = [n for n, s in SPECS.items() if s.written_by == "worker" and n != "chunk_done"]


def _writing(array: zarr.Array) -> zarr.Array:
    """`array` set to write every chunk, even one equal to its fill value."""
    return array.with_config({"write_empty_chunks": True})


class CacheStore:
    """Write access to one memenc store. Make it with `prepare` (coordinator) or
    `open_for_write` (workers), not directly."""

    def __init__(self, loc: Location, group: zarr.Group, layout: StoreLayout) -> None:
        self._loc = loc
        self._group = group
        self._layout = layout
        self._attrs: dict[str, Any] = dict(memenc_attrs(group) or {})
        # write_empty_chunks: else Zarr compares each chunk with the fill value (NaN: ~5 ms
        # per 2 MB float16 chunk, half its write) to skip it; memenc never writes one (its
        # data are finite, markers 1), so the bytes stored are the same.
        self._arrays = {name: _writing(group[name]) for name in SPECS if name in group}
        # Local stores: the chunks workers write go straight to their files (`ChunkFiles`),
        # per array, once its probes agreed with Zarr; set up on the first write.
        self._files: dict[str, ChunkFiles | None] | None = None
        self._found_whole = False  # complete, and `pending_chunks` found nothing missing

    # ---- making one

    @classmethod
    def prepare(
        cls, path: str | os.PathLike[str], layout: StoreLayout, *, overwrite: bool = False
    ) -> CacheStore:
        """Create the store at `path` (a directory, ``file://`` or fsspec URL) with `layout`,
        or resume it, and return it open for writing (coordinator; holds the lock meanwhile).

        - New path (or an empty directory): creates every array, writes ``frame_index``,
          ``maskmem_pos_enc``, ``object_id``, ``maskmem_tpos_enc`` (when given), and the
          ``memenc`` attributes: status ``creating`` first, ``in_progress`` once every
          array exists.
        - ``in_progress`` store with the same fingerprint and layout: resumed, data kept;
          `pending_chunks` lists what is left.
        - ``complete`` store with the same fingerprint and layout: returned as is, nothing
          pending; unless a marker is unset or a chunk file gone (damage since): then
          ``in_progress``, those pending (checking: 0.43 s against 0.10 s, 5,000 chunks).
        - Anything else memenc made (other fingerprint, layout, schema version, an unknown
          status) is refused; a creation that was cut short (``creating``) is recreated.
        - With ``overwrite``, any memenc store at the path (whatever its settings and
          status) is replaced. A local store's old contents are kept beside it, in
          ``.<name>.memenc-replaced``, until the new store is complete (`finalize` deletes
          them) or `bring_back_replaced` restores them; object stores are deleted.
        - Leftover ``*.partial`` temp files (from killed writers) are removed.

        Raises:
            StoreError: the store was made with other settings (without ``overwrite``); the
                path exists but is not a memenc store (never touched, even with
                ``overwrite``); the path cannot be created or written (permission denied …).
            StoreLockedError: another process holds the store's lock.
        """
        loc = Location(path)
        with store_lock(loc):
            kind = check_memenc_location(loc)
            replacing = False
            if kind == "zarr":
                group = open_group(loc, "r+")
                attrs = memenc_attrs(group) or {}
                if attrs.get("status") == STATUS_CREATING:
                    loc.clear()
                elif overwrite:
                    loc.set_aside()  # kept until the new store is complete
                    replacing = True
                else:
                    store = cls._resume(loc, group, attrs, layout)
                    loc.remove_partials()
                    return store
            loc.remove_partials()
            try:
                return cls._create(loc, layout)
            except BaseException:
                if replacing:
                    loc.bring_back()
                raise

    @classmethod
    def _resume(
        cls, loc: Location, group: zarr.Group, attrs: dict[str, Any], layout: StoreLayout
    ) -> CacheStore:
        if (status := attrs.get("status")) not in (STATUS_IN_PROGRESS, STATUS_COMPLETE):
            damaged = f"unknown store status {status!r} (damaged metadata)"
            raise StoreError(f"{loc}: {damaged}; use --overwrite")
        differs: list[str] = []
        if attrs.get("schema") != SCHEMA:
            differs.append(f"schema {attrs.get('schema')!r}")
        try:
            old = layout_from_group(group, loc)
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
            differs.extend(settings_that_differ(layout, old, attrs) or ["fingerprint"])
        differs = list(dict.fromkeys(differs))  # a layout key can also be a fingerprint key
        if differs:
            shown = ", ".join(differs[:8]) + (", …" if len(differs) > 8 else "")
            raise StoreError(
                f"{loc}: store was made with other settings ({shown} differ); use --overwrite"
            )
        store = cls(loc, group, old)
        if status == STATUS_COMPLETE and store.pending_chunks():  # damaged since: redone
            try:
                group.attrs[ATTRS_KEY] = store._attrs = {**attrs, "status": STATUS_IN_PROGRESS}
            except OSError as exc:
                raise StoreError(f"{loc}: cannot reopen: {describe_os_error(exc)}") from exc
        return store

    @classmethod
    def _create(cls, loc: Location, layout: StoreLayout) -> CacheStore:
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
                    compressors=COMPRESSORS,
                    chunk_key_encoding=CHUNK_KEY_ENCODING,
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
            raise StoreError(f"{loc}: cannot create store: {describe_os_error(exc)}") from exc
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
        loc = Location(path)
        group, attrs = open_existing(loc, "r+")
        status = attrs.get("status")
        if status != STATUS_IN_PROGRESS:
            raise StoreError(f"{loc}: store is {status!r}, not in_progress; nothing to write")
        return cls(loc, group, layout_from_group(group, loc))

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
        """`store_lock` on this store: ``with store.lock(): …`` yields the store, or raises
        StoreLockedError when another process holds the lock."""
        with store_lock(self._loc):
            yield self

    def _done_markers(self) -> np.ndarray:
        markers, root = self._arrays["chunk_done"], self._loc.local
        try:  # local stores: the files read directly (`read_markers`: 13x as fast)
            fast = read_markers(root, markers) if root is not None else None
            return fast if fast is not None else np.asarray(markers[:])
        except OSError as exc:
            why = describe_os_error(exc)
            raise StoreError(f"{self._loc}: cannot read chunk_done: {why}") from exc
        except (ValueError, RuntimeError) as exc:
            raise StoreError(f"{self._loc}: chunk_done is damaged: {exc}") from exc

    def pending_chunks(self) -> list[int]:
        """Frame-chunks whose ``chunk_done`` marker is not set, or (local stores) is set but
        a chunk file is missing, ascending (a complete store found whole is not checked
        again: 0.5 s instead of 1.5 s for a rerun of 5,000 chunks). Raises StoreError."""
        if self._found_whole:
            return []
        done = self._done_markers() == 1
        pending = {int(i) for i in np.flatnonzero(~done)}
        if self._loc.local is not None:  # a resume redoes what was deleted since
            data = [a for n, a in self._arrays.items() if n in _FRAME_CHUNKED]
            pending |= missing_chunk_files(self._loc.local, data, np.flatnonzero(done).tolist())
        self._found_whole = not pending and self.status == STATUS_COMPLETE
        return sorted(pending)

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
        *,
        peak: float | None = None,
    ) -> None:
        """Write one whole frame-chunk, then set its ``chunk_done`` marker.

        Args:
            chunk: the frame-chunk index.
            features: [n, O, 64, h, w] float, n = len(chunk_rows(chunk)); cast to the store
                dtype.
            scores: [n, O] object score logits.
            timestamps: [n] seconds.
            pointers: [n, O, 256] object pointers (``obj_ptr``), stored as float32.
            peak: the largest |x| of the features before they were cast to the store dtype
                (NaN or inf when any was not finite), from whoever cast them (the engine,
                on the device). Given, the checks use it instead of scanning ``features``;
                the store dtype overflows exactly when the peak's cast does, as the cast
                rounds monotonically.

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
            if peak is None:
                ok = bool(np.isfinite(stored).all())
            else:
                ok = bool(np.isfinite(np.float32(peak).astype(layout.store_dtype)))
        if not ok:
            where = f"rows {rows.start}-{rows.stop - 1} (chunk {chunk})"
            finite = np.isfinite(features).all() if peak is None else np.isfinite(peak)
            if finite:
                peak = float(np.abs(features).max()) if peak is None else peak
                raise StoreError(
                    f"{self._loc}: features in {where} exceed the float16 range "
                    f"(max |x| = {peak:.4g}); use --store-dtype float32, or check the "
                    "checkpoint if it may be damaged"
                )
            raise StoreError(
                f"{self._loc}: non-finite (NaN/inf) features in {where}; the model gave "
                "them: check the checkpoint and the masks"
            )
        if not np.isfinite(pointers).all():
            raise StoreError(
                f"{self._loc}: non-finite (NaN/inf) object pointers in rows "
                f"{rows.start}-{rows.stop - 1} (chunk {chunk}); the model gave them: check "
                "the checkpoint and the masks"
            )
        sel = slice(rows.start, rows.stop)
        data = {
            "maskmem_features": stored,
            "object_score_logits": scores.astype(np.float32, copy=False),
            "obj_ptr": pointers,
            "timestamp": timestamps.astype(np.float64, copy=False),
        }
        try:
            self._set_together(sel, data)
            kill_point("chunk-data", chunk)
            # The marker goes last: a chunk counts as written only once its data is.
            self._set_together(slice(chunk, chunk + 1), {"chunk_done": np.ones(1, np.uint8)})
            kill_point("chunk-done", chunk)
        except OSError as exc:
            raise StoreError(
                f"{self._loc}: writing chunk {chunk} failed: {describe_os_error(exc)}"
            ) from exc

    def _direct(self) -> dict[str, ChunkFiles | None]:
        if self._files is None:
            root = self._loc.local
            self._files = {
                name: None if root is None else ChunkFiles.for_array(root, self._arrays[name])
                for name, spec in SPECS.items()
                if spec.written_by == "worker" and name in self._arrays
            }
        return self._files

    def _set_together(self, sel: slice, data: dict[str, np.ndarray]) -> None:
        """Write each array's rows `sel`: straight to the chunk files where `ChunkFiles`
        can (each chunk encoded and written in one of its shared threads), the rest in one
        trip to Zarr's event loop, those arrays concurrently. Returns once all are
        written; raises the first error after every write has finished or failed."""
        files = self._direct()
        through_zarr = {name: v for name, v in data.items() if files.get(name) is None}
        failure: BaseException | None = None
        jobs: list[Future[None]] = []
        try:
            for name, value in data.items():
                writer = files.get(name)
                if writer is not None:
                    jobs += writer.submit(sel.start, value)
        finally:
            futures.wait(jobs)  # every file finished or failed before anything is raised
            for job in jobs:
                exc = job.exception()
                if isinstance(exc, OSError):
                    failure = failure or exc
                elif exc is not None:
                    raise exc
        if through_zarr:

            async def together() -> None:
                results = await asyncio.gather(
                    *(
                        self._arrays[name].async_array.setitem(sel, value)
                        for name, value in through_zarr.items()
                    ),
                    return_exceptions=True,
                )
                for result in results:
                    if isinstance(result, BaseException):
                        raise result

            try:
                zarr_sync(together())
            except OSError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

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
                f"chunks not written (chunks {chunk_ranges(missing)})"
            )
        if self.status == STATUS_COMPLETE:
            self._loc.drop_aside()
            return
        kill_point("before-complete")
        attrs = {**self._attrs, "status": STATUS_COMPLETE}
        try:
            with warnings.catch_warnings():
                # "consolidated metadata is not in the v3 spec", and the lock file is
                # "not a component of a Zarr hierarchy": both expected here.
                warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
                zarr.consolidate_metadata(self._group.store)
            group = open_group(self._loc, "r+")
            group.attrs[ATTRS_KEY] = attrs  # status "complete" is the last write
        except OSError as exc:
            raise StoreError(
                f"{self._loc}: cannot mark complete: {describe_os_error(exc)}"
            ) from exc
        self._group = group
        self._attrs = attrs
        self._loc.drop_aside()  # the store an overwrite replaced, kept until now

    def bring_back_replaced(self) -> bool:
        """Restore the store that `prepare(overwrite=True)` set aside, deleting this one
        (for a replacement that failed); False when nothing was set aside. Takes the lock."""
        with store_lock(self._loc):
            return self._loc.bring_back()

    def __repr__(self) -> str:
        return f"CacheStore({self.path!r}, status={self.status!r}, chunks={self.num_chunks})"
