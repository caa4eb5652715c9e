"""A JSON-safe summary of a memenc store, for ``memenc inspect``.

    info = describe_store("clip.zarr")
    info["status"], info["chunks_done"], info["chunks_total"]
    for a in info["arrays"]:
        a["name"], a["shape"], a["dtype"], a["stored_bytes"]

The store is opened read-only and nothing is created or changed, so a store that is
still being written (status ``in_progress``) can be described while workers fill it.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from memenc.errors import StoreError
from memenc.store.chunkfiles import read_markers
from memenc.store.location import Location, describe_os_error, open_existing
from memenc.store.schema import (
    LOCK_FILE,
    READABLE_SCHEMAS,
    SCHEMA,
    SPECS,
    STATUS_COMPLETE,
    STATUS_IN_PROGRESS,
    chunk_ranges,
    layout_from_group,
)
from memenc.store.settings import json_safe, without_non_finite
from memenc.store.urls import storage_errors

__all__ = ["describe_store", "human_bytes", "summary_lines"]


def describe_store(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a memenc store without changing it.

    Args:
        path: the store (a directory, ``file://`` or fsspec URL).

    Returns:
        A dict that `json.dumps` accepts as it is:

        - ``path``, ``status`` (``in_progress`` | ``complete``; ``creating`` for a creation
          that was cut short), ``schema``, ``memenc_version``, ``fingerprint`` (``""`` when
          the store has none).
        - ``chunks_done``, ``chunks_total``: frame-chunks whose ``chunk_done`` marker is set,
          out of all; ``chunks_pending``: the others as ranges (``"1-3, 7"``, ``""`` when
          none). All three are None when ``chunk_done`` is missing or unreadable.
        - ``num_frames``, ``frame_first``, ``frame_last`` (source frame numbers of the first
          and last rows), ``object_ids``, ``chunk_frames``, ``store_dtype``; None where the
          store does not say.
        - ``arrays``: one dict per array, schema order first: ``name``,
          ``dimension_names``, ``shape``, ``dtype``, ``chunks`` (chunk shape), ``codecs``
          (names, e.g. ``["bytes", "blosc", "crc32c"]``), ``nbytes`` (uncompressed),
          ``stored_bytes`` (its chunk files on disk) and ``stored_chunks`` (how many
          chunk files exist); the last two are None for remote stores.
        - ``size_on_disk``: bytes of every file in the store (metadata included); None
          for remote stores.
        - ``attrs``: the whole ``memenc`` group attribute.
        - ``problems``: what makes the store unreadable by `memenc.open_cache` (a schema
          version it cannot read, an unfinished creation, arrays that do not match the
          schema); empty for a healthy store. A store of the older schema
          memenc.memory-cache/1 has no problem listed but no ``obj_ptr`` array.

    Raises:
        StoreError: the path does not exist, is an empty directory, a file, a directory or
            Zarr group that is not a memenc store, or cannot be read (a URL's storage
            service failing too: no credentials, an endpoint that does not answer).
    """
    with storage_errors(os.fspath(path)):
        return _describe(path)


def _describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    loc = Location(path)
    group, attrs = open_existing(loc, "r", any_schema=True)
    problems: list[str] = []
    # NaN in a hand-edited record reads as None here; the layout check below names it
    attrs = json_safe(without_non_finite(attrs)[0])

    status = attrs.get("status")
    if attrs.get("schema") not in READABLE_SCHEMAS:  # older readable ones: no obj_ptr
        problems.append(f"schema {attrs.get('schema')!r} is not {SCHEMA!r}")
    if status not in (STATUS_IN_PROGRESS, STATUS_COMPLETE):
        problems.append(f"store creation did not finish (status {status!r})")
    else:
        try:
            layout_from_group(group, loc)
        except StoreError as exc:
            problems.append(str(exc).removeprefix(f"{loc}: "))

    arrays = _arrays(group, loc, problems)
    done, total, pending = _chunk_progress(group, problems, status, loc.local)
    frame_index = _read_small(group, "frame_index", problems)
    object_ids = _read_small(group, "object_id", problems)
    features = next((a for a in arrays if a["name"] == "maskmem_features"), None)

    return {
        "path": str(loc),
        "status": status,
        "schema": attrs.get("schema"),
        "memenc_version": attrs.get("memenc_version"),
        "fingerprint": str(attrs.get("fingerprint") or ""),
        "chunks_done": done,
        "chunks_total": total,
        "chunks_pending": pending,
        "num_frames": None if frame_index is None else len(frame_index),
        "frame_first": int(frame_index[0])
        if frame_index is not None and frame_index.size
        else None,
        "frame_last": int(frame_index[-1])
        if frame_index is not None and frame_index.size
        else None,
        "object_ids": None if object_ids is None else [int(i) for i in object_ids],
        "chunk_frames": attrs.get("chunk_frames"),
        "store_dtype": attrs.get("storage_dtype")
        or attrs.get("store_dtype")  # stores made before the attribute was renamed
        or (features["dtype"] if features else None),
        "arrays": arrays,
        "size_on_disk": _tree_bytes(loc.local, problems) if loc.local is not None else None,
        "attrs": attrs,
        "problems": problems,
    }


