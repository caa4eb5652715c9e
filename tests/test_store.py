"""The memenc Zarr store (schema memenc.memory-cache/2) and its reader.

Small stores throughout: T=10 frames, 2 objects, 4x4 features, F=3 frames per chunk,
so 4 chunks with a short last one.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import re
import subprocess
import sys
import threading
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from memenc.errors import StoreError, StoreLockedError
from memenc.store import (
    ARRAYS,
    SCHEMA,
    CacheStore,
    StoreLayout,
    chunkfiles,
    default_chunk_frames,
    fingerprint,
    open_cache,
    store_lock,
)
from memenc.store import writer as writer_module
from memenc.store.chunkfiles import ChunkFiles
from memenc.store.report import describe_store
from memenc.store.schema import LOCK_FILE

T, OBJ, H, W, F = 10, 2, 4, 4, 3
OBJECT_IDS = [3, 7]
SETTINGS = {"model": {"variant": "tiny", "seed": 0}, "frames": {"start": 0, "step": 2}}


def make_layout(
    store_dtype: str = "float16",
    settings: dict | None = None,
    chunk_frames: int = F,
    tpos: bool = True,
) -> StoreLayout:
    settings = SETTINGS if settings is None else settings
    rng = np.random.default_rng(123)
    return StoreLayout(
        num_frames=T,
        object_ids=OBJECT_IDS,
        feat_hw=(H, W),
        store_dtype=store_dtype,
        chunk_frames=chunk_frames,
        frame_index=np.arange(T, dtype=np.int64) * 2 + 5,
        pos_enc=rng.standard_normal((64, H, W)).astype(np.float32),
        tpos_enc=rng.standard_normal((7, 1, 1, 64)).astype(np.float32) if tpos else None,
        attrs=settings,
        fingerprint=fingerprint(settings),
    )


def chunk_data(chunk: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic data for one chunk (also used by the worker subprocesses)."""
    rng = np.random.default_rng(1000 + chunk)
    features = rng.standard_normal((n, OBJ, 64, H, W)).astype(np.float32)
    scores = rng.choice([-10.0, 10.0], size=(n, OBJ)).astype(np.float32)
    timestamps = (np.arange(n) + chunk * F) / 24.0
    pointers = rng.standard_normal((n, OBJ, 256)).astype(np.float32)
    return features, scores, timestamps, pointers


def write(store: CacheStore, chunks: list[int] | None = None) -> None:
    for chunk in store.pending_chunks() if chunks is None else chunks:
        store.write_chunk(chunk, *chunk_data(chunk, len(store.chunk_rows(chunk))))


def expected_features(store_dtype: str) -> np.ndarray:
    """[T, OBJ, 64, H, W] as the store should hold it (after the cast), as float32."""
    parts = [chunk_data(c, len(range(c * F, min(c * F + F, T))))[0] for c in range(4)]
    return np.concatenate(parts).astype(store_dtype).astype(np.float32)


def chunk_file(path: Path, name: str, *coords: int) -> Path:
    """The file of chunk ``coords`` of array ``name`` in the local store ``path``."""
    key = zarr.open_array(path / name, mode="r").metadata.encode_chunk_key(coords)
    return path / name / key


