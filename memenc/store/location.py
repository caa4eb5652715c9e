"""Where a store lives: a local directory, a ``file://`` URL or an fsspec URL (``s3://…``),
and the checks and opens every store user shares.

`Location` parses a path once; `check_memenc_location` refuses what is not a memenc store
(or a place to make one); `open_existing` opens a store memenc made; `describe_os_error`
turns an OSError into the few words a message shows. A path with ``://`` (other than
``file://``) stays a string until `Location` parses it: ``pathlib.Path("s3://b/k")`` is
``s3:/b/k``, a local folder.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import zarr
import zarr.storage

from memenc.errors import StoreError
from memenc.store.schema import ATTRS_KEY, LOCK_FILE, READABLE_SCHEMAS, SCHEMA, memenc_attrs
from memenc.store.urls import check_url, file_url_path, is_url

__all__ = [
    "Location",
    "check_memenc_location",
    "describe_os_error",
    "open_existing",
    "open_group",
]


def describe_os_error(exc: OSError) -> str:
    """The reason an OSError gives, in the words a one-line message shows."""
    if exc.errno == errno.EROFS:  # not PermissionError: no permission would let it write
        return "read-only file system"
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.ENOTDIR:
        return "a parent of this path is not a directory"
    return exc.strerror or str(exc)


class Location:
    """A store path: a local directory, or an fsspec URL."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        text = os.fspath(path)
        self.text = text
        if is_url(text):
            import fsspec

            check_url(text)  # a missing backend is a usage error naming the extra
            self.local: Path | None = None
            self.fs, self.fs_path = fsspec.core.url_to_fs(text)
        else:
            self.local = Path(file_url_path(text))

    def __str__(self) -> str:
        return self.text

    def lock_key(self) -> str | None:
        return os.path.realpath(self.local) if self.local is not None else None

    def zarr_store(self, *, read_only: bool) -> zarr.storage.StoreLike:
        if self.local is not None:
            return zarr.storage.LocalStore(self.local, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.text, read_only=read_only)

    def kind(self) -> str:
        """'absent', 'empty' (a directory with nothing but a lock file), 'zarr' (has a
        zarr.json), 'file' (not a directory) or 'other' (a directory of something else)."""
        try:
            if self.local is not None:
                if not self.local.exists():
                    if self.local.is_symlink():  # not "exists and is not a directory"
                        target = os.readlink(self.local)
                        raise StoreError(f"{self}: a link to {target}, which does not exist")
                    return "absent"
                if not self.local.is_dir():
                    return "file"
                names = {p.name for p in self.local.iterdir()}
            else:
                if not self.fs.exists(self.fs_path):
                    return "absent"
                if self.fs.isfile(self.fs_path):
                    return "file"
                names = {
                    p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.fs_path, detail=False)
                }
        except OSError as exc:
            raise StoreError(f"{self}: cannot read: {describe_os_error(exc)}") from exc
        names.discard(LOCK_FILE)
        if "zarr.json" in names:
            return "zarr"
        return "other" if names else "empty"

    def make_dir(self) -> None:
        try:
            if self.local is not None:
                self.local.mkdir(parents=True, exist_ok=True)
            else:
                self.fs.makedirs(self.fs_path, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self}: cannot create store: {describe_os_error(exc)}") from exc

    def clear(self) -> None:
        """Delete everything in the store directory except the lock file."""
        try:
            if self.local is not None:
                for child in self.local.iterdir():
                    if child.name == LOCK_FILE:
                        continue
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            elif self.fs.exists(self.fs_path):
                self.fs.rm(self.fs_path, recursive=True)
        except OSError as exc:
            raise StoreError(f"{self}: cannot delete old store: {describe_os_error(exc)}") from exc

    @property
    def aside(self) -> Path | None:
        """Where `set_aside` keeps a local store's old contents: a hidden folder beside the
        store's real directory (a path such as ``.`` or a link resolved first, so the folder
        is never inside the store and sits on the store's own file system)."""
        return self._beside("memenc-replaced")

    def _beside(self, suffix: str) -> Path | None:
        """The hidden folder ``.<real name>.<suffix>`` beside a local store's real
        directory; None for object stores."""
        if self.local is None:
            return None
        real = Path(os.path.realpath(self.local))
        return real.parent / f".{real.name}.{suffix}"

    def set_aside(self) -> None:
        """Empty the store directory for a new store (all but the lock file), keeping its
        contents beside it (`aside`) until `drop_aside` or `bring_back`. When that folder
        is there already (an earlier replacement never finished), it holds the store that
        was replaced, so the directory is just cleared. Object stores are cleared.

        The contents move into a second folder first, renamed to `aside` once all are in:
        a move that fails is undone (the store stays as it was), and one cut short by a
        kill is undone by the next call, before anything else."""
        aside = self.aside
        # filled first, renamed to `aside` once whole: a partial copy is never taken for one
        moving = self._beside("memenc-replacing")
        if self.local is None or aside is None or moving is None:
            self.clear()
            return
        self._move_back(moving)  # an earlier call was killed mid-way
        if aside.exists():
            self.clear()
            return
        try:
            moving.mkdir()
            for child in list(self.local.iterdir()):
                if child.name != LOCK_FILE:
                    os.replace(child, moving / child.name)
            os.replace(moving, aside)
        except OSError as exc:
            undone = self._move_back(moving)
            kept = "the store is as it was" if undone else f"part of it is in {moving}"
            raise StoreError(
                f"{self}: cannot set the old store aside ({describe_os_error(exc)}); {kept}"
            ) from exc

    def _move_back(self, moving: Path) -> bool:
        """Move what a `set_aside` cut short left in `moving` back into the store directory;
        True when nothing is left there."""
        if self.local is None or not moving.is_dir():
            return True
        try:
            for child in list(moving.iterdir()):
                os.replace(child, self.local / child.name)
            moving.rmdir()
        except OSError:
            return False
        return True

    def bring_back(self) -> bool:
        """Put back what `set_aside` kept, replacing the directory's contents (all but the
        lock file); False when nothing was kept."""
        aside = self.aside
        if self.local is None or aside is None or not aside.is_dir():
            return False
        self.clear()
        try:
            for child in list(aside.iterdir()):
                os.replace(child, self.local / child.name)
            aside.rmdir()
        except OSError as exc:
            raise StoreError(
                f"{self}: cannot bring back the old store from {aside}: {describe_os_error(exc)}"
            ) from exc
        return True

    def drop_aside(self) -> None:
        """Delete what `set_aside` kept (once the new store is complete)."""
        aside = self.aside
        if aside is not None and aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)

    def remove_partials(self) -> int:
        """Delete zarr's ``*.partial`` temp files left by killed writers; return the count."""
        if self.local is None:
            return 0  # object stores write whole objects; no temp files
        removed = 0
        try:
            for tmp in self.local.rglob("*.partial"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
                    removed += 1
        except OSError as exc:
            raise StoreError(
                f"{self}: cannot remove leftover temp files: {describe_os_error(exc)}"
            ) from exc
        return removed


def open_group(loc: Location, mode: str) -> zarr.Group:
    """Open an existing group with an explicit mode ('r' or 'r+'), never creating one."""
    assert mode in ("r", "r+")
    try:
        group = zarr.open_group(store=loc.zarr_store(read_only=mode == "r"), mode=mode)
    except OSError as exc:
        raise StoreError(f"{loc}: cannot open store: {describe_os_error(exc)}") from exc
    except (TypeError, AttributeError) as exc:
        # JSON that is not an object (``null``, a list) fails inside zarr this way
        raise StoreError(f"{loc}: zarr.json is damaged (not a JSON object)") from exc
    except (ValueError, KeyError) as exc:  # zarr's refusals of other metadata
        raise StoreError(f"{loc}: not a memenc store ({exc})") from exc
    return group


_NOTHING_HERE = {"absent": "no such file or directory", "empty": "empty directory"}


def open_existing(
    loc: Location, mode: str, *, any_schema: bool = False
) -> tuple[zarr.Group, dict[str, Any]]:
    """Open a store memenc made, read-only (`mode` "r") or for chunk writes ("r+"), and
    return its group and ``memenc`` attributes.

    Raises StoreError when there is no store, the path is something else, or its schema
    is not this version's. With ``any_schema`` (for describing a store, not using it) a
    store of any memenc schema version opens, and the refusal of a missing store says
    what is there instead.
    """
    kind = check_memenc_location(loc)
    if kind in ("absent", "empty"):
        if any_schema:
            raise StoreError(f"{loc}: not a memenc store ({_NOTHING_HERE[kind]})")
        raise StoreError(f"{loc}: no memenc store here")
    group = open_group(loc, mode)
    attrs = memenc_attrs(group)
    if any_schema:
        if attrs is None:  # removed between the check and the open
            raise StoreError(f"{loc}: not a memenc store (no '{ATTRS_KEY}' schema)")
        return group, attrs
    attrs = attrs or {}
    # older schema versions open read-only (issue 9: /1 has no obj_ptr), never for writing
    readable = mode == "r" and attrs.get("schema") in READABLE_SCHEMAS
    if attrs.get("schema") != SCHEMA and not readable:
        raise StoreError(
            f"{loc}: store schema {attrs.get('schema')!r} is not {SCHEMA!r} "
            "(made by another memenc version)"
        )
    return group, attrs


def check_memenc_location(loc: Location) -> str:
    """Return the location's kind, refusing anything that is not absent/empty/a memenc store."""
    kind = loc.kind()
    if kind == "file":
        raise StoreError(f"{loc}: exists and is not a directory, so not a memenc store")
    if kind == "other":
        raise StoreError(f"{loc}: is a directory without zarr.json, not a memenc store")
    if kind == "zarr" and memenc_attrs(open_group(loc, "r")) is None:
        raise StoreError(f"{loc}: is a Zarr store but not a memenc cache (no '{ATTRS_KEY}' schema)")
    return kind
