"""memenc's one error hierarchy.

Every error a user can act on is a `MemencError`. The CLI prints `str(error)` as
one line on stderr and exits with `error.exit_code`; library callers catch the
class they care about. Messages name the input (a path, a frame, a key) and the
problem, so they stand on their own without a traceback.
"""

from __future__ import annotations


class MemencError(Exception):
    """Base class: an error caused by the input or the environment, not a bug."""

    exit_code: int = 1


class UsageError(MemencError):
    """The command line itself is wrong (conflicting or malformed options)."""

    exit_code = 2


class VideoDecodeError(MemencError):
    """A video cannot be probed or decoded, or its decoder crashed or hung."""


class MaskError(MemencError):
    """A mask source is missing, unreadable, or does not fit the video."""


class CheckpointError(MemencError):
    """A checkpoint is missing, not a checkpoint, or lacks keys memenc needs."""


class StoreError(MemencError):
    """A Zarr store cannot be created, resumed or read as a memenc cache."""


class StoreLockedError(StoreError):
    """Another process holds the store's write lock."""


class MemencWarning(UserWarning):
    """Something the user should know that does not stop the run (a damaged video
    whose decodable frames are encoded). Raised through `warnings.warn`; the CLI prints
    it as one line ``memenc: warning: …`` on stderr."""
