"""U-Net for images in the DDPM / ADM style: `net(x_t, t, y) -> tensor shaped like x_t`.

Layout (as in DDPM): an input conv, a down path of `num_res_blocks` residual blocks per level
with a strided-conv downsample between levels, a middle block (res, attention, res), and an up
path of `num_res_blocks + 1` residual blocks per level, each taking one skip activation from the
down path, with a nearest-upsample + conv between levels. Self-attention follows the residual
blocks at every spatial size listed in `attn_resolutions`. The time `t` (in [0, 1], or any real
value such as EDM's c_noise), an optional second time `r` and the optional class label `y`
condition every residual block through a scale and shift of its second normalisation. Every
layer that writes into a residual stream, and the output conv, starts at zero, so a fresh net
outputs exactly zero.

`timestep_embedding`, `batch_times`, `ConditionEmbedding`, `condition` and `attention` are shared
with `mlp.py` and `dit.py`. Every network works under torch.func.jvp (forward-mode AD), e.g.
for MeanFlow's objective.
"""

import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# -----------------------------------------------------------------------------
# conditioning: time and class label -> one embedding vector per example


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) of a (B,) tensor of (scaled) times, as in Transformers/DDPM."""
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    angles = t.float()[:, None] * freqs[None, :]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2 == 1:  # odd dim: pad one zero column
        features = F.pad(features, (0, 1))
    return features


def batch_times(t, batch_size: int, device) -> torch.Tensor:
    """Turn `t` (python float, 0-dim tensor or (B,) tensor) into a float (B,) tensor."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch_size)
    if t.numel() != batch_size:
        raise ValueError(f"t has {t.numel()} values but the batch has {batch_size} examples")
    return t


class ConditionEmbedding(nn.Module):
    """Embedding of time (sinusoidal features of t * time_scale, then an MLP) plus class label.

    Time range: any real t is valid. With the default time_scale = 1000 the features are
    cos / sin of 1000 t at frequencies 10000^(-i / half), i < half = freq_dim / 2: the fastest
    resolves differences in t of about 1e-3, the slowest turns 0.1 to 0.2 rad per unit of t
    (freq_dim 256 to 32), so the features are injective over spans of t of 30 units or more.
    Times t in [0, 1] and EDM's c_noise = log(s) / 4 (about [-2, 1.5]) are both well inside.

    With `num_classes > 0` the label table has `num_classes + 1` rows; row `num_classes` is the
    null class (label dropout for classifier-free guidance) and is used when `y` is None. With
    `num_classes == 0` the embedding is unconditional and `y` is ignored.

    `time_inputs=2` adds a second time r (MeanFlow / consistency objectives, whose network is
    u(x_t, r, t)): as in MeanFlow (Geng et al. 2025) the pair is embedded as (t, t - r), the
    interval length t - r getting its own sinusoidal features and MLP (`interval_mlp`), added
    to the t embedding. r = None means r = t (an empty interval). `time_inputs=1` has no such
    layer, so its parameters (and old checkpoints) are unchanged.
    """

    def __init__(
        self,
        freq_dim: int,
        emb_dim: int,
        num_classes: int = 0,
        time_scale=1000.0,
        time_inputs: int = 1,
    ):
        super().__init__()
        if time_inputs not in (1, 2):
            raise ValueError(f"time_inputs={time_inputs} must be 1 (t) or 2 (t and r)")
        self.freq_dim = freq_dim
        self.num_classes = num_classes
        self.time_scale = time_scale
        self.time_inputs = time_inputs
        self.time_mlp = time_mlp(freq_dim, emb_dim)
        self.interval_mlp = time_mlp(freq_dim, emb_dim) if time_inputs == 2 else None
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

    def embed_time(self, mlp: nn.Sequential, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t * self.time_scale, self.freq_dim)
        return mlp(features.to(mlp[0].weight.dtype))

    def forward(
        self, t: torch.Tensor, y: torch.Tensor | None = None, r: torch.Tensor | None = None
    ) -> torch.Tensor:
        """t: float (B,); y: long (B,) or None; r: float (B,) or None (= t), only with
        time_inputs=2. Returns (B, emb_dim)."""
        emb = self.embed_time(self.time_mlp, t)
        if self.interval_mlp is not None:
            emb = emb + self.embed_time(self.interval_mlp, t - (t if r is None else r))
        elif r is not None:
            raise ValueError("a second time r needs a network built with time_inputs=2")
        if self.class_embed is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            emb = emb + self.class_embed(y)
        return emb


