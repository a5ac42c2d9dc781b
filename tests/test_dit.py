"""Tests for dit.py beyond the shared network tests of test_networks.py (zero init, time and
label conditioning, null class, gradients, second time): shapes, patch layout, position
embeddings, argument errors, parameter count and a few training steps on digits."""

import math

import pytest
import torch
import torch.nn as nn
from helpers import perturb_zero_init

import data_utils
from dit import DiT, sincos_2d

NUM_CLASSES = 10


@pytest.mark.parametrize(
    "in_channels, image_size, patch_size, out_channels",
    [(1, 8, 2, None), (1, 8, 2, 2), (3, 12, 4, 6), (3, 6, 3, None), (1, 8, 1, None)],
)
def test_output_shape(in_channels, image_size, patch_size, out_channels):
    net = DiT(
        in_channels,
        image_size,
        patch_size,
        width=32,
        depth=1,
        num_heads=2,
        num_classes=NUM_CLASSES,
        out_channels=out_channels,
    )
    x = torch.randn(3, in_channels, image_size, image_size)
    y = torch.tensor([0, 5, NUM_CLASSES])  # the null class is a valid label
    assert torch.equal(
        net(x, torch.rand(3), y),
        torch.zeros(3, out_channels or in_channels, image_size, image_size),
    )
    perturb_zero_init(net)
    out = net(x, torch.rand(3), y)
    assert out.shape == (3, out_channels or in_channels, image_size, image_size)
    assert torch.isfinite(out).all()


def reference_patchify(x, p):
    """(B, C, H, W) -> (B, (H/p)(W/p), p * p * C), patches row-major, values (row, col, C)."""
    B, C, H, W = x.shape
    patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(B, (H // p) * (W // p), p * p * C)


def test_unpatchify_inverts_patchify():
    net = DiT(3, 12, patch_size=4, width=16, depth=1, num_heads=2)
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(net.unpatchify(reference_patchify(x, 4)), x)


def test_tokens_follow_the_image_layout():
    """A 1x1 patch net whose token map is the identity outputs its input: patch order, the
    position of each token and the unpatchify layout agree (only the output layer is set)."""
    net = DiT(1, 4, patch_size=1, width=8, depth=0, num_heads=2, pos_embed="sincos")
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        net.patch_embed.weight.zero_()
        net.patch_embed.weight[0, 0] = 1.0  # token channel 0 = the pixel value
        net.pos_embed.embedding.zero_()
        net.final.norm = nn.Identity()
        net.final.linear.weight[0, 0] = 1.0
    assert torch.allclose(net(x, torch.rand(2)), x)


def test_sincos_position_embedding_closed_form():
    dim, grid = 16, 3
    emb = sincos_2d(grid, dim)
    row, col, i = 2, 1, 3  # token (2, 1) is number 2 * 3 + 1; frequency i of dim / 4
    w = 10000 ** (-i / (dim // 4))
    token = emb[row * grid + col]
    assert token[i].item() == pytest.approx(math.sin(row * w), abs=1e-6)
    assert token[dim // 4 + i].item() == pytest.approx(math.cos(row * w), abs=1e-6)
    assert token[dim // 2 + i].item() == pytest.approx(math.sin(col * w), abs=1e-6)
    assert token[3 * dim // 4 + i].item() == pytest.approx(math.cos(col * w), abs=1e-6)
    assert torch.cdist(emb, emb).fill_diagonal_(1).min() > 0.1  # every position distinct


def test_position_embedding_options():
    fixed = DiT(1, 8, patch_size=2, width=16, depth=1, num_heads=2, pos_embed="sincos")
    learned = DiT(1, 8, patch_size=2, width=16, depth=1, num_heads=2, pos_embed="learned")
    assert not any("pos_embed" in k for k in fixed.state_dict())  # fixed: not saved
    learned_params = dict(learned.named_parameters())
    assert learned_params["pos_embed.embedding"].shape == (1, 16, 16)
    assert torch.equal(learned_params["pos_embed.embedding"][0], sincos_2d(4, 16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=8, patch_size=3), r"image size 8 must be divisible by patch_size=3"),
        (dict(image_size=7, patch_size=2), r"image size 7 .* \(divisors: \[1, 7\]\)"),
        (dict(width=30, num_heads=4), r"num_heads=4 must divide width=30"),
        (dict(width=18, num_heads=2), r"width=18 must be divisible by 4"),
        (dict(pos_embed="rope"), r"pos_embed='rope'; valid choices: \['learned', 'sincos'\]"),
    ],
)
def test_invalid_arguments_raise_one_line(kwargs, message):
    options = dict(in_channels=1, image_size=8, patch_size=2, width=16, depth=1, num_heads=2)
    options.update(kwargs)
    with pytest.raises(ValueError, match=message) as error:
        DiT(**options)
    assert "\n" not in str(error.value)


def expected_num_params(in_ch, out_ch, patch, width, depth, mlp_ratio, num_classes, learned, g):
    """Parameter count from the architecture's layer list, counted independently."""
    hidden = int(width * mlp_ratio)
    block = (3 * width**2 + 3 * width) + (width**2 + width)  # qkv, proj
    block += (width * hidden + hidden) + (hidden * width + width)  # mlp
    block += 6 * width**2 + 6 * width  # adaLN
    final = (2 * width**2 + 2 * width) + (width * patch**2 * out_ch + patch**2 * out_ch)
    embed = in_ch * patch**2 * width + width  # patch projection
    embed += (256 * width + width) + (width**2 + width)  # time MLP on 256 sin-cos features
    embed += (num_classes + 1) * width if num_classes else 0
    embed += g * g * width if learned else 0
    return depth * block + final + embed


@pytest.mark.parametrize("learned, num_classes", [(False, 0), (True, NUM_CLASSES)])
def test_parameter_count(learned, num_classes):
    net = DiT(
        1,
        8,
        patch_size=2,
        width=64,
        depth=3,
        num_heads=4,
        num_classes=num_classes,
        out_channels=2,
        pos_embed="learned" if learned else "sincos",
    )
    expected = expected_num_params(1, 2, 2, 64, 3, 4.0, num_classes, learned, 4)
    assert sum(p.numel() for p in net.parameters()) == expected


def flow_matching_loss(net, x0, y, x1, t):
    """Velocity loss of the linear interpolant x_t = (1 - t) x0 + t x1: target x1 - x0."""
    tb = t[:, None, None, None]
    return (net((1 - tb) * x0 + tb * x1, t, y) - (x1 - x0)).pow(2).mean()


def test_a_few_steps_on_digits_lower_the_loss():
    torch.manual_seed(0)
    data = data_utils.build_dataset("digits", "data", True, image_size=8)
    net = DiT(1, 8, patch_size=2, width=32, depth=2, num_heads=4, num_classes=NUM_CLASSES)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)

    def batch(size):
        index = torch.randint(len(data), (size,), generator=generator).tolist()
        x0, y = data.__getitems__(index)
        return (
            x0,
            y,
            torch.randn(x0.shape, generator=generator),
            torch.rand(size, generator=generator),
        )

    held_out = batch(256)
    with torch.no_grad():
        before = flow_matching_loss(net, *held_out).item()
    for _ in range(30):
        loss = flow_matching_loss(net, *batch(32))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = flow_matching_loss(net, *held_out).item()
    # at init the output is 0, so the loss is E|x1 - x0|^2 = 1 + E x0^2 (1.72 here); 30 steps
    # bring it to 0.93
    assert before > 1.0
    assert after < 0.75 * before
