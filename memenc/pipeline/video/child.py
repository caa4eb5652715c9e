"""Child side: the decoder processes' main loops and their message protocol — the video
decoder (probe, then frames into the shared buffer or one frame through the pipe) and
the mask-video decoder (scan, then label frames)."""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from memenc.pipeline.video.labels import iter_labels, scan_labels
from memenc.pipeline.video.probe import check_decord, probe_file, probe_images
from memenc.pipeline.video.readers import DecordReader, ImageReader, PyAVReader
from memenc.pipeline.video.types import NATIVE, DecodeFailure, short_error

__all__ = ["label_child_main", "video_child_main"]

# The child sends a heartbeat at most this often during a long probe.
_HEARTBEAT_S = 0.5


def _heartbeat(conn: multiprocessing.connection.Connection) -> Callable[[], None]:
    """A function that tells the parent a long probe or read is still making progress
    (rate-limited: at most one ``("alive",)`` per `_HEARTBEAT_S`)."""
    last_beat = time.monotonic()

    def heartbeat() -> None:
        nonlocal last_beat
        if time.monotonic() - last_beat > _HEARTBEAT_S:
            conn.send(("alive",))
            last_beat = time.monotonic()

    return heartbeat


def _apply_fault(stage: str, fault: str | None) -> None:
    if not fault or not fault.startswith(stage + ":"):
        return
    action = fault.split(":", 1)[1]
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "exit":
        os._exit(3)
    elif action == "hang":
        threading.Event().wait()


def video_child_main(
    conn: multiprocessing.connection.Connection,
    fault: str | None,
    path: str,
    image_size: int | None,
    readahead_budget: int,
    threads: int = 0,
) -> None:
    """Decoder process: probe, then (when image_size is given) serve read requests.

    ``threads`` is FFmpeg's decoding thread count for the reader (decord's
    ``num_threads``, PyAV's ``thread_count``; 0: FFmpeg's automatic choice). Nothing in
    this process runs torch or OpenMP work, so that is its only thread pool.

    ``image_size`` 0 (`NATIVE`) serves single frames at their displayed size instead,
    through the pipe (``("frame", rid, k)`` -> ``("frame", rid, rgb)``).

    Messages to the parent: ``("alive",)`` heartbeats, ``("info", dict, timestamps)``
    or ``("error", text)`` for the probe, then ``("ok",)`` per buffer mapping and
    ``("done", rid)`` / ``("error", rid, text)`` per read.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import av
    import decord

    decord.logging.set_level(decord.logging.QUIET)  # FFmpeg's own log lines
    # numpy arrays from get_batch, whatever bridge a preloaded __main__ may have chosen
    # (SAM 2's loader, for one, switches decord to its torch bridge globally)
    decord.bridge.set_bridge("native")
    del av  # imported early so a broken install fails here; PyAV ignores FFmpeg logs

    heartbeat = _heartbeat(conn)

    try:
        _apply_fault("probe", fault)
        try:
            size = None if image_size == NATIVE else image_size
            if os.path.isdir(path):
                probe = probe_images(path)
                reader: Any = None if image_size is None else ImageReader(probe.files or [], size)
            else:
                probe = probe_file(path, heartbeat)
                vr = None
                if probe.info["backend_reason"] == "" and image_size != NATIVE:
                    vr = check_decord(path, probe, image_size, threads)
                reader = None
                if image_size == NATIVE:
                    reader = PyAVReader(path, probe, None)
                elif image_size is not None:
                    if vr is not None:
                        reader = DecordReader(vr, readahead_budget)
                    else:
                        reader = PyAVReader(path, probe, image_size, threads)
                del vr
        except DecodeFailure as e:
            conn.send(("error", str(e)))
            return
        except Exception as e:  # a library raised something unexpected: still one line
            conn.send(("error", f"probe failed ({type(e).__name__}: {short_error(e)})"))
            return
        conn.send(("info", probe.info, probe.timestamps))
        if reader is None:
            return

        buf: mmap.mmap | None = None
        view: np.ndarray | None = None
        while True:
            while not conn.poll(0.05):
                reader.idle()
            msg = conn.recv()
            kind = msg[0]
            if kind == "close":
                return
            if kind == "map":
                _, buf_path, nbytes = msg
                view = None
                if buf is not None:
                    with contextlib.suppress(BufferError):
                        buf.close()
                with open(buf_path, "r+b") as f:
                    buf = mmap.mmap(f.fileno(), nbytes)
                view = np.frombuffer(buf, np.uint8).reshape(-1, 3, image_size, image_size)
                conn.send(("ok",))
            elif kind == "frame":
                _, rid, k = msg
                _apply_fault("read", fault)
                try:
                    conn.send(("frame", rid, reader.read_native(k)))
                except DecodeFailure as e:
                    conn.send(("error", rid, str(e)))  # names the frame
                except Exception as e:
                    conn.send(("error", rid, f"frame {k}: {type(e).__name__}: {short_error(e)}"))
            elif kind == "read":
                _, rid, first_slot, frames = msg
                _apply_fault("read", fault)
                assert view is not None
                try:
                    reader.read(frames, view[first_slot : first_slot + len(frames)])
                except DecodeFailure as e:
                    conn.send(("error", rid, str(e)))
                except Exception as e:  # unexpected, from a library: report, keep serving
                    first, last = frames[0], frames[-1]
                    problem = f"frames {first}-{last}: {type(e).__name__}: {short_error(e)}"
                    conn.send(("error", rid, problem))
                else:
                    conn.send(("done", rid))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent went away


def label_child_main(
    conn: multiprocessing.connection.Connection, fault: str | None, path: str, scan: bool
) -> None:
    """Mask decoder process: (when ``scan``) decode the whole video once and report
    ``("info", dict)``, then serve ``("read", rid, frames)`` with ``("labels", rid,
    uint8/uint16 [n, H, W])``, decoding forward and restarting for an earlier frame.
    Errors are ``("error", text)`` / ``("error", rid, text)``; heartbeats as the video
    decoder's, during the scan and long reads."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    heartbeat = _heartbeat(conn)

    try:
        _apply_fault("mask-probe", fault)
        try:
            info = scan_labels(path, heartbeat) if scan else None
        except DecodeFailure as e:
            conn.send(("error", str(e)))
            return
        except Exception as e:
            conn.send(
                ("error", f"cannot decode the mask video ({type(e).__name__}: {short_error(e)})")
            )
            return
        conn.send(("info", info))
        frames_iter: Iterator[np.ndarray] | None = None
        position = 0  # index of the frame frames_iter yields next
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                return
            _, rid, frames = msg
            _apply_fault("mask-read", fault)
            out = []
            try:
                for frame in frames:
                    if frames_iter is None or frame < position:
                        frames_iter, position = iter_labels(path), 0
                    labels = None
                    while position <= frame:
                        labels = next(frames_iter, None)
                        if labels is None:
                            frames_iter = None
                            raise DecodeFailure(
                                f"frame {frame}: the mask video ended after frame {position - 1}"
                            )
                        position += 1
                        heartbeat()
                    out.append(labels)
            except DecodeFailure as e:
                frames_iter = None  # its position is unknown now
                conn.send(("error", rid, str(e)))
            except Exception as e:
                frames_iter = None
                conn.send(("error", rid, f"{type(e).__name__}: {short_error(e)}"))
            else:
                conn.send(("labels", rid, np.stack(out) if out else None))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return
