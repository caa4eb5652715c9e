"""Sources, engine and store: video and mask sources, the streaming engine, the Zarr store.

Import the modules you need (``memenc.pipeline.video``, ...); this package imports
nothing itself, so a decoder child process loads only what it uses.
"""
