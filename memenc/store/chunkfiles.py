"""Whole frame-chunks written straight to a local store's chunk files, the same bytes Zarr
would write.

Why: `zarr.Array.__setitem__` costs about 2.5 ms a call on this project's 2-core machine
before a byte is encoded (the trip to Zarr's event loop, its task fan-out and thread
hops; a 1-byte ``chunk_done`` marker took 3.0 ms), and a frame-chunk is five such calls.
Here a chunk is encoded in the calling thread with the array's own codec settings and
written as Zarr's LocalStore writes it: to a ``*.partial`` temporary file in the chunk's
directory, then renamed into place, so a killed writer leaves whole old or whole new
chunks (RELIABILITY.md, Zarr).

What is encoded here is only the chain memenc's schema creates, checked per array:
``bytes`` (little-endian) → ``blosc`` → ``crc32c``. `ChunkFiles.for_array` first encodes
a random probe both ways, here and through Zarr into memory, full chunk and edge chunk,
and returns None unless every byte agrees; the caller then writes through Zarr. So a
Zarr or numcodecs release that changes what the chain writes costs speed, not data.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

__all__ = ["ChunkFiles", "write_file"]

# Zarr's chunk files as they are written: the first bytes in a call of their own. On this
# project's machine (Linux 6.18, ext4) one write() of exactly 2 MiB at offset 0 of a new
# file took 7.2 ms against 1.5 ms for the same bytes in two calls (medians of 30): the
# kernel then fills the file's first 2 MiB of page cache as one huge folio. np.save's
# header has the same effect on its data.
_HEAD = 4096

_checked: dict[str, bool] = {}  # array metadata JSON -> did the probe agree
_checked_lock = threading.Lock()


def _crc32c() -> Callable[[bytes], int] | None:
    """CRC-32C of a bytes-like object, from the library Zarr's checksum codec uses."""
    try:
        import google_crc32c

        return google_crc32c.value
    except ImportError:
        pass
    try:
        import crc32c

        return crc32c.crc32c
    except ImportError:
        return None


