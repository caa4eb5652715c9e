"""`memenc batch`: parse the options, call `memenc.pipeline.batch.run_batch`, render the
summary (a table, or --json) and exit 0 (all succeeded) or 3 (some inputs failed)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.table import Table

from memenc.cli.console import out_console, progress_bar
from memenc.cli.options import Json, Quiet, RunOptions, progress_wanted, with_run_options

EXIT_SOME_FAILED = 3


@with_run_options
def batch(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Video files, globs, folders (of videos or frame folders), or manifests "
            "(.csv / .jsonl with a 'video' column; optional masks, output, objects, frames)."
        ),
    ],
    out: Annotated[
        str,
        typer.Option("-o", "--out", help="Folder or URL (s3://bucket/prefix) for the stores."),
    ],
    masks_template: Annotated[
        Optional[str],
        typer.Option(
            help="Where each video's masks are, from {parent}, {stem}, {name}, {video}; "
            "e.g. '{parent}/{stem}_masks'. Default: beside each video, as encode finds them."
        ),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Local worker processes (default: one per GPU with several GPUs, else 1 = "
            "this process).",
        ),
    ] = None,
    shard: Annotated[
        Optional[str],
        typer.Option(help="Run shard I/N of the videos, or 'auto' (a Slurm array task)."),
    ] = None,
    dask: Annotated[
        Optional[str],
        typer.Option(help="Run the units on a Dask cluster: scheduler ADDRESS or local[:N]."),
    ] = None,
    retries: Annotated[
        int, typer.Option(min=0, help="Extra attempts for a lost worker or an I/O error.")
    ] = 2,
    unit_frames: Annotated[
        int,
        typer.Option(min=1, help="Frames per work unit; longer videos are split across workers."),
    ] = 256,
    finalize_only: Annotated[
        bool,
        typer.Option(help="Compute nothing; mark complete the stores whose chunks are all done."),
    ] = False,
    prepare_only: Annotated[
        bool,
        typer.Option(
            help="Compute nothing; create every store and DIR/batch-plan.json, so that "
            "--shard runs split long videos by unit too."
        ),
    ] = False,
    *,
    run: RunOptions,  # encode's model and store options (cli/options.py)
    verbose: Annotated[bool, typer.Option(help="Show the workers' logs.")] = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Encode many videos, one store each under --out (resumable; exit 3 if some failed)."""
    from memenc.cli.app import _warnings_as_lines
    from memenc.pipeline.batch import BatchSettings, run_batch

    shared = run.library_kwargs()
    frames, objects = shared.pop("frames"), shared.pop("objects")  # per input, in a manifest
    settings = BatchSettings(**shared)
    show = progress_wanted(quiet, as_json)
    with _BatchBar(show) as bar, _warnings_as_lines():
        summary = run_batch(
            inputs,
            out,
            settings=settings,
            masks_template=masks_template,
            frames=frames,
            objects=objects,
            unit_frames=unit_frames,
            workers=workers,
            shard=shard,
            dask=dask,
            retries=retries,
            finalize_only=finalize_only,
            prepare_only=prepare_only,
            verbose=verbose,
            progress=bar.update if show else None,
        )
    data = summary.to_dict()
    if as_json:
        print(json.dumps(data))
    elif not quiet:
        _render(data)
    else:  # errors stay with --quiet: each failed input and its reason, then the count
        for r in data["inputs"]:
            if r["status"] == "failed":
                print(f"memenc: {r['input']}: {' '.join(str(r['error']).split())}", file=sys.stderr)
        if not data["ok"]:
            print(f"memenc: {data['counts'].get('failed', 0)} input(s) failed", file=sys.stderr)
    if not summary.ok:
        raise typer.Exit(EXIT_SOME_FAILED)


def _render(data: dict) -> None:
    table = Table(title=f"memenc batch -> {data['out']}", title_justify="left")
    for col in ("input", "status", "frames", "seconds", "store / error"):
        table.add_column(col, overflow="fold")
    for r in data["inputs"]:
        style = {"failed": "red", "complete": "green"}.get(r["status"], "")
        table.add_row(
            r["input"],
            f"[{style}]{r['status']}[/]" if style else r["status"],
            str(r["frames"]),
            f"{r['seconds']:.1f}",
            r["error"] or r["store"],
        )
    out_console.print(table)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(data["counts"].items()))
    out_console.print(
        f"{counts}; {data['seconds']:.1f}s, {data['videos_per_second']:.3f} videos/s, "
        f"{data['frames_per_second']:.2f} frames/s"
    )
    if not data["ok"]:
        print(f"memenc: {data['counts'].get('failed', 0)} input(s) failed", file=sys.stderr)


class _BatchBar:
    """One rich bar for the whole batch: frames (with rate and ETA) and videos done."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = progress_bar(
            "batch", "frames · {task.fields[videos]} videos · {task.fields[rate]}"
        )
        self.task = None

    def __enter__(self) -> _BatchBar:
        if self.enabled:
            self.bar.start()
            self.task = self.bar.add_task("batch", total=None, videos="0/?", rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()

    def update(self, p) -> None:  # p: memenc.pipeline.batch.BatchProgress
        rate = p.frames_done / p.elapsed_s if p.elapsed_s > 0 else 0.0
        self.bar.update(
            self.task,
            completed=p.frames_done,
            total=p.frames_total or None,
            videos=f"{p.videos_done}/{p.videos_total}"
            + (f" ({p.waiting} waiting on another process)" if p.waiting else ""),
            rate=f"{rate:.2f} frames/s",
        )
