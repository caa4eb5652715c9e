"""Where the CLI writes: stdout for results, stderr for progress bars, and the bar's one
shape that `encode` and `batch` share."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

out_console = Console()
err_console = Console(stderr=True)


def progress_bar(label: str, info: str) -> Progress:
    """A bar on stderr: `label`, the bar, done/total, `info` (a rich format string over the
    task), elapsed time and ETA."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(info),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
