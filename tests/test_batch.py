"""`memenc batch`: inputs and store names, shards, local workers, Dask (a default
LocalCluster, whose workers are daemonic), a lost worker, SIGKILL and rerun, and stores on
an S3 server (moto) on loopback. Every batch store is compared array for array with a
single-video `encode_video` of the same input."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import media
import numpy as np
import pytest
import torch
import zarr

from memenc import encode_video, open_cache
from memenc.errors import MemencError, MemencWarning, StoreError, UsageError
from memenc.pipeline.batch import (
    BatchSettings,
    _check_plan,
    expand_inputs,
    parse_shard,
    run_batch,
)

H, W = 48, 64
LENGTHS = {"c0": 6, "c1": 7, "c2": 8, "c3": 6, "c4": 12}  # c4: 6 chunks, 3 units
SETTINGS = BatchSettings(
    weights="random", variant="sam2.1_hiera_tiny", image_size=64, chunk_frames=2
)
CLI_OPTS = ["--weights", "random", "--variant", "sam2.1_hiera_tiny", "--image-size", "64",
            "--chunk-frames", "2", "--unit-frames", "4"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread everywhere (here, CLI runs, local and Dask workers): the thread count
    changes the last bits of CPU convolutions, and the stores are compared bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Five short clips with .masks.npy beside them, and one corrupt file (also with masks)."""
    d = tmp_path_factory.mktemp("videos")
    for name, t in LENGTHS.items():
        labels = media.moving_labels(t, H, W)
        media.write_video(d / f"{name}.mp4", media.scene_frames(labels))
        np.save(d / f"{name}.masks.npy", labels)
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    np.save(d / "broken.masks.npy", media.moving_labels(6, H, W))
    return d


@pytest.fixture(scope="module")
def references(dataset, tmp_path_factory):
    """Each good clip encoded alone by encode_video with the batch's settings."""
    d = tmp_path_factory.mktemp("refs")
    refs = {}
    for name in LENGTHS:
        encode_video(dataset / f"{name}.mp4", out=d / f"{name}.zarr", weights="random",
                     variant="sam2.1_hiera_tiny", image_size=64, chunk_frames=2)  # fmt: skip
        refs[name] = _arrays(d / f"{name}.zarr")
    return refs


def _arrays(path) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():  # the lock file "is not a component of a Zarr hierarchy"
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        z = zarr.open_group(str(path), mode="r")
        return {k: z[k][:] for k in z.array_keys()}


def _assert_equal_stores(path, want: dict[str, np.ndarray]) -> None:
    got = _arrays(path)
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k], equal_nan=True), (path, k)
    assert open_cache(path).status == "complete"


def _cli(args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMENC_TEST_KILL")}
    return subprocess.run(
        [sys.executable, "-m", "memenc", "batch", *args],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1", **(env_extra or {})},
        timeout=timeout,
    )


# ---- inputs ---------------------------------------------------------------------------


def test_inputs_globs_frame_folders_manifests_and_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "clip.mp4").write_bytes(b"x")
        (tmp_path / folder / "clip.masks.npy").write_bytes(b"x")
    frames = tmp_path / "frames"
    for name in ("bear", "clip"):
        (frames / name).mkdir(parents=True)
        (frames / name / "00000.jpg").write_bytes(b"x")
    (frames / "bear_masks").mkdir()
    (frames / "bear_masks" / "00000.png").write_bytes(b"x")
    got = expand_inputs([str(tmp_path / "*" / "clip.mp4"), frames, tmp_path / "a" / "clip.mp4"])
    assert [Path(i.video).relative_to(tmp_path).as_posix() for i in got] == [
        "a/clip.mp4", "b/clip.mp4", "frames/bear", "frames/clip"]  # fmt: skip
    assert [i.name for i in got] == ["clip.zarr", "clip-2.zarr", "bear.zarr", "clip-3.zarr"]

    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "video,masks,output,objects,frames\n"
        "a/clip.mp4,a/clip.masks.npy,sub/one.zarr,3,0:4\n"
        "b/clip.mp4,,../escape.zarr,,\n"
        f"{frames / 'bear'},,{tmp_path / 'abs.zarr'},,\n"
        "frames/clip,,x/../../y.zarr,,\n"
    )
    rows = expand_inputs([manifest])
    assert rows[0].name == "sub/one.zarr" and rows[0].error is None
    assert rows[0].masks == str(tmp_path / "a" / "clip.masks.npy")
    assert (rows[0].objects, rows[0].frames) == ("3", "0:4")
    for line, refused in enumerate(rows[1:], 3):  # each refusal names its line
        assert refused.error and refused.error.startswith(f"{manifest}:{line}: manifest output")
        assert "outside the output folder" in refused.error
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"video": "a/clip.mp4", "objects": [3, 7]}) + "\n")
    assert expand_inputs([jsonl])[0].objects == "3,7"

    with pytest.raises(UsageError, match="matches nothing"):
        expand_inputs([str(tmp_path / "*.mkv")])
    with pytest.raises(UsageError, match="no such file"):
        expand_inputs([tmp_path / "missing.mp4"])
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nx.mp4\n")
    with pytest.raises(UsageError, match="no 'video' column"):
        expand_inputs([bad])
    # a misspelt column or field is refused: before, it was ignored and every frame and
    # object encoded
    typo = tmp_path / "typo.csv"
    typo.write_text("video,frame\na/clip.mp4,0:1\n")
    with pytest.raises(UsageError, match=r"typo\.csv:1: unknown column 'frame'; did you mean "
                       r"'frames'\? a manifest has 'video', 'masks'"):  # fmt: skip
        expand_inputs([typo])
    typo = tmp_path / "typo.jsonl"
    typo.write_text(json.dumps({"video": "a/clip.mp4"}) + "\n"
                    + json.dumps({"video": "a/clip.mp4", "objcts": "3"}) + "\n")  # fmt: skip
    with pytest.raises(UsageError, match=r"typo\.jsonl:2: unknown field 'objcts'; did you mean "
                       r"'objects'"):  # fmt: skip
        expand_inputs([typo])


