"""Options that `encode` and `batch` share, declared once as `Annotated` aliases, with the
choices they take and the checks Typer runs while parsing."""

from __future__ import annotations

import enum
import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any, Optional

import typer

from memenc.errors import UsageError


class Weights(str, enum.Enum):
    checkpoint = "checkpoint"
    random = "random"


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class StoreDtype(str, enum.Enum):
    float16 = "float16"
    float32 = "float32"


def check_image_size_option(value: Optional[int]) -> Optional[int]:
    """--image-size: the library's rule (a positive multiple of 32), checked while parsing."""
    from memenc.pipeline.engine import check_image_size

    try:
        check_image_size(value)
    except UsageError as e:
        raise typer.BadParameter(str(e).removeprefix("--image-size ")) from None
    return value


def progress_wanted(quiet: bool, as_json: bool) -> bool:
    """The bar is drawn on stderr, so it is shown when stderr is a terminal."""
    return not (quiet or as_json) and sys.stderr.isatty()


Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="No progress and no closing result or summary (errors, warnings and the exit "
        "code stay).",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")]

SavStep = Annotated[
    int, typer.Option(min=1, help="SA-V JSON masks: annotation k is video frame k*N (SA-V: 4).")
]
Checkpoint = Annotated[
    Optional[str],
    typer.Option(
        help="Checkpoint file, or an official name (sam2.1_hiera_tiny, ...). "
        "Default: $MEMENC_CHECKPOINT, else sam2.1_hiera_base_plus (downloaded once)."
    ),
]
WeightsOption = Annotated[
    Weights, typer.Option("--weights", help="'checkpoint', or 'random' for seeded random weights.")
]
Seed = Annotated[int, typer.Option(help="Seed for --weights random.")]
Variant = Annotated[
    Optional[str], typer.Option(help="Force the model variant (default: detected).")
]
ImageSize = Annotated[
    Optional[int],
    typer.Option(
        help="Model image size S, a positive multiple of 32 (default 1024).",
        callback=check_image_size_option,
    ),
]
Frames = Annotated[
    Optional[str], typer.Option(help="Source frames START:STOP:STEP (Python slice).")
]
Objects = Annotated[Optional[str], typer.Option(help="Object ids to keep, e.g. 1,2.")]
BatchSize = Annotated[
    Optional[int],
    typer.Option(min=1, help="Frames per batch (default: 4 on the CPU, 16 on CUDA)."),
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
PrecisionOption = Annotated[Precision, typer.Option("--precision", help="Compute precision.")]
StoreDtypeOption = Annotated[
    StoreDtype, typer.Option("--store-dtype", help="Stored feature dtype.")
]
ChunkFrames = Annotated[
    Optional[int], typer.Option(min=1, help="Frames per chunk (default: ~1-4 MB chunks).")
]
Overwrite = Annotated[
    bool,
    typer.Option(
        help="Replace any memenc store at the output path and start anew (no resume). A "
        "local store replaced is kept aside until the new one is complete; encode brings "
        "it back if the run fails."
    ),
]
SkipUnmasked = Annotated[
    bool, typer.Option(help="Encode only frames that have a mask instead of failing.")
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the image and memory encoders. Compiling takes tens of seconds "
        "(about 40 s on an H200 for hiera_t at 1024), more than it saved on every run "
        "measured so far (512 frames there, bf16: 47.5 s against 11.9 s without).",
    ),
]
DecodeTimeout = Annotated[
    float, typer.Option(help="Seconds a decoder may take for one batch before it is killed.")
]
Decoders = Annotated[
    Optional[int],
    typer.Option(
        min=1,
        help="Decoder processes per video, each over its own chunks "
        "(default: 1 on the CPU, half the cores up to 4 on CUDA).",
    ),
]


@dataclass(frozen=True)
class RunOptions:
    """The model and store options `encode` and `batch` share, as parsed. Each field's
    default and `Annotated` alias above is its option's one declaration."""

    sav_step: SavStep = 4
    checkpoint: Checkpoint = None
    weights: WeightsOption = Weights.checkpoint
    seed: Seed = 0
    variant: Variant = None
    image_size: ImageSize = None
    frames: Frames = None
    objects: Objects = None
    batch_size: BatchSize = None
    device: Device = "auto"
    precision: PrecisionOption = Precision.fp32
    store_dtype: StoreDtypeOption = StoreDtype.float16
    chunk_frames: ChunkFrames = None
    compile: Compile = False
    overwrite: Overwrite = False
    skip_unmasked: SkipUnmasked = False
    decode_timeout: DecodeTimeout = 120.0
    decoders: Decoders = None

    def library_kwargs(self) -> dict[str, Any]:
        """The options as `encode_video` (and `BatchSettings`) name them."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["decode_timeout_s"] = values.pop("decode_timeout")
        return {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}


def with_run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command that takes ``run: RunOptions`` every `RunOptions` field as an option
    of its own (Typer reads the signature), and hand them back packed as ``run``."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "run"]
    # the field types are strings here (postponed annotations): the aliases of this module
    shared = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                          annotation=globals()[f.type] if isinstance(f.type, str) else f.type)
        for f in fields(RunOptions)
    ]  # fmt: skip
    tail = [p for p in own if p.name in ("quiet", "as_json")]  # progress and output last
    head = [p for p in own if p not in tail]
    params = [*head, *shared, *tail]
    names = [f.name for f in fields(RunOptions)]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        run = RunOptions(**{n: kwargs.pop(n) for n in names})
        return command(run=run, **kwargs)

    wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    )
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
