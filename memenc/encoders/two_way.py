"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Each block runs self-attention of the tokens, tokens → image cross-attention, an MLP on
the tokens, then image → tokens cross-attention; a last tokens → image attention and a
LayerNorm finish the tokens. Names follow the checkpoint's `sam_mask_decoder.transformer.*`
keys (`layers.{i}.self_attn.q_proj`, `norm1` … `norm4`, `final_attn_token_to_image`,
`norm_final_attn`). The operations and their order are the reference's, so the numbers are.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class Tokens(nn.Module):
    """Learned tokens `weight` `[n, dim]`: what SAM keeps in an `nn.Embedding` and reads
    only as a table (same checkpoint key, `<name>.weight`). Unlike `nn.Embedding` it draws
    no random initial values: the weights always come from a checkpoint or a seed, and
    skipping `normal_` keeps building the model on the meta device cheap."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, dim))


class MLP(nn.Module):
    """`num_layers` linears (keys `layers.{i}`) with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width by `downsample_rate`."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the inner width {inner}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # [B, N, C] -> [B, heads, N, C/heads]
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q `[B, Nq, C]`, k and v `[B, Nk, C]` -> `[B, Nq, C]`."""
        return self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`forward` from projected q `[B, Nq, inner]`, k and v `[B, Nk, inner]`."""
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        b, h, n, c = out.shape
        # [B, heads, Nq, C/heads] -> [B, Nq, C]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock(nn.Module):
    """One two-way block; the first block's self-attention sees no positional encoding and
    has no residual (`skip_first_layer_pe`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dim, num_layers=2)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries `[1 or B, Nt, C]` (tokens; 1: the same tokens for every image), keys
        `[B, hw, C]` (image) -> both updated (queries `[B, Nt, C]`).

        The reference's operations on each image's rows, in its order, with two shortcuts
        that leave every value as it was: tokens shared by all images are worked on once
        until they meet the image, and `keys + key_pe`, which is both the token → image
        keys and the image → token queries, is formed and projected once (one product with
        both weights stacked: each output column is the same dot product it was alone).
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        image_q = keys + key_pe
        stacked = F.linear(
            image_q,
            torch.cat((t2i.k_proj.weight, i2t.q_proj.weight)),
            torch.cat((t2i.k_proj.bias, i2t.q_proj.bias)),
        )
        k_t2i, q_i2t = stacked.split((t2i.k_proj.out_features, i2t.q_proj.out_features), dim=-1)
        q = t2i.q_proj(queries + query_pe).expand(keys.shape[0], -1, -1)
        queries = self.norm2(queries + t2i.attend(q, k_t2i, t2i.v_proj(keys)))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + i2t.attend(q_i2t, i2t.k_proj(q), i2t.v_proj(queries)))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """`depth` two-way blocks and the final tokens → image attention."""

    def __init__(
        self, depth: int = 2, dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048
    ) -> None:
        super().__init__()
        block = TwoWayAttentionBlock(dim, num_heads, mlp_dim)
        self.layers = nn.ModuleList(copy.deepcopy(block) for _ in range(depth))
        if depth:
            self.layers[0].skip_first_layer_pe = True
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(
        self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image and image_pe `[B, C, h, w]`, tokens `[1 or B, Nt, C]` -> (tokens
        `[B, Nt, C]`, image tokens `[B, hw, C]`)."""
        keys = image.flatten(2).permute(0, 2, 1)  # [B, C, h, w] -> [B, hw, C]
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys
