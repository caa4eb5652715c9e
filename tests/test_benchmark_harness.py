"""The benchmark harness (benchmarks/run.py) keeps what it measured when a run fails or
outlasts its budget: benchmarks/gpu.sh runs it once, inside a fixed device budget."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from benchmarks import run as bench


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_timed_process_kills_the_whole_process_group_past_its_timeout(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    cmd = ["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 1 s"):
        bench.timed_process(cmd, timeout=1.0)
    assert time.monotonic() - t < 10
    grandchild = int(pidfile.read_text())
    for _ in range(50):  # the kill is sent; give the kernel a moment to reap
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_timed_process_reports_a_failed_command_with_its_stderr():
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('bad input\\n'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="exited 3: bad input"):
        bench.timed_process(cmd)


def test_a_failed_whole_run_is_reported_in_its_row_and_the_others_still_run(tmp_path, monkeypatch):
    case = bench.Case("tiny case", "sam2.1_hiera_tiny", 64, 2, ("memenc fp32", "reference fp32"), 2)
    inp = bench.Inputs(tmp_path / "v.mp4", tmp_path / "m", tmp_path / "ck.pt", case)
    calls: list[str] = []

    def fake(cmd, gpu=False, timeout=None):
        name = "reference" if "--child" in cmd else "memenc"
        calls.append(name)
        if name == "memenc":
            raise RuntimeError("exited 1: memenc: something broke")
        return {"seconds": 2.0, "tree_peak_mb": 100.0, "build_s": 0.5, "loop_s": 1.0}

    monkeypatch.setattr(bench, "timed_process", fake)
    res = bench.Results(tmp_path / "out")
    bench.whole_runs(res, inp, "cpu", bench.SUITES["quick"], tmp_path)
    assert calls == ["memenc", "reference", "reference"]  # the failed run is not repeated
    text = "\n".join(res.lines)
    assert "| memenc fp32 | failed: exited 1: memenc: something broke |" in text
    assert "| reference fp32 | 2.00 (2.00–2.00) |" in text
    assert res.failures == {
        "whole/tiny case/memenc fp32": "failed: exited 1: memenc: something broke"
    }
    assert (tmp_path / "out" / "benchmark.md").read_text().count("something broke") == 1


def test_work_past_the_budget_is_skipped_and_said_so(tmp_path, monkeypatch):
    case = bench.Case("tiny case", "sam2.1_hiera_tiny", 64, 2, ("memenc fp32",), 1)
    inp = bench.Inputs(tmp_path / "v.mp4", tmp_path / "m", None, case)
    monkeypatch.setattr(bench, "DEADLINE", bench.Deadline(5))  # under the 15 s a run needs
    monkeypatch.setattr(bench, "timed_process", lambda *a, **k: pytest.fail("ran past budget"))
    res = bench.Results(None)
    bench.whole_runs(res, inp, "cpu", bench.SUITES["quick"], tmp_path)
    assert res.failures == {
        "whole/tiny case/memenc fp32": "not run: the benchmark's time budget was spent"
    }
    assert any("not run: the benchmark's time budget was spent" in line for line in res.lines)


def test_whole_runs_without_a_budget_wait_as_long_as_a_run_takes(tmp_path, monkeypatch):
    """No --budget-s: the runs get no timeout (an infinite one made subprocess raise
    OverflowError, so every whole run of the CPU suite failed)."""
    case = bench.Case("tiny case", "sam2.1_hiera_tiny", 64, 2, ("memenc fp32",), 1)
    inp = bench.Inputs(tmp_path / "v.mp4", tmp_path / "m", None, case)
    real = bench.timed_process
    timeouts: list = []

    def trivial(cmd, gpu=False, timeout=None):
        timeouts.append(timeout)
        return real([sys.executable, "-c", "pass"], gpu=gpu, timeout=timeout)

    monkeypatch.setattr(bench, "DEADLINE", bench.Deadline(None))
    monkeypatch.setattr(bench, "timed_process", trivial)
    res = bench.Results(None)
    bench.whole_runs(res, inp, "cpu", bench.SUITES["quick"], tmp_path)
    assert timeouts == [None] and res.failures == {}
    assert len(res.m("whole/tiny case/memenc fp32").samples) == 1


def test_a_runs_k_reaches_the_memenc_command(tmp_path):
    inp = bench.Inputs(tmp_path / "v.mp4", tmp_path / "m", None, bench.SUITES["gpu512"].cases[0])
    assert [bench.decoders_in(r) for r in inp.case.runs] == [None, 8, None, None, 8]
    cmd = bench.memenc_cmd(inp, tmp_path / "o.zarr", "cuda", "bf16", False, 4)
    assert cmd[cmd.index("--decoders") + 1] == "4" and "--compile" not in cmd
    assert "--decoders" not in bench.memenc_cmd(inp, tmp_path / "o.zarr", "cpu", "fp32", True, None)


def test_compute_alone_times_the_engines_calls_and_writes_its_table(tmp_path):
    """benchmarks/compute.py on the CPU: host time is timed inside wall time, the
    throughput is the batch over wall time, and there is no CUDA graph row to report."""
    from benchmarks import compute

    assert compute.main(["--device", "cpu", "--image-size", "256", "--batch-size", "2",
                         "--precisions", "fp32", "--repeats", "2", "--warmup", "1",
                         "--out", str(tmp_path)]) == 0  # fmt: skip
    result = json.loads((tmp_path / "compute.json").read_text())
    (row,) = result["rows"]
    assert row["precision"] == "fp32" and 0 < row["host_s"] <= row["wall_s"]
    assert row["frames_per_s"] == pytest.approx(2 / row["wall_s"])
    assert "graph_replay_s" not in row
    md = (tmp_path / "compute.md").read_text()
    assert "S=256, batches of 2, cpu" in md and "| fp32 |" in md and "| – | – |" in md


def test_the_stages_run_in_the_engines_batches_for_the_device():
    """The stages measured alone use the batch `memenc encode` uses on that device (they
    used 4 everywhere, and on CUDA the engine runs 16)."""
    import torch

    from memenc.pipeline.engine import default_batch_size

    for device in ("cpu", "cuda"):
        assert bench.stage_batch(device) == default_batch_size(torch.device(device))
    assert bench.stage_batch("cuda") > bench.stage_batch("cpu")


def test_the_stages_run_alone_without_the_whole_runs(tmp_path):
    """`--only stages`: no whole run has made the memenc fp32 store whose layout the
    write-only stage copies, so the stages make it (it failed with StopIteration)."""
    case = bench.Case("stages only", "sam2.1_hiera_tiny", 256, 4, ("memenc fp32",), 1,
                      width=96, height=64)  # fmt: skip
    suite = bench.Suite(cases=(case,), decoders=(1,), micro_size=256,
                        micro_variant=case.variant, repeats=2, stages_case=case.name)  # fmt: skip
    inp = bench.make_inputs(tmp_path, case, have_reference=False)
    res = bench.Results(None)
    bench.stages(res, inp, suite, "cpu", tmp_path)
    key = f"stages/{case.name}"
    for stage in ("decode K=1", "compute", "write"):
        assert len(res.m(f"{key}/{stage}").samples) == 2, stage
    assert res.m(f"{key}/write MB/s").median > 0
    # the same bytes each repeat: the throughput over all pairs is the sum of np.save's
    # seconds (1 / its rate) over the sum of Zarr's
    zarr_rates, np_rates = res.m(f"{key}/write MB/s").samples, res.m(f"{key}/np.save MB/s").samples
    throughput = sum(1 / r for r in np_rates) / sum(1 / r for r in zarr_rates)
    assert res.ratios[f"{key}/zarr_over_npsave_throughput"] == pytest.approx(throughput)
    # one chunk: only the second repeat's write is timed per chunk (the first probes)
    (wall,) = res.m(f"{key}/write wall ms per chunk").samples
    assert wall == pytest.approx(res.m(f"{key}/write").samples[1] * 1e3)
    for name in ("write CPU", "np.save CPU", "np.save wall"):
        (ms,) = res.m(f"{key}/{name} ms per chunk").samples
        assert ms > 0, name
    assert any(line.startswith("- per frame-chunk (") for line in res.lines)
    (made,) = tmp_path.glob("stages_only_memenc_fp32*.zarr")
    assert json.loads((made / "zarr.json").read_text())["attributes"]["memenc"]["status"] == (
        "complete"
    )
    assert any("fp32, batches of 4" in line for line in res.lines)


def test_the_decode_stage_can_read_a_longer_clip_of_its_own(tmp_path, monkeypatch):
    """`Suite.decode_frames` (the gpu suite: 256): the decode stage reads a generated clip
    of that many frames, its table's frames/s are over those frames, the threads each
    decoder got are said, and the slowest stage is scaled to the case's frames."""
    import benchmarks.decode as decode_module

    seen = []
    real = decode_module.decode_throughput

    def spy(video, image_size, frames, batch, k, **kw):
        seen.append((Path(video).name, len(frames), k))
        return real(video, image_size, frames, batch, k, **kw)

    monkeypatch.setattr(decode_module, "decode_throughput", spy)
    case = bench.Case("own clip", "sam2.1_hiera_tiny", 256, 4, ("memenc fp32",), 1,
                      width=96, height=64)  # fmt: skip
    suite = bench.Suite(cases=(case,), decoders=(1, 2), micro_size=256,
                        micro_variant=case.variant, repeats=1, stages_case=case.name,
                        decode_frames=40)  # fmt: skip
    inp = bench.make_inputs(tmp_path, case, have_reference=False)
    res = bench.Results(None)
    res.m(f"whole/{case.name}/memenc fp32").add(10.0)  # a whole run to compare with
    bench.stages(res, inp, suite, "cpu", tmp_path)
    assert seen == [("clip720p.mp4", 40, 1), ("clip720p.mp4", 40, 2)]
    key = f"stages/{case.name}"
    k1, compute, write = (res.m(f"{key}/{n}").median for n in ("decode K=1", "compute", "write"))
    row = next(line for line in res.lines if line.startswith("| decode K=1 |"))
    assert row.endswith(f"| {40 / k1:.1f} |"), row
    said = next(line for line in res.lines if line.startswith("- decode: a clip of its own"))
    assert "40 frames" in said and "K=1 auto" in said, said
    # the decode clip's seconds scaled to the case's 4 frames before taking the slowest
    slowest = max(k1 * 4 / 40, compute, write)
    assert res.ratios[f"{key}/end_to_end_over_slowest_stage"] == pytest.approx(10.0 / slowest)