def _encoder(array: zarr.Array) -> Callable[[np.ndarray], bytes] | None:
    """A function from one whole chunk (C-ordered, the array's dtype) to its stored bytes,
    or None when the array's codec chain is not bytes → [blosc →] crc32c."""
    codecs = list(array.metadata.codecs)
    if len(codecs) not in (2, 3) or not isinstance(codecs[0], BytesCodec):
        return None
    if not isinstance(codecs[-1], Crc32cCodec):
        return None
    checksum = _crc32c()
    dtype = array.dtype
    if checksum is None or not isinstance(dtype, np.dtype) or dtype.kind not in "fiub":
        return None

    def compress(raw: np.ndarray) -> bytes:
        return raw.tobytes()  # google_crc32c takes bytes, not a view of the array

    if len(codecs) == 3:
        blosc = codecs[1]
        if not isinstance(blosc, BloscCodec):
            return None
        from numcodecs import Blosc

        try:
            compress = Blosc(
                cname=blosc.cname.value,
                clevel=blosc.clevel,
                shuffle={"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[blosc.shuffle.value],
                blocksize=blosc.blocksize,
                typesize=blosc.typesize,
            ).encode
        except (TypeError, KeyError, ValueError):  # an older numcodecs, or a new setting
            return None
    little = dtype.newbyteorder("<")

    def encode(chunk: np.ndarray) -> bytes:
        packed = compress(np.ascontiguousarray(chunk, dtype=little))
        return b"".join((packed, checksum(packed).to_bytes(4, "little")))

    return encode


def _zarr_bytes(array: zarr.Array, probe: np.ndarray) -> dict[str, bytes]:
    """The chunk files Zarr writes for ``probe`` in an in-memory copy of ``array``."""
    files: dict[str, object] = {}
    copy = zarr.create_array(
        zarr.storage.MemoryStore(files),
        shape=probe.shape,
        chunks=array.chunks,
        dtype=array.dtype,
        serializer=array.serializer,
        compressors=array.compressors,
        filters=array.filters,
        fill_value=array.fill_value,
        chunk_key_encoding=array.metadata.chunk_key_encoding,
        zarr_format=3,
        config={"write_empty_chunks": True},
    )
    copy[...] = probe
    return {k: v.to_bytes() for k, v in files.items() if k != "zarr.json"}  # type: ignore[attr-defined]


class ChunkFiles:
    """Writes whole frame-chunks of one array of a local store (dimension 0 is the frame).

    Make it with `for_array`; `write_rows` writes every Zarr chunk in a run of rows that
    starts on a chunk boundary and ends on one or at the array's end."""

    def __init__(self, root: Path, array: zarr.Array, encode: Callable[[np.ndarray], bytes]):
        self._dir = Path(root, *array.path.split("/"))
        self._array = array
        self._encode = encode
        self._shape = tuple(array.shape)
        self._chunks = tuple(array.chunks)
        self._fill = array.fill_value
        self._key = array.metadata.encode_chunk_key
        # the grid of chunks across the other dimensions, the same for every frame-chunk
        grid = [range(-(-s // c)) for s, c in zip(self._shape[1:], self._chunks[1:], strict=True)]
        self._others = list(itertools.product(*grid))

    @classmethod
    def for_array(cls, root: Path, array: zarr.Array) -> ChunkFiles | None:
        """A writer for ``array`` (stored under the local directory ``root``), or None when
        this module cannot write what Zarr would (then write through Zarr)."""
        encode = _encoder(array)
        if encode is None:
            return None
        key = json.dumps(array.metadata.to_dict(), sort_keys=True, default=str)
        with _checked_lock:
            agrees = _checked.get(key)
        if agrees is None:
            agrees = cls._probe_agrees(array, encode)
            with _checked_lock:
                _checked[key] = agrees
        return cls(root, array, encode) if agrees else None

    @staticmethod
    def _probe_agrees(array: zarr.Array, encode: Callable[[np.ndarray], bytes]) -> bool:
        """Encode a random probe of one full chunk and one edge chunk along the frame
        dimension both here and through Zarr; True when every file is the same bytes."""
        chunks = tuple(array.chunks)
        rows = chunks[0] + max(1, chunks[0] // 2)
        shape = (rows, *array.shape[1:])
        rng = np.random.default_rng(0)
        if array.dtype.kind == "f":
            probe = rng.standard_normal(shape).astype(array.dtype)
        else:
            info = np.iinfo(array.dtype)
            probe = rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True)
            probe = probe.astype(array.dtype)
        writer = ChunkFiles(Path("."), array, encode)
        got: dict[str, bytes] = {}
        try:
            want = _zarr_bytes(array, probe)
            for start in range(0, rows, chunks[0]):
                for key, data in writer._encoded(start, probe[start : start + chunks[0]]):
                    got[key] = data
        except Exception:  # noqa: BLE001 - any failure means "write through Zarr"
            return False
        return got == want

    def _encoded(self, start: int, rows: np.ndarray) -> Iterator[tuple[str, bytes]]:
        """(chunk key, stored bytes) for each chunk of the frame-chunk starting at row
        ``start``; ``rows`` holds its rows (fewer than a chunk at the array's end)."""
        n = self._chunks[0]
        c0 = start // n
        for coords in self._others:
            sel = tuple(
                slice(i * c, min((i + 1) * c, s))
                for i, c, s in zip(coords, self._chunks[1:], self._shape[1:], strict=True)
            )
            part = rows[(slice(None), *sel)]
            if part.shape != self._chunks:  # an edge chunk: Zarr stores it whole, filled
                whole = np.full(self._chunks, self._fill, dtype=self._array.dtype)
                whole[tuple(slice(0, k) for k in part.shape)] = part
                part = whole
            yield self._key((c0, *coords)), self._encode(part)

    def files(self, start: int, rows: np.ndarray) -> Iterator[tuple[Path, bytes]]:
        """(file, bytes) of every chunk of rows ``start``…, encoded one by one as the
        iterator is advanced, for `write_file`. The rows must be whole frame-chunks (the
        last may end at the array's end)."""
        n = self._chunks[0]
        stop = start + len(rows)
        if start % n or (stop % n and stop != self._shape[0]) or stop > self._shape[0]:
            raise ValueError(f"rows {start}:{stop} are not whole chunks of {n} frames")
        rows = np.asarray(rows, dtype=self._array.dtype)
        for first in range(start, stop, n):
            for key, data in self._encoded(first, rows[first - start : first - start + n]):
                yield self._dir / key, data

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        """Write rows ``start``… (whole frame-chunks) in this thread.

        Raises:
            ValueError: the rows do not cover whole frame-chunks.
            OSError: a file could not be written (no file is left half-written).
        """
        for path, data in self.files(start, rows):
            write_file(path, data)


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a ``*.partial`` file renamed into place."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o666)
    except FileNotFoundError:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o666)
    try:
        try:
            view = memoryview(data)
            for piece in (view[:_HEAD], view[_HEAD:]):
                while piece:
                    piece = piece[os.write(fd, piece) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