def test_inputs_with_no_videos_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "header.csv").write_text("video,objects\n")
    (tmp_path / "blank.jsonl").write_text("\n")
    inputs = [tmp_path / "empty", tmp_path / "header.csv", tmp_path / "blank.jsonl"]
    with pytest.raises(UsageError) as e:
        expand_inputs([*inputs, str(tmp_path / "emp*")])
    assert str(e.value) == (
        f"no videos among the inputs ({inputs[0]}: no video files or frame folders; "
        f"{inputs[1]}: a manifest with no rows; {inputs[2]}: a manifest with no rows; "
        f"{tmp_path / 'emp*'}: the pattern matches no videos)"
    )


def test_a_glob_reads_the_manifests_it_matches(tmp_path):
    """A pattern's matches are taken as if each had been given: a manifest is read, not
    run as a video."""
    (tmp_path / "clip.mp4").write_bytes(b"x")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.csv").write_text("video,objects,output\n../clip.mp4,3,a.zarr\n")
    (tmp_path / "lists" / "b.jsonl").write_text('{"video": "../clip.mp4", "output": "b.zarr"}\n')
    got = expand_inputs([str(tmp_path / "lists" / "*")])
    assert [(i.name, i.objects, i.error) for i in got] == [
        ("a.zarr", "3", None),
        ("b.zarr", None, None),
    ]
    assert {Path(i.video).resolve() for i in got} == {(tmp_path / "clip.mp4").resolve()}


def test_a_manifest_output_of_the_folder_itself_is_named_so(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"x")
    manifest = tmp_path / "m.csv"
    manifest.write_text("video,output\nclip.mp4,.\nclip.mp4,./\nclip.mp4,x.zarr\n")
    got = expand_inputs([manifest])
    for line, refused in ((2, got[0]), (3, got[1])):
        assert refused.error and refused.error.startswith(f"{manifest}:{line}: manifest output")
        assert "is the output folder itself, not a store in it" in refused.error
    assert got[2].error is None and got[2].name == "x.zarr"


def test_manifest_encodings_and_bytes(tmp_path):
    """A spreadsheet's byte-order mark is read past; bytes that are not UTF-8, a CSV the
    csv module refuses and a NUL byte in a path are usage errors naming the file."""
    (tmp_path / "clip.mp4").write_bytes(b"x")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfvideo,frames\r\nclip.mp4,0:2\r\n")
    assert [(Path(r.video).name, r.frames) for r in expand_inputs([bom])] == [("clip.mp4", "0:2")]
    bom_lines = tmp_path / "bom.jsonl"
    bom_lines.write_bytes(b"\xef\xbb\xbf" + json.dumps({"video": "clip.mp4"}).encode() + b"\n")
    assert Path(expand_inputs([bom_lines])[0].video).name == "clip.mp4"
    cases = {
        "latin1.csv": (b"video\nclip.mp4\ncaf\xe9.mp4\n", r"latin1.csv:3: manifest is not UTF-8"),
        "bad.jsonl": (b'{"video": "clip.mp4"}\n{"video": "\xff"}\n', r"bad.jsonl:2: .*not UTF-8"),
        "nul.csv": (b'video\n"clip\x00.mp4"\n', r"nul.csv:2: the row's 'video' holds a NUL byte"),
        "nul.jsonl": (b'{"video": "a.mp4", "masks": "m\\u0000"}\n', r"'masks' holds a NUL"),
        "long.csv": (b"video\n" + b"a" * 200_000 + b"\n", r"long.csv:2: not CSV \(field larger"),
        "quote.csv": (b'video,objects\nclip.mp4,1\n"clip.mp4,2\n', r"quote.csv:3: not CSV \(unexp"),
        "after.csv": (b'video,objects\n"clip.mp4"x,1\n', r"after.csv:2: not CSV \(',' expected"),
        "empty.csv": (
            b"video,objects\nclip.mp4,1\n,2\n",
            r"empty.csv:3: the row's 'video' is empty",
        ),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UsageError, match=message):
            expand_inputs([tmp_path / name])


def test_manifest_fields_that_do_not_fit_are_refused(tmp_path):
    """An unquoted comma, a JSON value of the wrong type, and one store inside another
    (an --overwrite of the outer one would delete the inner) are not guessed at."""
    (tmp_path / "clip.mp4").write_bytes(b"x")
    cases = {
        "extra.csv": ("video,objects\nclip.mp4,3\nclip.mp4,3,7\n", r"extra.csv:3: 1 more field"),
        "dict.jsonl": ('{"video": "clip.mp4", "output": {"a": 1}}\n', r":1: 'output' must be a"),
        "list.jsonl": ('{"video": ["clip.mp4"]}\n', r"'video' must be a string, not \["),
        "frames.jsonl": ('{"video": "clip.mp4", "frames": 4}\n', r"'frames' must be a string"),
        "bool.jsonl": ('{"video": "clip.mp4", "objects": true}\n', r"'objects' must be a str"),
        "ids.jsonl": ('{"video": "clip.mp4", "objects": [1, "2"]}\n', "must list whole numbers"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError, match=message):
            expand_inputs([tmp_path / name])
    fine = tmp_path / "fine.jsonl"
    fine.write_text(
        '{"video": "clip.mp4", "objects": 3}\n{"video": "clip.mp4", "objects": [3, 7]}\n'
    )
    assert [r.objects for r in expand_inputs([fine])] == ["3", "3,7"]
    nested = tmp_path / "nested.csv"
    nested.write_text("video,output\nclip.mp4,outer.zarr\nclip.mp4,outer.zarr/inner.zarr\n"
                      "clip.mp4,a/b.zarr\nclip.mp4,a\n")  # fmt: skip
    rows = expand_inputs([nested])
    assert [r.error is None for r in rows] == [True, False, True, False]
    assert "nests with another input's store" in rows[1].error


def test_manifest_rows_that_give_one_video_other_settings_are_all_kept(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"x")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "video,output,objects\n"
        "clip.mp4,a.zarr,\n"
        "clip.mp4,b.zarr,\n"  # another output: its own input
        "clip.mp4,c.zarr,1\n"
        "clip.mp4,a.zarr,\n"  # the first row again: kept once
        "clip.mp4,a.zarr,2\n"  # the first row's output with other objects: refused
    )
    rows = expand_inputs([manifest, tmp_path / "clip.mp4", tmp_path / "clip.mp4"])
    assert [(r.name, r.objects) for r in rows] == [
        ("a.zarr", None), ("b.zarr", None), ("c.zarr", "1"), ("a.zarr", "2"), ("clip.zarr", None),
    ]  # fmt: skip
    assert [r.error is None for r in rows] == [True, True, True, False, True]
    assert "used by another input" in rows[3].error