def test_the_load_benchmark_shows_the_mapping_keeps_the_weights_off_the_heap(ref_checkpoint):
    """benchmarks/load.py at 256: right after `load_model`, reading the file leaves at least
    half the model's weight bytes more in the heap than mapping it does, and two processes
    that map it share its pages (each one's proportional share is under its resident
    part)."""
    from benchmarks import load as load_bench
    from memenc.encoders import load_model

    _, path = ref_checkpoint("sam2.1_hiera_tiny", 256)
    weights_mb = sum(p.nbytes for p in load_model(path, image_size=256).parameters()) / 2**20
    got = load_bench.measure(path, 256, rounds=1)
    assert got["read"]["heap_mb"] - got["mapped"]["heap_mb"] > weights_mb / 2
    assert got["read"]["live_mb"] - got["mapped"]["live_mb"] > weights_mb / 2
    for share in got["pair"]:
        assert share["mapped_rss_mb"] > weights_mb / 2
        assert share["mapped_pss_mb"] < 0.75 * share["mapped_rss_mb"]
    assert "| mapped |" in load_bench.table(got, path, 256, 1)


def test_the_heap_benchmark_samples_a_whole_run(tmp_path):
    """benchmarks/heap.py on 8 frames of the bundled sample at 256: the run completes, the
    series covers it, and what it reports holds together (live within the heap, the store
    written)."""
    from benchmarks import heap

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ball.zarr"
    got = heap.run([str(root / "samples" / "ball.mp4"), "--weights", "random",
                    "--image-size", "256", "--frames", "0:8", "-o", str(out)], every=0.05)  # fmt: skip
    assert got["exit"] == 0
    samples = got["samples"]
    assert len(samples) >= 10 and samples[-1]["t"] > samples[0]["t"]
    for s in samples:
        assert 0 < s["live_mb"] <= s["heap_mb"] + 0.01
    # the samples cover the work: the model and a frame's activations come after the first
    assert max(s["live_mb"] for s in samples) > samples[0]["live_mb"] + 10
    meta = json.loads((out / "zarr.json").read_text())["attributes"]["memenc"]
    assert meta["status"] == "complete"


