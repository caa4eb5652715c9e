"""Sine position encoding of a feature map, as SAM 2 uses for its memories."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Normalised 2-D sine/cosine encoding that depends only on a map's shape.

    `num_pos_feats` is the total number of output channels: half encode y, half x.
    The module has no parameters; `forward(x)` returns `[B, num_pos_feats, H, W]`
    for `x` of shape `[B, C, H, W]`, and `encode(h, w)` the `[num_pos_feats, h, w]`
    map itself (cached per shape and device).
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        self.half = num_pos_feats // 2
        self.temperature = temperature
        self.scale = 2 * math.pi
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The `[num_pos_feats, h, w]` float32 encoding of an h×w map."""
        key = (h, w, str(device))
        if key not in self._cache:
            eps = 1e-6
            # 1-based coordinates, normalised so the last row/column is ~2π.
            ys = torch.arange(1, h + 1, dtype=torch.float32, device=device)
            xs = torch.arange(1, w + 1, dtype=torch.float32, device=device)
            ys = ys / (ys[-1:] + eps) * self.scale
            xs = xs / (xs[-1:] + eps) * self.scale
            k = torch.arange(self.half, dtype=torch.float32, device=device)
            freq = self.temperature ** (2 * (k // 2) / self.half)
            py = ys[:, None] / freq  # [h, half]
            px = xs[:, None] / freq  # [w, half]
            # interleave sin of even and cos of odd frequencies: [n, half/2, 2] -> [n, half]
            py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)
            px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)
            # channels: y-encoding first, then x; broadcast to the grid -> [C, h, w]
            pos_y = py.T[:, :, None].expand(self.half, h, w)
            pos_x = px.T[:, None, :].expand(self.half, h, w)
            self._cache[key] = torch.cat((pos_y, pos_x), dim=0).contiguous()
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, num_pos_feats, H, W]` encoding for `x` of shape `[B, C, H, W]`."""
        pos = self.encode(x.shape[-2], x.shape[-1], x.device)
        return pos[None].expand(x.shape[0], -1, -1, -1)


class PositionEmbeddingRandom(nn.Module):
    """SAM's Fourier-feature encoding of image positions with a fixed random projection.

    The buffer `positional_encoding_gaussian_matrix` `[2, num_pos_feats]` comes from the
    checkpoint (key `sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`);
    `forward((h, w))` returns `[2 * num_pos_feats, h, w]` for the centres of an h×w grid.
    """

    def __init__(self, num_pos_feats: int = 128) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.zeros(2, num_pos_feats))

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        g = self.positional_encoding_gaussian_matrix
        # pixel centres normalised to (0, 1), as (x, y) pairs: [h, w, 2]
        ys = (torch.arange(1, h + 1, dtype=torch.float32, device=g.device) - 0.5) / h
        xs = (torch.arange(1, w + 1, dtype=torch.float32, device=g.device) - 0.5) / w
        coords = torch.stack((xs[None, :].expand(h, w), ys[:, None].expand(h, w)), dim=-1)
        proj = (2 * coords - 1) @ g * (2 * math.pi)  # [h, w, num_pos_feats]
        pe = torch.cat((proj.sin(), proj.cos()), dim=-1)
        return pe.permute(2, 0, 1)  # [h, w, C] -> [C, h, w]