def _fields(value: Any) -> dict[str, Any]:
    """A record attribute as a dict: one of another type (hand-edited) reads as empty."""
    return value if isinstance(value, dict) else {}


def summary_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The human summary `memenc inspect` prints: (label, text) rows for the video, the
    model, the masks, objects, frames, storage dtype, pointers, status, chunks and size, from a
    `describe_store` result. Fields the store does not record read "-"."""
    attrs = _fields(info.get("attrs"))
    video = _fields(attrs.get("source_video"))
    model = _fields(attrs.get("model"))
    masks = _fields(attrs.get("masks"))
    selection = _fields(attrs.get("frame_selection"))

    def size(v: dict) -> str:
        return f"{v['width']}×{v['height']}" if v.get("width") and v.get("height") else ""

    video_text = " ".join(
        x
        for x in (
            str(video.get("path") or "-"),
            f"({', '.join(p for p in (size(video), _fps(video), _count(video)) if p)})"
            if video
            else "",
        )
        if x
    )
    if model.get("weights") == "random":
        weights = f"random weights, seed {model.get('seed')}"
    elif model.get("checkpoint"):
        sha = model.get("checkpoint_sha256") or ""
        weights = f"checkpoint {model['checkpoint']}" + (f" (sha256 {sha[:12]}…)" if sha else "")
    else:
        weights = "-"
    model_text = (
        f"{model.get('variant', '-')} at {model.get('image_size', '-')} px, {weights}"
        if model
        else "-"
    )
    masks_text = (
        f"{masks.get('path', '-')} ({masks.get('kind', '?')}"
        + (", logits" if masks.get("is_logits") else "")
        + ")"
        if masks
        else "-"
    )
    objects = info.get("object_ids")
    n = info.get("num_frames")
    frames_text = "-" if n is None else f"{n}"
    if n:
        frames_text += f" (source frames {info['frame_first']}…{info['frame_last']}"
        spec = selection.get("spec")
        frames_text += f", selection {spec})" if isinstance(spec, str) and spec.strip(":") else ")"
    done, total = info.get("chunks_done"), info.get("chunks_total")
    chunks_text = "-" if total is None else f"{done}/{total}"
    if info.get("chunks_pending"):
        chunks_text += f" (pending: {info['chunks_pending']})"
    if info.get("chunk_frames"):
        chunks_text += f", {info['chunk_frames']} frames each"
    rows = [
        ("video", video_text),
        ("model", model_text),
        ("masks", masks_text),
        ("objects", "-" if objects is None else ", ".join(map(str, objects)) or "none"),
        ("frames", frames_text),
        ("storage", f"{info.get('store_dtype') or '-'}, computed in {attrs.get('precision', '-')}"),
        ("pointers", _pointers_text(info)),
        ("status", str(info.get("status"))),
        ("chunks done", chunks_text),
        ("size on disk", human_bytes(info.get("size_on_disk"))),
    ]
    rows += [("problem", p) for p in info.get("problems") or []]
    return rows


def _pointers_text(info: dict[str, Any]) -> str:
    """Whether the store holds object pointers (issue 9: schema memenc.memory-cache/2)."""
    if any(a.get("name") == "obj_ptr" for a in info.get("arrays") or []):
        return "obj_ptr (SAM 2 object pointers, float32)"
    return "none (older schema; recompute with `memenc encode … --overwrite`)"


def _fps(video: dict) -> str:
    fps = video.get("fps")
    return f"{fps:g} fps" if isinstance(fps, (int, float)) else ""


def _count(video: dict) -> str:
    n = video.get("frame_count")
    return f"{n} frames" if n is not None else ""


def human_bytes(n: int | None) -> str:
    """1536 -> '1.5 KB'; None -> '-'."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _arrays(group: zarr.Group, loc: Location, problems: list[str]) -> list[dict[str, Any]]:
    """One description per array of the group: the schema's arrays first, then others."""
    try:
        with warnings.catch_warnings():
            # Listing a local store meets the lock file, "not a component of a Zarr
            # hierarchy": expected.
            warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
            names = list(group.array_keys())
    except OSError as exc:
        raise StoreError(f"{loc}: cannot list arrays: {describe_os_error(exc)}") from exc
    except (ValueError, TypeError, AttributeError):  # a member's zarr.json is damaged:
        names = list(SPECS)  # describe the schema's arrays one by one, naming the bad one
    order = {name: i for i, name in enumerate(SPECS)}
    names.sort(key=lambda n: (order.get(n, len(order)), n))
    out = []
    for name in names:
        try:
            array = group[name]
        except KeyError:
            problems.append(f"array {name} is missing")
            continue
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            problems.append(f"array {name} cannot be opened: {exc}")
            continue
        info: dict[str, Any] = {
            "name": name,
            "dimension_names": _dimension_names(array),
            "shape": [int(n) for n in array.shape],
            "dtype": str(array.dtype),
            "chunks": [int(n) for n in array.chunks],
            "codecs": _codec_names(array),
            "nbytes": int(math.prod(array.shape)) * np.dtype(str(array.dtype)).itemsize,
            "stored_bytes": None,
            "stored_chunks": None,
        }
        if loc.local is not None:
            info["stored_bytes"], info["stored_chunks"] = _chunk_files(loc.local / name, problems)
        out.append(info)
    return out


