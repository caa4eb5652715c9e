"""Store paths that are URLs: which fsspec backend each needs, and the extra that installs it.

A path with ``://`` (other than ``file://``) stays a string until
`memenc.store.location.Location` parses it: ``pathlib.Path("s3://b/k")`` is ``s3:/b/k``, a local folder.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Iterator

from memenc.errors import MemencError, StoreError, UsageError

__all__ = [
    "check_kept_url",
    "check_url",
    "file_url_path",
    "is_url",
    "storage_error",
    "storage_errors",
    "storage_failure",
]

# protocol -> (the package fsspec needs, the memenc extra that installs it, if any)
_BACKENDS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", None),
    "gcs": ("gcsfs", None),
    "az": ("adlfs", None),
    "abfs": ("adlfs", None),
}


# fsspec protocols that are no place for a store: archives and other file systems layered
# over one given apart from the URL, read-only views of a repository, and file systems of
# file systems. fsspec opens them with arguments a store path does not carry, and fails
# with errors that name neither the URL nor the reason.
_NOT_STORES = {
    "zip", "tar", "libarchive", "github", "git", "reference", "dask", "dir", "cached",
    "simplecache", "filecache", "blockcache", "jlab", "jupyter",
}  # fmt: skip


def file_url_path(text: str) -> str:
    """The local path a ``file://`` URL names, as RFC 8089 reads it: the host empty or
    ``localhost``, %-escapes decoded (``file:///data/my%20clip.zarr`` is
    ``/data/my clip.zarr``); any other text unchanged. Raises UsageError for a file URL
    naming another host, which is no local path."""
    if not text.startswith("file://"):
        return text
    parts = urllib.parse.urlsplit(text)
    if parts.netloc not in ("", "localhost"):
        raise UsageError(
            f"{text}: a file:// URL on host {parts.netloc!r}; give a local path "
            "(file:///path, or the path itself)"
        )
    return urllib.parse.unquote(parts.path)


def is_url(text: str) -> bool:
    """True for an fsspec URL (``s3://…``); False for local paths and ``file://``."""
    return "://" in text and not text.startswith("file://")


def check_url(url: str) -> None:
    """Raise UsageError unless fsspec can open `url` here: an unknown protocol, or one whose
    backend package is not installed (the message names the package and memenc's extra)."""
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    if protocol in _NOT_STORES:
        raise UsageError(
            f"{url}: memenc does not keep stores in {protocol}:// file systems; give a local "
            "folder or an object store URL (s3://, gs://, az://)"
        )
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        package, extra = _BACKENDS.get(protocol, (None, None))
        if extra:
            hint = f"pip install 'memenc[{extra}]'"
        elif package:
            hint = f"pip install {package}"
        else:
            hint = "install the fsspec backend for it"
        raise UsageError(
            f"{url}: {protocol}:// URLs need a backend that is not installed; {hint}"
        ) from None
    except ValueError:
        raise UsageError(f"{url}: unknown URL protocol {protocol!r}") from None


def check_kept_url(url: str) -> None:
    """`check_url`, and raise UsageError for a ``memory://`` URL: that store lives inside
    one process, so what a command (or a batch's worker processes) writes there is gone
    when it exits."""
    if url.split("://", 1)[0].lower() == "memory":
        raise UsageError(
            f"{url}: a memory:// store lives only inside one process and would be lost when "
            "this command exits; give a folder or an object store URL"
        )
    check_url(url)


# the packages whose exceptions mean "the storage service or its credentials failed":
# botocore raises NoCredentialsError or EndpointConnectionError unwrapped through s3fs
_BACKEND_PACKAGES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "adlfs", "azure")


def storage_failure(exc: BaseException) -> BaseException | None:
    """The exception in `exc`'s chain (itself, its cause or context) that a storage
    backend raised (missing credentials, an endpoint that cannot be reached), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        package = type(current).__module__.split(".")[0]
        if package in _BACKEND_PACKAGES:
            return current
        current = current.__cause__ or current.__context__
    return None


def storage_error(where: str, exc: BaseException) -> StoreError | None:
    """A one-line StoreError naming `where` (the store) for a storage backend's failure in
    `exc`'s chain (see `storage_failure`), or None when the backend did not raise it."""
    failed = storage_failure(exc)
    if failed is None:
        return None
    text = (str(failed).strip().splitlines() or [""])[0][:160]
    return StoreError(
        f"{where}: the storage service failed ({type(failed).__name__}: {text}); "
        "check its credentials and endpoint"
    )


@contextlib.contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """Within the block, a storage backend's failure (see `storage_failure`) becomes
    `storage_error`'s StoreError naming `where`; memenc's own errors and anything else
    pass unchanged."""
    try:
        yield
    except MemencError:
        raise
    except Exception as exc:
        failed = storage_error(where, exc)
        if failed is None:
            raise
        raise failed from exc
