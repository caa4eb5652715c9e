"""The work unit's stages on the CPU: the store-dtype cast where the engine makes it
(bit-identical to numpy's), the writer's checks from a peak, the writer pool, errors in
a stage, the batch size's default, and `--compile`'s padding of a short last batch."""

from __future__ import annotations

import sys
import threading
import time

import media
import numpy as np
import pytest
import torch
import zarr
from dispatch import RecordOps
from typer.testing import CliRunner

from memenc.cli.app import app
from memenc.encoders import MemencModel, load_model
from memenc.errors import StoreError
from memenc.pipeline import engine
from memenc.pipeline.engine import (
    StageTimes,
    _ChunkBuffer,
    busiest_stage,
    default_batch_size,
    host_row_peaks,
    row_peaks,
    run_chunks,
    store_layout,
)
from memenc.pipeline.masks import MaskSource, open_masks
from memenc.pipeline.video import VideoSource
from memenc.store import CacheStore

S = 64
T = 10


def _cast_cases() -> np.ndarray:
    """float32 values around every float16 edge: overflow (65504 is the largest float16,
    65520 the tie that rounds to inf), subnormals and the ties between them, ties between
    normals (odd and even neighbours), signed zeros, infinities, and a sweep of bit
    patterns over the whole float32 range."""
    sub = np.float32(2.0**-24)  # the smallest float16 subnormal
    special = [
        0.0, -0.0, 65504.0, 65519.996, 65520.0, 65536.0, 1e6, -65520.0, -65519.996,
        np.inf, -np.inf, sub, sub / 2, sub * 1.5, sub * 2.5, sub / 2 * 1.0001, sub / 4,
        2.0**-14, 2.0**-14 - sub / 2, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-11 + 2.0**-20,
        -(1 + 2.0**-11), 2049.0, 2051.0, 4097.0, 3.14159, -2.71828, 1e-8, -1e-8,
    ]  # fmt: skip
    ties = (np.arange(1, 2048, dtype=np.float32) + 0.5) * sub  # subnormal ties
    sweep = np.arange(0, 2**32, 9973, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([np.asarray(special, np.float32), ties, -ties, sweep])
    return values[~np.isnan(values)]


def test_float16_cast_in_the_chunk_buffer_is_numpys_astype():
    """The engine casts with torch's `.to(float16)` on the device (here: on the CPU, the
    CUDA kernel is checked by the CUDA tests) and with numpy as the chunk buffers are
    filled on the CPU; both give numpy's `astype(np.float16)` bit for bit, overflow to inf,
    subnormals and round-half-to-even ties included."""
    values = _cast_cases()
    with np.errstate(over="ignore"):
        want = values.astype(np.float16).view(np.uint16)
    got = torch.from_numpy(values).to(torch.float16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got, want)
    # through the chunk buffer, as the assembler fills it: rows of [O, 64, h, w]
    per = 64 * 4 * 4
    n = values.size // per
    rows = values[: n * per].reshape(n, 1, 64, 4, 4)
    buf = _ChunkBuffer(n, (1, 64, 4, 4), 256, np.dtype(np.float16))
    for k in range(n):
        buf.put(k, rows[k], np.zeros(1), 0.0, np.zeros((1, 256)), 0.0)
    np.testing.assert_array_equal(buf.features.view(np.uint16).ravel(), want[: n * per])
    assert np.isinf(buf.features.astype(np.float32)).any()  # the overflow cases are in it


def test_row_peaks_mark_non_finite_rows():
    x = torch.tensor([[1.0, -7.0, 3.0], [2.0, float("nan"), 9.0], [0.0, -np.inf, 1.0]])
    for peaks in (row_peaks(x).numpy(), host_row_peaks(x.numpy())):
        assert peaks[0] == 7.0 and np.isnan(peaks[1]) and peaks[2] == np.inf
    y = torch.randn(5, 2, 64, 3, 3)
    np.testing.assert_array_equal(row_peaks(y).numpy(), np.abs(y.numpy()).reshape(5, -1).max(1))
    np.testing.assert_array_equal(host_row_peaks(y.numpy()), row_peaks(y).numpy())


def _layout(model, masks, store_dtype="float16", chunk_frames=3, **kw):
    return store_layout(
        model,
        list(range(T)),
        masks,
        video_attrs={"frames": T},
        video_content="sha256:x",
        masks_content="sha256:y",
        selection=slice(None),
        store_dtype=store_dtype,
        chunk_frames=chunk_frames,
        precision="fp32",
        **kw,
    )


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    video, _ = media.write_clip(d, T)
    return d, video


def _masks(d):
    return open_masks(d / "clip_masks", video_frame_count=T, video_width=80, video_height=60)


def _run(path, clip, *, model=None, store_dtype="float16", runs_on=None, **kw):
    """A fresh store at `path`, all chunks run (by `runs_on`, default `model`); returns
    (its arrays, the store)."""
    d, video = clip
    model = model or load_model(weights="random", image_size=S, device="cpu")
    masks = _masks(d)
    store = CacheStore.prepare(path, _layout(model, masks, store_dtype))
    with VideoSource(video, S, timeout_s=60) as source:
        run_chunks(store, source, masks, runs_on or model, range(store.num_chunks), **kw)
    masks.close()
    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][:] for k in ("maskmem_features", "obj_ptr", "object_score_logits")}, store


