"""Hiera, the hierarchical vision transformer of SAM 2's image encoder.

Parameter names follow the official checkpoint (`patch_embed.proj`, `pos_embed`,
`pos_embed_window`, `blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.layers.{0,1}/proj`)
so that `image_encoder.trunk.*` loads key for key. Activations are kept
channels-last (`[B, H, W, C]`) inside the trunk, as in SAM 2.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _pool(x: torch.Tensor, pool: nn.Module | None) -> torch.Tensor:
    """Max-pool a channels-last map `[B, H, W, C]` (identity when `pool` is None)."""
    if pool is None:
        return x
    # [B, H, W, C] -> [B, C, H, W] for the pool, and back
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _to_windows(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split `[B, H, W, C]` into `[B * nWin, size, size, C]`, zero-padding H and W up to a
    multiple of `size`. Returns the windows and the padded (Hp, Wp)."""
    b, h, w, c = x.shape
    ph, pw = (size - h % size) % size, (size - w % size) % size
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    # [B, Hp/s, s, Wp/s, s, C] -> [B, Hp/s, Wp/s, s, s, C] -> [B*nWin, s, s, C], contiguous
    # as in the reference (with one row of windows a reshape alone would give a strided
    # view, and the linear layers round a strided input differently)
    x = x.view(b, hp // size, size, wp // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size, size, c).contiguous(), (hp, wp)


def _from_windows(
    windows: torch.Tensor, size: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of `_to_windows`: `[B * nWin, size, size, C]` -> `[B, H, W, C]` without padding."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // size) * (wp // size))
    # [B, Hp/s, Wp/s, s, s, C] -> [B, Hp/s, s, Wp/s, s, C] -> [B, Hp, Wp, C]
    x = windows.reshape(b, hp // size, wp // size, size, size, -1).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, -1)
    return x[:, :h, :w, :] if (hp > h or wp > w) else x


# On the CPU the first stages' blocks run their attention windows (a band of window rows at
# a time), their stage transitions' shortcut projection and their MLP rows in pieces of
# about this many tokens, so that a frame's 4x-wide MLP hidden tensor, 3x-wide qkv tensor
# and 2x-wide projection are never whole (at 1024 they are 100, 150 and 50 MB in the first
# stage). The numbers do not change: each window's attention and each token's MLP and
# projection depend on that window or token alone, and the CPU's matrix products give
# each row of a contiguous input the same bits whatever the number of rows (a strided
# input is rounded differently, so pieces are made contiguous). Checked bit for bit
# against the reference at 256, which runs in pieces (tests/test_pointers.py,
# tests/test_bank.py), and against whole tensors at 512 and 320 (tests/test_encoders.py).
PIECE_TOKENS = 2048

_POS_LOCK = threading.Lock()  # Hiera._pos_embed's cache


def _add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y, into `x` when the sum has x's dtype (under autocast a bfloat16 `x` plus a
    float32 `y` is float32, as out of place)."""
    return x.add_(y) if torch.promote_types(x.dtype, y.dtype) == x.dtype else x + y


class PatchEmbed(nn.Module):
    """7×7 stride-4 convolution from RGB to `embed_dim`, output channels-last."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C]


class Mlp(nn.Module):
    """Two linear layers with GELU between them (checkpoint names `layers.0`, `layers.1`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, dim)])
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GELU in place: the same kernel and numbers as `self.act`, without a second hidden
        # tensor (4x the block's width: 100 MB a frame in the first stage at 1024)
        h = self.layers[0](x)
        return self.layers[1](torch.ops.aten.gelu_(h) if not h.requires_grad else self.act(h))


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention whose queries may be max-pooled (stage transitions)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: nn.Module | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        # [B, H, W, 3*C] -> [B, H*W, 3, heads, C/heads] -> three [B, H*W, heads, C/heads]
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).unbind(2)
        if self.q_pool is not None:
            q = _pool(q.reshape(b, h, w, -1), self.q_pool)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        # attention over [B, heads, tokens, C/heads]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        out = out.transpose(1, 2).reshape(b, h, w, -1)  # back to [B, H', W', C]
        return self.proj(out)


class MultiScaleBlock(nn.Module):
    """One Hiera block: (windowed) attention and an MLP, each with a residual.

    At a stage transition (`dim != dim_out`) the shortcut is projected and pooled, and
    the queries are pooled by `q_stride`, halving the resolution.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        window_size: int,
        q_stride: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride) if q_stride else None
        self.pool = pool
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool=pool)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, 4 * dim_out)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """The block's output for `x` `[B, H, W, C]`. overwrite: `x` is the caller's to lose
        (Hiera's own running map), so a block that keeps the map's size may write its
        output into it on the CPU (`_banded`)."""
        if self.window_size > 0 and self._pieces(x):
            return self._banded(x, overwrite)
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self._project_shortcut(x)

        window = self.window_size
        hw = (x.shape[1], x.shape[2])
        if window > 0:
            x, padded = _to_windows(x, window)
            x = self._attend_windows(x)
        else:
            x = self.attn(x)
        if self.q_stride:
            # queries were pooled: windows shrank, and the output takes the shortcut's size
            window = self.window_size // self.q_stride[0]
            hw = (shortcut.shape[1], shortcut.shape[2])
            padded = tuple(n + (window - n % window) % window for n in hw)
        if self.window_size > 0:
            x = _from_windows(x, window, padded, hw)

        # the residual adds go in place, into tensors this block made (the same sums: float
        # addition is commutative), so no third full-size tensor is allocated for each
        x = _add(x, shortcut)
        return self._add_mlp(x)

    def _pieces(self, x: torch.Tensor) -> bool:
        """Whether to run this block's attention windows and MLP rows a piece at a time:
        on the CPU (eager) when `x` holds more than PIECE_TOKENS tokens."""
        return (
            x.device.type == "cpu"
            and x.shape[:-1].numel() > PIECE_TOKENS
            and not torch.compiler.is_compiling()
        )

    def _project_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The stage transition's shortcut, pool(proj(x)) for the normalised map `x`; on the
        CPU in pieces (`_pieces`) a band of rows at a time, so the projection is never whole
        (at 1024 the first transition's is 50 MB, a frame's peak of live memory). The
        projection gives each token the same bits alone as in the whole map (the band is
        contiguous rows of a contiguous map), and the max-pool does not round."""
        if self.pool is None or not self._pieces(x) or not x.is_contiguous():
            return _pool(self.proj(x), self.pool)
        q = self.q_stride[0]
        b, h, w, _ = x.shape
        rows = max(q, PIECE_TOKENS // w // q * q)  # input rows per band, a multiple of q
        out: torch.Tensor | None = None
        for i in range(b):
            for r in range(0, h // q * q, rows):  # max-pool drops a last odd row
                pooled = _pool(self.proj(x[i : i + 1, r : min(r + rows, h // q * q)]), self.pool)
                if out is None:
                    out = pooled.new_empty((b, h // q, w // q, pooled.shape[-1]))
                out[i : i + 1, r // q : r // q + pooled.shape[1]] = pooled
        assert out is not None
        return out

    def _banded(self, x: torch.Tensor, overwrite: bool) -> torch.Tensor:
        """The whole block for a windowed block on the CPU, a band of window rows at a time:
        norm1, the band's windows attended and put back, its shortcut (projected and
        pooled at a stage transition) added, and its MLP, before the next band is read.

        Every step depends on a window or a token alone, so the numbers are those of the
        whole map (see PIECE_TOKENS), and no map-sized temporary is made: not the
        normalised map, nor the projected shortcut (at 1024 the first stage's are 25 and
        50 MB). A block that keeps the map's size writes into `x` when `overwrite` allows
        (band i's rows are read only by band i), so the first stage's block at 1024 holds
        one 25 MB map instead of three."""
        s = self.window_size
        q = self.q_stride[0] if self.q_stride else 1
        so = s // q  # output window side
        project = self.dim != self.dim_out
        b, h, w, _ = x.shape
        ho, wo = h // q, w // q  # max-pool drops a last odd row or column
        rows = max(1, PIECE_TOKENS // (s * s * -(-w // s)))  # rows of windows per band
        may_overwrite = (
            overwrite
            and not project
            and q == 1
            and not (torch.is_grad_enabled() and x.requires_grad)
        )
        out: torch.Tensor | None = None
        for i in range(b):
            for r0 in range(0, -(-h // s), rows):
                band = x[i : i + 1, r0 * s : (r0 + rows) * s]
                normed = self.norm1(band)
                windows, (hp, wp) = _to_windows(normed, s)
                att = self.attn(windows)
                y0 = r0 * so
                y1 = min(y0 + hp // s * so, ho)
                att = _from_windows(att, so, (hp // s * so, wp // s * so), (y1 - y0, wo))
                if project:  # the band's rows of pool(proj(norm1(x)))
                    shortcut = _pool(self.proj(normed[:, : (y1 - y0) * q]), self.pool)
                else:
                    shortcut = band[:, : y1 - y0]
                del normed, windows
                if out is None:
                    dtype = torch.promote_types(att.dtype, shortcut.dtype)
                    if may_overwrite and dtype == x.dtype:
                        out = x
                    else:
                        out = att.new_empty((b, ho, wo, att.shape[-1]), dtype=dtype)
                part = out[i : i + 1, y0:y1]
                if out is x:
                    part.add_(att)  # att + shortcut, the shortcut being these rows of x
                else:
                    torch.add(att, shortcut, out=part)
                del att, shortcut
                if out.dtype == torch.float32:  # any sum fits in `out`
                    self._mlp_rows(part)
        assert out is not None
        # a float32 band's MLP ran above; any other dtype gets it on the whole map
        return out if out.dtype == torch.float32 else self._add_mlp(out)

    def _mlp_rows(self, x: torch.Tensor) -> None:
        """x += mlp(norm2(x)) for a float32 map `[B, H, W, C]` (any layout), a piece of rows
        at a time (each token's result depends on that token alone; the MLP's input, norm2's
        output, is contiguous whatever x's layout)."""
        step = max(1, PIECE_TOKENS // x.shape[2])
        for n in range(x.shape[0]):
            for i in range(0, x.shape[1], step):
                piece = x[n : n + 1, i : i + step]
                piece.add_(self.mlp(self.norm2(piece)))

    def _attend_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """`self.attn` over windows `[N, s, s, C]`, in pieces of windows on the CPU."""
        if not self._pieces(windows):
            return self.attn(windows)
        step = max(1, PIECE_TOKENS // (windows.shape[1] * windows.shape[2]))
        return torch.cat([self.attn(windows[i : i + step]) for i in range(0, len(windows), step)])

    def _add_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x + mlp(norm2(x)), into `x`; on the CPU a piece of rows at a time (each token's
        result depends on that token alone)."""
        if not self._pieces(x) or x.dtype != torch.float32:  # float32: any sum fits in x
            return _add(x, self.mlp(self.norm2(x)))
        self._mlp_rows(x)  # on the CPU only global-attention blocks get here (see _banded)
        return x


class Hiera(nn.Module):
    """The Hiera trunk. `forward` returns one `[B, C_i, H_i, W_i]` map per stage, finest first
    (strides 4, 8, 16, 32)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        stages: Sequence[int],
        global_att_blocks: Sequence[int],
        window_spec: Sequence[int],
        window_pos_embed_bkg_spatial_size: Sequence[int],
        q_pool: int = 3,
        q_stride: tuple[int, int] = (2, 2),
    ) -> None:
        super().__init__()
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]

        self.patch_embed = PatchEmbed(embed_dim)
        # `_pos_embed`'s: (the parameters it was made from, its key, the embedding)
        self._pos_cache: tuple[tuple[nn.Parameter, ...], tuple[Any, ...], torch.Tensor] | None = (
            None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(
            torch.zeros(1, embed_dim, window_spec[0], window_spec[0])
        )

        self.blocks = nn.ModuleList()
        dim, heads, stage = embed_dim, num_heads, 0
        for i in range(sum(stages)):
            dim_out = dim
            # A stage's first block still attends in the previous stage's windows (its queries
            # are pooled into the new stage's windows), as in the reference.
            window = window_spec[stage]
            if i - 1 in self.stage_ends:  # first block of a new stage widens the channels
                dim_out, heads = 2 * dim, 2 * heads
                stage += 1
            if i in global_att_blocks:
                window = 0
            self.blocks.append(
                MultiScaleBlock(
                    dim,
                    dim_out,
                    heads,
                    window_size=window,
                    q_stride=q_stride if i in q_pool_blocks else None,
                )
            )
            dim = dim_out
        self.channel_list = [self.blocks[i].dim_out for i in reversed(self.stage_ends)]

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Background embedding resized to (h, w) plus the tiled window embedding, `[1, h, w, C]`.

        It depends on the weights and the map's size alone, so under inference mode it is
        made once and kept (the reference makes it for every frame: at 1024 a bicubic
        resize to 256×256 and a 25 MB sum), and the frame's sum goes into the
        convolution's output. The same operations make it, so the numbers are the same.
        Its key holds the two parameters (identity, storage, version), so new or changed
        weights make it anew, and the device and autocast state, which could change its
        dtype. It holds the embedding (25 MB at 1024)."""
        if not torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
            return self._make_pos_embed(h, w)
        params = (self.pos_embed, self.pos_embed_window)
        dev = self.pos_embed.device.type
        key = (
            h, w, self.pos_embed.device, self.pos_embed.dtype,
            *(p.data_ptr() for p in params), *(p._version for p in params),
            torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev),
        )  # fmt: skip
        with _POS_LOCK:  # frame workers (model._FramePool) start together: made once
            cached = self._pos_cache
            if (
                cached is None
                or cached[1] != key
                or any(a is not b for a, b in zip(cached[0], params))
            ):
                self._pos_cache = None  # the old one is not held while the new one is made
                self._pos_cache = cached = (params, key, self._make_pos_embed(h, w))
        return cached[2]

    def _make_pos_embed(self, h: int, w: int) -> torch.Tensor:
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        win = self.pos_embed_window
        pos = pos + win.tile([a // b for a, b in zip(pos.shape, win.shape)])
        return pos.permute(0, 2, 3, 1)  # [1, C, h, w] -> [1, h, w, C]

    def forward(self, x: torch.Tensor, coarsest: int | None = None) -> list[torch.Tensor]:
        """Images `[B, 3, S, S]` -> the stages' maps, finest first; coarsest: only that many
        of the last stages' maps (the earlier ones are not kept while the rest run: at 1024
        the first two stages' are 25 and 13 MB a frame)."""
        keep = set(self.stage_ends[-coarsest:] if coarsest else self.stage_ends)
        x = self.patch_embed(x)  # [B, H, W, C], a view of the convolution's [B, C, H, W]
        x = _add(x, self._pos_embed(x.shape[1], x.shape[2]))  # into the conv's output
        outputs = []
        for i, block in enumerate(self.blocks):
            # a stage's output is kept, so the block after it must not write into it
            x = block(x, overwrite=i - 1 not in self.stage_ends)
            if i in keep:
                outputs.append(x.permute(0, 3, 1, 2))  # [B, H, W, C] -> [B, C, H, W]
        return outputs
