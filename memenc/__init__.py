"""memenc: precompute SAM 2 memory caches for videos into chunked Zarr stores.

    import memenc
    memenc.encode_video("clip.mp4", checkpoint="sam2.1_hiera_tiny", out="clip.zarr")
    cache = memenc.open_cache("clip.zarr")

See DESIGN.md in the project for the contract and docs/ARCHITECTURE.md for the modules.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "encode_video", "load_model", "open_cache"]


def __getattr__(name: str):
    # Lazy: `import memenc` stays cheap (no torch) for tools that only need the version.
    if name == "encode_video":
        from memenc.pipeline.engine import encode_video

        return encode_video
    if name == "load_model":
        from memenc.encoders import load_model

        return load_model
    if name == "open_cache":
        from memenc.store.reader import open_cache

        return open_cache
    raise AttributeError(f"module 'memenc' has no attribute {name!r}")
