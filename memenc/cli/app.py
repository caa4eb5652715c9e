"""`memenc` commands: encode, batch (in memenc/cli/batch.py), inspect, preview.

Errors: a `MemencError` prints one line `memenc: error: …` on stderr and exits with its
code 1; usage errors (from the parser or from memenc's own checks) print the command's
usage line and one `Error:` line, and exit 2. MEMENC_DEBUG=1 shows the traceback instead.
A `MemencWarning` (a damaged video whose decodable frames are encoded) prints one line
`memenc: warning: …` on stderr and the command goes on. Progress bars appear only when
stderr (where they are drawn) is a terminal, and never with --quiet or --json.

Only `typer` is imported, never `click` directly: Typer 0.29+ vendors its own copy
(`typer._click`) and no longer installs `click`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from memenc.cli.console import out_console, progress_bar
from memenc.cli.options import Json, Quiet, RunOptions, progress_wanted, with_run_options
from memenc.errors import MemencError, MemencWarning, UsageError

# The parser's own exception classes, taken from Typer so that they are the ones its parser
# raises whether it vendors click (0.29+) or uses the `click` package (older releases):
# BadParameter derives from UsageError, which derives from ClickException.
_ParserUsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_ParserException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_PASS_THROUGH = (_ParserException, typer.Exit, typer.Abort)


class _ErrorMappingCommand(TyperCommand):
    """Runs a command and maps what it raises: memenc's `UsageError` becomes the parser's
    usage error (usage line + one `Error:` line, exit 2); another `MemencError` one line
    on stderr and its exit code; Ctrl-C "interrupted" (exit 130), SIGTERM "terminated"
    (exit 143); running out of GPU memory one line suggesting a smaller
    --batch-size (exit 1), out of host memory one suggesting a smaller --image-size; a
    closed output pipe nothing (exit 141, as SIGPIPE would); a storage backend's failure
    (no credentials, an endpoint it cannot reach) one line naming the store;
    anything else one line marked as an internal error (exit 1).
    MEMENC_DEBUG=1 prints the traceback as well (and asyncio's own error log, silenced
    otherwise)."""

    def invoke(self, ctx: typer.Context):
        debug = os.environ.get("MEMENC_DEBUG") == "1"
        if not debug:
            # Zarr lists a group's members in concurrent tasks; when one member's metadata
            # fails, asyncio logs each sibling task's unretrieved exception as a traceback
            # at exit. The failure itself reaches the command and is reported once.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except UsageError as e:
            if debug:
                traceback.print_exc()
            raise _ParserUsageError(" ".join(str(e).split()), ctx=ctx) from e
        except MemencError as e:
            if debug:
                traceback.print_exc()
            _error_line(f"memenc: error: {e}")
            ctx.exit(e.exit_code)
        except KeyboardInterrupt as e:
            code = 143 if isinstance(e, _Terminated) else 130
            _error_line("memenc: terminated" if code == 143 else "memenc: interrupted")
            _exit_if_stuck_at_exit(code)
            ctx.exit(code)
        except BrokenPipeError:
            # the reader of our output went away (`memenc inspect s.zarr | head`): stop
            # quietly, as a tool killed by SIGPIPE would, and keep Python's exit flush from
            # failing on the closed pipe again
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except Exception as e:
            if debug:
                traceback.print_exc()
            if _is_out_of_memory(e):
                batch = ctx.params.get("batch_size") or _cuda_default_batch()
                _error_line(
                    f"memenc: error: out of GPU memory ({_first_line(e)}); "
                    f"try a smaller --batch-size (this run: {batch}) or --image-size"
                )
                ctx.exit(1)
            if _is_out_of_host_memory(e):
                running = "batch_size" in ctx.params  # encode and batch; not inspect, preview
                hint = "; try a smaller --image-size or --batch-size" if running else ""
                _error_line(f"memenc: error: out of memory ({_first_line(e)[:100]}){hint}")
                ctx.exit(1)
            from memenc.store.urls import storage_error

            # inspect and preview name their store STORE (preview's --out is its PNG)
            where = ctx.params.get("store") or ctx.params.get("out") or "the store"
            failed = storage_error(str(where), e)
            if failed is not None:
                _error_line(f"memenc: error: {failed}")
                ctx.exit(1)
            _error_line(
                f"memenc: internal error: {type(e).__name__}: {e} "
                "(set MEMENC_DEBUG=1 for the traceback)"
            )
            ctx.exit(1)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, Slurm's scancel and time limit), taken the way Ctrl-C is: the run
    stops where it is, its workers and decoders are ended, its lock released."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


STUCK_EXIT_S = 3.0  # how long the interpreter's exit may wait for threads after a signal
_WATCH_S = 30.0  # how long the watch lasts (a command run in-process returns meanwhile)


def _exit_if_stuck_at_exit(code: int) -> None:
    """After Ctrl-C or SIGTERM: if the interpreter's exit then waits on a thread stuck in
    a read that never returns (a chunk file on a stalled network mount, a FIFO), end the
    process with `code` once it has waited `STUCK_EXIT_S`. A command called in-process
    (tests) returns instead of exiting, and the watch ends after `_WATCH_S`."""

    def watch() -> None:
        t0 = time.monotonic()
        stopped_at = None
        while time.monotonic() - t0 < _WATCH_S:
            # threading sets _SHUTTING_DOWN as the interpreter's exit starts joining
            # threads (3.10-3.13; later ones stop the main thread first)
            exiting = getattr(threading, "_SHUTTING_DOWN", False)
            if exiting or not threading.main_thread().is_alive():
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at >= STUCK_EXIT_S:
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    os._exit(code)
            time.sleep(0.1)

    threading.Thread(target=watch, name="memenc-exit-watch", daemon=True).start()


def _cuda_default_batch() -> str:
    import torch

    from memenc.pipeline.engine import default_batch_size

    return f"{default_batch_size(torch.device('cuda'))}, the CUDA default"


def _is_out_of_memory(e: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or the RuntimeError older torch raises for it."""
    if type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and "CUDA out of memory" in str(e)