def test_chunk_buffers_hold_what_the_old_float32_path_stored(tmp_path, clip):
    """float16 chunks assembled in the store dtype hold numpy's cast of the float32 run's
    features, bit for bit, and two writers store what one does."""
    f32, _ = _run(tmp_path / "f32.zarr", clip, store_dtype="float32", batch_size=4)
    f16, _ = _run(tmp_path / "f16.zarr", clip, batch_size=4, writers=1)
    np.testing.assert_array_equal(
        f16["maskmem_features"].view(np.uint16),
        f32["maskmem_features"].astype(np.float16).view(np.uint16),
    )
    two, store = _run(tmp_path / "two.zarr", clip, batch_size=2, writers=2)
    assert store.pending_chunks() == []
    for name in f16:
        np.testing.assert_array_equal(two[name], f16[name])


def test_write_chunk_checks_from_a_peak_say_what_the_scan_says(tmp_path, clip):
    """Given the peak the engine computed, `write_chunk` raises the messages its own scan
    of float32 features raises (overflow with max |x|, non-finite), and writes nothing."""
    d, _ = clip
    model = load_model(weights="random", image_size=S, device="cpu")
    store = CacheStore.prepare(tmp_path / "s.zarr", _layout(model, _masks(d)))
    h = model.feat_size
    rng = np.random.default_rng(0)
    features = rng.standard_normal((3, 2, 64, h, h)).astype(np.float32)
    rest = (np.zeros((3, 2), np.float32), np.arange(3.0), np.zeros((3, 2, 256), np.float32))
    big = features * 1e5
    for bad in (big, np.where(features > 2, np.nan, features)):
        with pytest.raises(StoreError) as scanned:
            store.write_chunk(0, bad, *rest)
        peak = float(row_peaks(torch.from_numpy(bad)).max())
        with np.errstate(over="ignore"):
            cast = bad.astype(np.float16)
        with pytest.raises(StoreError) as given:
            store.write_chunk(0, cast, *rest, peak=peak)
        assert str(given.value) == str(scanned.value)
    with (
        pytest.raises(StoreError, match=r"max \|x\| = .*use --store-dtype float32"),
        np.errstate(over="ignore"),
    ):
        store.write_chunk(0, big.astype(np.float16), *rest, peak=float(np.abs(big).max()))
    assert store.pending_chunks() == [0, 1, 2, 3]


@pytest.mark.parametrize("writers", [1, 2])
def test_overflow_in_a_batch_ends_the_run_with_the_writers_message(
    tmp_path, clip, monkeypatch, writers
):
    """Features that overflow float16 in the third batch: the run ends with the store's
    one-line message; chunks before it keep their markers, the failing one has none."""
    model = load_model(weights="random", image_size=S, device="cpu")
    real = MemencModel.encode_memory
    calls = []

    def scaled(self, *args, **kw):
        out = real(self, *args, **kw)
        calls.append(1)
        if len(calls) == 3:  # rows 4-5: chunk 1 (rows 3-5)
            object.__setattr__(out, "features", out.features * 1e6)
        return out

    monkeypatch.setattr(MemencModel, "encode_memory", scaled)
    with pytest.raises(StoreError, match=r"rows 3-5 \(chunk 1\) exceed the float16 range"):
        _run(tmp_path / "s.zarr", clip, model=model, batch_size=2, writers=writers)
    pending = CacheStore.open_for_write(tmp_path / "s.zarr").pending_chunks()
    assert 1 in pending and 0 not in pending  # chunk 0 was taken by a writer before chunk 1