def test_parse_shard_and_slurm_environment():
    assert parse_shard("2/5") == (2, 5)
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5"}
    assert parse_shard("auto", env) == (2, 4)
    for spec in ("5/5", "1", "a/b"):
        with pytest.raises(UsageError, match="--shard"):
            parse_shard(spec)
    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_ID is not set"):
        parse_shard("auto", {})
    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_ID='x' is not a number"):
        parse_shard("auto", {**env, "SLURM_ARRAY_TASK_ID": "x"})
    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_MIN='' is not a number"):
        parse_shard("auto", {**env, "SLURM_ARRAY_TASK_MIN": ""})
    # --array=0-10:2: tasks 0, 2, ... 10 are shards 0..5 of 6 (before, task 6 was "shard 6
    # of 6" and failed, and shards 1, 3, 5 never ran)
    stepped = {"SLURM_ARRAY_TASK_COUNT": "6", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_ARRAY_TASK_STEP": "2"}  # fmt: skip
    got = [parse_shard("auto", {**stepped, "SLURM_ARRAY_TASK_ID": str(t)}) for t in range(0, 11, 2)]
    assert got == [(i, 6) for i in range(6)]
    # --array=1,3,7 (no even step): the environment cannot place task 7; say what to do
    listed = {
        "SLURM_ARRAY_TASK_ID": "7",
        "SLURM_ARRAY_TASK_COUNT": "3",
        "SLURM_ARRAY_TASK_MIN": "1",
    }
    with pytest.raises(UsageError, match=r"task 7 is not one of .* pass --shard I/N"):
        parse_shard("auto", listed)


def test_manifest_output_outside_the_folder_fails_only_that_input(tmp_path, dataset, references):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"video": str(dataset / "c0.mp4"), "output": "ok/c0.zarr"}) + "\n"
        + json.dumps({"video": str(dataset / "c1.mp4"), "output": "../../evil.zarr"}) + "\n"
    )  # fmt: skip
    out = tmp_path / "out"
    summary = run_batch([manifest], out, settings=SETTINGS)
    assert [r.status for r in summary.inputs] == ["complete", "failed"]
    assert "outside the output folder" in summary.inputs[1].error
    _assert_equal_stores(out / "ok" / "c0.zarr", references["c0"])
    assert not (tmp_path / "evil.zarr").exists() and not (out.parent.parent / "evil.zarr").exists()


# ---- the decoder in a daemonic process ---------------------------------------------------


def _decode_in_daemon(q, path, fault):
    import memenc.pipeline.video as vid
    from memenc.pipeline.video import process as vprocess

    vprocess._CHILD_FAULT = fault
    try:
        with vid.VideoSource(path, 64, timeout_s=5) as source:
            q.put(("ok", tuple(source.read([0, 1, 2]).frames.shape)))
    except Exception as e:
        q.put((type(e).__name__, str(e)))


def test_decoder_runs_and_is_killed_inside_a_daemonic_process(dataset):
    """multiprocessing refuses children of daemonic processes (Dask workers); the decoder
    starts there as a plain subprocess, and its crashes and stalls are still caught."""
    ctx = multiprocessing.get_context("spawn")
    got = {}
    for fault in (None, "read:crash", "read:hang"):
        q = ctx.Queue()
        p = ctx.Process(target=_decode_in_daemon, args=(q, str(dataset / "c1.mp4"), fault),
                        daemon=True)  # fmt: skip
        p.start()
        got[fault] = q.get(timeout=120)
        p.join()
    assert got[None] == ("ok", (3, 3, 64, 64))
    assert got["read:crash"][0] == "_DecoderGone" and "crashed (signal 9" in got["read:crash"][1]
    assert got["read:hang"][0] == "_DecoderGone" and "timed out after 5s" in got["read:hang"][1]


# ---- executors: local workers and Dask -------------------------------------------------


def _check_batch_of_six(run, out: Path, references) -> dict:
    """Exit 3; five stores equal to encode_video's; the corrupt file listed with its error
    in --json and in batch-summary.json."""
    assert run.returncode == 3, run.stderr
    printed = json.loads(run.stdout)
    written = json.loads((out / "batch-summary.json").read_text())
    for data in (printed, written):
        by_name = {Path(r["input"]).stem: r for r in data["inputs"]}
        assert sorted(by_name) == sorted([*LENGTHS, "broken"])
        assert by_name["broken"]["status"] == "failed"
        assert "broken.mp4" in by_name["broken"]["error"]
        assert all(by_name[n]["status"] == "complete" for n in LENGTHS)
        assert by_name["c4"]["units"] == 3 and by_name["c4"]["frames"] == 12
    for name in LENGTHS:
        _assert_equal_stores(out / f"{name}.zarr", references[name])
    assert not (out / "broken.zarr").exists()
    return printed


