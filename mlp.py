"""Residual MLP for vector data (e.g. 2-D toy sets): `net(x_t, t, y) -> tensor shaped like x_t`.

Same conditioning as the U-Net (`unet.ConditionEmbedding`): time `t` (in [0, 1] or any real
value), an optional second time `r` (`time_inputs=2`) and an optional class label, where label
`num_classes` is the null class. Residual branches and the output layer start at zero, so a
fresh net outputs exactly zero.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import ConditionEmbedding, condition, zero_init


class MLPBlock(nn.Module):
    """Pre-norm residual block; the normalised input is scaled and shifted by the embedding."""

    def __init__(self, hidden: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)  # affine comes from emb_proj
        self.emb_proj = nn.Linear(emb_dim, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = zero_init(nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb_proj(F.silu(emb)).chunk(2, dim=1)
        h = self.norm(x) * (1 + scale) + shift
        h = self.fc2(self.dropout(F.silu(self.fc1(h))))
        return x + h


class MLP(nn.Module):
    """Residual MLP: input Linear, `num_blocks` conditioned residual blocks, output Linear
    (`out_dim` outputs, default `dim`). `time_inputs=2` adds the second time input r."""

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        num_blocks: int = 4,
        dropout: float = 0.0,
        num_classes: int = 0,
        out_dim: int | None = None,
        time_inputs: int = 1,
    ):
        super().__init__()
        self.dim = dim
        self.num_classes = num_classes
        self.cond_embed = ConditionEmbedding(
            max(hidden // 2, 2), hidden, num_classes, time_inputs=time_inputs
        )
        self.input_proj = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([MLPBlock(hidden, hidden, dropout) for _ in range(num_blocks)])
        self.out = nn.Sequential(
            nn.LayerNorm(hidden), nn.SiLU(), zero_init(nn.Linear(hidden, out_dim or dim))
        )

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None, r=None) -> torch.Tensor:
        """x: (B, dim); t: (B,) floats (any real, see ConditionEmbedding) or a scalar;
        y: long (B,) or None; r: second time like t (time_inputs=2 only; None means r = t)."""
        emb = condition(self.cond_embed, t, y, r, x.shape[0], x.device)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
