"""The memenc memory-cache store: one Zarr v3 group per video (schema memenc.memory-cache/2).

Modules, one concern each:

- `schema`: the `ARRAYS` table, `StoreLayout`, reading a group back into a layout.
- `settings`: `RunSettings`, the fingerprint, content hashing.
- `location`: local path or fsspec URL (`Location`) and the shared open/check helpers.
- `lock`: `store_lock`.
- `writer`: `CacheStore` (prepare, write chunks, finalize).
- `reader`: `open_cache` → `MemoryCache` (torch tensors for SAM 2).
- `report`: `describe_store` and the summary ``memenc inspect`` prints.
- `urls`: which fsspec backend a URL needs (no zarr, for planning batches).

Names load from their module on first use (`from memenc.store import CacheStore`).
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it. Loaded on first use, so `memenc.store.urls`
# (what batch planning needs) stays free of zarr and numpy, and nothing here imports torch
# until `open_cache` is used.
_WHERE = {
    "ARRAYS": "schema",
    "ATTRS_KEY": "schema",
    "SCHEMA": "schema",
    "STORE_DTYPES": "schema",
    "ArraySpec": "schema",
    "StoreLayout": "schema",
    "default_chunk_frames": "schema",
    "NUMBERS_VERSION": "settings",
    "RunSettings": "settings",
    "content_sha256": "settings",
    "fingerprint": "settings",
    "Location": "location",
    "check_url": "urls",
    "is_url": "urls",
    "store_lock": "lock",
    "CacheStore": "writer",
    "MemoryCache": "reader",
    "open_cache": "reader",
    "describe_store": "report",
    "summary_lines": "report",
}

__all__ = [
    "ARRAYS",
    "ATTRS_KEY",
    "NUMBERS_VERSION",
    "SCHEMA",
    "STORE_DTYPES",
    "ArraySpec",
    "CacheStore",
    "Location",
    "MemoryCache",
    "RunSettings",
    "StoreLayout",
    "check_url",
    "content_sha256",
    "default_chunk_frames",
    "describe_store",
    "fingerprint",
    "is_url",
    "open_cache",
    "store_lock",
    "summary_lines",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'memenc.store' has no attribute {name!r}")
    return getattr(importlib.import_module(f"memenc.store.{module}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