def test_quiet_batch_still_names_each_failed_input(tmp_path, dataset):
    run = _cli([str(dataset / "broken.mp4"), "-o", str(tmp_path / "out"), "--quiet", *CLI_OPTS])
    assert run.returncode == 3 and run.stdout == "", run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2, run.stderr
    assert lines[0].startswith(f"memenc: {dataset / 'broken.mp4'}: ") and len(lines[0]) > 40
    assert lines[1] == "memenc: 1 input(s) failed"


def test_a_plan_memenc_did_not_write_is_refused(tmp_path, dataset):
    out = tmp_path / "out"
    out.mkdir()
    for plan in ([], {"inputs": [{"index": 0}]}, {"inputs": [None]}, {"inputs": "x"}):
        (out / "batch-plan.json").write_text(json.dumps(plan))
        with pytest.raises(UsageError, match=r"batch-plan.json: not a batch plan memenc wrote"):
            run_batch([dataset / "c0.mp4"], out, settings=SETTINGS, shard="0/2")
    prepared = run_batch([dataset / "c0.mp4"], out, settings=SETTINGS, prepare_only=True)
    plan = json.loads((out / "batch-plan.json").read_text())
    assert prepared.ok and _check_plan(plan, "plan") is None  # what memenc writes passes
    for key, value in (("per_unit", 0), ("chunks", -1), ("chunk_frames", "2")):
        wrong = {"inputs": [{**plan["inputs"][0], key: value}]}
        with pytest.raises(UsageError, match=f"missing or wrong '{key}'"):
            _check_plan(wrong, "plan")


def test_six_videos_one_corrupt_with_two_local_workers(tmp_path, dataset, references):
    run = _cli([str(dataset), "-o", str(tmp_path / "out"), "--workers", "2", "--json", *CLI_OPTS])
    data = _check_batch_of_six(run, tmp_path / "out", references)
    assert data["executor"] == "processes" and data["workers"] == 2
    workers = {w for r in data["inputs"] for w in r["workers"]}
    assert len(workers) == 2 and str(os.getpid()) not in {w.split(":")[1] for w in workers}


def test_six_videos_on_a_default_local_dask_cluster_with_a_worker_killed(
    tmp_path, dataset, references
):
    """`--dask local:2` (daemonic worker processes): the long clip's three units are shared
    by both workers, and a worker SIGKILLed after writing a chunk (once) is replaced; its
    unit is retried and every store still equals encode_video's."""
    flag = tmp_path / "kill-once"
    flag.write_text("")
    run = _cli(
        [str(dataset), "-o", str(tmp_path / "out"), "--dask", "local:2", "--json", *CLI_OPTS],
        {"MEMENC_TEST_KILL": "chunk-done:1", "MEMENC_TEST_KILL_ONCE": str(flag)},
    )
    data = _check_batch_of_six(run, tmp_path / "out", references)
    assert not flag.exists()  # a worker did die at the kill point
    assert data["executor"] == "dask" and data["workers"] == 2
    c4 = next(r for r in data["inputs"] if Path(r["input"]).stem == "c4")
    assert len({w for r in data["inputs"] for w in r["workers"]}) >= 2
    assert c4["chunks_written"] <= 6


# ---- shards, finalize, SIGKILL --------------------------------------------------------------


def test_three_shards_cover_every_video_once_then_finalize(tmp_path, dataset, references):
    out = tmp_path / "out"
    seen: list[str] = []
    for i in range(3):
        summary = run_batch([dataset], out, settings=SETTINGS, shard=f"{i}/3", unit_frames=4)
        seen += [Path(r.input).stem for r in summary.inputs]
        assert (out / f"batch-summary-shard-{i}-of-3.json").is_file()
    assert sorted(seen) == sorted([*LENGTHS, "broken"])  # each exactly once
    final = run_batch([dataset], out, finalize_only=True)
    status = {Path(r.input).stem: r.status for r in final.inputs}
    assert status.pop("broken") == "failed"
    assert set(status.values()) == {"skipped"}  # each shard completed its own stores
    data = json.loads((out / "batch-summary.json").read_text())
    broken = next(r for r in data["inputs"] if Path(r["input"]).stem == "broken")
    assert "broken.mp4" in broken["error"]  # the shard's reason, carried over
    for name in LENGTHS:
        _assert_equal_stores(out / f"{name}.zarr", references[name])


def test_finalize_pass_completes_stores_whose_chunks_are_all_written(tmp_path, dataset):
    out = tmp_path / "out"
    run = _cli([str(dataset / "c0.mp4"), "-o", str(out), "-q", *CLI_OPTS],
               {"MEMENC_TEST_KILL": "before-complete"})  # fmt: skip
    assert run.returncode == -signal.SIGKILL
    assert open_cache(out / "c0.zarr").status == "in_progress"
    final = run_batch([dataset / "c0.mp4"], out, finalize_only=True)
    assert [r.status for r in final.inputs] == ["complete"]
    assert open_cache(out / "c0.zarr").status == "complete"