def _is_out_of_host_memory(e: BaseException) -> bool:
    """torch's CPU allocator refusing a tensor, or Python's MemoryError."""
    if isinstance(e, MemoryError):
        return True
    return isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate" in str(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def _error_line(text: str) -> None:
    """One line on stderr: newlines in messages (e.g. from native libraries) are folded."""
    print(" ".join(text.split()), file=sys.stderr)


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Print each `MemencWarning` raised inside as one line ``memenc: warning: …``."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", MemencWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, MemencWarning):
                _error_line(f"memenc: warning: {message}")
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


app = typer.Typer(
    name="memenc",
    help="Precompute SAM 2 memory caches (memory features + position encodings) for videos "
    "into chunked Zarr stores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain parser errors: the usage line and one `Error:` line, not a boxed panel
    rich_markup_mode=None,
)


@app.command(cls=_ErrorMappingCommand)
@with_run_options
def encode(
    video: Annotated[Path, typer.Argument(help="A video file, or a folder of frame images.")],
    masks: Annotated[
        Optional[Path],
        typer.Option(
            help="Mask source: PNG folder, mask video, .npy/.npz, or SA-V JSON. "
            "Default: <stem>_masks/, <stem>.masks.npy|npz or <stem>_manual.json beside the video."
        ),
    ] = None,
    out: Annotated[
        Optional[str],
        typer.Option(
            "-o",
            "--out",
            help="Output store, a path or URL (default: <video stem>.zarr beside it).",
        ),
    ] = None,
    *,
    run: RunOptions,  # the model and store options shared with batch (cli/options.py)
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Encode a video's SAM 2 memories into a Zarr store (resumable)."""
    from memenc.pipeline.engine import busiest_stage, encode_video
    from memenc.store.urls import check_kept_url, is_url

    if out is not None and is_url(out):  # the library may write memory://, not a command
        check_kept_url(out)
    show = progress_wanted(quiet, as_json)
    with _ProgressView(show) as view, _warnings_as_lines():
        result = encode_video(
            video,
            masks=masks,
            out=out,
            **run.library_kwargs(),
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
        busiest = busiest_stage(result.stages)
        if busiest is not None:  # what bounded the run: --json's `stages` say more
            what += f", {busiest[0]} busy {busiest[1]:.0%} of the time"
        out_console.print(
            f"{result.store}: {result.frames} frames × {len(result.objects)} objects "
            f"({result.status}; {what}; {result.variant}, {result.weights} weights, "
            f"{result.device}, {result.precision})"
        )


def _not_empty(path: str | None, name: str) -> None:
    """A usage error for an empty STORE (it would mean the current folder); `encode_video`
    makes the same check of its ``out``."""
    if path is not None and not path.strip():
        raise UsageError(f"{name}: an empty path; name the store")


class _ProgressView:
    """A rich progress bar fed by the engine's `Progress` reports (download, then encode)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = progress_bar("{task.description}", "{task.fields[rate]}")
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


@app.command(cls=_ErrorMappingCommand)
def inspect(
    store: Annotated[str, typer.Argument(help="A memenc store (path or URL).")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole record (all attributes) as JSON.")
    ] = False,
) -> None:
    """Summarise a store: video, model, masks, objects, frames, status, chunks, size, arrays."""
    from memenc.store.report import describe_store, human_bytes, summary_lines

    _not_empty(store, "STORE")

    info = describe_store(store)
    if as_json:
        print(json.dumps(info, default=str))
        return
    print(info["path"])
    summary = summary_lines(info)
    width = max(len(label) for label, _ in summary)
    for label, text in summary:
        print(f"  {label:<{width}}  {text}")
    print()
    rows = [("array", "dims", "shape", "dtype", "chunks", "on disk")] + [
        (
            a["name"],
            ",".join(a.get("dimension_names") or []),
            "×".join(map(str, a["shape"])),
            str(a["dtype"]),
            "×".join(map(str, a["chunks"])),
            human_bytes(a.get("stored_bytes")),
        )
        for a in info["arrays"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:  # plain print: a table that never wraps or truncates
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


@app.command(cls=_ErrorMappingCommand)
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

    _not_empty(store, "STORE")

    path = render_preview(store, frame, out, object_id=object_id)
    out_console.print(f"wrote {path}")


from memenc.cli.batch import batch  # noqa: E402 (it uses the options defined above)

app.command(cls=_ErrorMappingCommand)(batch)


def main() -> None:
    """Console entry point (`memenc`)."""
    app()


if __name__ == "__main__":
    main()