def test_batch_size_default_is_per_device_and_recorded(tmp_path, clip):
    assert default_batch_size(torch.device("cpu")) == 4
    assert default_batch_size(torch.device("cuda")) == 16
    d, video = clip
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(
        app,
        ["encode", str(video), "--weights", "random", "--image-size", str(S),
         "--device", "cpu", "-o", str(out), "--quiet"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    attrs = zarr.open_group(str(out), mode="r").attrs["memenc"]
    assert attrs["batch_size"] == 4 and attrs["compile"] is False
    help_text = " ".join(CliRunner().invoke(app, ["encode", "--help"]).output.split())
    assert "default: 4 on the CPU, 16 on CUDA" in help_text and "--compile" in help_text


def test_cpu_stages_other_than_compute_run_no_torch_operation(tmp_path, clip):
    """On the CPU only the compute stage (the calling thread, and the frame workers it runs
    frames on) runs torch operations. One in another stage's thread starts a second OpenMP
    team, and libgomp then stops the compute team's workers spinning between parallel
    regions: 60 frames at S=512 on 2 cores took 55.7 s instead of 46.7 s while the decode
    thread built the mask planes with torch (before frames ran on workers)."""
    seen: list = []

    def enter_mode(frame, event, arg):  # the first event in every thread started from now
        sys.setprofile(None)
        RecordOps(seen).__enter__()  # left active: the thread ends with the run

    threading.setprofile(enter_mode)
    try:
        arrays, store = _run(tmp_path / "s.zarr", clip, batch_size=4, writers=2)
    finally:
        threading.setprofile(None)
    assert store.pending_chunks() == [] and arrays["maskmem_features"].any()
    assert [op for op in seen if not op[0].startswith("memenc-frame")] == []
    # the mode sees work in other threads: the same hook catches a mask expansion there
    t = threading.Thread(target=lambda: torch.zeros(3) == torch.ones(1), name="probe")
    threading.setprofile(enter_mode)
    try:
        t.start()
        t.join()
    finally:
        threading.setprofile(None)
    assert ("probe", "aten.eq.Tensor") in seen


class _FakeCompile:
    """Stands in for `torch.compile`: runs the module eagerly and records input shapes."""

    def __init__(self) -> None:
        self.shapes: dict[str, set] = {}

    def __call__(self, module, *, dynamic=None, **kw):
        assert dynamic is False
        name = type(module).__name__
        seen = self.shapes.setdefault(name, set())

        def run(*args):
            seen.add(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
            return module(*args)

        return run


@pytest.mark.parametrize("whole_batches", [False, True])
def test_compiled_encoders_see_one_shape_and_store_the_same_numbers(
    tmp_path, clip, monkeypatch, whole_batches
):
    """10 frames in batches of 4: the last batch (2 frames) is padded to 4 when the kernels
    take whole batches (as on CUDA), so each compiled encoder sees one input shape; on the
    CPU's one-frame kernels no padding is needed. The stored numbers equal the eager run's
    (bit for bit on the CPU path; batch-size rounding aside for whole batches)."""
    if whole_batches:
        monkeypatch.setattr(MemencModel, "frame_batch", property(lambda self: None))
    model = load_model(weights="random", image_size=S, device="cpu")
    eager, _ = _run(tmp_path / "eager.zarr", clip, model=model, batch_size=4)
    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    model.compile_encoders()
    assert model.compiled and "_compiled" not in "".join(model.state_dict())
    got, _ = _run(tmp_path / "compiled.zarr", clip, model=model, batch_size=4)
    b = 4 if whole_batches else 1
    assert {len(s) for s in fake.shapes.values()} == {1}, fake.shapes
    ((image_shape,),) = fake.shapes["ImageEncoder"]
    assert image_shape == (b, 3, S, S)
    ((_, mask_shape),) = fake.shapes["MemoryEncoder"]
    assert mask_shape[0] == b
    for name in eager:
        if whole_batches:
            np.testing.assert_allclose(got[name], eager[name], rtol=1e-3, atol=1e-4)
        else:
            np.testing.assert_array_equal(got[name], eager[name])


def test_pad_repeats_the_last_row():
    x = torch.arange(6).view(2, 3)
    np.testing.assert_array_equal(
        engine._pad(x, 4).numpy(), [[0, 1, 2], [3, 4, 5]] + [[3, 4, 5]] * 2
    )


class _FakeEvent:
    """Stands in for `torch.cuda.Event` on the CPU: records what happens to it."""

    log: list[tuple[str, int]] = []
    count = 0

    def __init__(self, blocking: bool = False) -> None:
        assert blocking  # the waiting threads sleep rather than spin
        _FakeEvent.count += 1
        self.id = _FakeEvent.count

    def record(self, stream=None) -> None:
        self.log.append(("record", self.id))

    def synchronize(self) -> None:
        self.log.append(("sync", self.id))


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA's host-side calls made runnable on the CPU: pinned allocations become plain
    ones, events record their calls, `current_stream` is a placeholder. Tensors stay on
    the CPU, so the plumbing runs and its results can be compared with the CPU path."""
    real_empty = torch.empty

    def empty(*shape, pin_memory=False, **kw):
        return real_empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    _FakeEvent.log = []
    return _FakeEvent.log


def test_staging_reuses_a_pinned_slot_only_after_its_copy_finished(fake_cuda):
    staging = engine._Staging(torch.device("cpu"), slots=2)
    batches = [torch.full((2, 3), float(i)) for i in range(3)]
    # on the CPU `.to(device)` returns the pinned view itself: clone, as a device copy is
    outs = [staging.to_device(batches[0], batches[0] > 0)[0].clone()]
    first = staging._buffers[0][0].data_ptr()
    outs += [staging.to_device(b, b > 0)[0].clone() for b in batches[1:]]
    for b, out in zip(batches, outs):
        np.testing.assert_array_equal(out.numpy(), b.numpy())
    # slots 0, 1, then slot 0 again: only after the event behind its first copy passed
    assert fake_cuda == [("record", 1), ("record", 2), ("sync", 1), ("record", 3)]
    slot = staging._buffers[0][0]
    assert slot.data_ptr() == first  # the one pinned buffer, reused
    np.testing.assert_array_equal(slot[:6].numpy(), np.full(6, 2.0))  # holds batch 2 now


def test_cuda_results_path_stores_what_the_cpu_path_stores(tmp_path, clip, monkeypatch, fake_cuda):
    """The CUDA branch end to end on the CPU with faked pinning and events (a stage thread,
    cast and peaks before the copies, pinned result slots, events waited on, two writers):
    the stored numbers equal the CPU path's, bit for bit, and every batch's event is
    waited on by the assembler."""
    model = load_model(weights="random", image_size=S, device="cpu")
    want, _ = _run(tmp_path / "cpu.zarr", clip, model=model, batch_size=2)

    class CudaLike:  # run_chunks sees a CUDA model; the kernels stay on the CPU
        device = type("Device", (), {"type": "cuda"})()
        compiled = False
        frame_batch = 1
        image_features = staticmethod(model.image_features)
        encode_memory = staticmethod(model.encode_memory)

    class CpuStaging(engine._Staging):  # a copy out of the slot, as the device copy is
        def to_device(self, *tensors):
            return [t.clone() for t in super().to_device(*tensors)]

    monkeypatch.setattr(engine, "_Staging", lambda device: CpuStaging(torch.device("cpu")))
    # the fake device is no torch device: masks stay on the host here (label maps go to a
    # real device in `read_to`, tested in test_masks_on_device.py) and are staged as frames
    monkeypatch.setattr(MaskSource, "read_to", lambda self, frames, device: self.read(frames))
    times = StageTimes()
    got, store = _run(tmp_path / "cuda.zarr", clip, model=model, runs_on=CudaLike(), batch_size=2,
                      times=times)  # fmt: skip
    assert store.pending_chunks() == []
    stages = times.summary()  # the staging thread is a stage of its own; two writers
    assert list(stages) == ["decode", "stage", "compute", "assemble", "write"]
    assert stages["write"]["threads"] == 2
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    synced = {i for what, i in fake_cuda if what == "sync"}
    recorded = {i for what, i in fake_cuda if what == "record"}
    assert len(recorded) == 2 * 5  # T=10 frames in batches of 2: staging + results each
    # every results event (5) is waited on by the assembler, and staging waits before it
    # reuses its 3 slots for batches 4 and 5 (2)
    assert len(synced) == 5 + 2


class _SlowCompute:
    """`model` as `run_chunks` sees it, with `image_features` taking `delay` s longer."""

    def __init__(self, model, delay: float) -> None:
        self.device, self.compiled, self.frame_batch = model.device, False, model.frame_batch
        self._model, self._delay = model, delay
        self.encode_memory = model.encode_memory

    def image_features(self, frames):
        time.sleep(self._delay)
        return self._model.image_features(frames)


def _check_sums(stages: dict) -> None:
    for name, s in stages.items():  # busy and the waits make up each stage's time
        parts = s["busy"] + s["waiting_for_input"] + s["waiting_for_output"]
        assert parts + s["waiting_for_device"] == pytest.approx(s["seconds"], abs=0.01), name


def test_stage_times_name_the_stage_that_bounds_the_run(tmp_path, clip, monkeypatch):
    """`StageTimes` puts the time where it went: with compute slowed by 0.4 s a batch
    (5 batches), compute is busy for at least 2 s while decode waits for room and the
    writer for input; with each chunk's write slowed by 1.5 s (4 chunks), the writer is
    busy for at least 6 s and the assembler waits for room."""
    model = load_model(weights="random", image_size=S, device="cpu")
    times = StageTimes()
    _run(tmp_path / "a.zarr", clip, model=model, runs_on=_SlowCompute(model, 0.4),
         batch_size=2, times=times)  # fmt: skip
    st = times.summary()
    assert list(st) == ["decode", "compute", "assemble", "write"]
    assert all(s["threads"] == 1 for s in st.values())
    _check_sums(st)
    assert st["compute"]["busy"] >= 2.0
    assert st["compute"]["waiting_for_input"] < 1.0
    assert st["decode"]["waiting_for_output"] >= 1.0  # a bounded queue ahead of compute
    assert st["write"]["waiting_for_input"] >= 2.0

    real = CacheStore.write_chunk

    def slow_write(self, *args, **kwargs):
        time.sleep(1.5)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CacheStore, "write_chunk", slow_write)
    times = StageTimes()
    _, store = _run(tmp_path / "b.zarr", clip, model=model, batch_size=2, writers=1,
                    queue_depth=1, times=times)  # fmt: skip
    assert store.pending_chunks() == []
    st = times.summary()
    _check_sums(st)
    assert st["write"]["busy"] >= 6.0
    # T=10 rows in chunks of 3, one waiting for the writer at most: the assembler hands on
    # the fourth once the writer has finished the first two (3 s), long after the compute
    assert st["assemble"]["waiting_for_output"] >= 1.0


def test_busiest_stage_counts_the_devices_time_and_writers_per_thread():
    def stage(busy, threads=1, device=0.0, seconds=10.0):
        return {"threads": threads, "seconds": seconds, "busy": busy, "waiting_for_input": 0.0,
                "waiting_for_output": 0.0, "waiting_for_device": device}  # fmt: skip

    cpu = {"decode": stage(2.0), "compute": stage(9.0), "assemble": stage(0.1),
           "write": stage(1.0)}  # fmt: skip
    assert busiest_stage(cpu) == ("compute", 0.9)
    # CUDA: compute only launches; the assembler's wait for the device is the GPU's work
    cuda = {**cpu, "compute": stage(1.0), "assemble": stage(0.2, device=6.0)}
    assert busiest_stage(cuda) == ("device", 0.6)
    # two writers busy 8 s together: 4 s each, less than decode's 5
    both = {**cuda, "decode": stage(5.0), "write": stage(8.0, threads=2, seconds=20.0)}
    assert busiest_stage(both) == ("device", 0.6)
    assert busiest_stage({**both, "decode": stage(7.0)}) == ("decode", 0.7)
    assert busiest_stage({}) is None
