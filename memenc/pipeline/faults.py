"""Kill points for crash tests.

`MEMENC_TEST_KILL=<point>[:<chunk>]` makes the process SIGKILL itself when it reaches that
point, so tests can interrupt a run at an exact place without timing games. Points:
`chunk-data:N` (chunk N's data written, its marker not yet), `chunk-done:N` (chunk N
fully written), `before-complete` (every chunk written, status not yet complete).
Unset in normal use: a lookup of one environment variable per chunk.

With `MEMENC_TEST_KILL_ONCE=<file>` as well, only the process that deletes that file dies,
so a retried unit gets past the point (used to lose one worker of a batch). `memenc
batch` adds the point `unit-start:N` (a worker about to run its unit N of some video).
"""

from __future__ import annotations

import os
import signal


def kill_point(point: str, chunk: int | None = None) -> None:
    spec = os.environ.get("MEMENC_TEST_KILL")
    if spec and spec == (point if chunk is None else f"{point}:{chunk}"):
        once = os.environ.get("MEMENC_TEST_KILL_ONCE")
        if once:
            try:
                os.unlink(once)
            except FileNotFoundError:
                return
        os.kill(os.getpid(), signal.SIGKILL)
