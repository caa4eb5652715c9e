"""The store's write lock: `store_lock`, an ``flock`` on ``<store>/.memenc.lock`` that the
kernel releases when its holder dies. Only local stores are locked."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from memenc.errors import StoreError, StoreLockedError
from memenc.store.location import Location, check_memenc_location, describe_os_error
from memenc.store.schema import LOCK_FILE

try:  # POSIX only; without it local stores are not locked.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["store_lock"]


@dataclass
class _HeldLock:
    fd: int
    thread: int
    depth: int


_held_locks: dict[str, _HeldLock] = {}
_held_guard = threading.Lock()


def _read_lock_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def store_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the store's exclusive write lock for the duration of the ``with`` block.

    The lock is ``flock`` on ``<store>/.memenc.lock``; the kernel releases it when the
    holder dies, however it dies. It does not wait: a lock held elsewhere raises at once.
    Re-entrant within one thread, so `CacheStore.prepare` (which locks itself) can run
    inside it. For full protection take it before `CacheStore.prepare`::

        with store_lock(path):
            store = CacheStore.prepare(path, layout)
            ...
            store.finalize()

    A path that does not exist yet is created (as an empty directory holding the lock
    file). fsspec URLs and systems without ``fcntl`` are not locked.

    Raises:
        StoreLockedError: another process (or another thread of this one) holds the lock.
        StoreError: the path is not a memenc store, or the lock file cannot be created.
    """
    loc = path if isinstance(path, Location) else Location(path)
    key = loc.lock_key()
    if key is None or fcntl is None:
        yield
        return
    check_memenc_location(loc)  # never drop a lock file into someone else's directory
    loc.make_dir()
    me = threading.get_ident()
    with _held_guard:
        held = _held_locks.get(key)
        if held is not None:
            if held.thread != me:
                raise StoreLockedError(
                    f"{loc}: store is being written by another process (pid {os.getpid()}, "
                    "another thread of this process)"
                )
            held.depth += 1
        else:
            lock_path = os.path.join(key, LOCK_FILE)
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise StoreError(
                    f"{loc}: cannot create lock file: {describe_os_error(exc)}"
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_lock_pid(fd)
                os.close(fd)
                raise StoreLockedError(
                    f"{loc}: store is being written by another process (pid {pid})"
                ) from None
            except OSError as exc:
                os.close(fd)
                raise StoreError(f"{loc}: cannot lock: {describe_os_error(exc)}") from exc
            with contextlib.suppress(OSError):  # the pid is only for the message
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            held = _HeldLock(fd=fd, thread=me, depth=1)
            _held_locks[key] = held
    try:
        yield
    finally:
        with _held_guard:
            held.depth -= 1
            if held.depth == 0:
                del _held_locks[key]
                fcntl.flock(held.fd, fcntl.LOCK_UN)
                os.close(held.fd)