def test_sigkilled_batch_reruns_without_recomputing_complete_work(tmp_path, dataset, references):
    out = tmp_path / "out"
    args = [str(dataset / "c0.mp4"), str(dataset / "c4.mp4"), "-o", str(out), "--json",
            *CLI_OPTS]  # fmt: skip
    killed = _cli(args, {"MEMENC_TEST_KILL": "chunk-data:4"})  # only c4 has a chunk 4
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert open_cache(out / "c0.zarr").status == "complete"
    assert _arrays(out / "c4.zarr")["chunk_done"].tolist() == [1, 1, 1, 1, 0, 0]
    c0_files = {
        p: p.stat().st_mtime_ns
        for p in (out / "c0.zarr").rglob("*")
        if p.is_file() and p.name != ".memenc.lock"  # the lock is taken again, nothing else
    }

    rerun = _cli(args)
    assert rerun.returncode == 0, rerun.stderr
    by_name = {Path(r["input"]).stem: r for r in json.loads(rerun.stdout)["inputs"]}
    assert by_name["c0"]["status"] == "skipped" and by_name["c0"]["chunks_written"] == 0
    assert by_name["c4"]["status"] == "complete" and by_name["c4"]["chunks_written"] == 2
    assert c0_files == {p: p.stat().st_mtime_ns for p in c0_files}  # c0 untouched
    for name in ("c0", "c4"):
        _assert_equal_stores(out / f"{name}.zarr", references[name])


def _group_alive(pgid: int) -> list[int]:
    """Processes of process group `pgid` that still run (zombies excluded)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("how", ["Ctrl-C", "SIGTERM", "SIGKILL"])
def test_stopping_a_batch_with_workers_ends_them_all(tmp_path, how):
    """Ctrl-C reaches the whole process group, SIGTERM (scancel) and SIGKILL only the
    coordinator. Every way, no worker outlives it (one would go on writing a store whose
    lock died with the coordinator), and the first two say so in one line."""
    labels = media.moving_labels(160, H, W)
    media.write_video(tmp_path / "long.mp4", media.scene_frames(labels))
    np.save(tmp_path / "long.masks.npy", labels)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "memenc", "batch", str(tmp_path / "long.mp4"), "-o", str(out),
            "--workers", "2", *CLI_OPTS[:4], "--image-size", "128", "--chunk-frames", "2",
            "--unit-frames", "8"]  # fmt: skip
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    markers = out / "long.zarr" / "chunk_done"
    deadline = time.monotonic() + 300
    while not list(markers.glob("c.*")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # until the workers write
    assert run.poll() is None, run.communicate()
    signal_to = {"Ctrl-C": (os.killpg, signal.SIGINT), "SIGTERM": (os.kill, signal.SIGTERM),
                 "SIGKILL": (os.kill, signal.SIGKILL)}[how]  # fmt: skip
    signal_to[0](run.pid, signal_to[1])
    _, err = run.communicate(timeout=60)
    if how == "SIGKILL":  # it says nothing (multiprocessing's tracker may note what it frees)
        assert run.returncode == -signal.SIGKILL, err
    else:
        want = {"Ctrl-C": (130, "memenc: interrupted"), "SIGTERM": (143, "memenc: terminated")}
        assert (run.returncode, err.strip()) == want[how], err
    deadline = time.monotonic() + 10
    while _group_alive(run.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _group_alive(run.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "processes outlived the coordinator"
    written = sorted(p.name for p in markers.glob("c.*"))
    time.sleep(1)
    assert sorted(p.name for p in markers.glob("c.*")) == written  # nobody writes any more
    cache = open_cache(out / "long.zarr")
    assert cache.status == "in_progress" and 0 < len(written) < 80


# ---- object storage: an S3 server (moto) on loopback -----------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (a free port) with a bucket; the endpoint and fake
    credentials are in the environment for this process and the CLI runs it starts."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,  # fsspec's config: endpoint_url for s3fs
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config
    import s3fs

    fsspec.config.set_conf_env(fsspec.config.conf)  # pick FSSPEC_S3_* up in this process
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("caches")
    yield env
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _s3_arrays(url: str) -> dict[str, np.ndarray]:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no listing cached from before the writes
    z = zarr.open_group(zarr.storage.FsspecStore.from_url(url, read_only=True), mode="r")
    return {k: z[k][:] for k in z.array_keys()}


def test_encode_and_inspect_keep_an_s3_url(tmp_path, dataset, references, s3, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = "s3://caches/single/c0.zarr"
    run = subprocess.run(
        [sys.executable, "-m", "memenc", "encode", str(dataset / "c0.mp4"), "-o", url,
         "--weights", "random", "--variant", "sam2.1_hiera_tiny", "--image-size", "64",
         "--chunk-frames", "2", "--json"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["store"] == url
    assert not (tmp_path / "s3:").exists()  # no local folder named after the URL
    got = _s3_arrays(url)
    for k, want in references["c0"].items():
        assert np.array_equal(got[k], want, equal_nan=True), k
    cache = open_cache(url)
    assert cache.status == "complete" and cache.object_ids == [3, 7]
    shown = subprocess.run([sys.executable, "-m", "memenc", "inspect", url, "--json"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["status"] == "complete" and info["chunks_done"] == info["chunks_total"] == 3


@pytest.mark.parametrize(
    "command, failure",
    [("encode", "no credentials"), ("inspect", "no credentials"), ("batch", "no credentials"),
     ("preview", "no credentials"), ("encode", "no endpoint")],
)  # fmt: skip
def test_s3_without_credentials_or_endpoint_is_one_line(tmp_path, dataset, s3, command, failure):
    """What botocore raises past s3fs (it is not an OSError) is one line naming the store."""
    url = "s3://caches/refused/c0.zarr"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MEMENC_TEST"))}
    if failure == "no credentials":  # nowhere to find any: not the files, not EC2's service
        env.update(AWS_ENDPOINT_URL=s3["AWS_ENDPOINT_URL"], AWS_DEFAULT_REGION="us-east-1",
                   AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                   AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    else:  # nothing listens on port 9 (discard) of loopback
        env.update(s3, AWS_ENDPOINT_URL="http://127.0.0.1:9",
                   FSSPEC_S3_ENDPOINT_URL="http://127.0.0.1:9", AWS_MAX_ATTEMPTS="1")  # fmt: skip
    args = {
        "encode": ["encode", str(dataset / "c0.mp4"), "-o", url, *CLI_OPTS[:6]],
        "inspect": ["inspect", url],
        "preview": ["preview", url, "--frame", "0", "-o", str(tmp_path / "p.png")],
        "batch": ["batch", str(dataset / "c0.mp4"), "-o", url.rsplit("/", 1)[0], *CLI_OPTS],
    }[command]
    run = subprocess.run([sys.executable, "-m", "memenc", *args], capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" not in lines[0], run.stderr
    store = url if command != "batch" else url.rsplit("/", 1)[0]
    reason = "NoCredentialsError" if failure == "no credentials" else "EndpointConnectionError"
    assert lines[0].startswith(f"memenc: error: {store}: ") and reason in lines[0], lines[0]


READ_WITHOUT_CREDENTIALS = """
import sys
from memenc.errors import StoreError
from memenc.store import describe_store, open_cache
for read in (open_cache, describe_store):
    try:
        read(sys.argv[1])
    except StoreError as e:
        print(str(e))
