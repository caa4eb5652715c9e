"""Whole frame-chunks written straight to a local store's chunk files, in the format Zarr
writes: the same bytes, except that a large chunk compression would barely shrink is kept
uncompressed (below).

Why: `zarr.Array.__setitem__` costs about 2.5 ms a call on this project's 2-core machine
before a byte is encoded (the trip to Zarr's event loop, its task fan-out and thread
hops; a 1-byte ``chunk_done`` marker took 3.0 ms), and a frame-chunk is five such calls.
Here a chunk is encoded with the array's own codec settings (by the store, in the thread
that then writes it: a frame-chunk's chunks compress side by side) and written as
Zarr's LocalStore writes it: to a ``*.partial`` temporary file in the chunk's
directory, then renamed into place, so a killed writer leaves whole old or whole new
chunks (RELIABILITY.md, Zarr).

What is encoded here is only the chain memenc's schema creates, checked per array:
``bytes`` (little-endian) → [``blosc`` →] ``crc32c``. `ChunkFiles.for_array` first
encodes probes both ways, here and through Zarr into memory, full chunk and edge chunk:
a compressible probe must give the same bytes, a random one must read back through Zarr
as the same values. Otherwise it returns None and the caller writes through Zarr; so a
Zarr or numcodecs release that changes what the chain writes costs speed, not data.

Compression where it pays: a chunk of 256 KiB or more is compressed (as Zarr would) only
when a 64 KiB sample of it, eight pieces spread over it, shrinks by at least 1/8 (ZFS
keeps a block compressed by the same rule); otherwise it is stored as an uncompressed
Blosc frame (the same header, its bytes copied), which every Blosc reader decodes. Blosc
with bit-shuffle took 1.5-2.9 ms per 2 MB of float16 features on this project's 2-core
machine (byte-shuffle, the schema's codec since, 1.4-1.9 ms), more than writing them
(0.7-1.3 ms). What it buys depends on the features: with bit-shuffle 1.079× on one store's
first chunk (random weights), 1.8× on the benchmark's 640×360 clip (random weights too,
objects present; 1.69× with byte-shuffle); the latter stay compressed.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype

__all__ = ["ChunkFiles", "missing_chunk_files", "read_markers", "write_file"]

_writers_made: ThreadPoolExecutor | None = None
_writers_lock = threading.Lock()


def _writers() -> ThreadPoolExecutor:
    """The threads that encode and write chunk files, shared by every store of the
    process: one per core, 2 to 8 (Blosc and file writes release the GIL, so a
    frame-chunk's object chunks compress side by side)."""
    # on first use: that module loads the video decoding the store itself does not need
    from memenc.pipeline.decoders import available_cores

    global _writers_made
    with _writers_lock:
        if _writers_made is None:
            _writers_made = ThreadPoolExecutor(
                min(8, max(2, available_cores())), thread_name_prefix="memenc-chunk-file"
            )
        return _writers_made


def _forget_writers() -> None:
    """In a forked child: the parent's threads did not come along, so a pool made before
    the fork would take jobs and never run them; the child makes its own."""
    global _writers_made, _writers_lock
    _writers_made = None
    _writers_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_writers)


# Zarr's chunk files as they are written: the first bytes in a call of their own. On this
# project's machine (Linux 6.18, ext4) one write() of exactly 2 MiB at offset 0 of a new
# file took 7.2 ms against 1.5 ms for the same bytes in two calls (medians of 30); 1 MiB,
# 1.9 MB and split writes did not show it. Presumably the kernel then backs the file's
# first 2 MiB of page cache with one huge folio (not verified). np.save writes its header
# first, which has the same effect.
_HEAD = 4096

_checked: dict[str, bool] = {}  # array metadata JSON -> did the probe agree
_checked_lock = threading.Lock()


def _crc32c() -> Callable[[bytes], int] | None:
    """CRC-32C of a bytes object, from the library Zarr's checksum codec uses."""
    try:
        import google_crc32c
    except ImportError:
        return None
    return google_crc32c.value


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
        compress = _blosc_where_it_pays(blosc)  # type: ignore[assignment]
        if compress is None:
            return None
    little = dtype.newbyteorder("<")

    def encode(chunk: np.ndarray) -> bytes:
        packed = compress(np.ascontiguousarray(chunk, dtype=little))
        return b"".join((packed, checksum(packed).to_bytes(4, "little")))

    return encode


