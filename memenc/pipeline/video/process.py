"""Parent side: starting a decoder process (forkserver / spawn context, or a plain
subprocess in a daemonic parent), the `Decoder` connection whose every wait has a
deadline, and the shared frame buffer."""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from memenc.errors import VideoDecodeError
from memenc.pipeline.video.types import short_error

__all__ = ["Decoder", "DecoderGone", "SharedBuffer"]


# Test hook: "<stage>:<action>", stage in {"probe", "read", "mask-probe", "mask-read"},
# action in {"crash", "segv", "hang", "exit"}. `Decoder` passes it to each new child;
# None in normal use.
_CHILD_FAULT: str | None = None


_context_lock = threading.Lock()
_context: multiprocessing.context.BaseContext | None = None


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver (children fork from a small server that preloads this module), else spawn."""
    global _context
    with _context_lock:
        if _context is None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                ctx = multiprocessing.get_context("forkserver")
                # Only a hint: ignored if some other code already started the server.
                ctx.set_forkserver_preload(["__main__", "memenc.pipeline.video.child"])
            else:
                ctx = multiprocessing.get_context("spawn")
            _context = ctx
        return _context


_plain = False  # `start_plainly`


def start_plainly(plain: bool) -> None:
    """Start decoder processes as plain subprocesses (`plain_process`) instead of from
    multiprocessing's forkserver, for the rest of the process (False: the forkserver).

    A plain child starts a fresh interpreter, so each costs more time: probing the
    benchmark's 720p clip took 0.53 s against 0.23 s forked from a running forkserver
    (0.51 s for the first, which starts the server; medians of 7, this project's 2-core
    machine). But it leaves nothing behind when it exits, where the forkserver (30 MB)
    and multiprocessing's resource tracker (13 MB) live until the parent exits. The CPU
    path uses it (`memenc.pipeline.engine.encode_video`): there a run's memory peaks after
    its decoders are done, and the start is small beside the encoders' seconds a frame."""
    global _plain
    _plain = plain


class _DecoderGone(VideoDecodeError):
    """The decoder process crashed, exited or stalled (and was killed)."""


# The name the package uses. The class keeps the name it had, which batch summaries show
# ("_DecoderGone: <path>: decoder crashed ...").
DecoderGone = _DecoderGone


class Decoder:
    """The parent's handle on one decoder process: messages with deadlines."""

    def __init__(
        self,
        path: str,
        timeout_s: float,
        target: Callable[..., None],
        args: tuple[Any, ...],
        what: str = "decoder",
    ) -> None:
        """Start ``target(child_conn, fault, *args)`` in a decoder process (``fault`` is
        the test hook `_CHILD_FAULT`). ``what`` names the process in messages
        ("decoder", "mask decoder")."""
        self.path = path
        self.timeout_s = timeout_s
        self.what = what
        if _plain or multiprocessing.current_process().daemon:
            # asked for (`start_plainly`), or a daemonic parent (a Dask worker), whose
            # children multiprocessing refuses: a plain subprocess, driven the same way
            from memenc.pipeline.video import plain_process

            try:
                self.proc, self.conn = plain_process.start(target, (_CHILD_FAULT, *args))
            except OSError as e:  # out of processes, memory or file descriptors
                raise VideoDecodeError(
                    f"{path}: cannot start a {what} process ({short_error(e)})"
                ) from None
            return
        ctx = _mp_context()
        self.conn, child_conn = ctx.Pipe(duplex=True)
        try:
            self.proc = ctx.Process(
                target=target,
                args=(child_conn, _CHILD_FAULT, *args),
                name="memenc-decoder",
                daemon=True,
            )
            self.proc.start()
        except BaseException as e:
            self.conn.close()  # no process to talk to: nothing may keep this end open
            if isinstance(e, Exception):  # e.g. out of processes, memory or descriptors
                raise VideoDecodeError(
                    f"{path}: cannot start a {what} process ({short_error(e)})"
                ) from None
            raise
        finally:
            child_conn.close()

    def error(self, problem: str) -> VideoDecodeError:
        return VideoDecodeError(f"{self.path}: {problem}")

    def gone(self, problem: str) -> DecoderGone:
        return DecoderGone(f"{self.path}: {problem}")

    def send(self, msg: tuple[Any, ...]) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            raise self._died() from None

    def recv(self, since: float) -> tuple[Any, ...]:
        """The next message other than a heartbeat; the child has ``timeout_s`` from
        ``since`` (or its last heartbeat) to send it."""
        while True:
            remaining = since + self.timeout_s - time.monotonic()
            ready = multiprocessing.connection.wait(
                [self.conn, self.proc.sentinel], max(remaining, 0)
            )
            if self.conn in ready:
                try:
                    msg = self.conn.recv()
                except (EOFError, ConnectionResetError, OSError):
                    raise self._died() from None
                if msg[0] == "alive":
                    since = time.monotonic()
                    continue
                return msg
            if ready:  # the sentinel alone: the child is gone
                raise self._died()
            if time.monotonic() >= since + self.timeout_s:
                self.kill()
                raise self.gone(f"{self.what} timed out after {self.timeout_s:g}s")

    def _died(self) -> DecoderGone:
        self.proc.join(timeout=5)
        code = self.proc.exitcode
        self.kill()
        if code is not None and code < 0:
            try:
                name = f" ({signal.Signals(-code).name})"
            except ValueError:
                name = ""
            return self.gone(f"{self.what} crashed (signal {-code}{name})")
        return self.gone(f"{self.what} exited unexpectedly (exit code {code})")

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def close(self) -> None:
        if self.proc.exitcode is None and not self.conn.closed:
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(("close",))
            self.proc.join(timeout=2)
        self.kill()


class SharedBuffer:
    """A file-backed shared mapping for frames; unlinked once the child maps it."""

    def __init__(self, frames: int, image_size: int) -> None:
        nbytes = frames * 3 * image_size * image_size
        self.frames = frames
        self.nbytes = nbytes
        self.path = ""
        last_error: OSError | None = None
        for folder in ("/dev/shm", tempfile.gettempdir()):
            if not os.path.isdir(folder):
                continue
            fd, path = tempfile.mkstemp(prefix="memenc-frames-", dir=folder)
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, nbytes)  # fail now, not with SIGBUS later
                else:
                    os.ftruncate(fd, nbytes)
                self.map = mmap.mmap(fd, nbytes)
            except OSError as e:
                last_error = e
                os.close(fd)
                os.unlink(path)
                continue
            os.close(fd)
            self.path = path
            self.view = np.frombuffer(self.map, np.uint8).reshape(frames, 3, image_size, image_size)
            return
        raise OSError(f"cannot allocate {nbytes} bytes of shared memory for frames: {last_error}")

    def unlink(self) -> None:
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = ""

    def close(self) -> None:
        self.unlink()
        self.view = None  # type: ignore[assignment]
        with contextlib.suppress(BufferError):
            self.map.close()