def _dimension_names(array: zarr.Array) -> list[str] | None:
    names = getattr(array.metadata, "dimension_names", None)
    return None if names is None else [str(n) for n in names]


def _codec_names(array: zarr.Array) -> list[str]:
    names = []
    for codec in getattr(array.metadata, "codecs", ()):
        try:
            names.append(str(codec.to_dict()["name"]))
        except (AttributeError, KeyError, TypeError):
            names.append(type(codec).__name__)
    return names


def _chunk_files(folder: Path, problems: list[str]) -> tuple[int, int]:
    """(bytes, count) of an array's chunk files: everything in its folder but zarr.json
    and leftover ``*.partial`` temp files."""
    total = count = 0
    try:
        for root, _dirs, files in os.walk(folder):
            for name in files:
                if name == "zarr.json" and root == str(folder):
                    continue
                if name.endswith(".partial"):
                    continue
                total += os.lstat(os.path.join(root, name)).st_size
                count += 1
    except OSError as exc:
        problems.append(f"{folder}: cannot read: {describe_os_error(exc)}")
    return total, count


def _tree_bytes(root: Path, problems: list[str]) -> int:
    """Bytes of every file under root (the lock file aside), symlinks not followed."""
    total = 0
    try:
        for folder, _dirs, files in os.walk(root):
            for name in files:
                if name == LOCK_FILE and folder == str(root):
                    continue
                total += os.lstat(os.path.join(folder, name)).st_size
    except OSError as exc:
        problems.append(f"{root}: cannot read: {describe_os_error(exc)}")
    return total


def _read_small(group: zarr.Group, name: str, problems: list[str]) -> np.ndarray | None:
    """A small 1-D array's values, or None (with the reason in problems) when missing or
    damaged."""
    try:
        return np.asarray(group[name][:])
    except KeyError:
        return None
    except (OSError, ValueError, RuntimeError, TypeError, AttributeError) as exc:
        problems.append(f"{name} cannot be read: {exc}")
        return None


def _chunk_progress(
    group: zarr.Group, problems: list[str], status: Any, root: Path | None
) -> tuple[int | None, int | None, str | None]:
    """(done, total, pending ranges) from ``chunk_done`` (a local store's files read
    directly, see `read_markers`); markers other than 0 and 1, and unset ones in a store
    whose status is complete, are listed in ``problems``."""
    markers = None
    if root is not None:
        try:
            markers = read_markers(root, group["chunk_done"])
        except (KeyError, OSError, ValueError, RuntimeError, TypeError, AttributeError):
            markers = None  # missing or damaged: _read_small names the problem
    if markers is None:
        markers = _read_small(group, "chunk_done", problems)
    if markers is None:
        return None, None, None
    pending = [int(i) for i in np.flatnonzero(markers != 1)]
    odd = [int(i) for i in np.flatnonzero((markers != 0) & (markers != 1))]
    unset = [int(i) for i in np.flatnonzero(markers == 0)]
    if odd:
        problems.append(
            f"chunk_done is damaged: markers other than 0 or 1 (chunks {chunk_ranges(odd)})"
        )
    if unset and status == STATUS_COMPLETE:
        problems.append(
            f"status is complete but chunks {chunk_ranges(unset)} are not written; "
            "rerunning the same command redoes them"
        )
    return int(markers.size - len(pending)), int(markers.size), chunk_ranges(pending)
