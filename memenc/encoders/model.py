"""MemencModel: SAM 2's image encoder and memory step, with exactly the reference's numbers.

Two calls make a memory:

    pix_feat = model.image_features(frames)       # uint8 [B, 3, S, S] -> [B, 256, S/16, S/16]
    out = model.encode_memory(pix_feat, masks)    # masks [B, O, H, W] -> MemoryOutput

`encode_memory` is SAM 2's `track_step(mask_inputs=m, run_mem_encoder=True)` for a frame
whose mask was given as input (`use_mask_input_as_output_without_sam`), run for all of a
frame's objects at once: `_encode_new_memory` for the memory features and
`_use_mask_as_output` for the object pointers (memenc/encoders/pointer.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memenc.encoders.decoder import MaskDecoder
from memenc.encoders.hiera import Hiera
from memenc.encoders.memory import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from memenc.encoders.neck import FpnNeck
from memenc.encoders.pointer import object_pointers
from memenc.encoders.position import PositionEmbeddingSine
from memenc.encoders.prompt import PromptEncoder
from memenc.encoders.two_way import MLP, TwoWayTransformer
from memenc.encoders.variants import Variant

# ImageNet statistics SAM 2 normalises frames with
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)

# Logits SAM 2 gives a binary mask input (its `_use_mask_as_output`), and object scores
MASK_LOGIT_SCALE, MASK_LOGIT_BIAS = 20.0, -10.0
SCORE_PRESENT, SCORE_ABSENT = 10.0, -10.0


@dataclass(frozen=True)
class MemoryOutput:
    """The memory of B frames × O objects.

    features: `[B, O, 64, h, w]` maskmem_features; pos_enc: `[64, h, w]` (the same for every
    frame and object); object_score_logits: `[B, O]` (+10 present, −10 absent for masks);
    obj_ptr: `[B, O, 256]` object pointers, or None when they were not asked for.
    """

    features: torch.Tensor
    pos_enc: torch.Tensor
    object_score_logits: torch.Tensor
    obj_ptr: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b, o, c, h, w = self.features.shape
        if tuple(self.pos_enc.shape) != (c, h, w):
            raise ValueError(
                f"pos_enc {tuple(self.pos_enc.shape)} does not match features {(c, h, w)}"
            )
        if tuple(self.object_score_logits.shape) != (b, o):
            raise ValueError(
                f"object_score_logits {tuple(self.object_score_logits.shape)} != {(b, o)}"
            )
        if self.obj_ptr is not None and (
            self.obj_ptr.ndim != 3 or self.obj_ptr.shape[:2] != (b, o)
        ):
            raise ValueError(f"obj_ptr {tuple(self.obj_ptr.shape)} != {(b, o)} + (C,)")


def _reference_layout(pix_feat: torch.Tensor) -> torch.Tensor:
    """pix_feat `[B, C, h, w]` with the strides the reference's has: it flattens the map to
    tokens `[hw, B, C]` and views it back, and the convolutions that follow pick their
    kernels (and so their rounding) by layout."""
    return pix_feat.flatten(2).permute(2, 0, 1).permute(1, 2, 0).view(pix_feat.shape)


class ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck (`image_encoder.trunk.*`, `image_encoder.neck.*`)."""

    def __init__(self, trunk: Hiera, neck: FpnNeck) -> None:
        super().__init__()
        if trunk.channel_list != neck.backbone_channel_list:
            raise ValueError(
                f"trunk channels {trunk.channel_list} != neck {neck.backbone_channel_list}"
            )
        self.trunk = trunk
        self.neck = neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images `[B, 3, S, S]` -> stride-16 features `[B, 256, S/16, S/16]`."""
        return self.neck(self.trunk(x, coarsest=self.neck.levels_used))


# On the CPU the frames of a batch run side by side, one single-threaded worker per thread of
# torch's pool, instead of one frame after another on all of them: a worker's kernels run
# without waiting at OpenMP barriers, and one frame's Python between kernels overlaps the
# other's kernels. The numbers do not change: every kernel memenc runs gives the same bits
# on one thread as on 2, 3 or 4 (checked op by op at S=256, 512 and 1024 on the
# development machine), except 1x1 convolutions, whose oneDNN kernels split their sums by
# thread count. `_FramePool` finds such convolutions by trying each once and runs them on
# the caller's thread count; tests/test_encoders.py checks the whole against one frame at
# a time, bit for bit.
FRAME_WORKERS_MAX = 4
# Each worker holds a frame's activations, which scale with Hiera's stride-4 map. Two
# frames at once raised a process's peak from 798-831 MB to 1027-1146 MB at S=1024 (a
# 25 MB stride-4 map in float32), and from 548 to 629 MB at 512 (sam2.1 tiny, 8 frames
# in batches of 4 with 2 objects, maxrss, 2 runs and 1), so the workers run only where
# that map is at most this size: S=512 for tiny and base_plus (6.3 and 7.3 MB) and below.
# Measured again at 1024 after a frame's live peak fell (b67f946): two frames ran
# image_features 1.11x as fast (6.69 against 7.45 s for two frames, medians of 4) for 82
# MB more live memory, but whole runs of the benchmark's 6-frame clip were no faster
# (medians of 4 alternating: 29.4 s both) and peaked at 930-969 MB against 731-798 MB.
FRAME_WORKERS_MAP_BYTES = 8 * 2**20


class _FramePool:
    """`workers` threads that run torch single-threaded, each on one frame at a time.

    A convolution whose result changes with the thread count runs in a worker on `threads`
    threads (the caller's count), so it rounds as it would in the caller. Whether it does
    is tried once per convolution and input layout, on random input of that layout (a real
    input can hide it: an empty mask makes every sum exactly zero). OpenMP's thread count is
    a per-thread setting, but torch also sets MKL's and its own default for new threads
    process-wide, so `map` puts those back to `threads` when it returns."""

    def __init__(self, model: nn.Module, workers: int, threads: int) -> None:
        self.workers, self.threads = workers, threads
        self._local = threading.local()
        self._wide: dict[tuple[Any, ...], bool] = {}  # convolution and layout -> caller's count
        self._executor = ThreadPoolExecutor(
            workers, thread_name_prefix="memenc-frame", initializer=self._start
        )
        self._hooks = []
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                self._hooks.append(module.register_forward_pre_hook(self._before))
                self._hooks.append(module.register_forward_hook(self._after))

    def _start(self) -> None:
        torch.get_num_threads()  # this thread's settings made now, from the process's
        torch.set_num_threads(1)
        self._local.worker = True

    @staticmethod
    def _key(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (id(module), tuple(x.shape), x.stride(), x.dtype)

    def _before(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not getattr(self._local, "worker", False):
            return
        # decided here and kept for `_after`: another worker may decide in between
        self._local.wide = wide = self._wide.get(self._key(module, args))
        if wide:
            torch.set_num_threads(self.threads)

    def _after(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
        if not getattr(self._local, "worker", False):
            return None
        wide = self._local.wide
        if wide:
            torch.set_num_threads(1)
        elif wide is None:  # first time: do one and all threads give the same bits?
            x = args[0]
            probe = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
            probe.normal_(generator=torch.Generator().manual_seed(0))
            narrow = module.forward(probe)
            torch.set_num_threads(self.threads)
            try:
                wide = not torch.equal(module.forward(probe), narrow)
                self._wide[self._key(module, args)] = wide
                if wide:
                    return module.forward(*args)
            finally:
                torch.set_num_threads(1)
        return None

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
        """`[fn(*args) ...]` in the workers, in order, under the caller's inference mode."""
        inference = torch.is_inference_mode_enabled()

        def run(*args: Any) -> Any:
            with torch.inference_mode(inference):
                return fn(*args)

        try:
            return list(self._executor.map(run, *iterables))
        finally:
            torch.set_num_threads(self.threads)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._executor.shutdown(wait=False)


class MemencModel(nn.Module):
    """SAM 2's image encoder and memory encoder for one variant at one image size.

    Attributes: `variant` (a `Variant`; `str()` gives its name), `image_size` (S),
    `weights` ("checkpoint" or "random"), `checkpoint` (path or None), `checkpoint_sha256`,
    `seed` (for random weights), `maskmem_tpos_enc` `[7, 1, 1, 64]` and, for SAM 2.1,
    `no_obj_embed_spatial` `[1, 64]`. The pointer heads carry the checkpoint's names:
    `mask_downsample`, `sam_prompt_encoder`, `sam_mask_decoder`, `obj_ptr_proj`, `no_obj_ptr`.
    Build it with `memenc.encoders.load_model`.
    """

    def __init__(self, variant: Variant, image_size: int | None = None) -> None:
        super().__init__()
        self.variant = variant
        self.image_size = int(image_size or variant.image_size)
        if self.image_size <= 0 or self.image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        self.weights = "random"
        self.checkpoint: str | None = None
        self.checkpoint_sha256: str | None = None
        self.seed: int | None = None

        trunk = Hiera(
            embed_dim=variant.embed_dim,
            num_heads=variant.num_heads,
            stages=variant.stages,
            global_att_blocks=variant.global_att_blocks,
            window_spec=variant.window_spec,
            window_pos_embed_bkg_spatial_size=variant.window_pos_embed_bkg_spatial_size,
        )
        self.image_encoder = ImageEncoder(trunk, FpnNeck(variant.channel_list, variant.d_model))
        self.memory_encoder = MemoryEncoder(
            MaskDownSampler(embed_dim=variant.d_model),
            Fuser(CXBlock(variant.d_model), variant.fuser_layers),
            in_dim=variant.d_model,
            out_dim=variant.mem_dim,
        )
        self.position_encoding = PositionEmbeddingSine(variant.mem_dim)
        self.maskmem_tpos_enc = nn.Parameter(
            torch.zeros(variant.num_maskmem, 1, 1, variant.mem_dim)
        )
        if variant.no_obj_embed_spatial:
            self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, variant.mem_dim))
        else:
            self.no_obj_embed_spatial = None
        # SAM heads for the object pointers (DESIGN §3a), under the checkpoint's names
        d = variant.d_model
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.sam_prompt_encoder = PromptEncoder(d)
        self.sam_mask_decoder = MaskDecoder(TwoWayTransformer(dim=d), d)
        self.obj_ptr_proj = MLP(d, d, d, 3)
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, d))
        self.register_buffer(
            "pixel_mean", torch.tensor(PIXEL_MEAN)[:, None, None], persistent=False
        )
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD)[:, None, None], persistent=False)
        # torch.compile'd (image encoder, memory encoder), kept out of the module tree (and
        # so out of state_dict); None until `compile_encoders`
        self._compiled: tuple[nn.Module, nn.Module] | None = None
        self._frame_pool: _FramePool | None = None
        self._frame_workers: int | None = None  # None: `frame_workers` chooses

    def compile_encoders(self) -> None:
        """Run the image encoder and the memory encoder through `torch.compile`
        (dynamic=False: one graph per input shape, compiled on first use). The pointer
        heads stay eager. Callers keep shapes fixed (`run_chunks` pads a short last batch
        when the kernels take whole batches). Numbers stay within DESIGN §3's bounds, not
        bit-identical (the compiler fuses and reorders): on the CPU at S=256, sam2.1 tiny,
        the memory features were within relative L2 9e-7 of eager, and the first call
        took 112 s to compile on 2 shared cores (worth it only for long runs)."""
        self._compiled = (
            torch.compile(self.image_encoder, dynamic=False),
            torch.compile(self.memory_encoder, dynamic=False),
        )

    @property
    def compiled(self) -> bool:
        """Whether `compile_encoders` was called."""
        return self._compiled is not None

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split a batch into the micro-batches the kernels run on (`frame_batch`)."""
        return x.split(self.frame_batch or x.shape[0] or 1)

    @property
    def frame_batch(self) -> int | None:
        """Frames per kernel call: 1 on the CPU, where the reference runs one frame at a time
        and float32 kernels round differently for other batch sizes (so memenc's numbers are
        bit-for-bit the reference's, and batching would gain nothing there); None (the whole
        batch) on accelerators, where batching is the speed-up."""
        return 1 if self.device.type == "cpu" else None

    @property
    def frame_workers(self) -> int:
        """Frames the CPU kernels run at once, each on one thread (`_FramePool`): torch's
        thread count (in this thread) when it is 2 to FRAME_WORKERS_MAX and Hiera's
        stride-4 map of a frame is at most FRAME_WORKERS_MAP_BYTES; otherwise 1, one frame
        at a time on all threads (also on accelerators, compiled, and under autocast,
        which is per thread). `set_frame_workers` overrides the choice."""
        if (
            self.device.type != "cpu"
            or self._compiled is not None
            or torch.is_autocast_enabled("cpu")
        ):
            return 1
        if self._frame_workers is not None:
            return self._frame_workers
        threads = torch.get_num_threads()
        side = self.image_size // 4
        map_bytes = side * side * self.variant.embed_dim * 4
        if 2 <= threads <= FRAME_WORKERS_MAX and map_bytes <= FRAME_WORKERS_MAP_BYTES:
            return threads
        return 1

    def set_frame_workers(self, workers: int | None) -> None:
        """Run `workers` frames at once on the CPU (1: one at a time); None: choose
        (`frame_workers`)."""
        if workers is not None and workers < 1:
            raise ValueError(f"frame workers must be at least 1, got {workers}")
        self._frame_workers = workers

    def _map(self, fn: Callable[..., Any], *parts: Iterable[Any]) -> list[Any]:
        """`[fn(*args) for args in zip(*parts)]`, frames side by side when `frame_workers`
        is more than 1."""
        workers = self.frame_workers
        if workers == 1:
            return [fn(*args) for args in zip(*parts, strict=True)]
        threads = torch.get_num_threads()
        pool = self._frame_pool
        if pool is None or (pool.workers, pool.threads) != (workers, threads):
            if pool is not None:
                pool.close()
            pool = self._frame_pool = _FramePool(self, workers, threads)
        return pool.map(fn, *parts)

    @property
    def feat_size(self) -> int:
        """Side of the stride-16 feature map, S/16."""
        return self.image_size // 16

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @torch.inference_mode()
    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames `[B, 3, S, S]` -> pix_feat `[B, 256, S/16, S/16]` (the stride-16
        FPN level, SAM 2's `vision_feats[-1]`). Normalisation (/255, ImageNet mean/std)
        happens here. Raises ValueError on a wrong shape."""
        s = self.image_size
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (3, s, s):
            raise ValueError(f"frames must be [B, 3, {s}, {s}], got {tuple(frames.shape)}")
        encoder = self._compiled[0] if self._compiled else self.image_encoder
        # normalised a micro-batch at a time (elementwise: the same numbers), so on the CPU
        # only one frame per frame worker is ever held in float32 (12.6 MB at 1024, against
        # 50 MB for a batch of 4 and twice that while it is normalised)
        return torch.cat(
            self._map(lambda part: encoder(self._normalize(part)), self._split(frames))
        )

    def _normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, 3, S, S]` -> float32 on the model's device, /255, ImageNet mean/std."""
        x = frames.to(self.device, non_blocking=True).to(torch.float32)
        # in place once `x` is a copy (the same operations on the same values), so a frame
        # is one float32 tensor here rather than four (12.6 MB each at 1024)
        x = x / 255.0 if x.data_ptr() == frames.data_ptr() else x.div_(255.0)
        return x.sub_(self.pixel_mean).div_(self.pixel_std)

    @torch.inference_mode()
    def mask_logits(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks `[B, O, H, W]` at any resolution -> (logits `[B, O, S, S]` float32,
        object_score_logits `[B, O]`), following DESIGN §3 steps 2–3.

        bool/uint8 masks are binary: resized bilinearly with antialias to S×S, thresholded
        at 0.5, logits = 20·m − 10, score +10 when any pixel is set. Float masks are logits:
        resized bilinearly (no antialias) and used as they are, score +10 when any is > 0.
        """
        if masks.ndim != 4:
            raise ValueError(f"masks must be [B, O, H, W], got {tuple(masks.shape)}")
        b, o, h, w = masks.shape
        s = self.image_size
        binary = masks.dtype in (torch.bool, torch.uint8)
        m = masks.to(self.device).to(torch.float32).reshape(b * o, 1, h, w)
        if (h, w) != (s, s):
            m = F.interpolate(
                m, size=(s, s), mode="bilinear", align_corners=False, antialias=binary
            )
            if binary:
                m = (m >= 0.5).to(torch.float32)
        logits = m * MASK_LOGIT_SCALE + MASK_LOGIT_BIAS if binary else m
        present = (m > 0).flatten(1).any(dim=1)
        scores = torch.where(present, SCORE_PRESENT, SCORE_ABSENT).to(torch.float32)
        return logits.view(b, o, s, s), scores.view(b, o)

    @torch.inference_mode()
    def encode_memory(
        self,
        pix_feat: torch.Tensor,
        masks: torch.Tensor,
        object_score_logits: torch.Tensor | None = None,
        *,
        pointers: bool = True,
    ) -> MemoryOutput:
        """Memory features and object pointers of each frame's objects.

        pix_feat: `[B, 256, h, w]` from `image_features`. masks: `[B, O, H, W]`, bool/uint8
        (binary) or float (logits), any resolution. object_score_logits: optional `[B, O]`
        that replaces the scores derived from the masks. Returns a `MemoryOutput`; objects
        whose score is ≤ 0 get SAM 2.1's no-object embedding and `no_obj_ptr`.

        The pointer path gets the 0/1 mask SAM 2 would be given: the resized, thresholded
        binary mask, and for logit masks the mask `logits > 0`, so a logit mask's pointer is
        that of `track_step(mask_inputs=logits > 0)` (SAM 2's mask inputs are 0/1 masks,
        which `mask_downsample` maps to its logit scale). Its second gate is the score (> 0).
        pointers=False skips them (`obj_ptr` is None). On the CPU, the pointers of the
        bundled sample's two objects made `memenc encode` 3.3% slower at S=512 and 2.7% at
        S=1024 (medians of 29 and 10 paired runs of `benchmarks/pointers.py`, sam2.1 tiny,
        2 cores); at S=256, where the image encoder is cheap, 3.6%. They skip what SAM 2's
        `_use_mask_as_output` spends on upscaling the mask, which does not reach them.
        """
        if masks.ndim != 4:
            raise ValueError(f"masks must be [B, O, H, W], got {tuple(masks.shape)}")
        b, o = masks.shape[:2]
        if pix_feat.shape[0] != b:
            raise ValueError(f"pix_feat has {pix_feat.shape[0]} frames but masks have {b}")
        given = None
        if object_score_logits is not None:
            given = object_score_logits.to(self.device, torch.float32).reshape(b, o)
        encoder = self._compiled[1] if self._compiled else self.memory_encoder
        exact = self.frame_batch == 1  # the CPU: the reference's rounding

        # The masks are resized and scaled a micro-batch at a time, with its frames'
        # features (each mask's numbers are its own), so on the CPU only one frame's
        # S×S planes are held: at 1024 a batch of 4 frames of 2 objects made four 33 MB
        # tensors, the peak of live memory of a run.
        def frame(
            pf: torch.Tensor, mk: torch.Tensor, *given_scores: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            logits, scores = self.mask_logits(mk)
            if given_scores:
                scores = given_scores[0]
            # SAM 2's scaled sigmoid: sigmoid(logits) * 20 - 10; the encoder skips its own
            mask_for_mem = (
                torch.sigmoid(logits) * self.variant.sigmoid_scale + self.variant.sigmoid_bias
            )
            feats = encoder(_reference_layout(pf), mask_for_mem, self.frame_batch)
            del mask_for_mem
            if not pointers:
                return feats, scores, None
            # SAM 2's mask_inputs are the 0/1 masks: logits > 0
            m01 = (logits > 0).to(torch.float32)
            del logits
            ptr = object_pointers(self, _reference_layout(pf), m01, scores > 0, exact)
            return feats, scores, ptr

        parts = [pix_feat, masks] + ([given] if given is not None else [])
        done = self._map(frame, *(self._split(x) for x in parts))
        scores = torch.cat([sc for _, sc, _ in done])
        features = torch.cat([feats for feats, _, _ in done])
        if self.no_obj_embed_spatial is not None:
            absent = 1 - (scores > 0).to(features.dtype)  # [B, O]
            embed = self.no_obj_embed_spatial.to(features.dtype)  # [1, 64]
            features = features + absent[..., None, None, None] * embed[0, :, None, None]
        h, w = features.shape[-2:]
        pos_enc = self.position_encoding.encode(h, w, features.device).to(features.dtype)
        obj_ptr = torch.cat([ptr for _, _, ptr in done]) if pointers else None
        return MemoryOutput(
            features=features, pos_enc=pos_enc, object_score_logits=scores, obj_ptr=obj_ptr
        )


def empty_model(variant: Variant, image_size: int | None = None) -> MemencModel:
    """A `MemencModel` whose parameters are allocated but not initialised, for weights that
    are about to be loaded or drawn: building it on the meta device skips the modules'
    own random initialisation (about a second of CPU for sam2.1 tiny, more for larger
    variants), which the loaded weights would overwrite anyway. The fixed buffers (the
    ImageNet statistics) are set; every parameter and the prompt encoder's Fourier matrix
    must still be filled by the caller."""
    with torch.device("meta"):
        model = MemencModel(variant, image_size)
    # allocate by hand: `to_empty` goes through torch's reference ops for meta tensors,
    # whose first use imports sympy (about a second)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                empty = torch.empty(p.shape, dtype=p.dtype)
                module._parameters[name] = nn.Parameter(empty, requires_grad=p.requires_grad)
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype)
    model.pixel_mean.copy_(torch.tensor(PIXEL_MEAN)[:, None, None])
    model.pixel_std.copy_(torch.tensor(PIXEL_STD)[:, None, None])
    return model
