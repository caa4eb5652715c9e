"""Kill points for crash tests.

`MEMENC_TEST_KILL=<point>[:<chunk>]` makes the process SIGKILL itself when it reaches that
point, so tests can interrupt a run at an exact place without timing games. Points:
`chunk-data:N` (chunk N's data written, its marker not yet), `chunk-done:N` (chunk N
fully written), `before-complete` (every chunk written, status not yet complete).
Unset in normal use: a lookup of one environment variable per chunk.
"""

from __future__ import annotations

import os
import signal


def kill_point(point: str, chunk: int | None = None) -> None:
    spec = os.environ.get("MEMENC_TEST_KILL")
    if spec and spec == (point if chunk is None else f"{point}:{chunk}"):
        os.kill(os.getpid(), signal.SIGKILL)
