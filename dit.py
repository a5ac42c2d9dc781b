"""Diffusion transformer in the DiT / SiT style: `net(x_t, t, y) -> tensor shaped like x_t`.

Layout (Peebles and Xie 2023, "Scalable diffusion models with transformers"): a strided conv
cuts the (C, H, W) image into (H / p) * (W / p) patches of p x p pixels and projects each to a
`width`-dim token; a 2-D position embedding (fixed sin-cos, or learned and started from the
sin-cos values) is added; `depth` transformer blocks with adaLN-Zero conditioning follow; a final
adaptive LayerNorm and a linear layer map each token back to a p x p x out_channels patch.

adaLN-Zero: the conditioning vector c (time embedding + class embedding, `unet.ConditionEmbedding`,
with the null class `num_classes` for classifier-free guidance) is mapped by one linear layer per
block to (shift, scale, gate) for the attention and for the MLP branch:

    x <- x + gate_a * Attn(LN(x) * (1 + scale_a) + shift_a)
    x <- x + gate_m * MLP(LN(x) * (1 + scale_m) + shift_m)

These linear layers start at zero, so every block starts as the identity; the output linear
layer starts at zero too, so a fresh net outputs exactly zero. Time inputs: t (any real value,
see ConditionEmbedding) and, with `time_inputs=2`, a second time r.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import ConditionEmbedding, attention, condition, zero_init

TIME_FREQ_DIM = 256  # sinusoidal features of the time, as in DiT


# -----------------------------------------------------------------------------
# position embeddings: (num_tokens, width) for a grid of grid_size x grid_size patches


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, dim) features [sin(pos * w_i), cos(pos * w_i)], w_i = 10000^(-i / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = positions.double()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (grid_size^2, dim), tokens in row-major order: half of the
    channels encode the row, half the column (as in MAE / DiT). dim must be divisible by 4."""
    if dim % 4 != 0:
        raise ValueError(f"width={dim} must be divisible by 4 for the 2-D sin-cos embedding")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    embedding = torch.cat(
        [sincos_1d(rows.flatten(), dim // 2), sincos_1d(cols.flatten(), dim // 2)], dim=1
    )
    return embedding.float()


class SinCosPositions(nn.Module):
    """Fixed embedding, kept as a non-persistent buffer (not in the state_dict)."""

    def __init__(self, grid_size: int, dim: int):
        super().__init__()
        self.register_buffer("embedding", sincos_2d(grid_size, dim)[None], persistent=False)

    def forward(self) -> torch.Tensor:
        return self.embedding


class LearnedPositions(nn.Module):
    """Trainable embedding, started from the sin-cos values."""

    def __init__(self, grid_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(sincos_2d(grid_size, dim)[None])

    def forward(self) -> torch.Tensor:
        return self.embedding


POSITION_EMBEDDINGS = {"sincos": SinCosPositions, "learned": LearnedPositions}


# -----------------------------------------------------------------------------
# blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D); shift, scale: (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention over the tokens (`unet.attention`: scaled_dot_product_attention,
    forward-mode differentiable)."""

    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        dropout = self.dropout if self.training else 0.0
        h = attention(q, k, v, dropout_p=dropout)
        return self.proj(h.transpose(1, 2).reshape(B, N, D))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x), approximate="tanh")))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (see the module docstring)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads, dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(width, int(width * mlp_ratio), dropout)
        self.ada_ln = zero_init(nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada_ln(F.silu(c)).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """Adaptive LayerNorm, then a linear map of each token to a patch of out_channels."""

    def __init__(self, width: int, patch_values: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_ln = zero_init(nn.Linear(width, 2 * width))
        self.linear = zero_init(nn.Linear(width, patch_values))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada_ln(F.silu(c)).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# -----------------------------------------------------------------------------
# the transformer


class DiT(nn.Module):
    """DiT/SiT-style transformer on square images of side `image_size` (divisible by
    `patch_size`). `width` is the token dimension (divisible by `num_heads` and by 4),
    `mlp_ratio` the MLP's hidden size over `width`, `pos_embed` 'sincos' or 'learned'.
    `num_classes=0` is unconditional; otherwise label `num_classes` is the null class, used when
    `y` is None. `out_channels` defaults to `in_channels`. `time_inputs=2` adds a second time r.

    DiT-S/2 is width 384, depth 12, 6 heads, patch 2; DiT-B/2 width 768, depth 12, 12 heads.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch_size: int = 2,
        width: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        out_channels: int | None = None,
        dropout: float = 0.0,
        pos_embed: str = "sincos",
        time_inputs: int = 1,
    ):
        super().__init__()
        check_dit_args(image_size, patch_size, width, num_heads, pos_embed)
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.grid_size = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.pos_embed = POSITION_EMBEDDINGS[pos_embed](self.grid_size, width)
        self.cond_embed = ConditionEmbedding(
            TIME_FREQ_DIM, width, num_classes, time_inputs=time_inputs
        )
        self.blocks = nn.ModuleList(
            [DiTBlock(width, num_heads, mlp_ratio, dropout) for _ in range(depth)]
        )
        self.final = FinalLayer(width, patch_size * patch_size * self.out_channels)
        self.init_transformer_weights()

    def init_transformer_weights(self):
        """Xavier-uniform linear layers of the blocks and the patch projection (as in DiT); the
        adaLN and output layers stay at zero."""
        for block in self.blocks:
            for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.out_channels, -1))
        nn.init.zeros_(self.patch_embed.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, g * g, p * p * C) -> (B, C, g * p, g * p), tokens in row-major order."""
        B, g, p, C = tokens.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = tokens.reshape(B, g, g, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None, r=None) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) floats (any real, see ConditionEmbedding) or a scalar;
        y: long (B,) or None; r: second time like t (time_inputs=2 only; None means r = t)."""
        c = condition(self.cond_embed, t, y, r, x.shape[0], x.device)
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, g * g, width), row-major
        h = h + self.pos_embed().to(h.dtype)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final(h, c))


def check_dit_args(image_size, patch_size, width, num_heads, pos_embed):
    """One-line ValueErrors for sizes the transformer cannot use."""
    if patch_size < 1 or image_size % patch_size != 0:
        raise ValueError(
            f"image size {image_size} must be divisible by patch_size={patch_size} "
            f"(divisors: {[p for p in range(1, image_size + 1) if image_size % p == 0]})"
        )
    if width % num_heads != 0:
        raise ValueError(f"num_heads={num_heads} must divide width={width}")
    if pos_embed not in POSITION_EMBEDDINGS:
        raise ValueError(f"pos_embed={pos_embed!r}; valid choices: {sorted(POSITION_EMBEDDINGS)}")