"""


def test_s3_without_credentials_from_python_is_a_store_error(tmp_path, s3):
    """open_cache and describe_store, called from Python, raise StoreError naming the store
    when the storage service fails, not botocore's own exception."""
    url = "s3://caches/refused/c0.zarr"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MEMENC_TEST"))}
    env.update(AWS_ENDPOINT_URL=s3["AWS_ENDPOINT_URL"], AWS_DEFAULT_REGION="us-east-1",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", READ_WITHOUT_CREDENTIALS, url],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 2, run.stdout
    for line in lines:
        assert line.startswith(f"{url}: the storage service failed (NoCredentialsError: "), line


def test_batch_to_s3_resumes_after_sigkill(dataset, references, s3):
    out = "s3://caches/batch"
    args = [str(dataset / "c0.mp4"), str(dataset / "c4.mp4"), "-o", out, "--json", *CLI_OPTS]
    killed = _cli(args, {"MEMENC_TEST_KILL": "chunk-data:4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _s3_arrays(f"{out}/c4.zarr")["chunk_done"].tolist() == [1, 1, 1, 1, 0, 0]
    rerun = _cli(args)
    assert rerun.returncode == 0, rerun.stderr
    by_name = {Path(r["input"]).stem: r for r in json.loads(rerun.stdout)["inputs"]}
    assert by_name["c0"]["status"] == "skipped"
    assert by_name["c4"]["status"] == "complete" and by_name["c4"]["chunks_written"] == 2
    for name in ("c0", "c4"):
        got = _s3_arrays(f"{out}/{name}.zarr")
        for k, want in references[name].items():
            assert np.array_equal(got[k], want, equal_nan=True), (name, k)
        assert open_cache(f"{out}/{name}.zarr").status == "complete"
    import fsspec

    with fsspec.open(f"{out}/batch-summary.json", "r") as f:
        assert json.load(f)["ok"] is True


def test_url_without_its_backend_is_a_usage_error_naming_the_extra(tmp_path, dataset):
    code = (
        "import sys; sys.modules['s3fs'] = None; from memenc.cli.app import main; "
        f"sys.argv = ['memenc', 'encode', {str(dataset / 'c0.mp4')!r}, '-o', 's3://b/x.zarr', "
        "'--weights', 'random', '--image-size', '64']; main()"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "s3://b/x.zarr" in run.stderr and "memenc[s3]" in run.stderr
    assert not any(tmp_path.iterdir())


def test_out_that_is_a_file_is_a_usage_error_and_the_file_is_kept(tmp_path, dataset):
    taken = tmp_path / "taken.zarr"
    taken.write_bytes(b"precious")
    with pytest.raises(UsageError, match=r"--out .*taken\.zarr: exists and is not a folder"):
        run_batch([dataset / "c0.mp4"], taken, settings=SETTINGS)
    assert taken.read_bytes() == b"precious"


def test_after_a_prepare_pass_shards_split_long_videos_by_unit(tmp_path, dataset, references):
    """--prepare-only creates every store and the plan; then three shards each take every
    third unit across the batch, so the long clip's three units land on three shards, each
    unit runs exactly once, and the shard that writes a store's last chunk completes it."""
    out = tmp_path / "out"
    prepared = run_batch([dataset], out, settings=SETTINGS, unit_frames=4, prepare_only=True)
    status = {Path(r.input).stem: r.status for r in prepared.inputs}
    assert status.pop("broken") == "failed" and set(status.values()) == {"prepared"}
    assert (out / "batch-plan.json").is_file()
    units: dict[str, list[int]] = {}
    for i in range(3):
        summary = run_batch([dataset], out, settings=SETTINGS, shard=(i, 3))
        for r in summary.inputs:
            units.setdefault(Path(r.input).stem, []).append(r.units)
    assert units["c4"] == [1, 1, 1]  # three units of c4, one per shard
    # every unit exactly once: 2 units for each 3- or 4-chunk clip, 3 for c4
    assert {n: sum(u) for n, u in units.items() if n != "broken"} == {
        "c0": 2, "c1": 2, "c2": 2, "c3": 2, "c4": 3}  # fmt: skip
    for name in LENGTHS:
        _assert_equal_stores(out / f"{name}.zarr", references[name])


def test_masks_template_finds_masks_elsewhere_and_bad_fields_are_usage_errors(
    tmp_path, dataset, references
):
    videos, annotations = tmp_path / "videos", tmp_path / "annotations"
    videos.mkdir()
    annotations.mkdir()
    (videos / "c1.mp4").write_bytes((dataset / "c1.mp4").read_bytes())
    (annotations / "c1.npy").write_bytes((dataset / "c1.masks.npy").read_bytes())
    out = tmp_path / "out"
    summary = run_batch([videos], out, settings=SETTINGS,
                        masks_template="{parent}/../annotations/{stem}.npy")  # fmt: skip
    assert [r.status for r in summary.inputs] == ["complete"]
    _assert_equal_stores(out / "c1.zarr", references["c1"])
    plain = run_batch([videos], tmp_path / "out2", settings=SETTINGS)  # not beside it
    assert plain.inputs[0].status == "failed" and "no masks found" in plain.inputs[0].error
    for template, message in [
        ("{folder}/{stem}", r"\{folder\} is not one of"),
        ("{stem.upper}", r"\{stem.upper\} is not one of"),  # no attributes ...
        ("{stem[0]}", r"\{stem\[0\]\} is not one of"),  # ... and no indexing
        ("{}", r"\{\} is not one of"),
        ("{stem", "expected '}'"),
        ("{stem:d}", "Unknown format code"),
        (" ", "empty"),
    ]:
        with pytest.raises(UsageError, match=f"--masks-template '.*': {message}"):
            run_batch([videos], out, settings=SETTINGS, masks_template=template)


def test_an_output_folder_batch_cannot_write_in_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"x")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UsageError, match=r"--out .*a-file/sub: .*a-file is not a folder"):
        run_batch([tmp_path / "clip.mp4"], tmp_path / "a-file" / "sub", settings=SETTINGS)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root passes permission bits: deny it as the kernel would
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode)
        )
    for out in (locked, locked / "new" / "deeper"):
        with pytest.raises(StoreError, match=rf"--out {out}: cannot write in {locked} \(perm"):
            run_batch([tmp_path / "clip.mp4"], out, settings=SETTINGS)
    assert list(locked.iterdir()) == []  # nothing made, no summary
    locked.chmod(0o755)


