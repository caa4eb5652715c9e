"""Reading SAM 2 checkpoints, and fetching official ones by name.

A checkpoint is an official `{"model": state_dict}` file or a bare state dict, read with
`torch.load(weights_only=True)`. Only the keys memenc's modules have are taken (memory
attention, and the parts of the prompt encoder and mask decoder that do not change the
object pointer, are ignored); they load with `strict=True`, so a missing or mis-shaped
key is an error that names it.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from memenc.encoders.variants import VARIANTS, Variant
from memenc.errors import CheckpointError

# Prefixes of the checkpoint keys memenc's modules own; everything else is ignored.
USED_PREFIXES = (
    "image_encoder.",
    "memory_encoder.",
    "maskmem_tpos_enc",
    "no_obj_embed_spatial",
    # the SAM heads that make object pointers (DESIGN §3a)
    "mask_downsample.",
    "sam_prompt_encoder.",
    "sam_mask_decoder.",
    "obj_ptr_proj.",
    "no_obj_ptr",
)
# ... except the parts of those heads that do not change the pointer: point and box
# prompts, the no-mask embedding (a mask is always given), and the mask decoder's
# upscaling path with its high-resolution FPN projections, hypernetworks and IoU head
# (the pointer is taken from mask token 0 before them; see memenc/encoders/decoder.py).
UNUSED_PREFIXES = (
    "sam_prompt_encoder.point_embeddings.",
    "sam_prompt_encoder.no_mask_embed.",
    "sam_mask_decoder.output_upscaling.",
    "sam_mask_decoder.conv_s0.",
    "sam_mask_decoder.conv_s1.",
    "sam_mask_decoder.output_hypernetworks_mlps.",
    "sam_mask_decoder.iou_prediction_head.",
)

DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2"
# Release folder of each family on the official server
_RELEASE = {"sam2": "072824", "sam2.1": "092824"}

ProgressFn = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


def memenc_home() -> Path:
    """The cache folder: $MEMENC_HOME, default ~/.cache/memenc."""
    return Path(os.environ.get("MEMENC_HOME") or Path.home() / ".cache" / "memenc")


def official_url(variant: Variant) -> str:
    """Download URL of a variant's official checkpoint ($MEMENC_CHECKPOINT_BASE_URL overrides
    the server)."""
    base = os.environ.get("MEMENC_CHECKPOINT_BASE_URL") or DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{_RELEASE[variant.family]}/{variant.name}.pt"


def is_official_name(name: str) -> bool:
    """True for `sam2.1_hiera_tiny`-style names (with or without `.pt`) of released checkpoints."""
    return name.removesuffix(".pt") in VARIANTS


def download_official(name: str, progress: ProgressFn | None = None, timeout: float = 60.0) -> Path:
    """Return the local path of official checkpoint `name`, downloading it into
    `memenc_home()/checkpoints/` on first use.

    The file is streamed into a temporary `.partial` file beside the target and renamed
    into place only once it is whole: every byte the server announced (`Content-Length`)
    has arrived or, when the server announces no length, the file loads as a checkpoint.
    Its sha256, computed while it streams, is written beside it (`<name>.pt.sha256`) and
    checked on every later use; a cached file that no longer matches (or has no record)
    is downloaded again. Raises CheckpointError on network errors (the message says how
    to pass a local file instead) or an incomplete download.
    """
    variant = VARIANTS[name.removesuffix(".pt")]
    target = memenc_home() / "checkpoints" / f"{variant.name}.pt"
    record = _sha256_record(target)
    if target.is_file():
        if _cached_file_intact(target, record):
            return target
        target.unlink(missing_ok=True)  # damaged or unrecorded: fetch it again
        record.unlink(missing_ok=True)
    url = official_url(variant)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"{target.parent}: cannot create the checkpoint cache: {e.strerror}"
        ) from e
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    tmp_record = record.with_name(f"{record.name}.{os.getpid()}.partial")
    try:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            total = resp.headers.get("Content-Length")
            total = int(total) if total is not None else None
            done = 0
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            if total is not None and done != total:
                raise CheckpointError(f"{url}: download interrupted after {done} of {total} bytes")
        if total is None:
            # nothing says how long the file is: it must at least load as a checkpoint
            try:
                read_state_dict(tmp)
            except CheckpointError as e:
                raise CheckpointError(
                    f"{url}: the download ({done} bytes, no Content-Length) is not a complete "
                    "checkpoint; the connection was probably cut"
                ) from e
        tmp_record.write_text(f"{digest.hexdigest()}  {target.name}\n")
        os.replace(tmp_record, record)
        os.replace(tmp, target)
    except CheckpointError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise CheckpointError(
            f"{url}: download of {variant.name} failed: {reason}; without network, pass a "
            f"checkpoint file you have: --checkpoint FILE (or set MEMENC_CHECKPOINT=FILE)"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
        tmp_record.unlink(missing_ok=True)
    return target


def _sha256_record(target: Path) -> Path:
    """The file beside a cached checkpoint that holds its sha256 (`sha256sum` format)."""
    return target.with_name(f"{target.name}.sha256")


def _cached_file_intact(target: Path, record: Path) -> bool:
    """Whether a cached download still has the sha256 recorded when it completed."""
    try:
        expected = record.read_text().split()[0]
    except (OSError, IndexError):
        return False
    return sha256_file(target) == expected


def resolve_checkpoint(checkpoint: str | os.PathLike, progress: ProgressFn | None = None) -> Path:
    """A checkpoint argument -> a local file: an existing path as it is, an official name
    downloaded (once) into the cache. Raises CheckpointError for anything else."""
    path = Path(checkpoint)
    if path.exists():
        if not path.is_file():
            raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
        return path
    if is_official_name(str(checkpoint)):
        return download_official(str(checkpoint), progress)
    raise CheckpointError(
        f"{checkpoint}: no such file, and not an official checkpoint name "
        f"(known: {', '.join(VARIANTS)})"
    )


def _is_zip(path: Path) -> bool:
    """Whether the file starts as a zip archive does (torch.save's format since torch 1.6;
    the legacy format cannot be memory-mapped)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False  # torch.load then reports the problem


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint file safely and return its model state dict (the `"model"` entry of
    an official file, or the file itself when it is a bare state dict).
    Raises CheckpointError naming the file when it is unreadable or not a checkpoint.

    A zip-format file (every official one) is memory-mapped rather than read: its tensors
    are views of the file's pages, which the model then takes as its own (`assign=True`),
    so the weights never pass through the heap, and the keys memenc does not use (memory
    attention, the mask decoder's other heads) are never read at all. `benchmarks/load.py`
    for sam2.1 tiny at 1024 on this project's 2-core machine: right after `load_model` the
    process holds 245 MB (heap 221 MB, 90 MB of it live) against 393 MB (heap 370, 213
    live) when the file is read. A CPU run's peak is another matter: it comes later, from
    the image encoder's activations, which now grow the heap instead of filling what the
    load left free, and it did not change measurably (short clip: 838-889 MB in the
    benchmark's three runs, 825-860 MB before). Processes on one machine that load the same
    file (several `memenc batch` workers, for one) share its pages: two that had each run a
    frame held 104 MB of it each, a proportional share of 52 MB, where a read file is a
    private copy in each. The pages are the file's: a checkpoint overwritten in place
    while memenc runs is not supported (the downloader renames a finished file into place,
    as does any careful copy). Neither way checks the zip's CRCs: the store records the
    file's SHA-256."""
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: not for users
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as e:  # torch.load raises many types for damaged or foreign files
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path}: a pickle that holds more than tensors, not a SAM 2 checkpoint "
                "(memenc loads weights only and never runs code from a checkpoint)"
            ) from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or another format): "
            f"{type(e).__name__}{': ' + first[:200] if first else ''}"
        ) from e
    sd = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if (
        not isinstance(sd, Mapping)
        or not sd
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
    ):
        raise CheckpointError(
            f"{path}: not a SAM 2 checkpoint (expected {{'model': state_dict}} or a state dict of tensors)"
        )
    return dict(sd)


def used_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The subset of a checkpoint's state dict that memenc's modules own (the one filter)."""
    return {
        k: v
        for k, v in state_dict.items()
        if k.startswith(USED_PREFIXES) and not k.startswith(UNUSED_PREFIXES)
    }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