def test_timed_process_keeps_its_own_wall_time_over_the_childs_summary():
    """memenc's `--json` summary has its own `seconds` (from inside the process): the
    merged result keeps the process's wall time, and the child's other keys."""
    cmd = [sys.executable, "-c", 'print(\'{"seconds": 99.0, "frames": 7}\')']
    got = bench.timed_process(cmd)
    assert got["seconds"] < 60 and got["frames"] == 7


def test_whole_runs_show_where_memencs_stages_spent_the_run(tmp_path, monkeypatch):
    case = bench.Case("tiny case", "sam2.1_hiera_tiny", 64, 4, ("memenc fp32",), 2)
    inp = bench.Inputs(tmp_path / "v.mp4", tmp_path / "m", None, case)
    spent = iter([(1.0, 0.5), (3.0, 1.5)])  # (compute busy, decode's wait for room) a run

    def fake(cmd, gpu=False, timeout=None):
        assert "--json" in cmd  # the summary with the stages comes back on stdout
        busy, room = next(spent)
        zero = dict.fromkeys(bench.STAGE_PARTS, 0.0)
        return {
            "seconds": 6.0, "tree_peak_mb": 100.0, "frames": 4, "frames_per_second": 2.0,
            "stages": {
                "decode": {**zero, "busy": 0.1, "waiting_for_output": room},
                "compute": {**zero, "busy": busy},
            },
        }  # fmt: skip

    monkeypatch.setattr(bench, "timed_process", fake)
    res = bench.Results(None)
    bench.whole_runs(res, inp, "cpu", bench.SUITES["quick"], tmp_path)
    text = "\n".join(res.lines)
    assert "| memenc fp32 | decode | 0.10 | 0.00 | 1.00 | 0.00 |" in text  # medians of 2
    assert "| memenc fp32 | compute | 2.00 | 0.00 | 0.00 | 0.00 |" in text
    # 6 s of process, 4 frames at 2 frames/s in the stages: 4 s outside them
    assert "memenc fp32: outside the stages" in text and "4.00 (4.00–4.00) s of 6.00 s" in text
