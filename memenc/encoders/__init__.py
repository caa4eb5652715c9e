"""memenc.encoders: SAM 2's image encoder, memory encoder and object-pointer heads as
PyTorch modules.

`load_model` is the entry point; it returns a `MemencModel` whose `image_features` and
`encode_memory` compute exactly what SAM 2 computes for the same weights.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from memenc.encoders.checkpoint import (
    ProgressFn,
    read_state_dict,
    resolve_checkpoint,
    sha256_file,
    used_keys,
)
from memenc.encoders.model import MemencModel, MemoryOutput, empty_model
from memenc.encoders.variants import (
    DEFAULT_VARIANT,
    VARIANTS,
    Variant,
    detect_variant,
    get_variant,
)
from memenc.errors import CheckpointError

__all__ = [
    "DEFAULT_VARIANT",
    "VARIANTS",
    "MemencModel",
    "MemoryOutput",
    "Variant",
    "detect_variant",
    "get_variant",
    "load_model",
    "use_exact_fp32",
]


def use_exact_fp32() -> None:
    """Make float32 convolutions and matmuls on CUDA run in full fp32, not TF32.

    PyTorch lets cuDNN convolutions use TF32 by default (about 1e-3 relative error), which
    would put CUDA fp32 results outside DESIGN §3's 1e-5 of the reference. This sets the
    cuDNN-convolution and cuBLAS-matmul fp32 precision to "ieee" with the API of torch >= 2.9
    (`torch.backends.cudnn.conv.fp32_precision`, `torch.backends.cuda.matmul.fp32_precision`),
    or the older `allow_tf32` flags before it. The switches are process-global: they stay
    set after memenc returns and apply to other CUDA code in the process. bf16/fp16 compute
    (autocast) is unaffected. It touches no device, so it is safe without CUDA.

    With the new API set, torch 2.13 refuses to *read* the legacy
    `torch.backends.cudnn.allow_tf32` (it calls the mix of APIs an error); use
    `torch.backends.cudnn.conv.fp32_precision` to inspect the setting.
    """
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        cudnn_conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # torch < 2.9
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


# The pointer heads' parameters are drawn after the encoders', so that the encoders'
# random weights for a seed are those memenc drew before it had pointer heads.
_POINTER_HEADS = ("mask_downsample.", "sam_prompt_encoder.", "sam_mask_decoder.", "obj_ptr_proj.",
                  "no_obj_ptr")  # fmt: skip


def _randomize(model: MemencModel, seed: int) -> None:
    """Seeded random weights with a non-trivial spread (norm scales near 1, all else
    N(0, 0.1²); the prompt encoder's random Fourier matrix N(0, 1), as SAM draws it), the
    same on every machine."""
    gen = torch.Generator().manual_seed(seed)
    params = sorted(
        model.named_parameters(), key=lambda kv: (kv[0].startswith(_POINTER_HEADS), kv[0])
    )
    with torch.no_grad():
        for name, p in params:
            noise = torch.randn(p.shape, generator=gen) * 0.1
            is_norm_scale = name.endswith("weight") and p.ndim == 1
            p.copy_(noise + 1.0 if is_norm_scale else noise)
        gauss = model.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        gauss.copy_(torch.randn(gauss.shape, generator=gen))


def load_model(
    checkpoint: str | os.PathLike | None = None,
    *,
    variant: str | None = None,
    weights: str = "checkpoint",
    seed: int = 0,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> MemencModel:
    """Build SAM 2's image and memory encoders and the heads that make object pointers.

    checkpoint: a checkpoint file (official `{"model": state_dict}` or a bare state dict) or
        an official name such as `sam2.1_hiera_tiny` (downloaded once into $MEMENC_HOME).
    variant: force a variant (`sam2.1_hiera_tiny`, `small`, ...); default: detected from
        the checkpoint, or sam2.1_hiera_tiny for random weights.
    weights: "checkpoint", or "random" for seeded random weights (`seed`); the model's
        `weights` attribute says which.
    image_size: S, default the variant's 1024; any positive multiple of 32.
    device: where the model lives. progress: download progress callback (bytes, total).
    On every device it calls `use_exact_fp32` (TF32 off for CUDA fp32, process-wide), so a
    model moved to CUDA later computes fp32 within DESIGN §3's bounds too.

    Returns an eval-mode `MemencModel`. Raises CheckpointError for a missing, unreadable or
    foreign file and for missing or mis-shaped keys (named, with the variant).
    """
    if weights not in ("checkpoint", "random"):
        raise CheckpointError(f"weights must be 'checkpoint' or 'random', got {weights!r}")
    use_exact_fp32()
    if weights == "random":
        model = empty_model(get_variant(variant or DEFAULT_VARIANT), image_size)
        _randomize(model, seed)
        model.weights, model.seed = "random", seed
        return model.eval().to(device)

    if checkpoint is None:
        raise CheckpointError(
            "no checkpoint given (pass a file or an official name, or weights='random')"
        )
    path = resolve_checkpoint(checkpoint, progress)
    # the store records the checkpoint's SHA-256; hashlib releases the GIL, so the file
    # is hashed in a thread while it is read and loaded here (no torch work in that thread)
    with ThreadPoolExecutor(1, thread_name_prefix="memenc-sha256") as pool:
        digest = pool.submit(sha256_file, path)
        state = read_state_dict(path)
        var = get_variant(variant) if variant else detect_variant(state, str(path))
        model = empty_model(var, image_size)
        _load_strict(model, used_keys(state), path)
        model.checkpoint_sha256 = digest.result()
    model.weights = "checkpoint"
    model.checkpoint = str(path)
    return model.eval().to(device)


def _load_strict(model: MemencModel, state: dict[str, torch.Tensor], path: os.PathLike) -> None:
    """load_state_dict(strict=True), with missing and mis-shaped keys reported by name."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if misshaped:
        problems.append(f"mis-shaped keys {_listing(misshaped)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if problems:
        raise CheckpointError(f"{path}: does not fit {model.variant.name}: " + "; ".join(problems))
    # The model takes the loaded tensors themselves (assign=True) rather than copies, so the
    # weights are not held twice while loading (tests/test_encoders.py checks that they are
    # the same tensors). Measured once for sam2.1 tiny: the load's RSS peak fell from 549 to
    # 421 MB; a run's peak, set later by the image encoder's activations, did not change.
    # Each tensor first gets the dtype and contiguous layout of the model's own parameter,
    # so the kernels see what they saw before.
    own = {k: v.to(expected[k].dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(own, strict=True, assign=True)


def _listing(items: list[str], most: int = 5) -> str:
    more = f" (+{len(items) - most} more)" if len(items) > most else ""
    return ", ".join(items[:most]) + more
