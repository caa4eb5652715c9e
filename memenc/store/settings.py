"""A run's settings, declared once: what the store records and what its fingerprint covers,
and the canonical JSON and content hashing the fingerprint is made of.

`RunSettings` holds every setting of an `encode` run. Each field declares, in its
metadata, whether it is *stored* (written to the store's ``memenc`` attributes, for
provenance and for people) and whether it is *fingerprinted* (part of the identity that
decides "same run: resume or no-op" against "other settings: refuse"). A stored dict
field may also name *provenance* keys: kept in the attributes, left out of the
fingerprint (paths and mtimes).

The fingerprint covers what determines the stored numbers: the content of the video
and of the masks (`content_sha256` of their bytes), the checkpoint's sha256 (or the
seed of random weights), the variant, image size, frames, objects, mask mode,
precision, storage dtype, chunking, and `NUMBERS_VERSION`. Paths and mtimes are
provenance, so copied inputs are the same run and a changed file at the same path is
not; batch size, device, `compile` and the decoder count are recorded but not
fingerprinted (their results agree within DESIGN §3; K decoders give the same pixels).

Hashing costs one read of each input per run (also for a run that finds its store
complete). Measured on the 2-core development machine, file in the page cache: sha256
(stdlib hashlib, 1 MiB reads) at ~0.7 GB/s idle (~1.5 s for a 1 GB video) and
~0.2 GB/s with the cores shared (~5 s); blake2b was slower there (~0.47 GB/s idle).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "NUMBERS_VERSION",
    "RunSettings",
    "content_sha256",
    "fingerprint",
    "json_safe",
]

NUMBERS_VERSION = 2
"""Version of the numbers memenc stores. Bump it whenever a code change alters what a
run writes for the same inputs and settings, so stores made before are not resumed.

2: stores hold SAM 2's object pointers (``obj_ptr``, schema memenc.memory-cache/2). A
store made by an earlier memenc has another fingerprint, so a rerun refuses it as made
with "other settings" unless ``--overwrite`` is given (which recomputes it, pointers
included): intended, since it has no pointers to resume."""

_BLOCK = 1 << 20  # hashing reads 1 MiB at a time


def _json_default(value: Any) -> Any:
    """`json.dumps` default: paths, numpy values and sets as JSON values."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"not JSON-serialisable: {value!r} ({type(value).__name__})")


def _canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default
    )


def without_non_finite(value: Any, where: str = "") -> tuple[Any, list[tuple[str, float]]]:
    """`value` with every NaN or infinite float (which JSON cannot hold, and Zarr's
    metadata reader accepts) replaced by None, and where each was (``source_video.fps``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [(where or "value", value)]
    found: list[tuple[str, float]] = []
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k], bad = without_non_finite(v, f"{where}.{k}" if where else str(k))
            found += bad
        return out, found
    if isinstance(value, (list, tuple)):
        items = []
        for i, v in enumerate(value):
            item, bad = without_non_finite(v, f"{where}[{i}]")
            items.append(item)
            found += bad
        return items, found
    return value, found


def json_safe(value: Any) -> Any:
    """The value as it reads back from JSON (paths → str, tuples → lists, numpy → Python)."""
    return json.loads(_canonical_json(value))


def fingerprint(settings: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of everything that determines a store's data.

    Canonical: keys sorted, no whitespace; paths become strings, numpy scalars and arrays
    Python values, tuples lists. Equal settings give equal fingerprints whatever the key
    order.

    Raises:
        TypeError: a value that has no JSON form.
        ValueError: a NaN or infinite float.
    """
    return hashlib.sha256(_canonical_json(dict(settings)).encode()).hexdigest()


def content_sha256(files: Iterable[str | os.PathLike[str]]) -> str:
    """``"sha256:<hex>"`` of the bytes of `files` in order (one file, or the frames of a
    folder). For several files each one's name (not its folder) and length go in before
    its bytes, so moving bytes between files or renaming a frame changes the hash, while
    copying the folder elsewhere does not. Raises OSError when a file cannot be read."""
    paths = [Path(f) for f in files]
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    for path in paths:
        with open(path, "rb") as f:
            if len(paths) > 1:
                h.update(f"{path.name}\0{os.fstat(f.fileno()).st_size}\0".encode())
            while n := f.readinto(buf):
                h.update(view[:n])
    return "sha256:" + h.hexdigest()


def _setting(
    *, stored: bool, fingerprinted: bool, provenance: tuple[str, ...] = (), **default: Any
) -> Any:
    return field(
        metadata={"stored": stored, "fingerprinted": fingerprinted, "provenance": provenance},
        **default,
    )


_BOTH = {"stored": True, "fingerprinted": True}
_STORED = {"stored": True, "fingerprinted": False}
_FINGERPRINTED = {"stored": False, "fingerprinted": True}


@dataclass(frozen=True)
class RunSettings:
    """Every setting of one run. Field metadata: ``stored`` (in the attributes),
    ``fingerprinted`` (in the fingerprint), ``provenance`` (keys of a dict field that
    are stored only). Field names are the attribute names."""

    numbers_version: int = _setting(**_BOTH)
    source_video: dict[str, Any] = _setting(
        **_BOTH, provenance=("path", "size_bytes", "mtime", "backend_reason")
    )
    video_content: str = _setting(**_BOTH)  # content_sha256 of the file or frame files
    frame_selection: dict[str, Any] = _setting(**_STORED)  # {"spec", "frames"} as given
    frames: tuple[int, ...] = _setting(**_FINGERPRINTED)  # source frame numbers (frame_index)
    model: dict[str, Any] = _setting(**_BOTH, provenance=("checkpoint",))
    masks: dict[str, Any] = _setting(**_BOTH, provenance=("path", "bytes", "mtime"))
    masks_content: str = _setting(**_BOTH)  # content_sha256 of the mask source's files
    memory: dict[str, Any] = _setting(**_BOTH)  # mask mode: binarize, sigmoid scale/bias
    precision: str = _setting(**_BOTH)
    storage_dtype: str = _setting(**_BOTH)
    chunk_frames: int = _setting(**_BOTH)
    batch_size: int = _setting(**_STORED)
    device: str = _setting(**_STORED)
    # decoder processes K (None: chosen by each batch worker); speed only, like batch_size
    decoders: int | None = _setting(**_STORED, default=1)
    compile: bool = _setting(**_STORED, default=False)  # torch.compile'd encoders

    def attrs(self) -> dict[str, Any]:
        """The stored fields, as the store's ``memenc`` attributes hold them."""
        values = asdict(self)
        return {f.name: values[f.name] for f in fields(self) if f.metadata["stored"]}

    def identity(self) -> dict[str, Any]:
        """The fingerprinted fields, provenance keys left out."""
        values = asdict(self)
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.metadata["fingerprinted"]:
                out[f.name] = _without(values[f.name], f.metadata["provenance"])
        return out

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of `identity`."""
        return fingerprint(self.identity())

    @classmethod
    def stored_identity(cls, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """The part of stored attributes that is fingerprinted (stored and fingerprinted
        fields, provenance keys left out); what a refusal compares to say which settings
        differ."""
        out: dict[str, Any] = {}
        for f in fields(cls):
            if f.metadata["stored"] and f.metadata["fingerprinted"] and f.name in attrs:
                out[f.name] = _without(attrs[f.name], f.metadata["provenance"])
        return out


def _without(value: Any, keys: tuple[str, ...]) -> Any:
    if keys and isinstance(value, Mapping):
        return {k: v for k, v in value.items() if k not in keys}
    return value