def flip_bit(chunk_file: Path, bit: int) -> None:
    """Damage one stored chunk: flip `bit` of the byte in the middle of the file."""
    data = bytearray(chunk_file.read_bytes())
    data[len(data) // 2] ^= bit
    chunk_file.write_bytes(bytes(data))


@pytest.fixture
def written_store(tmp_path: Path):
    """Factory for a store at ``tmp_path/v.zarr``: prepared with `layout` (default
    `make_layout()`), `chunks` written (all by default), finalized when `finalize`.
    Returns (path, store)."""

    def make(
        layout: StoreLayout | None = None,
        chunks: list[int] | None = None,
        *,
        finalize: bool = True,
    ) -> tuple[Path, CacheStore]:
        path = tmp_path / "v.zarr"
        store = CacheStore.prepare(path, make_layout() if layout is None else layout)
        write(store, chunks)
        if finalize:
            store.finalize()
        return path, store

    return make


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path with its bytes (path itself may be a file)."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# ----------------------------------------------------------------- helpers and layout


def test_fingerprint_is_canonical_and_sensitive() -> None:
    a = {"model": {"variant": "tiny", "seed": 0}, "path": Path("/v.mp4"), "n": np.int64(3)}
    b = {"n": 3, "path": "/v.mp4", "model": {"seed": 0, "variant": "tiny"}}
    assert fingerprint(a) == fingerprint(b)
    assert len(fingerprint(a)) == 64
    assert fingerprint({**b, "n": 4}) != fingerprint(b)
    with pytest.raises(ValueError):
        fingerprint({"x": float("nan")})
    with pytest.raises(TypeError):
        fingerprint({"x": object()})


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_default_chunk_frames_targets_1_to_4_mb(dtype: str) -> None:
    f = default_chunk_frames(3, 64, 64, dtype)  # image_size 1024
    chunk_bytes = f * 64 * 64 * 64 * np.dtype(dtype).itemsize
    assert 1 << 20 <= chunk_bytes <= 4 << 20
    assert default_chunk_frames(3, 64, 64, torch.float16) == default_chunk_frames(
        3, 64, 64, "float16"
    )
    assert default_chunk_frames(1, 4, 4, dtype) > 100  # tiny maps: many frames per chunk
    assert default_chunk_frames(1, 1024, 1024, dtype) == 1  # never below 1
    with pytest.raises(ValueError):
        default_chunk_frames(0, 64, 64, dtype)


def test_layout_validates_and_normalises() -> None:
    layout = make_layout()
    assert layout.num_chunks == 4
    assert layout.chunk_rows(3) == range(9, 10)
    assert layout.tpos_enc.shape == (7, 64)
    with pytest.raises(ValueError, match="pos_enc"):
        StoreLayout(**{**vars(layout), "pos_enc": np.zeros((64, 5, 4), np.float32)})
    with pytest.raises(ValueError, match="store_dtype"):
        StoreLayout(**{**vars(layout), "store_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="frame_index"):
        StoreLayout(**{**vars(layout), "frame_index": np.arange(T - 1)})
    with pytest.raises(ValueError, match="duplicates"):
        StoreLayout(**{**vars(layout), "object_ids": [1, 1]})
    with pytest.raises(ValueError, match="status"):
        StoreLayout(**{**vars(layout), "attrs": {"status": "complete"}})


# ----------------------------------------------------------------- round trip and schema


@pytest.mark.parametrize("store_dtype", ["float16", "float32"])
def test_round_trip(tmp_path: Path, store_dtype: str) -> None:
    path = tmp_path / "v.zarr"
    layout = make_layout(store_dtype)
    store = CacheStore.prepare(path, layout)
    assert store.status == "in_progress"
    assert store.pending_chunks() == [0, 1, 2, 3]
    assert [len(store.chunk_rows(c)) for c in range(4)] == [3, 3, 3, 1]
    write(store)
    assert store.pending_chunks() == []
    store.finalize()
    assert store.status == "complete"

    cache = open_cache(path)
    assert cache.status == "complete"
    assert cache.object_ids == OBJECT_IDS
    assert cache.store_dtype == store_dtype
    np.testing.assert_array_equal(cache.frame_index, layout.frame_index)
    np.testing.assert_allclose(cache.timestamps, np.arange(T) / 24.0)
    torch.testing.assert_close(cache.pos_enc, torch.from_numpy(layout.pos_enc), rtol=0, atol=0)
    torch.testing.assert_close(cache.tpos_enc, torch.from_numpy(layout.tpos_enc), rtol=0, atol=0)
    want = expected_features(store_dtype)
    for row in range(T):
        for o, oid in enumerate(OBJECT_IDS):
            got = cache.features(row, oid)
            assert got.dtype == torch.float32 and got.shape == (64, H, W)
            np.testing.assert_array_equal(got.numpy(), want[row, o])
    assert cache.score(9, 7) == chunk_data(3, 1)[1][0, 1]

    attrs = cache.attrs
    assert attrs["schema"] == SCHEMA
    assert attrs["status"] == "complete"
    assert attrs["fingerprint"] == fingerprint(SETTINGS)
    assert attrs["storage_dtype"] == store_dtype
    assert attrs["model"] == SETTINGS["model"]
    assert isinstance(attrs["memenc_version"], str) and attrs["memenc_version"]


def test_schema_dims_chunks_dtypes_and_checksums(written_store) -> None:
    path, _ = written_store(make_layout("float16"))
    group = zarr.open_group(path, mode="r")
    want = {
        "maskmem_features": (("frame", "object", "channel", "y", "x"), (T, OBJ, 64, H, W),
                             (F, 1, 64, H, W), "float16"),
        "maskmem_pos_enc": (("channel", "y", "x"), (64, H, W), (64, H, W), "float32"),
        "object_score_logits": (("frame", "object"), (T, OBJ), (F, OBJ), "float32"),
        "obj_ptr": (("frame", "object", "pointer_channel"), (T, OBJ, 256), (F, OBJ, 256),
                    "float32"),
        "frame_index": (("frame",), (T,), (T,), "int64"),
        "timestamp": (("frame",), (T,), (F,), "float64"),
        "object_id": (("object",), (OBJ,), (OBJ,), "int32"),
        "maskmem_tpos_enc": (("slot", "channel"), (7, 64), (7, 64), "float32"),
        "chunk_done": (("chunk",), (4,), (1,), "uint8"),
    }  # fmt: skip
    assert sorted(group.array_keys()) == sorted(want)
    assert {spec.name for spec in ARRAYS} == set(want)
    for name, (dims, shape, chunks, dtype) in want.items():
        array = group[name]
        assert array.metadata.dimension_names == dims, name
        assert array.shape == shape, name
        assert array.chunks == chunks, name
        assert str(array.dtype) == dtype, name
        assert any(isinstance(c, Crc32cCodec) for c in array.compressors), name
    np.testing.assert_array_equal(group["object_id"][:], OBJECT_IDS)
    # Every frame-chunk marker lives in its own file, so workers never share a chunk; chunk
    # files sit side by side (``c.<i>…``), so writing a chunk creates no directories.
    assert sorted(p.name for p in (path / "chunk_done").iterdir()) == [
        "c.0",
        "c.1",
        "c.2",
        "c.3",
        "zarr.json",
    ]
    assert not [p for p in path.rglob("*") if p.is_dir() and p.parent != path]


def test_store_without_tpos_enc(written_store) -> None:
    path, _ = written_store(make_layout(tpos=False))
    assert "maskmem_tpos_enc" not in zarr.open_group(path, mode="r")
    assert open_cache(path).tpos_enc is None


def test_sam2_output_dict_is_the_bank_by_source_frame(written_store) -> None:
    path, store = written_store(make_layout("float16"))
    cache = open_cache(path)
    assert cache.has_pointers
    pointers = np.concatenate([chunk_data(c, len(store.chunk_rows(c)))[3] for c in range(4)])
    scores = np.concatenate([chunk_data(c, len(store.chunk_rows(c)))[1] for c in range(4)])
    bank = cache.sam2_output_dict(7)
    assert set(bank) == {"cond_frame_outputs", "non_cond_frame_outputs"}
    assert bank["non_cond_frame_outputs"] == {}
    cond = bank["cond_frame_outputs"]
    assert list(cond) == (np.arange(T) * 2 + 5).tolist()  # source frame numbers
    want = expected_features("float16")
    for row, frame in enumerate(cond):
        out = cond[frame]
        assert set(out) == {"maskmem_features", "maskmem_pos_enc", "obj_ptr", "object_score_logits"}
        assert out["maskmem_features"].shape == (1, 64, H, W)
        assert out["maskmem_features"].dtype == torch.float32
        np.testing.assert_array_equal(out["maskmem_features"][0].numpy(), want[row, 1])
        assert out["obj_ptr"].shape == (1, 256) and out["obj_ptr"].dtype == torch.float32
        np.testing.assert_array_equal(out["obj_ptr"][0].numpy(), pointers[row, 1])
        np.testing.assert_array_equal(cache.pointer(row, 7).numpy(), pointers[row, 1])
        assert out["object_score_logits"].tolist() == [[float(scores[row, 1])]]
        assert len(out["maskmem_pos_enc"]) == 1
        torch.testing.assert_close(out["maskmem_pos_enc"][0][0], cache.pos_enc, rtol=0, atol=0)
    some = cache.sam2_output_dict(3, [9, 5, 9], dtype=torch.bfloat16)["cond_frame_outputs"]
    assert list(some) == [9, 5]
    assert some[9]["obj_ptr"].dtype == torch.bfloat16
    assert torch.equal(some[9]["obj_ptr"][0], torch.from_numpy(pointers[2, 0]).bfloat16())
    with pytest.raises(StoreError, match="frame 6 is not in the store"):
        cache.sam2_output_dict(3, [6])
    with pytest.raises(StoreError, match="object 4"):
        cache.sam2_output_dict(4)


def make_v1_store(path: Path) -> None:
    """A store as memenc made it before object pointers: schema memenc.memory-cache/1, the
    same arrays without obj_ptr."""
    store = CacheStore.prepare(path, make_layout("float32"))
    write(store)
    store.finalize()
    group = zarr.open_group(path, mode="r+")
    del group["obj_ptr"]
    attrs = group.attrs["memenc"]
    group.attrs["memenc"] = {**attrs, "schema": "memenc.memory-cache/1"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        zarr.consolidate_metadata(path)


def test_v1_store_opens_and_asking_for_pointers_says_how_to_recompute(tmp_path: Path) -> None:
    from memenc.store.report import describe_store, summary_lines

    path = tmp_path / "old.zarr"
    make_v1_store(path)
    cache = open_cache(path)
    assert not cache.has_pointers
    np.testing.assert_array_equal(cache.features(4, 7).numpy(), expected_features("float32")[4, 1])
    assert cache.for_sam2(4, 7)["maskmem_features"].shape == (1, 64, H, W)
    for ask in (lambda: cache.pointer(4, 7), lambda: cache.sam2_output_dict(7)):
        with pytest.raises(StoreError, match=r"no object pointers.*memenc encode .*--overwrite"):
            ask()
    info = describe_store(path)
    assert info["problems"] == [] and info["schema"] == "memenc.memory-cache/1"
    assert "obj_ptr" not in [a["name"] for a in info["arrays"]]
    assert dict(summary_lines(info))["pointers"].startswith("none")
    with pytest.raises(StoreError, match="not in_progress|is not"):
        CacheStore.open_for_write(path)
    with pytest.raises(StoreError, match=r"schema 'memenc.memory-cache/1'.*--overwrite"):
        CacheStore.prepare(path, make_layout("float32"))
    fresh = CacheStore.prepare(path, make_layout("float32"), overwrite=True)
    assert fresh.attrs["schema"] == SCHEMA and fresh.pending_chunks() == [0, 1, 2, 3]


def test_for_sam2_shapes_and_dtypes(written_store) -> None:
    path, _ = written_store(make_layout("float32"))
    cache = open_cache(path)
    row = cache.row_of(5 + 2 * 4)  # frame_index = 2*row + 5
    assert row == 4
    mem = cache.for_sam2(row, 7)
    assert mem["maskmem_features"].shape == (1, 64, H, W)
    assert mem["maskmem_features"].dtype == torch.bfloat16
    assert isinstance(mem["maskmem_pos_enc"], list) and len(mem["maskmem_pos_enc"]) == 1
    assert mem["maskmem_pos_enc"][0].shape == (1, 64, H, W)
    assert mem["maskmem_pos_enc"][0].dtype == torch.float32
    assert mem["object_score_logits"].shape == (1, 1)
    torch.testing.assert_close(
        mem["maskmem_features"][0], cache.features(row, 7).to(torch.bfloat16), rtol=0, atol=0
    )
    with pytest.raises(StoreError, match="frame 6 is not in the store"):
        cache.row_of(6)
    with pytest.raises(StoreError, match="object 4"):
        cache.features(0, 4)
    with pytest.raises(IndexError):
        cache.features(T, 3)


def test_xarray_and_dask_read_the_store(written_store) -> None:
    xr = pytest.importorskip("xarray")
    path, _ = written_store(make_layout("float16"))
    with warnings.catch_warnings():
        # Complete stores carry consolidated metadata: no listing, so no complaint about
        # the lock file or about missing consolidated metadata.
        warnings.simplefilter("error", zarr.errors.ZarrUserWarning)
        warnings.simplefilter("error", RuntimeWarning)
        ds = xr.open_zarr(path)
    assert ds["maskmem_features"].dims == ("frame", "object", "channel", "y", "x")
    assert ds["maskmem_pos_enc"].dims == ("channel", "y", "x")
    assert ds["object_score_logits"].dims == ("frame", "object")
    assert ds["obj_ptr"].dims == ("frame", "object", "pointer_channel")
    assert ds.sizes["channel"] == 64 and ds.sizes["pointer_channel"] == 256
    assert ds["maskmem_tpos_enc"].dims == ("slot", "channel")
    assert ds["chunk_done"].dims == ("chunk",)
    np.testing.assert_array_equal(
        ds["maskmem_features"].values.astype(np.float32), expected_features("float16")
    )
    np.testing.assert_array_equal(ds["frame_index"].values, np.arange(T) * 2 + 5)
    assert ds.attrs["memenc"]["status"] == "complete"

    da = pytest.importorskip("dask.array")
    feats = da.from_zarr(str(path), component="maskmem_features")
    assert feats.chunksize == (F, 1, 64, H, W)
    np.testing.assert_array_equal(feats.compute().astype(np.float32), expected_features("float16"))


def test_fsspec_url_round_trip() -> None:
    pytest.importorskip("fsspec")
    url = f"memory://memenc-test-{uuid.uuid4().hex}/v.zarr"
    store = CacheStore.prepare(url, make_layout("float32"))
    with store.lock():  # no lock for URLs: a no-op, not an error
        write(store)
        store.finalize()
    cache = open_cache(url)
    np.testing.assert_array_equal(cache.features(3, 3).numpy(), expected_features("float32")[3, 0])
    assert CacheStore.prepare(url, make_layout("float32")).pending_chunks() == []


# ----------------------------------------------------------------- completion and resume


def test_finalize_refuses_with_missing_chunks(written_store) -> None:
    path, store = written_store(chunks=[0, 2], finalize=False)
    with pytest.raises(StoreError, match=r"2 of 4 chunks not written \(chunks 1, 3\)"):
        store.finalize()
    assert store.status == "in_progress"
    assert zarr.open_group(path, mode="r").attrs["memenc"]["status"] == "in_progress"


def test_resume_keeps_written_chunks(written_store) -> None:
    path, _ = written_store(chunks=[0, 2], finalize=False)
    chunk0 = chunk_file(path, "maskmem_features", 0, 0, 0, 0, 0).read_bytes()

    store = CacheStore.prepare(path, make_layout())
    assert store.status == "in_progress"
    assert store.pending_chunks() == [1, 3]
    assert chunk_file(path, "maskmem_features", 0, 0, 0, 0, 0).read_bytes() == chunk0
    write(store)
    store.finalize()
    cache = open_cache(path)
    np.testing.assert_array_equal(cache.features(1, 3).numpy(), expected_features("float16")[1, 0])


def test_complete_store_with_same_fingerprint_is_a_no_op(written_store) -> None:
    path, _ = written_store()
    before = snapshot(path)

    again = CacheStore.prepare(path, make_layout())
    assert again.status == "complete"
    assert again.pending_chunks() == []
    again.finalize()
    assert snapshot(path) == before


def test_an_overwrite_keeps_the_old_store_aside_until_the_new_one_is_complete(
    written_store,
) -> None:
    path, _ = written_store()  # complete
    before = snapshot(path)
    aside = path.parent / f".{path.name}.memenc-replaced"
    other = {**SETTINGS, "model": {"variant": "tiny", "seed": 1}}

    # a replacement that fails: the old store comes back whole, nothing left beside it
    new = CacheStore.prepare(path, make_layout(settings=other), overwrite=True)
    assert aside.is_dir() and new.pending_chunks() == [0, 1, 2, 3]
    write(new, [0, 1])
    assert new.bring_back_replaced() is True
    assert snapshot(path) == before and not aside.exists()
    assert open_cache(path).status == "complete"

    # an overwrite cut short, then a second one: the aside still holds the first store
    new = CacheStore.prepare(path, make_layout(settings=other), overwrite=True)
    write(new, [0])
    again = CacheStore.prepare(path, make_layout(settings=other), overwrite=True)
    assert again.pending_chunks() == [0, 1, 2, 3]
    assert snapshot(aside) == {k: v for k, v in before.items() if k != LOCK_FILE}
    # one that completes: the old store is deleted
    write(again, None)
    again.finalize()
    assert not aside.exists() and again.bring_back_replaced() is False
    assert open_cache(path).attrs["fingerprint"] == fingerprint(other)


def test_an_overwrite_that_cannot_set_the_old_store_aside_leaves_it_as_it_was(
    written_store, monkeypatch
) -> None:
    """A move that fails mid-way (another file system, a full disk) is undone: before, the
    moved part stayed in the aside folder, which the next overwrite took for the whole old
    store and so deleted the rest. A move cut short by a kill is undone by the next one."""
    path, _ = written_store()  # complete
    before = snapshot(path)
    aside = path.parent / f".{path.name}.memenc-replaced"
    moving = path.parent / f".{path.name}.memenc-replacing"
    other = {**SETTINGS, "model": {"variant": "tiny", "seed": 1}}
    real_replace = os.replace
    calls = []

    def failing(src, dst):
        calls.append(src)
        if len(calls) == 3:  # two of the store's entries moved, then the third fails
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(StoreError, match=r"cannot set the old store aside \(Invalid cross-device "
                       r"link\); the store is as it was"):  # fmt: skip
        CacheStore.prepare(path, make_layout(settings=other), overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert snapshot(path) == before and not aside.exists() and not moving.exists()

    # killed after two entries moved: the next overwrite moves them back first, then sets
    # the whole store aside
    moving.mkdir()
    for child in sorted(p for p in path.iterdir() if p.name != LOCK_FILE)[:2]:
        os.replace(child, moving / child.name)
    new = CacheStore.prepare(path, make_layout(settings=other), overwrite=True)
    assert not moving.exists()
    assert snapshot(aside) == {k: v for k, v in before.items() if k != LOCK_FILE}
    assert new.bring_back_replaced() is True and snapshot(path) == before


def test_an_overwrite_of_the_current_folder_keeps_the_old_store_beside_it(
    written_store, monkeypatch
) -> None:
    """`-o .` from inside the store: the aside folder is named from the real path, so it
    lies beside the store, not inside it (where the move would take it into itself)."""
    path, _ = written_store()
    before = snapshot(path)
    monkeypatch.chdir(path)
    other = {**SETTINGS, "model": {"variant": "tiny", "seed": 1}}
    new = CacheStore.prepare(".", make_layout(settings=other), overwrite=True)
    aside = path.parent / f".{path.name}.memenc-replaced"
    assert snapshot(aside) == {k: v for k, v in before.items() if k != LOCK_FILE}
    assert new.bring_back_replaced() is True and snapshot(path) == before


def test_a_setting_that_differs_is_named_once(written_store) -> None:
    path, _ = written_store(chunks=[0], finalize=False)
    other = {**SETTINGS, "chunk_frames": F + 1}  # a layout key that is fingerprinted too
    with pytest.raises(StoreError) as info:
        CacheStore.prepare(path, make_layout(settings=other, chunk_frames=F + 1))
    message = str(info.value)
    assert "(chunk_frames differ)" in message, message


@pytest.mark.parametrize("finish", [False, True], ids=["in_progress", "complete"])
def test_other_fingerprint_is_refused_unless_overwrite(written_store, finish: bool) -> None:
    path, _ = written_store(chunks=[0, 1, 2, 3] if finish else [0], finalize=finish)
    before = snapshot(path)
    other = {**SETTINGS, "model": {"variant": "tiny", "seed": 1}}

    with pytest.raises(StoreError, match=r"other settings \(model\.seed differ.*--overwrite"):
        CacheStore.prepare(path, make_layout(settings=other))
    assert snapshot(path) == before

    fresh = CacheStore.prepare(path, make_layout(settings=other), overwrite=True)
    assert fresh.status == "in_progress"
    assert fresh.pending_chunks() == [0, 1, 2, 3]
    assert fresh.attrs["fingerprint"] == fingerprint(other)
    assert not (path / "maskmem_features" / "c").exists()  # old data gone


def test_unknown_status_is_named_as_damage_not_as_other_settings(written_store) -> None:
    path, _ = written_store(chunks=[0], finalize=False)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["memenc"] = {**group.attrs["memenc"], "status": "bogus"}
    before = snapshot(path)
    with pytest.raises(
        StoreError, match=r"unknown store status 'bogus' \(damaged metadata\); use --overwrite$"
    ):
        CacheStore.prepare(path, make_layout())
    assert snapshot(path) == before
    assert CacheStore.prepare(path, make_layout(), overwrite=True).pending_chunks() == [0, 1, 2, 3]


def test_other_chunking_is_refused(written_store) -> None:
    path, _ = written_store(chunks=[0], finalize=False)
    with pytest.raises(StoreError, match="chunk_frames"):
        CacheStore.prepare(path, make_layout(chunk_frames=5))
    with pytest.raises(StoreError, match="store_dtype"):
        CacheStore.prepare(path, make_layout(store_dtype="float32"))


def test_interrupted_creation_is_redone(tmp_path: Path) -> None:
    path = tmp_path / "v.zarr"
    CacheStore.prepare(path, make_layout())
    group = zarr.open_group(path, mode="r+")  # as if prepare died before its last write
    group.attrs["memenc"] = {**group.attrs["memenc"], "status": "creating"}
    with pytest.raises(StoreError, match="creation did not finish"):
        open_cache(path)
    other = {"model": {"variant": "small"}}
    store = CacheStore.prepare(path, make_layout(settings=other))  # no --overwrite needed
    assert store.status == "in_progress"
    assert store.attrs["fingerprint"] == fingerprint(other)


def test_leftover_partial_files_are_removed(written_store) -> None:
    path, _ = written_store(chunks=[0], finalize=False)
    leftovers = [
        path / "maskmem_features" / "c.1.0.0.0.0.3f2a9c.partial",
        path / "zarr.77aa01.partial",
    ]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a chunk")
    store = CacheStore.prepare(path, make_layout())
    assert not any(p.exists() for p in leftovers)
    assert store.pending_chunks() == [1, 2, 3]
    assert (path / "zarr.json").is_file()


# ----------------------------------------------------------------- writing


def test_write_chunk_checks_shapes_and_range(tmp_path: Path) -> None:
    store = CacheStore.prepare(tmp_path / "v.zarr", make_layout())
    features, scores, timestamps, pointers = chunk_data(3, 1)
    with pytest.raises(ValueError, match=r"features must have shape \(3, 2, 64, 4, 4\)"):
        store.write_chunk(0, features, scores, timestamps, pointers)  # chunk 0 has 3 rows
    with pytest.raises(ValueError, match="scores"):
        store.write_chunk(3, features, scores[:, :1], timestamps, pointers)
    with pytest.raises(ValueError, match=r"pointers must have shape \(1, 2, 256\)"):
        store.write_chunk(3, features, scores, timestamps, pointers[..., :64])
    with pytest.raises(IndexError):
        store.write_chunk(4, features, scores, timestamps, pointers)
    assert store.pending_chunks() == [0, 1, 2, 3]


def test_write_chunk_refuses_float16_overflow_and_nan(tmp_path: Path) -> None:
    store = CacheStore.prepare(tmp_path / "v.zarr", make_layout("float16"))
    features, scores, timestamps, pointers = chunk_data(3, 1)
    with pytest.raises(StoreError, match="float16 range.*--store-dtype float32"):
        store.write_chunk(3, features * 1e6, scores, timestamps, pointers)
    bad = pointers.copy()
    bad[0, 1, 5] = np.inf
    with pytest.raises(StoreError, match="non-finite.*object pointers.*check the checkpoint"):
        store.write_chunk(3, features, scores, timestamps, bad)
    features[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(StoreError, match="non-finite.*features.*check the checkpoint and"):
        store.write_chunk(3, features, scores, timestamps, pointers)
    assert store.pending_chunks() == [0, 1, 2, 3]


def test_open_for_write_needs_an_in_progress_store(tmp_path: Path) -> None:
    path = tmp_path / "v.zarr"
    with pytest.raises(StoreError, match="no memenc store"):
        CacheStore.open_for_write(path)
    store = CacheStore.prepare(path, make_layout())
    worker = CacheStore.open_for_write(path)
    assert worker.layout.chunk_frames == F and worker.layout.object_ids == tuple(OBJECT_IDS)
    write(worker)
    store.finalize()
    with pytest.raises(StoreError, match="'complete', not in_progress"):
        CacheStore.open_for_write(path)


WORKER = """
import sys
import numpy as np
from memenc.store import CacheStore
T, OBJ, H, W, F = {consts}
{chunk_data}
store = CacheStore.open_for_write(sys.argv[1])
for chunk in map(int, sys.argv[2:]):
    store.write_chunk(chunk, *chunk_data(chunk, len(store.chunk_rows(chunk))))
"""


def test_workers_in_other_processes_fill_disjoint_chunks(tmp_path: Path) -> None:
    path = tmp_path / "v.zarr"
    store = CacheStore.prepare(path, make_layout())
    # The workers import only the store module (not torch), so they start quickly.
    code = WORKER.format(consts=(T, OBJ, H, W, F), chunk_data=inspect.getsource(chunk_data))
    with store.lock():
        workers = [
            subprocess.Popen([sys.executable, "-c", code, str(path), *chunks])
            for chunks in (["0", "2"], ["1", "3"])
        ]
        assert [w.wait(timeout=120) for w in workers] == [0, 0]
        assert store.pending_chunks() == []
        store.finalize()
    cache = open_cache(path)
    want = expected_features("float16")
    for row in range(T):
        np.testing.assert_array_equal(cache.features(row, 7).numpy(), want[row, 1])


def test_writer_threads_sharing_one_store_write_what_one_thread_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer threads (two on CUDA) share one `CacheStore`, its `ChunkFiles` and the file
    threads; chunks written by four threads at once, the first ones racing to set the
    writers up, are the files one thread writes."""
    monkeypatch.setattr(chunkfiles, "_checked", {})  # every thread finds no probe done
    layout = make_layout()
    alone = CacheStore.prepare(tmp_path / "alone.zarr", layout)
    write(alone)
    alone.finalize()
    shared = CacheStore.prepare(tmp_path / "shared.zarr", layout)
    start = threading.Barrier(4)
    failures: list[BaseException] = []

    def worker(chunk: int) -> None:
        try:
            start.wait()
            write(shared, [chunk])
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert shared.pending_chunks() == []
    shared.finalize()
    assert _files(tmp_path / "shared.zarr") == _files(tmp_path / "alone.zarr")


def _files(path: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(path).items() if not k.endswith(LOCK_FILE)}


@pytest.mark.parametrize("store_dtype", ["float16", "float32"])
@pytest.mark.parametrize(("separator", "shuffle"), [(".", "shuffle"), ("/", "bitshuffle")])
def test_chunk_files_are_the_bytes_zarr_writes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store_dtype: str,
    separator: str,
    shuffle: str,
) -> None:
    """Local chunks go straight to their files (`ChunkFiles`); every file of the store,
    the short last chunk's included, is what Zarr's own setitem writes. "/" keys and
    bit-shuffle are those of stores made before the flat keys and byte-shuffle."""
    monkeypatch.setattr(
        writer_module, "CHUNK_KEY_ENCODING", {"name": "default", "separator": separator}
    )
    blosc = BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)
    monkeypatch.setattr(writer_module, "COMPRESSORS", (blosc, Crc32cCodec()))
    direct_writes: list[str] = []
    real_files = ChunkFiles.files

    def counted(self: ChunkFiles, start: int, rows: np.ndarray):  # noqa: ANN202
        direct_writes.append(self._array.path)
        return real_files(self, start, rows)

    monkeypatch.setattr(ChunkFiles, "files", counted)
    direct = CacheStore.prepare(tmp_path / "direct.zarr", make_layout(store_dtype))
    write(direct)
    direct.finalize()
    # 4 chunks x (features, scores, pointers, timestamps, marker)
    assert sorted(set(direct_writes)) == sorted(
        ["maskmem_features", "object_score_logits", "obj_ptr", "timestamp", "chunk_done"]
    )
    assert len(direct_writes) == 4 * 5

    monkeypatch.setattr(ChunkFiles, "for_array", classmethod(lambda cls, root, array: None))
    direct_writes.clear()
    through_zarr = CacheStore.prepare(tmp_path / "zarr.zarr", make_layout(store_dtype))
    write(through_zarr)
    through_zarr.finalize()
    assert direct_writes == []

    want = _files(tmp_path / "zarr.zarr")
    got = _files(tmp_path / "direct.zarr")
    assert sorted(got) == sorted(want)
    assert [k for k in want if want[k] != got[k]] == []
    assert any(f"c{separator}3{separator}1{separator}" in k for k in got)  # the short chunk
    stored = zarr.open_array(tmp_path / "direct.zarr" / "maskmem_features", mode="r")
    assert stored.compressors[0].shuffle.value == shuffle


def test_large_chunks_are_compressed_only_where_it_pays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk of 256 KiB or more is stored compressed only when compression saves 1/8 of
    its bytes (judged on a sample); otherwise as an uncompressed Blosc frame. Either way
    Zarr reads back the same values, and a compressed chunk is the bytes Zarr writes."""
    t, f, hw = 24, 16, (32, 32)  # a chunk of one object: 16 x 64 x 32 x 32 float16 = 2 MiB
    rng = np.random.default_rng(5)
    features = np.empty((t, 2, 64, *hw), np.float32)
    features[:, 0] = rng.standard_normal((t, 64, *hw))  # noise: shrinks by ~7%
    features[:, 1] = np.round(rng.standard_normal((t, 64, 1, 1)), 1)  # flat maps
    layout = StoreLayout(
        num_frames=t, object_ids=[1, 2], feat_hw=hw, store_dtype="float16", chunk_frames=f,
        frame_index=np.arange(t, dtype=np.int64), pos_enc=np.zeros((64, *hw), np.float32),
        tpos_enc=None,
        attrs=SETTINGS, fingerprint=fingerprint(SETTINGS),
    )  # fmt: skip

    def written(name: str) -> Path:
        store = CacheStore.prepare(tmp_path / name, layout)
        for chunk in range(2):
            rows = store.chunk_rows(chunk)
            part = features[rows.start : rows.stop]
            n = len(rows)
            store.write_chunk(
                chunk, part, np.ones((n, 2)), np.arange(n) * 1.0, np.ones((n, 2, 256))
            )
        store.finalize()
        return tmp_path / name

    mine = written("direct.zarr")
    monkeypatch.setattr(ChunkFiles, "for_array", classmethod(lambda cls, root, array: None))
    theirs = written("zarr.zarr")

    raw = f * 64 * hw[0] * hw[1] * 2

    def stored(path: Path, chunk: int, obj: int) -> Path:
        return chunk_file(path, "maskmem_features", chunk, obj, 0, 0, 0)

    # the test's own facts: Zarr's compression saves under 1/8 on the noise, far more on
    # the flat maps and on the short last chunk (half of it the NaN fill)
    assert stored(theirs, 0, 0).stat().st_size * 8 > raw * 7
    assert stored(theirs, 0, 1).stat().st_size * 4 < raw
    assert stored(theirs, 1, 0).stat().st_size * 8 < raw * 7
    assert stored(mine, 0, 0).stat().st_size == raw + 16 + 4  # Blosc header, data, CRC32C
    for chunk, obj in [(0, 1), (1, 0), (1, 1)]:
        assert stored(mine, chunk, obj).read_bytes() == stored(theirs, chunk, obj).read_bytes()
    np.testing.assert_array_equal(
        zarr.open_array(mine / "maskmem_features", mode="r")[:],
        zarr.open_array(theirs / "maskmem_features", mode="r")[:],
    )
    np.testing.assert_array_equal(
        zarr.open_array(mine / "maskmem_features", mode="r")[:], features.astype(np.float16)
    )


def test_chunk_files_step_aside_when_their_bytes_would_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A codec chain memenc does not encode itself, or a probe whose bytes differ from
    Zarr's (here: a wrong checksum), sends the writes through Zarr: the store stays right."""
    monkeypatch.setattr(chunkfiles, "_checked", {})
    monkeypatch.setattr(chunkfiles, "_crc32c", lambda: lambda data: 0)
    path = tmp_path / "v.zarr"
    store = CacheStore.prepare(path, make_layout())
    group = zarr.open_group(path, mode="r")
    assert ChunkFiles.for_array(path, group["maskmem_features"]) is None
    write(store)
    store.finalize()
    cache = open_cache(path)
    for t in range(T):
        np.testing.assert_array_equal(
            cache.features(t, 7).numpy(), expected_features("float16")[t, 1]
        )

    other = zarr.create_array(
        tmp_path / "zstd.zarr", shape=(6, 4), chunks=(3, 4), dtype="float32",
        compressors=ZstdCodec(), zarr_format=3,
    )  # fmt: skip
    assert ChunkFiles.for_array(tmp_path / "zstd.zarr", other) is None


@pytest.mark.parametrize("gone", ["deleted", "emptied"])
@pytest.mark.parametrize("array, coords", [("maskmem_features", (1, 1, 0, 0, 0)),
                                            ("obj_ptr", (1, 0, 0)), ("timestamp", (1,))])  # fmt: skip
def test_a_marked_chunk_whose_file_is_gone_is_pending_again(tmp_path, array, coords, gone) -> None:
    """A chunk file deleted after its marker was set (by hand, a sync tool, a bad disk), or
    left with no bytes (a crash before the data reached the disk): the store does not count
    it as written, so a resume redoes it and finalize refuses to call the store complete
    before."""
    path = tmp_path / "v.zarr"
    store = CacheStore.prepare(path, make_layout())
    write(store, [0, 1, 2])
    if gone == "deleted":
        chunk_file(path, array, *coords).unlink()
    else:
        chunk_file(path, array, *coords).write_bytes(b"")
    store = CacheStore.open_for_write(path)
    assert store.pending_chunks() == [1, 3]
    with pytest.raises(StoreError, match=r"2 of 4 chunks not written \(chunks 1, 3\)"):
        store.finalize()
    write(store)  # the resume
    assert store.pending_chunks() == []
    store.finalize()
    torch.testing.assert_close(
        open_cache(path).features(4, 7).float(),
        torch.from_numpy(expected_features("float16")[4, 1]),
        rtol=0, atol=0,
    )  # fmt: skip


# ----------------------------------------------------------------- paths that are not stores


def test_non_store_directory_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "photos"
    path.mkdir()
    (path / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    before = snapshot(path)
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not a memenc store"):
            CacheStore.prepare(path, make_layout(), overwrite=overwrite)
    with pytest.raises(StoreError, match="not a memenc store"):
        open_cache(path)
    with pytest.raises(StoreError, match="not a memenc store"), store_lock(path):
        pass
    assert snapshot(path) == before
    assert not (path / LOCK_FILE).exists()


def test_plain_file_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "v.zarr"
    path.write_bytes(b"precious")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not a directory"):
            CacheStore.prepare(path, make_layout(), overwrite=overwrite)
    with pytest.raises(StoreError):
        open_cache(path)
    assert path.read_bytes() == b"precious"


def test_foreign_zarr_group_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "other.zarr"
    zarr.create_group(str(path), attributes={"owner": "someone else"})
    before = snapshot(path)
    with pytest.raises(StoreError, match="not a memenc cache"):
        CacheStore.prepare(path, make_layout(), overwrite=True)
    with pytest.raises(StoreError, match="not a memenc cache"):
        open_cache(path)
    assert snapshot(path) == before


def test_missing_store_is_an_error_for_the_reader(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no memenc store"):
        open_cache(tmp_path / "nothing.zarr")
    assert not (tmp_path / "nothing.zarr").exists()


def test_unwritable_location_names_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    path = blocker / "v.zarr"  # fails for root too: a parent is a regular file
    with pytest.raises(StoreError, match=f"{path}: cannot create store: .*not a directory"):
        CacheStore.prepare(path, make_layout())
    assert blocker.read_text() == "x"


def test_os_errors_are_named_in_plain_words() -> None:
    """A read-only mount is named as such, not as a permission a user could be given."""
    from memenc.store.location import describe_os_error

    assert describe_os_error(OSError(errno.EROFS, "Read-only file system")) == (
        "read-only file system"
    )
    assert describe_os_error(PermissionError(errno.EACCES, "x")) == "permission denied"
    assert describe_os_error(OSError(errno.ENOSPC, "x")) == "no space left on device"


def test_read_only_parent_is_refused(tmp_path: Path) -> None:
    """A parent folder nobody may write to: chmod 555, or for root (which mode bits do not
    stop) the immutable attribute, which refuses root as well."""
    parent = tmp_path / "ro"
    parent.mkdir()
    as_root = os.geteuid() == 0
    if as_root:
        subprocess.run(["chattr", "+i", str(parent)], check=True)
    else:
        parent.chmod(0o555)
    try:
        with pytest.raises(
            StoreError, match=f"{parent / 'v.zarr'}: .*(permission denied|not permitted)"
        ):
            CacheStore.prepare(parent / "v.zarr", make_layout())
        assert not (parent / "v.zarr").exists()
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(parent)], check=True)
        else:
            parent.chmod(0o755)


# ----------------------------------------------------------------- reading partial and damaged stores


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        ("maskmem_pos_enc", "maskmem_pos_enc holds NaN"),
        ("maskmem_tpos_enc", "maskmem_tpos_enc holds NaN"),
        ("frame_index", r"frame_index is missing \(every row frame 0"),
    ],
)
def test_deleted_chunk_of_an_array_written_at_creation_is_reported(
    written_store, array: str, problem: str
) -> None:
    """Zarr reads a deleted chunk file as the fill value without a word: NaN position
    encodings and a frame_index of zeros were served as data. The reader, `inspect` and a
    rerun now name the array."""
    path, _ = written_store()
    files = [p for p in (path / array).iterdir() if p.name.startswith("c")]
    assert len(files) == 1
    files[0].unlink()
    message = rf"{path}: malformed or damaged store: {problem}"
    with pytest.raises(StoreError, match=message):
        open_cache(path)
    assert re.search(problem, " ".join(describe_store(path)["problems"]))
    with pytest.raises(StoreError, match=message):
        CacheStore.prepare(path, make_layout())


def test_a_rerun_on_a_complete_store_checks_its_chunks_once(written_store, monkeypatch) -> None:
    """prepare, the caller's pending_chunks and finalize each asked whether a complete store
    was whole: three reads of every marker and listings of every chunk file (1.5 s for
    5,000 chunks). One object checks once."""
    path, _ = written_store()
    listings = []
    real = writer_module.missing_chunk_files
    monkeypatch.setattr(
        writer_module, "missing_chunk_files", lambda *a: listings.append(1) or real(*a)
    )
    store = CacheStore.prepare(path, make_layout())
    assert store.pending_chunks() == [] and store.status == "complete"
    store.finalize()
    assert len(listings) == 1


def test_deleted_timestamp_chunk_of_a_complete_store_is_reported(written_store) -> None:
    """A complete store's timestamps are all written: NaN there (the fill value) is a
    deleted chunk file, named, not served as 'not written yet'."""
    path, _ = written_store()
    (path / "timestamp" / "c.1").unlink()
    cache = open_cache(path)
    np.testing.assert_array_equal(cache.features(0, 3).numpy(), expected_features("float16")[0, 0])
    with pytest.raises(StoreError, match=rf"{path}: timestamp chunk 1 is missing \(NaN"):
        _ = cache.timestamps
    # (an in-progress store's NaN rows are pending, and served: see the long-store test)


def test_reader_on_in_progress_store_trusts_only_markers(written_store) -> None:
    path, store = written_store(chunks=[0], finalize=False)
    cache = open_cache(path)
    assert cache.status == "in_progress"
    np.testing.assert_array_equal(cache.features(2, 3).numpy(), expected_features("float16")[2, 0])
    with pytest.raises(StoreError, match="chunk 1, which is not written yet"):
        cache.features(3, 3)
    # Data written but marker not set yet (a writer killed between the two): still refused.
    features = chunk_data(2, 3)[0]
    zarr.open_group(path, mode="r+")["maskmem_features"][6:9] = features.astype(np.float16)
    with pytest.raises(StoreError, match="chunk 2, which is not written yet"):
        cache.features(6, 3)
    write(store, [1])  # finished after the reader opened: now readable
    np.testing.assert_array_equal(cache.features(3, 3).numpy(), expected_features("float16")[3, 0])


def test_flipped_bit_is_detected_on_read(written_store) -> None:
    path, _ = written_store(make_layout("float32"))
    flip_bit(chunk_file(path, "maskmem_features", 1, 0, 0, 0, 0), 0x10)

    cache = open_cache(path)
    with pytest.raises(StoreError, match=r"maskmem_features chunk 1 object 3 is damaged .*; "
                       r"recompute the store \(the same encode with --overwrite\)"):  # fmt: skip
        cache.features(4, 3)
    np.testing.assert_array_equal(  # the other object and the other chunks are fine
        cache.features(4, 7).numpy(), expected_features("float32")[4, 1]
    )
    np.testing.assert_array_equal(cache.features(0, 3).numpy(), expected_features("float32")[0, 0])


def test_a_damaged_marker_counts_as_unset_so_a_rerun_redoes_its_chunk(written_store) -> None:
    """A bit flipped in chunk_done/c.1 made every rerun fail ("chunk_done is damaged")
    with no way out but --overwrite; the marker only says "done", so the chunk is redone."""
    path, _ = written_store()  # complete
    before = snapshot(path)
    flip_bit(chunk_file(path, "chunk_done", 1), 0x10)
    with pytest.raises(StoreError, match=r"chunk_done is damaged .*; running the same encode "
                       r"again redoes that chunk"):  # fmt: skip
        open_cache(path).features(4, 3)
    again = CacheStore.prepare(path, make_layout())
    assert again.pending_chunks() == [1]
    write(again)
    again.finalize()
    assert snapshot(path) == before


def test_a_chunk_file_deleted_under_its_marker_is_an_error_on_read(written_store) -> None:
    """Zarr reads a missing chunk as the fill value (NaN) without an error; the reader
    refuses NaN in a chunk marked written, since the writer never stores it."""
    path, _ = written_store()
    chunk_file(path, "maskmem_features", 1, 0, 0, 0, 0).unlink()
    chunk_file(path, "obj_ptr", 2, 0, 0).unlink()
    chunk_file(path, "object_score_logits", 0, 0).unlink()
    cache = open_cache(path)
    with pytest.raises(StoreError, match=r"maskmem_features chunk 1 object 3 is missing"):
        cache.features(4, 3)
    with pytest.raises(StoreError, match=r"obj_ptr chunk 2 is missing"):
        cache.pointer(6, 7)
    with pytest.raises(StoreError, match=r"object_score_logits row 1 object 3 is missing"):
        cache.score(1, 3)
    with pytest.raises(StoreError, match=r"maskmem_features chunk 1 object 3 is missing"):
        cache.sam2_output_dict(3, frames=[int(cache.frame_index[4])])
    np.testing.assert_array_equal(  # what is there still reads
        cache.features(4, 7).numpy(), expected_features("float16")[4, 1]
    )
    assert cache.pointer(0, 3).shape == (256,)


def test_markers_read_from_their_files_equal_zarrs_reading(written_store) -> None:
    """pending_chunks reads a local store's markers from the files (`read_markers`): the same
    values as Zarr's reading, a marker it does not recognise read through Zarr, a damaged
    one unset (its chunk is redone)."""
    from memenc.store.chunkfiles import read_markers

    path, store = written_store(chunks=[0, 2], finalize=False)
    markers = zarr.open_group(str(path), mode="r+")["chunk_done"]
    markers[3] = 255  # Zarr's own encoding, not the bytes ChunkFiles writes for a 1
    fast = read_markers(path, markers)
    assert fast is not None and fast.tolist() == markers[:].tolist() == [1, 0, 1, 255]
    assert store.pending_chunks() == [1, 3]
    chunk_file(path, "chunk_done", 2).write_bytes(b"\x00" * 21)  # as long as a marker
    assert read_markers(path, markers).tolist() == [1, 0, 0, 255]
    assert store.pending_chunks() == [1, 2, 3]


def test_a_damaged_chunk_marker_is_named(written_store) -> None:
    """A ``chunk_done`` marker that is neither 0 nor 1 is damage, not a chunk "not written
    yet"; inspect lists it, as it lists a complete store with an unmarked chunk."""
    path, _ = written_store()
    zarr.open_group(str(path), mode="r+")["chunk_done"][1] = 255
    with pytest.raises(StoreError, match=r"chunk_done is damaged \(chunk 1's marker is 255"):
        open_cache(path).features(4, 3)
    assert describe_store(path)["problems"] == [
        "chunk_done is damaged: markers other than 0 or 1 (chunks 1)"
    ]
    zarr.open_group(str(path), mode="r+")["chunk_done"][1] = 0
    assert describe_store(path)["problems"] == [
        "status is complete but chunks 1 are not written; rerunning the same command redoes them"
    ]


@pytest.mark.parametrize("damage", ["marker", "file"])
def test_a_complete_store_damaged_since_is_reopened_and_its_chunks_redone(
    written_store, damage
) -> None:
    """A complete store whose chunk 2 lost its marker, or its features' file, goes back to
    in_progress on `prepare` with that chunk pending (before, its rewrite was refused as
    the store was complete); rewriting it makes the store complete and equal to before."""
    path, _ = written_store()
    before = snapshot(path)
    if damage == "marker":
        zarr.open_group(str(path), mode="r+")["chunk_done"][2] = 0
    else:
        chunk_file(path, "maskmem_features", 2, 0, 0, 0, 0).unlink()
    store = CacheStore.prepare(path, make_layout())
    assert store.status == "in_progress" and store.pending_chunks() == [2]
    assert zarr.open_group(str(path), mode="r").attrs["memenc"]["status"] == "in_progress"
    write(store)
    store.finalize()
    assert store.status == "complete" and snapshot(path) == before


def test_store_readers_take_integers_only(written_store) -> None:
    """A float row, frame or object id is refused, not truncated to another one."""
    path, _ = written_store()
    cache = open_cache(path)
    frame = int(cache.frame_index[4])
    for call, args, name in [
        (cache.row_of, (frame + 0.5,), "frame_number"),
        (cache.features, (4.5, 3), "row"),
        (cache.features, (4, 3.0), "object_id"),
        (cache.score, (np.float64(4), 3), "row"),
        (cache.pointer, (4, "3"), "object_id"),
        (cache.for_sam2, (4.2, 3), "row"),
        (cache.sam2_output_dict, (3, [frame + 0.5]), "frame"),
    ]:
        with pytest.raises(TypeError, match=f"^{name} must be an integer"):
            call(*args)
    np.testing.assert_array_equal(  # numpy and torch integers are integers
        cache.features(np.int64(4), torch.tensor(3)).numpy(),
        cache.features(4, 3).numpy(),
    )
    assert cache.row_of(np.int32(frame)) == 4


def test_a_store_with_frame_index_chunked_by_f_opens_and_resumes(tmp_path, monkeypatch) -> None:
    """Stores made before frame_index became one chunk chunked it by F: they still open,
    resume and read."""
    import dataclasses

    from memenc.store import schema

    old_spec = dataclasses.replace(
        schema.SPECS["frame_index"], chunking={"frame": schema._CHUNK_FRAMES}
    )
    old_arrays = tuple(old_spec if a.name == "frame_index" else a for a in schema.ARRAYS)
    path = tmp_path / "v.zarr"
    with monkeypatch.context() as m:
        m.setattr(writer_module, "ARRAYS", old_arrays)
        write(CacheStore.prepare(path, make_layout()), [0, 1])
    assert zarr.open_group(str(path), mode="r")["frame_index"].chunks == (F,)
    store = CacheStore.prepare(path, make_layout())  # the same settings: resumed
    assert store.pending_chunks() == [2, 3]
    write(store, [2, 3])
    store.finalize()
    cache = open_cache(path)
    assert cache.row_of(5 + 2 * 7) == 7
    np.testing.assert_array_equal(cache.features(7, 7).numpy(), expected_features("float16")[7, 1])
    assert describe_store(path)["problems"] == []


def test_a_long_store_opens_without_reading_every_chunk(tmp_path: Path) -> None:
    """open_cache reads frame_index (one chunk) and the small arrays, not each frame-chunk's
    marker and timestamps: 5,000 frame-chunks made it read 15,000 files (9 s here)."""
    import dataclasses

    n = 5_000
    long = dataclasses.replace(
        make_layout(), num_frames=n, chunk_frames=1, frame_index=np.arange(n, dtype=np.int64)
    )
    store = CacheStore.prepare(tmp_path / "long.zarr", long)
    assert sorted(p.name for p in (tmp_path / "long.zarr" / "frame_index").iterdir()) == [
        "c.0", "zarr.json"]  # fmt: skip
    reads: list[str] = []
    real = zarr.storage.LocalStore.get

    async def counted(self, key, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(key)
        return await real(self, key, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(zarr.storage.LocalStore, "get", counted)
        cache = open_cache(tmp_path / "long.zarr")
        assert len(reads) < 50, reads[:60]
        with pytest.raises(StoreError, match="not written yet"):
            cache.features(1_234, 3)  # reads that chunk's marker alone
        assert [k for k in reads if k.startswith("chunk_done/c")] == ["chunk_done/c.1234"], reads
    assert np.isnan(cache.timestamps).all() and store.pending_chunks()[-1] == n - 1


def test_frame_lookup_of_a_long_store_is_bounded_and_exact(tmp_path: Path) -> None:
    """row_of on a store of a million frames: exact for every kind of frame, without a
    Python dict of every frame (~100 MB here); stores whose frame_index does not increase
    (not written by memenc) still look up the first row of each frame."""
    import dataclasses
    import tracemalloc

    n = 1_000_000
    long = dataclasses.replace(
        make_layout(), num_frames=n, frame_index=np.arange(n, dtype=np.int64) * 3 + 1
    )
    CacheStore.prepare(tmp_path / "long.zarr", long)
    tracemalloc.start()
    cache = open_cache(tmp_path / "long.zarr")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # frame_index and timestamp (8 MB each) and what zarr reads them through
    assert peak < 40e6, peak
    assert [cache.row_of(f) for f in (1, 4, 3 * 777_777 + 1, 3 * (n - 1) + 1)] == [
        0, 1, 777_777, n - 1]  # fmt: skip
    for absent in (0, 2, 3 * n + 1, -5, 2**70):
        with pytest.raises(StoreError, match=f"frame {absent} is not in the store"):
            cache.row_of(absent)

    shuffled = dataclasses.replace(
        make_layout(), frame_index=np.array([9, 3, 9, 5, 1, 3, 7, 8, 0, 4])
    )
    CacheStore.prepare(tmp_path / "other.zarr", shuffled)
    cache = open_cache(tmp_path / "other.zarr")
    assert [cache.row_of(f) for f in (9, 3, 5, 1, 7, 8, 0, 4)] == [0, 1, 3, 4, 6, 7, 8, 9]
    with pytest.raises(StoreError, match="frame 2 is not in the store"):
        cache.row_of(2)


@pytest.mark.parametrize(
    ("name", "coords"), [("maskmem_pos_enc", (0, 0, 0)), ("maskmem_tpos_enc", (0, 0))]
)
def test_damaged_small_array_fails_at_open_naming_it(written_store, name, coords) -> None:
    path, _ = written_store()
    flip_bit(chunk_file(path, name, *coords), 0x01)
    with pytest.raises(StoreError, match=rf"malformed or damaged store: {name}: .*checksum"):
        open_cache(path)


# ----------------------------------------------------------------- the lock


HOLDER = """
import sys
from memenc.store import store_lock
with store_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "v.zarr"
    CacheStore.prepare(path, make_layout())
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=rf"another process \(pid {holder.pid}\)"):
            CacheStore.prepare(path, make_layout())
        with pytest.raises(StoreLockedError, match=str(path)):
            CacheStore.prepare(path, make_layout(), overwrite=True)
        assert (path / "zarr.json").exists()  # the overwrite did not happen
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs in the holder
        holder.wait(timeout=60)
    store = CacheStore.prepare(path, make_layout())
    with store.lock():
        assert json.loads((path / "zarr.json").read_text())["attributes"]["memenc"]
        assert (path / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_lock_is_reentrant_in_one_thread_and_exclusive_across_threads(tmp_path: Path) -> None:
    path = tmp_path / "new.zarr"
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            with store_lock(path):
                pass
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            errors.append(exc)

    with store_lock(path):  # before the store exists: creates the directory
        store = CacheStore.prepare(path, make_layout())  # locks again, same thread
        with store.lock():
            pass
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], StoreLockedError)
    with store_lock(path):  # released by the outermost exit
        pass


def test_reader_sees_rows_finished_after_it_opened(written_store) -> None:
    path, store = written_store(chunks=[0], finalize=False)
    cache = open_cache(path)  # opened while the store is in progress
    assert np.isnan(cache.timestamps[3:]).all()
    np.testing.assert_allclose(cache.timestamps[:3], np.arange(3) / 24.0)
    write(store, [1, 3])
    np.testing.assert_allclose(cache.timestamps[:6], np.arange(6) / 24.0)
    assert np.isnan(cache.timestamps[6:9]).all()  # chunk 2 is still pending
    np.testing.assert_allclose(cache.timestamps[9], 9 / 24.0)
    assert cache.features(4, OBJECT_IDS[0]).shape == (64, H, W)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_chunk_file_threads_are_made_again_in_a_forked_child(tmp_path: Path) -> None:
    """A process forked after the shared chunk-file threads exist gets threads of its own:
    the parent's pool would take the child's jobs and never run them."""
    import concurrent.futures

    path = tmp_path / "s.zarr"
    store = CacheStore.prepare(path, make_layout())
    write(store, [0])  # the parent's chunk-file threads exist from here
    files = ChunkFiles.for_array(path, zarr.open_group(path, mode="r+")["obj_ptr"])
    assert files is not None
    rows = chunk_data(1, F)[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # the child: no pytest, no assertions, only an exit status
        status = 3
        try:
            jobs = files.submit(F, rows)
            done, pending = concurrent.futures.wait(jobs, timeout=20)
            status = 0 if not pending and all(j.exception() is None for j in done) else 4
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    stored = zarr.open_array(path / "obj_ptr", mode="r")[F : 2 * F]
    np.testing.assert_array_equal(stored, rows)


def test_a_failed_chunk_file_is_raised_only_after_the_others_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When one chunk file fails with an error that is not an OSError, `write_chunk`
    still waits for the chunk's other files before raising, and sets no marker."""
    import time

    store = CacheStore.prepare(tmp_path / "s.zarr", make_layout())
    write(store, [0])  # the probes ran: from here the direct writes go through write_file
    real = chunkfiles.write_file
    finished: list[str] = []

    def write_file(path: Path, data: bytes) -> None:
        if path.parent.name == "maskmem_features" and path.name.startswith("c.1.0."):
            raise RuntimeError("encoder bug")
        time.sleep(0.2)
        real(path, data)
        finished.append(path.parent.name)

    monkeypatch.setattr(chunkfiles, "write_file", write_file)
    with pytest.raises(RuntimeError, match="encoder bug"):
        store.write_chunk(1, *chunk_data(1, F))
    # object 1's features, scores, pointers and timestamps: all written before the raise
    assert sorted(finished) == sorted(
        ["maskmem_features", "object_score_logits", "obj_ptr", "timestamp"]
    )
    assert store.pending_chunks() == [1, 2, 3]


def test_file_urls_name_the_local_path_rfc_8089_gives(tmp_path) -> None:
    """file:///a%20b/s.zarr is the folder 'a b/s.zarr' and file://localhost/… the same
    path; before, the prefix was cut off as text, so the first made a folder named
    'a%20b' and the second one under ./localhost. Another host is refused."""
    from memenc.errors import UsageError
    from memenc.store.location import Location

    folder = tmp_path / "a b"
    quoted = str(folder).replace(" ", "%20")
    assert Location(f"file://{quoted}/s.zarr").local == folder / "s.zarr"
    assert Location(f"file://localhost{quoted}/s.zarr").local == folder / "s.zarr"
    assert Location(str(folder / "s.zarr")).local == folder / "s.zarr"  # paths as they are
    with pytest.raises(UsageError, match=r"file://elsewhere/s\.zarr: a file:// URL on host"):
        Location("file://elsewhere/s.zarr")


def test_a_reader_open_across_an_overwrite_of_other_settings_refuses_to_read(
    written_store,
) -> None:
    """Before, a reader kept the old frame index and read the new store's chunks under it,
    silently. A store that only goes on (chunks, then complete) reads on; one redone with
    the same settings holds the same data and reads on too."""
    path, store = written_store(chunks=[0], finalize=False)
    cache = open_cache(path)
    cache.features(0, 3)
    write(store, [1, 2, 3])
    store.finalize()  # the group's zarr.json is rewritten: same store, same settings
    np.testing.assert_array_equal(cache.features(4, 3).numpy(), expected_features("float16")[4, 0])
    same = CacheStore.prepare(path, make_layout(), overwrite=True)
    write(same)
    same.finalize()
    np.testing.assert_array_equal(cache.features(8, 7).numpy(), expected_features("float16")[8, 1])

    other = {**SETTINGS, "model": {"variant": "tiny", "seed": 1}}
    new = CacheStore.prepare(path, make_layout(settings=other), overwrite=True)
    write(new)
    new.finalize()
    with pytest.raises(StoreError, match=r"the store was replaced since it was opened"):
        cache.features(9, 3)
    assert open_cache(path).attrs["fingerprint"] == fingerprint(other)  # opened again: fine


def test_a_link_to_nothing_is_named_as_such(tmp_path) -> None:
    """Before: 'exists and is not a directory' for a dangling link given as the store."""
    link = tmp_path / "dang.zarr"
    link.symlink_to(tmp_path / "gone" / "x.zarr")
    for act in (lambda: open_cache(link), lambda: CacheStore.prepare(link, make_layout())):
        with pytest.raises(StoreError, match=r"dang\.zarr: a link to .*gone/x\.zarr, which does "
                           r"not exist"):  # fmt: skip
            act()