def test_a_manifest_rows_bad_selection_names_the_row_not_an_option(tmp_path, dataset):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"video,frames,objects,output\n{dataset / 'c0.mp4'},0:x,,a.zarr\n"
                        f"{dataset / 'c0.mp4'},,3;7,b.zarr\n")  # fmt: skip
    summary = run_batch([manifest], tmp_path / "out", settings=SETTINGS)
    errors = [r.error for r in summary.inputs]
    assert errors[0].startswith(f"{manifest}:2: the row's 'frames' '0:x': 'x' is not an in"), errors
    assert errors[1].startswith(f"{manifest}:3: the row's 'objects' '3;7'"), errors


def test_a_manifest_output_cannot_leave_the_folder_through_a_link(tmp_path, dataset):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "link").symlink_to(elsewhere)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"video,output\n{dataset / 'c0.mp4'},link/x.zarr\n"
                        f"{dataset / 'c1.mp4'},sub/y.zarr\n")  # fmt: skip
    summary = run_batch([manifest], out, settings=SETTINGS)
    assert [r.status for r in summary.inputs] == ["failed", "complete"]
    assert "leaves the output folder through a symbolic link" in summary.inputs[0].error
    assert list(elsewhere.iterdir()) == []


def test_manifest_outputs_named_like_batch_files_are_refused(tmp_path, dataset):
    (tmp_path / "clip.mp4").write_bytes(b"x")
    manifest = tmp_path / "m.csv"
    names = ["batch-summary.json", "batch-plan.json", "batch-summary-shard-1-of-2.json/x.zarr",
             "ok/batch-summary.json"]  # fmt: skip
    manifest.write_text("video,output\n" + "".join(f"clip.mp4,{n}\n" for n in names))
    rows = expand_inputs([manifest])
    assert [r.error is None for r in rows] == [False, False, False, True]
    assert all("a file batch writes itself" in r.error for r in rows[:3])
    out = tmp_path / "out"  # a summary that cannot be written is one error naming it
    (out / "batch-summary.json").mkdir(parents=True)
    with pytest.raises(StoreError, match=r"batch-summary.json: cannot write \(Is a directory"):
        run_batch([dataset / "c0.mp4"], out, settings=SETTINGS)
    assert open_cache(out / "c0.zarr").status == "complete"


