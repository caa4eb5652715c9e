"""`memenc` commands: encode, inspect, preview.

Errors: a `MemencError` prints one line `memenc: error: …` on stderr and exits with its
code (1, or 2 for usage errors); MEMENC_DEBUG=1 shows the traceback instead. Progress
bars appear only on a terminal and never with --quiet or --json.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.core import TyperGroup

from memenc.errors import MemencError, UsageError


class _ErrorMappingGroup(TyperGroup):
    """Runs a command and turns a `MemencError` into one line on stderr and its exit code
    (any other exception: one line too, marked as an internal error). MEMENC_DEBUG=1
    prints the traceback as well."""

    def invoke(self, ctx: click.Context):
        debug = os.environ.get("MEMENC_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except MemencError as e:
            if debug:
                traceback.print_exc()
            _error_line(f"memenc: error: {e}")
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            _error_line("memenc: interrupted")
            ctx.exit(130)
        except Exception as e:
            if debug:
                traceback.print_exc()
            _error_line(
                f"memenc: internal error: {type(e).__name__}: {e} "
                "(set MEMENC_DEBUG=1 for the traceback)"
            )
            ctx.exit(1)


def _error_line(text: str) -> None:
    """One line on stderr: newlines in messages (e.g. from native libraries) are folded."""
    print(" ".join(text.split()), file=sys.stderr)


app = typer.Typer(
    cls=_ErrorMappingGroup,
    name="memenc",
    help="Precompute SAM 2 memory caches (memory features + position encodings) for videos "
    "into chunked Zarr stores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out_console = Console()
err_console = Console(stderr=True)

# Options shared by several commands, defined once
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")]


def _progress_wanted(quiet: bool, as_json: bool) -> bool:
    return not (quiet or as_json) and sys.stdout.isatty()


@app.command()
def encode(
    video: Annotated[Path, typer.Argument(help="A video file, or a folder of frame images.")],
    masks: Annotated[
        Optional[Path],
        typer.Option(
            help="Mask source: PNG folder, mask video, .npy/.npz, or SA-V JSON. "
            "Default: <stem>_masks/, <stem>.masks.npy|npz or <stem>_manual.json beside the video."
        ),
    ] = None,
    sav_step: Annotated[
        int, typer.Option(help="SA-V JSON masks: annotation k is video frame k*N (SA-V: 4).")
    ] = 4,
    checkpoint: Annotated[
        Optional[str],
        typer.Option(help="Checkpoint file, or an official name (sam2.1_hiera_tiny, ...)."),
    ] = None,
    weights: Annotated[
        str, typer.Option(help="'checkpoint', or 'random' for seeded random weights.")
    ] = "checkpoint",
    seed: Annotated[int, typer.Option(help="Seed for --weights random.")] = 0,
    variant: Annotated[
        Optional[str], typer.Option(help="Force the model variant (default: detected).")
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("-o", "--out", help="Output store (default: <video stem>.zarr beside it)."),
    ] = None,
    image_size: Annotated[
        Optional[int], typer.Option(help="Model image size S (default 1024).")
    ] = None,
    frames: Annotated[
        Optional[str], typer.Option(help="Source frames START:STOP:STEP (Python slice).")
    ] = None,
    objects: Annotated[Optional[str], typer.Option(help="Object ids to keep, e.g. 1,2.")] = None,
    batch_size: Annotated[int, typer.Option(help="Frames per batch.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="Compute precision: fp32, bf16 or fp16.")] = "fp32",
    store_dtype: Annotated[
        str, typer.Option(help="Stored feature dtype: float16 or float32.")
    ] = "float16",
    chunk_frames: Annotated[
        Optional[int], typer.Option(help="Frames per chunk (default: ~1-4 MB chunks).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing store made with other settings.")
    ] = False,
    skip_unmasked: Annotated[
        bool, typer.Option(help="Encode only frames that have a mask instead of failing.")
    ] = False,
    decode_timeout: Annotated[
        float, typer.Option(help="Seconds a decoder may take for one batch before it is killed.")
    ] = 120.0,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Encode a video's SAM 2 memories into a Zarr store (resumable)."""
    from memenc.pipeline.engine import encode_video

    if (checkpoint is None) == (weights == "checkpoint"):
        raise UsageError("give either --checkpoint PATH|NAME or --weights random")
    show = _progress_wanted(quiet, as_json)
    with _ProgressView(show) as view:
        result = encode_video(
            video,
            masks=masks,
            sav_step=sav_step,
            checkpoint=checkpoint,
            weights=weights,
            variant=variant,
            seed=seed,
            out=out,
            image_size=image_size,
            frames=frames,
            objects=objects,
            batch_size=batch_size,
            device=device,
            precision=precision,
            store_dtype=store_dtype,
            chunk_frames=chunk_frames,
            overwrite=overwrite,
            skip_unmasked=skip_unmasked,
            decode_timeout_s=decode_timeout,
            progress=view.update if show else None,
        )
    if as_json:
        print(json.dumps(result.to_dict()))
    elif not quiet:
        what = (
            "already complete, nothing to do"
            if result.already_complete
            else f"{result.chunks_written} chunks written, {result.frames_per_second:.2f} frames/s"
        )
        out_console.print(
            f"{result.store}: {result.frames} frames × {len(result.objects)} objects "
            f"({result.status}; {what}; {result.variant}, {result.weights} weights, "
            f"{result.device}, {result.precision})"
        )


