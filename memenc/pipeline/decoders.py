"""K decoder processes over one video: disjoint, chunk-aligned ranges of rows, each
decoded by its own `VideoSource` (its own child process) in its own thread, merged into
one stream of ``(rows, FrameBatch)``.

    with SpareSources(source, count=1) as spares:  # decoder 2 starts now
        ...                                         # (load the model meanwhile)
        groups = split_rows(rows, chunk_frames=8, parts=2)
        with ParallelDecode(source, frame_of, groups, 4, spares=spares) as batches:
            for batch_rows, batch in batches:
                ...

One decoder process serves one request at a time, which caps a run at what one
process decodes (~150–270 frames/s of 720p at S=1024 on two cores); a GPU computes
thousands. Splitting the rows into K contiguous groups of whole chunks keeps each
decoder reading forward through its own part of the file, and keeps the chunks being
filled at once to about one per group, so memory stays bounded (the engine fills
chunk buffers by row, in any order).

The engine's `run_chunks` and `benchmarks/decode.py` both decode through this class.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from memenc.errors import UsageError, VideoDecodeError
from memenc.pipeline.video import FrameBatch, VideoSource

if TYPE_CHECKING:  # no torch here: a decoder child may import this module (as __main__'s)
    import torch

__all__ = [
    "MAX_AUTO_DECODERS",
    "ParallelDecode",
    "SpareSources",
    "available_cores",
    "check_decoders",
    "choose_decoders",
    "decoder_threads",
    "split_rows",
]

# The most decoders chosen by default. On an H200 machine (16 cores, 1024, sam2.1 tiny)
# K = 4 decoded 247 frames/s alone, more than the compute took there (fp32 and bf16 whole
# runs of 512 frames made 30-36 frames/s), and held 5.9-6.0 GB for the process tree
# against 9.6-9.7 GB with K = 8, for whole runs within a run-to-run spread (fp32 16.98 s
# against 15.70 s, bf16 14.36 s against 15.52 s, one run each).
MAX_AUTO_DECODERS = 4


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_decoders(decoders: Any) -> int | None:
    """`decoders` as given, checked: None (auto) or a whole number >= 1. Raises
    UsageError otherwise (naming ``--decoders``)."""
    if decoders is None:
        return None
    if isinstance(decoders, bool) or not isinstance(decoders, int) or decoders < 1:
        raise UsageError(f"--decoders {decoders!r}: must be a whole number, at least 1")
    return int(decoders)


def choose_decoders(decoders: int | None, device: torch.device, cores: int | None = None) -> int:
    """The decoder count K of a run: `decoders` when given (checked as `check_decoders`),
    else chosen from the device and the cores. On the CPU: 1, because the cores are busy
    computing, and the model, not decoding, is the bottleneck (hiera_t at 1024 takes
    1–2 s a frame on two cores; one decoder gives 150+ frames/s). On CUDA: half the
    cores, at most `MAX_AUTO_DECODERS`, leaving the other half to the compute thread,
    the writer, mask reading and the copies."""
    k = check_decoders(decoders)
    if k is not None:
        return k
    if device.type != "cuda":
        return 1
    cores = cores or available_cores()
    return min(MAX_AUTO_DECODERS, max(1, cores // 2))


def decoder_threads(decoders: int, cores: int | None = None) -> int:
    """FFmpeg decoding threads for each of `decoders` decoder processes.

    One decoder (K=1) keeps FFmpeg's automatic choice (0: as many threads as it sees
    cores, plus one for frame threading), as memenc always did: the process has the
    machine's decoding to itself, and a damaged file fails at the frame it always did
    (with frame threads, a bad packet also fails the few frames in flight before it).
    With K > 1 each gets ``max(1, cores // K)`` threads, so K decoders together run
    about one thread per core instead of K × (cores + 1) threads fighting over them.
    Nothing else in a decoder process has a thread pool: it runs no torch or OpenMP
    work (the video child imports decord, PyAV and PIL; PIL decodes image folders on
    one thread). The thread count changes the speed, never the pixels.
    """
    if decoders <= 1:
        return 0
    return max(1, (cores or available_cores()) // decoders)


def split_rows(rows: Sequence[int], chunk_frames: int, parts: int) -> list[list[int]]:
    """`rows` (sorted) in at most `parts` contiguous groups of whole chunks (chunk c holds
    rows ``c*chunk_frames ..``) with about equal rows each: group g ends at the chunk
    boundary nearest to ``(g+1) * len(rows) / parts`` rows. Fewer groups when there are
    fewer chunks than `parts`; no group is empty."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    chunks: list[list[int]] = []  # rows of each chunk, in order
    for r in rows:
        if chunks and chunks[-1][-1] // chunk_frames == r // chunk_frames:
            chunks[-1].append(r)
        else:
            chunks.append([r])
    groups: list[list[int]] = []
    current: list[int] = []
    done = 0  # rows in closed groups and in `current`
    for chunk in chunks:
        target = (len(groups) + 1) * len(rows) / parts
        # close the group before this chunk when that lands nearer its share
        if current and len(groups) < parts - 1 and done + len(chunk) - target > target - done:
            groups.append(current)
            current = []
        current += chunk
        done += len(chunk)
    if current:
        groups.append(current)
    return groups


def _open_like(source: VideoSource) -> VideoSource:
    """Another source on `source`'s video with its settings, checked to see the same video."""
    s = source
    other = VideoSource(s.path, s.image_size, timeout_s=s.timeout_s, threads=s.threads)
    if other.info.frame_count != s.info.frame_count:
        other.close()
        raise VideoDecodeError(
            f"{s.path}: changed while it was read ({s.info.frame_count} frames, "
            f"now {other.info.frame_count})"
        )
    return other


class SpareSources:
    """`count` more sources like `source` (decoders 2..count+1), each started at once in
    a thread of its own, so their start (a process, its imports, the probe: ~0.2–0.4 s
    on an idle core, seconds on busy ones) overlaps other work: `encode_video` loads
    the model meanwhile. `ParallelDecode` takes spare i for its group i.

    `take(i)` waits for spare i and hands it over (the taker closes it), raising the
    error its start raised; `close` closes the spares not taken, waiting for those
    still starting. Their errors are then dropped: nobody needed them.
    """

    def __init__(self, source: VideoSource, count: int) -> None:
        self.count = count
        self._opened: dict[int, VideoSource] = {}
        self._errors: dict[int, BaseException] = {}
        self._taken: set[int] = set()
        self._threads: dict[int, threading.Thread] = {}
        for i in range(1, count + 1):
            # named as the decode thread that will use it (tests number decoders by it)
            thread = threading.Thread(
                target=self._open, args=(source, i), name=f"memenc-decode-{i}", daemon=True
            )
            self._threads[i] = thread
            thread.start()

    def _open(self, source: VideoSource, i: int) -> None:
        try:
            self._opened[i] = _open_like(source)
        except BaseException as e:  # handed to whoever takes it
            self._errors[i] = e

    def take(self, i: int) -> VideoSource | None:
        """Spare i (1..count), once started; None when there is none (or taken)."""
        if i not in self._threads or i in self._taken:
            return None
        self._taken.add(i)
        self._threads[i].join()
        if i in self._errors:
            raise self._errors[i]
        return self._opened.pop(i)

    def wait(self) -> None:
        """Wait until every spare has started (or failed to)."""
        for thread in self._threads.values():
            thread.join()

    def close(self) -> None:
        """Close the spares not taken (waiting for those still starting)."""
        self.wait()
        for source in self._opened.values():
            source.close()
        self._opened.clear()

    def __enter__(self) -> SpareSources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Cancelled(Exception):
    """Raised in a decode thread when the iteration has ended (its own or another error,
    or the consumer stopped)."""


class ParallelDecode:
    """Frames of row groups, each group decoded by its own `VideoSource` in its own
    thread; iterating yields ``(rows, FrameBatch)`` with the batches of each group in
    order and groups interleaved as they finish.

    source: an open source; it decodes the first group (the caller keeps and closes
        it). Group i takes spare i of `spares` when given (`SpareSources`, started
        earlier), else opens ``VideoSource(source.path, source.image_size,
        timeout_s=source.timeout_s, threads=source.threads)`` in its own thread; these
        are closed here on success, error and interruption.
    frame_of: a row's source frame number (rows of a group must map to sorted frames).
    groups: disjoint row groups (`split_rows`). One group is decoded in the iterating
        thread itself, with no extra thread.
    cancel: when set (another stage failed), the iteration ends early, without error.
    depth: decoded batches waiting, in all (at least one per group).

    Raises (from the iteration) the first error of any decoder — `VideoDecodeError`
    with its one-line message, from a frame that does not decode or a decoder that
    crashed, stalled or could not start — after stopping the others. Leaving the
    iteration early (break, an error in the consumer) stops and joins every thread.
    """

    def __init__(
        self,
        source: VideoSource,
        frame_of: Callable[[int], int],
        groups: Sequence[Sequence[int]],
        batch_size: int,
        *,
        cancel: threading.Event | None = None,
        depth: int | None = None,
        spares: SpareSources | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.frame_of = frame_of
        self.groups = [list(g) for g in groups if len(g)]
        self.batch_size = int(batch_size)
        self.cancel = cancel or threading.Event()
        self.spares = spares
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth or 0, len(self.groups)))
        self._stop = threading.Event()  # ends the decode threads
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()

    def __enter__(self) -> ParallelDecode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the decode threads and wait for them (each closes the source it opened)."""
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def __iter__(self) -> Iterator[tuple[list[int], FrameBatch]]:
        if len(self.groups) <= 1:
            for group in self.groups:
                yield from self._batches(self.source, group, self.cancel)
            return
        yield from self._merged()

    # -- internals --------------------------------------------------------------------

    def _batches(
        self, source: VideoSource, rows: list[int], stop: threading.Event
    ) -> Iterator[tuple[list[int], FrameBatch]]:
        frames = [self.frame_of(r) for r in rows]
        start = 0
        # closed as soon as the loop ends, so the source is free for its owner to close
        with contextlib.closing(source.iter_batches(frames, self.batch_size)) as batches:
            for batch in batches:
                if stop.is_set():
                    return
                n = len(batch.frame_index)
                yield rows[start : start + n], batch
                start += n

    def _merged(self) -> Iterator[tuple[list[int], FrameBatch]]:
        done = object()
        for i, group in enumerate(self.groups):
            thread = threading.Thread(
                target=self._decode, args=(i, group, done), name=f"memenc-decode-{i}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        try:
            running = len(self.groups)
            while running:
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    item = None
                if self._errors:
                    raise self._errors[0]
                if self.cancel.is_set():
                    return
                if item is done:
                    running -= 1
                elif item is not None:
                    yield item
        finally:
            self.close()
        if self._errors:  # an error raised after the last batch
            raise self._errors[0]

    def _put(self, item: Any) -> None:
        while True:
            if self._stop.is_set():
                raise _Cancelled
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _decode(self, i: int, rows: list[int], done: object) -> None:
        """Decode thread i: its group's batches into the queue, then `done`."""
        own: VideoSource | None = None
        try:
            if i == 0:
                source = self.source
            else:
                own = self.spares.take(i) if self.spares is not None else None
                own = source = own or _open_like(self.source)
            for item in self._batches(source, rows, self._stop):
                self._put(item)
            self._put(done)
        except _Cancelled:
            pass
        except BaseException as e:  # handed to the iterating thread
            with self._lock:
                if not self._stop.is_set():
                    self._errors.append(e)
                self._stop.set()
        finally:
            if own is not None:
                own.close()