def test_an_unreachable_dask_scheduler_is_an_error_not_a_usage_error(
    tmp_path, dataset, monkeypatch
):
    """Exit 1 (nobody answers at the address), not 2: the option itself was well formed."""
    import memenc.pipeline.batch as batch_module

    monkeypatch.setattr(batch_module, "DASK_CONNECT_S", 2.0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(MemencError, match=rf"^--dask {address}: cannot connect \(") as err:
        run_batch([dataset / "c0.mp4"], tmp_path / "out", settings=SETTINGS, dask=address)
    assert not isinstance(err.value, UsageError)
    with pytest.raises(UsageError, match=r"^--dask nowhere:x:y: "):
        run_batch([dataset / "c0.mp4"], tmp_path / "out", settings=SETTINGS, dask="nowhere:x:y")


def test_a_store_another_process_is_writing_is_waited_for_then_done(
    tmp_path, dataset, references, monkeypatch
):
    """Two batches on one output folder: each found the other's stores locked and called
    them failed ('being written by another process'), so both exited 3 with summaries
    that disagreed with the disk. A locked store is now set aside, planned again once the
    lock is free, and done (or found complete) by this run. Here the lock is held by a
    thread of this process until the batch has done the other two videos."""
    import threading

    import memenc.pipeline.batch as batch_module
    from memenc.store import store_lock

    monkeypatch.setattr(batch_module, "LOCK_RETRY_S", 0.2, raising=False)
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("c0", "c1", "c2"):
        (videos / f"{name}.mp4").write_bytes((dataset / f"{name}.mp4").read_bytes())
        (videos / f"{name}.masks.npy").write_bytes((dataset / f"{name}.masks.npy").read_bytes())
    out = tmp_path / "out"
    held, release, reports, timers = threading.Event(), threading.Event(), [], []

    def hold() -> None:
        with store_lock(out / "c1.zarr"):
            held.set()
            release.wait(120)

    def progress(p) -> None:
        reports.append(p)
        if p.videos_done == 2 and not timers:  # c0 and c2 done: c1 goes 1 s later,
            timers.append(threading.Timer(1.0, release.set))  # after 5 retry periods
            timers[0].start()

    layouts = []  # the videos `plan` probed and read the masks of
    real_layout = batch_module._Coordinator._layout
    monkeypatch.setattr(
        batch_module._Coordinator, "_layout",
        lambda self, inp: layouts.append(inp.name) or real_layout(self, inp),
    )  # fmt: skip
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        with pytest.warns(
            MemencWarning,
            match=r"c1\.zarr: store is being written by another "
            r"process \(pid \d+, another thread of this process\); waiting for it",
        ):
            summary = run_batch([videos], out, settings=SETTINGS, progress=progress)
    finally:
        release.set()
        holder.join(30)
    assert [(r.input.split("/")[-1], r.status, r.error) for r in summary.inputs] == [
        ("c0.mp4", "complete", None), ("c1.mp4", "complete", None), ("c2.mp4", "complete", None)
    ]  # fmt: skip
    assert summary.ok
    assert any(p.waiting == 1 for p in reports) and reports[-1].waiting == 0
    # probed once when found locked, once when free: not every LOCK_RETRY_S between
    assert layouts.count("c1.zarr") == 2, layouts
    for name in ("c0", "c1", "c2"):
        _assert_equal_stores(out / f"{name}.zarr", references[name])

    # The holder completes the store before it lets go (as `memenc encode` on the same
    # output would): the batch finds it complete and reports it skipped, not failed.
    out2 = tmp_path / "out2"
    set_aside = threading.Event()

    def encode_holding() -> None:
        with store_lock(out2 / "c1.zarr"):  # encode_video takes it again, in this thread
            held.set()
            assert set_aside.wait(120)
            encode_video(videos / "c1.mp4", out=out2 / "c1.zarr", weights="random",
                         variant="sam2.1_hiera_tiny", image_size=64, chunk_frames=2)  # fmt: skip

    held.clear()
    holder = threading.Thread(target=encode_holding)
    holder.start()
    try:
        assert held.wait(30)
        with pytest.warns(MemencWarning, match="waiting for it"):
            summary = run_batch(
                [videos], out2, settings=SETTINGS,
                progress=lambda p: set_aside.set() if p.waiting else None,
            )  # fmt: skip
    finally:
        set_aside.set()
        holder.join(120)
    assert [(r.status, r.chunks_written) for r in summary.inputs] == [
        ("complete", 3), ("skipped", 0), ("complete", 4)]  # fmt: skip
    _assert_equal_stores(out2 / "c1.zarr", references["c1"])


def test_dask_cluster_without_workers_fails_instead_of_waiting(tmp_path, dataset, monkeypatch):
    """A scheduler with no worker would take the units and never run them: the batch
    stops with one error naming the cluster, within the wait it allows.

    The scheduler runs in a process of its own (`dask scheduler`), not as an in-process
    `LocalCluster`: once, late in a full run, LocalCluster's event-loop thread did not start
    within distributed's fixed 10 s in this test process, before memenc code ran."""
    import memenc.pipeline.batch as batch_module

    monkeypatch.setattr(batch_module, "DASK_WORKER_WAIT_S", 3.0)
    info = tmp_path / "scheduler.json"
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", "0", "--no-dashboard", "--scheduler-file", str(info)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        address = None
        while address is None:
            assert scheduler.poll() is None, scheduler.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the scheduler wrote no address in 120 s"
            with contextlib.suppress(OSError, ValueError):  # absent, or still being written
                address = json.loads(info.read_text())["address"]
            time.sleep(0.1)
        t0 = time.monotonic()
        with pytest.raises(MemencError, match=rf"--dask {address}: no worker joined") as err:
            run_batch([dataset / "c0.mp4"], tmp_path / "out", settings=SETTINGS, dask=address)
        assert time.monotonic() - t0 < 60
        assert "\n" not in str(err.value)
    finally:
        scheduler.kill()
        scheduler.wait(10)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("memory://x.zarr", "lives only inside one process"),
        ("zip://x.zarr", "does not keep stores in zip:// file systems"),
        ("github://x.zarr", "does not keep stores in github:// file systems"),
    ],
)
def test_urls_that_cannot_keep_a_store_are_usage_errors(tmp_path, dataset, url, says):
    """memory:// would report a complete store that is gone when the command exits; zip://
    and the like fail inside fsspec with errors that name neither URL nor reason."""
    for cmd in (["encode", str(dataset / "c0.mp4"), "-o", url], ["batch", str(dataset / "c0.mp4"),
                "--out", url]):  # fmt: skip
        run = subprocess.run([sys.executable, "-m", "memenc", *cmd, "--weights", "random",
                              "--image-size", "64"], capture_output=True, text=True, cwd=tmp_path,
                             timeout=300)  # fmt: skip
        assert run.returncode == 2, run.stderr
        assert url in run.stderr and says in run.stderr and "Traceback" not in run.stderr
    if not url.startswith("memory"):  # reading one: the same one line
        run = subprocess.run([sys.executable, "-m", "memenc", "inspect", url],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)  # fmt: skip
        assert run.returncode == 2 and says in run.stderr, run.stderr
    assert not any(tmp_path.iterdir())