def time_mlp(freq_dim: int, emb_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


def condition(cond_embed: ConditionEmbedding, t, y, r, batch_size: int, device) -> torch.Tensor:
    """The (B, emb_dim) embedding of a net's (t, y, r) inputs; y is ignored when unconditional."""
    t = batch_times(t, batch_size, device)
    r = None if r is None else batch_times(r, batch_size, device)
    return cond_embed(t, y if cond_embed.num_classes > 0 else None, r)


# -----------------------------------------------------------------------------
# attention usable under forward-mode differentiation


def has_forward_tangent(*tensors: torch.Tensor) -> bool:
    """Whether forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) tracks a tangent of
    any of the tensors; always False while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    return any(fwAD.unpack_dual(x).tangent is not None for x in tensors)


def attention(q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v by scaled_dot_product_attention. Its fused kernels (flash,
    memory-efficient) have no forward-mode derivative, so under a JVP (MeanFlow's objective) the
    composite math backend, which has one, is used instead."""
    if has_forward_tangent(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


# -----------------------------------------------------------------------------
# building blocks


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest number of groups <= 32 that divides `channels`."""
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Set all parameters of `module` to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block whose second normalisation is scaled and shifted by the embedding."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        if in_channels == out_channels:
            self.skip = nn.Identity()
        else:
            self.skip = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, added to the input."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {channels}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, H*W, head_dim)
        h = attention(q, k, v)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the spatial size with a strided 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A sequence of blocks; the embedding goes to the residual blocks, the rest get only x."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x, emb) if isinstance(block, ResBlock) else block(x)
        return x


# -----------------------------------------------------------------------------
# the U-Net


class UNet(nn.Module):
    """DDPM/ADM-style U-Net predicting a tensor shaped like its input.

    `attn_resolutions` lists spatial sizes (image_size, image_size / 2, ...) after whose residual
    blocks self-attention is applied; sizes that no level has are simply unused. The middle block
    always has attention. `num_classes=0` is unconditional; otherwise label `num_classes` is the
    null class, used when `y` is None. `out_channels` defaults to `in_channels` (a second field,
    e.g. the z-denoiser of a stochastic interpolant, doubles it). `time_inputs=2` adds the second
    time input r (see ConditionEmbedding).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base_channels: int = 64,
        channel_mults=(1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions=(16,),
        dropout: float = 0.0,
        num_heads: int = 4,
        num_classes: int = 0,
        out_channels: int | None = None,
        time_inputs: int = 1,
    ):
        super().__init__()
        channel_mults = tuple(channel_mults)
        num_downsamples = len(channel_mults) - 1
        if image_size % 2**num_downsamples != 0:
            max_downsamples = (image_size & -image_size).bit_length() - 1  # factors of 2 in size
            raise ValueError(
                f"image size {image_size} cannot be halved {num_downsamples} times by "
                f"channel_mults={channel_mults}: use at most {max_downsamples} downsamplings "
                f"(len(channel_mults) <= {max_downsamples + 1})"
            )
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        emb_dim = 4 * base_channels
        self.cond_embed = ConditionEmbedding(
            base_channels, emb_dim, num_classes, time_inputs=time_inputs
        )

        def res_block(cin, cout):
            return ResBlock(cin, cout, emb_dim, dropout)

        def attention(channels):
            return AttentionBlock(channels, num_heads)

        # down path: remember the channel count of every activation kept as a skip
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        skip_channels = [base_channels]
        channels, resolution = base_channels, image_size
        self.down_blocks = nn.ModuleList()
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                blocks = [res_block(channels, base_channels * mult)]
                channels = base_channels * mult
                if resolution in attn_resolutions:
                    blocks.append(attention(channels))
                self.down_blocks.append(EmbedSequential(*blocks))
                skip_channels.append(channels)
            if level != len(channel_mults) - 1:
                self.down_blocks.append(EmbedSequential(Downsample(channels)))
                skip_channels.append(channels)
                resolution //= 2

        self.mid_block = EmbedSequential(
            res_block(channels, channels), attention(channels), res_block(channels, channels)
        )

        # up path: each block consumes one skip, last-in first-out
        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for i in range(num_res_blocks + 1):
                blocks = [res_block(channels + skip_channels.pop(), base_channels * mult)]
                channels = base_channels * mult
                if resolution in attn_resolutions:
                    blocks.append(attention(channels))
                if level != 0 and i == num_res_blocks:
                    blocks.append(Upsample(channels))
                    resolution *= 2
                self.up_blocks.append(EmbedSequential(*blocks))

        self.out = nn.Sequential(
            group_norm(channels),
            nn.SiLU(),
            zero_init(nn.Conv2d(channels, out_channels or in_channels, 3, padding=1)),
        )

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None, r=None) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) floats (any real, see ConditionEmbedding) or a scalar;
        y: long (B,) or None; r: second time like t (time_inputs=2 only; None means r = t)."""
        emb = condition(self.cond_embed, t, y, r, x.shape[0], x.device)
        h = self.input_conv(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.mid_block(h, emb)
        for block in self.up_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
