"""Start the decoder child as a plain subprocess, for parents that are daemonic processes.

multiprocessing refuses to start children from a daemonic process, and Dask's worker
processes are daemonic by default (a cluster started with default settings). A plain
``subprocess.Popen`` is not refused there. `start` runs ``python -m
memenc.pipeline.video.plain_process`` and gives the parent what
`memenc.pipeline.video.process.Decoder` uses from a ``multiprocessing.Process`` — a
duplex `Connection` (over a socket pair) and a process object with ``sentinel``,
``exitcode``, ``is_alive``, ``kill`` and ``join`` — so the deadlines, crash reports and
kills work the same way.

The sentinel is the read end of a pipe whose only write end the child holds: it becomes
readable (EOF) when the child exits, however it exits.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["PlainProcess", "start"]


class PlainProcess:
    """A `subprocess.Popen` child with the parts of `multiprocessing.Process` the decoder
    handle uses."""

    def __init__(self, popen: subprocess.Popen, sentinel: int) -> None:
        self._popen = popen
        self.sentinel = sentinel
        self.pid = popen.pid

    @property
    def exitcode(self) -> int | None:
        """None while running; the exit code, or minus the signal that ended it."""
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self.sentinel)


def start(
    target: Callable[..., None], args: tuple[Any, ...]
) -> tuple[PlainProcess, multiprocessing.connection.Connection]:
    """Start a decoder child that runs ``target(conn, *args)``; `target` is a module-level
    function (it travels by name). Returns the process and the parent's end of the
    connection."""
    parent_sock, child_sock = socket.socketpair()
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, False)
    env = dict(os.environ)
    # the child must import this memenc, wherever the parent found it
    root = os.path.abspath(__file__)
    for _ in range(4):  # memenc/pipeline/video/plain_process.py -> the folder above memenc
        root = os.path.dirname(root)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", __name__, str(child_sock.fileno()), str(write_end)],
            pass_fds=(child_sock.fileno(), write_end),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except BaseException:
        os.close(read_end)
        parent_sock.close()
        raise
    finally:
        child_sock.close()
        os.close(write_end)
    conn = multiprocessing.connection.Connection(parent_sock.detach())
    conn.send((target, args))
    return PlainProcess(popen, read_end), conn


def _main(argv: list[str]) -> None:
    """The child: read the decoder's arguments from the connection, then serve."""
    conn = multiprocessing.connection.Connection(int(argv[1]))
    # argv[2], the sentinel's write end, stays open until this process exits
    try:
        target, args = conn.recv()
    except (EOFError, OSError):
        return
    target(conn, *args)


if __name__ == "__main__":
    _main(sys.argv)