def _blosc_where_it_pays(blosc: BloscCodec) -> Callable[[np.ndarray], bytes] | None:
    """Blosc as the codec's settings say for chunks that shrink by 1/8 or more (judged on
    a sample), an uncompressed Blosc frame for the others; None when numcodecs cannot
    take these settings."""
    from numcodecs import Blosc

    try:
        settings = {
            "cname": blosc.cname.value,
            "shuffle": {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[blosc.shuffle.value],
            "blocksize": blosc.blocksize,
            "typesize": blosc.typesize,
        }
        packed = Blosc(clevel=blosc.clevel, **settings).encode
        copied = Blosc(clevel=0, **{**settings, "shuffle": 0}).encode
    except (TypeError, KeyError, ValueError):  # an older numcodecs, or a new setting
        return None

    def compress(raw: np.ndarray) -> bytes:
        if raw.nbytes < _SAMPLED_FROM:
            return packed(raw)
        flat = raw.reshape(-1).view(np.uint8)
        step = (flat.size - _PIECE) // (_PIECES - 1) // 64 * 64  # pieces start 64-aligned
        sample = np.concatenate([flat[i * step : i * step + _PIECE] for i in range(_PIECES)])
        if len(packed(sample)) * _PAYS <= sample.nbytes:
            return packed(raw)
        return copied(raw)

    return compress


_SAMPLED_FROM = 256 * 1024  # smaller chunks are always compressed: it costs little
_PIECES, _PIECE = 8, 8192  # the sample: 8 pieces of 8 KiB spread over the chunk
_PAYS = 8 / 7  # compressed when that saves at least 1/8 of the sample's bytes


def _other_chunks(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The chunk coordinates across every dimension but the first (the frame): the same
    for each frame-chunk."""
    grid = [range(-(-s // c)) for s, c in zip(shape[1:], chunks[1:], strict=True)]
    return list(itertools.product(*grid))


def _zarr_copy(array: zarr.Array, shape: tuple[int, ...]) -> tuple[zarr.Array, dict[str, Any]]:
    """An in-memory copy of ``array``'s settings with shape ``shape``, and its files."""
    files: dict[str, Any] = {}
    copy = zarr.create_array(
        zarr.storage.MemoryStore(files),
        shape=shape,
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
    return copy, files


class ChunkFiles:
    """Writes whole frame-chunks of one array of a local store (dimension 0 is the frame).

    Make it with `for_array`; `files` encodes every Zarr chunk of a run of rows that starts
    on a chunk boundary and ends on one or at the array's end, for `write_file`."""

    def __init__(
        self,
        root: Path,
        array: zarr.Array,
        encode: Callable[[np.ndarray], bytes],
        shape: tuple[int, ...] | None = None,  # the probe's, instead of the array's
    ) -> None:
        self._dir = Path(root, *array.path.split("/"))
        self._array = array
        self._encode = encode
        self._shape = tuple(array.shape) if shape is None else shape
        self._chunks = tuple(array.chunks)
        self._fill = array.fill_value
        self._key = array.metadata.encode_chunk_key
        self._others = _other_chunks(self._shape, self._chunks)

    @classmethod
    def for_array(cls, root: Path, array: zarr.Array) -> ChunkFiles | None:
        """A writer for ``array`` (stored under the local directory ``root``), or None when
        this module cannot vouch for what it would write (then write through Zarr)."""
        encode = _encoder(array)
        if encode is None:
            return None
        # the probe depends on the chunk layout and the codecs, not on the array's length
        settings = array.metadata.to_dict()
        for name in ("shape", "attributes", "dimension_names"):
            settings.pop(name, None)
        key = json.dumps(settings, sort_keys=True, default=str)
        with _checked_lock:
            agrees = _checked.get(key)
        if agrees is None:
            agrees = cls._probe_agrees(array, encode)
            with _checked_lock:
                _checked[key] = agrees
        return cls(root, array, encode) if agrees else None

    @staticmethod
    def _probe_agrees(array: zarr.Array, encode: Callable[[np.ndarray], bytes]) -> bool:
        """Encode probes of one full chunk and one edge chunk along the frame dimension
        here and through Zarr: a compressible one must give the same bytes, a random one
        (stored uncompressed where it is large) must read back through Zarr unchanged."""
        chunks = tuple(array.chunks)
        rows = chunks[0] + max(1, chunks[0] // 2)
        shape = (rows, *chunks[1:])  # one chunk across the other dimensions
        rng = np.random.default_rng(0)
        if array.dtype.kind == "f":
            noise = rng.standard_normal(shape, dtype=np.float32)
        else:
            info = np.iinfo(array.dtype)
            noise = rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True)
        few = rng.integers(0, 4, shape, dtype=np.uint8)  # four values: any compressor shrinks it
        writer = ChunkFiles(Path("."), array, encode, shape)
        try:
            for probe, same_bytes in (
                (few.astype(array.dtype), True),
                (noise.astype(array.dtype), False),
            ):
                copy, files = _zarr_copy(array, shape)
                copy[...] = probe
                ours = {
                    key: data
                    for start in range(0, rows, chunks[0])
                    for key, data in writer._encoded(start, probe[start : start + chunks[0]])
                }
                theirs = {k: v.to_bytes() for k, v in files.items() if k != "zarr.json"}
                if sorted(ours) != sorted(theirs):
                    return False
                if same_bytes:
                    if ours != theirs:
                        return False
                    continue
                wrap = default_buffer_prototype().buffer.from_bytes
                files.update({key: wrap(data) for key, data in ours.items()})
                back = np.asarray(copy[...])
                if back.tobytes() != probe.tobytes():
                    return False
        except Exception:  # noqa: BLE001 - any failure means "write through Zarr"
            return False
        return True

    def _parts(self, start: int, rows: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """(chunk key, the chunk's values) for each chunk of the frame-chunk starting at row
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
            yield self._key((c0, *coords)), part

    def _encoded(self, start: int, rows: np.ndarray) -> Iterator[tuple[str, bytes]]:
        """(chunk key, stored bytes) for each chunk of the frame-chunk starting at ``start``."""
        for key, part in self._parts(start, rows):
            yield key, self._encode(part)

    def files(self, start: int, rows: np.ndarray) -> Iterator[tuple[Path, Callable[[], bytes]]]:
        """(file, a call that returns its bytes) for every chunk of rows ``start``…, for
        `write_file`: the caller runs the encodings where it likes (the store runs each in
        the thread that writes its file, so a frame-chunk's chunks compress side by side).
        The rows must be whole frame-chunks (the last may end at the array's end), and must
        not change until every call has returned."""
        n = self._chunks[0]
        stop = start + len(rows)
        if start % n or (stop % n and stop != self._shape[0]) or stop > self._shape[0]:
            raise ValueError(f"rows {start}:{stop} are not whole chunks of {n} frames")
        rows = np.asarray(rows, dtype=self._array.dtype)
        for first in range(start, stop, n):
            for key, part in self._parts(first, rows[first - start : first - start + n]):
                yield self._dir / key, functools.partial(self._encode, part)

    def submit(self, start: int, rows: np.ndarray) -> list[Future[None]]:
        """Encode and write every chunk of rows ``start``… (as `files`), each in one of the
        shared writer threads; the futures finish when the files are in place. The rows
        must not change until then."""
        pool = _writers()
        return [
            pool.submit(_encode_and_write, path, encode) for path, encode in self.files(start, rows)
        ]


def _encode_and_write(path: Path, encode: Callable[[], bytes]) -> None:
    write_file(path, encode())


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


def missing_chunk_files(root: Path, arrays: list[zarr.Array], chunks: list[int]) -> set[int]:
    """The frame-chunks among `chunks` (marked written) that lack a chunk file of one of
    `arrays` (frame-chunked, under the local store `root`), or whose file is empty: deleted
    since, or the store was damaged (a crash can leave a renamed file with no bytes; no
    chunk encodes to none). Each array's folder is listed once."""
    missing: set[int] = set()
    for array in arrays:
        folder = Path(root, *array.path.split("/"))
        others = _other_chunks(tuple(array.shape), tuple(array.chunks))
        present = _nonempty_files(folder)
        for c in chunks:
            names = [array.metadata.encode_chunk_key((c, *o)) for o in others]
            # flat keys (c.0.1) from the listing, nested ones (c/0/1, older stores) one by one
            if not all(n in present if "/" not in n else _nonempty(folder / n) for n in names):
                missing.add(c)
    return missing


def _nonempty_files(folder: Path) -> set[str]:
    """Names of the non-empty regular files in `folder` (none when it cannot be listed)."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries if e.is_file() and e.stat().st_size > 0}
    except OSError:
        return set()


def _nonempty(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def read_markers(root: Path, array: zarr.Array) -> np.ndarray | None:
    """The values of ``chunk_done`` (`array`, of the local store `root`) read from its files
    directly: a file holding exactly the bytes `ChunkFiles` writes for a set marker is 1, a
    missing one is 0 (the fill value), and any other file is read through Zarr; one that
    does not decode (damaged) is 0 too, so its chunk is written again, marker and all,
    rather than the store refused for a byte that only says "done". 5,000 markers,
    4,285 of them set: 0.165 s here, 2.23 s through Zarr (~0.45 ms a marker; a one-hour video at 1024 in frame-chunks of 4
    has 21,600). None (read it through Zarr) when
    `ChunkFiles` does not write this array or its keys are nested (older stores)."""
    encode = _encoder(array)
    if encode is None or array.ndim != 1 or array.chunks != (1,) or array.fill_value != 0:
        return None
    if "/" in array.metadata.encode_chunk_key((0,)):
        return None
    folder = Path(root, *array.path.split("/"))
    try:
        present = set(os.listdir(folder))
    except OSError:
        return None
    one = encode(np.ones(1, array.dtype))
    values = np.zeros(array.shape[0], array.dtype)
    for i in range(array.shape[0]):
        key = array.metadata.encode_chunk_key((i,))
        if key not in present:
            continue
        try:
            with open(folder / key, "rb") as f:
                same = f.read(len(one) + 1) == one
        except OSError:
            same = False
        values[i] = 1 if same else _decoded_marker(array, i)
    return values


def _decoded_marker(array: zarr.Array, i: int) -> int:
    """Marker `i` read through Zarr; 0 when its file is damaged (checksum or decode)."""
    try:
        return int(array[i])
    except (ValueError, RuntimeError):
        return 0