class _ProgressView:
    """A rich progress bar fed by the engine's `Progress` reports (download, then encode)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> _ProgressView:
        if self.enabled:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()

    def update(self, p) -> None:  # p: memenc.pipeline.engine.Progress
        if p.stage not in self.tasks:
            label = "download" if p.stage == "download" else "encode"
            self.tasks[p.stage] = self.bar.add_task(label, total=p.total or None, rate="")
        rate = f"{p.fps:.2f} frames/s" if p.stage == "encode" else ""
        self.bar.update(self.tasks[p.stage], completed=p.done, total=p.total or None, rate=rate)


@app.command()
def inspect(
    store: Annotated[str, typer.Argument(help="A memenc store (path or URL).")],
    as_json: Json = False,
) -> None:
    """Show a store's arrays, chunks, completion, attributes and size on disk."""
    from memenc.pipeline.report import describe_store

    info = describe_store(store)
    if as_json:
        print(json.dumps(info, default=str))
        return
    table = Table(title=f"{info['path']}  [{info['status']}]")
    table.add_column("array", no_wrap=True)
    for col in ("dims", "shape", "dtype", "chunks", "on disk"):
        table.add_column(col, overflow="fold")
    for a in info["arrays"]:
        table.add_row(
            a["name"],
            ", ".join(a.get("dimension_names") or []),
            " × ".join(map(str, a["shape"])),
            str(a["dtype"]),
            " × ".join(map(str, a["chunks"])),
            _size(a.get("stored_bytes")),
        )
    out_console.print(table)
    out_console.print(
        f"chunks done: {info['chunks_done']}/{info['chunks_total']}   "
        f"size on disk: {_size(info.get('size_on_disk'))}   fingerprint: {info['fingerprint'][:16]}…"
    )
    out_console.print_json(data=info["attrs"], default=str)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def preview(
    store: Annotated[str, typer.Argument(help="A memenc store.")],
    frame: Annotated[int, typer.Option(help="Source frame number.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="PNG to write.")],
    object_id: Annotated[
        Optional[int], typer.Option("--object", help="Object id (default: the first).")
    ] = None,
) -> None:
    """Write a picture: the frame, the object's mask, and a PCA of its memory features."""
    from memenc.pipeline.preview import render_preview

    path = render_preview(store, frame, out, object_id=object_id)
    out_console.print(f"wrote {path}")


def main() -> None:
    """Console entry point (`memenc`)."""
    app()


if __name__ == "__main__":
    main()
