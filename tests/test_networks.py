"""Tests for the networks in unet.py and mlp.py: shapes, zero init, conditioning, gradients."""

import pytest
import torch
import torch.nn as nn

from mlp import MLP
from unet import UNet

NUM_CLASSES = 10


def small_unet(image_size=8, in_channels=1, num_classes=0, **kwargs):
    """A small, fast U-Net; defaults suit 8x8 images."""
    options = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    options.update(kwargs)
    return UNet(in_channels, image_size, num_classes=num_classes, **options)


def small_mlp(num_classes=0):
    return MLP(2, hidden=32, num_blocks=2, num_classes=num_classes)


def image_batch(net, batch_size=4):
    return torch.randn(batch_size, net.in_channels, net.image_size, net.image_size)


def vector_batch(batch_size=4):
    return torch.randn(batch_size, 2)


def perturb_zero_init(net, std=0.1):
    """Fill every all-zero parameter (zero-initialised layers, norm biases) with noise."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if torch.all(p == 0):
                nn.init.normal_(p, std=std)
    return net


# (network factory, input factory) pairs; conditional versions take num_classes
NETWORKS = {
    "unet": (small_unet, image_batch),
    "mlp": (small_mlp, lambda net: vector_batch()),
}


def build(kind, num_classes=0):
    torch.manual_seed(0)
    make_net, make_input = NETWORKS[kind]
    net = make_net(num_classes=num_classes).eval()
    return net, make_input(net)


@pytest.mark.parametrize(
    "image_size, in_channels, channel_mults, attn_resolutions",
    [(8, 1, (1, 2), (4,)), (28, 1, (1, 2, 2), (14,)), (32, 3, (1, 2, 2, 2), (16,))],
)
def test_unet_output_shape(image_size, in_channels, channel_mults, attn_resolutions):
    net = small_unet(
        image_size,
        in_channels,
        channel_mults=channel_mults,
        attn_resolutions=attn_resolutions,
        num_classes=NUM_CLASSES,
    )
    perturb_zero_init(net)
    x = image_batch(net, batch_size=2)
    out = net(x, torch.rand(2), torch.tensor([0, NUM_CLASSES]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_mlp_output_shape():
    net = perturb_zero_init(MLP(2, hidden=32, num_blocks=2))
    x = vector_batch(5)
    out = net(x, torch.rand(5))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["unet", "mlp"])
@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
def test_output_is_zero_at_init(kind, num_classes):
    net, x = build(kind, num_classes)
    y = torch.arange(x.shape[0]) if num_classes else None
    out = net(x, torch.rand(x.shape[0]), y)
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_output_depends_on_time(kind):
    net, x = build(kind)
    perturb_zero_init(net)
    batch_size = x.shape[0]
    with torch.no_grad():
        early = net(x, torch.full((batch_size,), 0.1))
        late = net(x, torch.full((batch_size,), 0.9))
    assert not torch.allclose(early, late, atol=1e-5)


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_scalar_time_is_broadcast(kind):
    net, x = build(kind)
    perturb_zero_init(net)
    with torch.no_grad():
        expected = net(x, torch.full((x.shape[0],), 0.3))
        assert torch.equal(net(x, torch.tensor(0.3)), expected)
        assert torch.equal(net(x, 0.3), expected)


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_conditional_output_depends_on_label(kind):
    net, x = build(kind, NUM_CLASSES)
    perturb_zero_init(net)
    t = torch.rand(x.shape[0])
    zeros = torch.zeros(x.shape[0], dtype=torch.long)
    null = torch.full((x.shape[0],), NUM_CLASSES, dtype=torch.long)
    with torch.no_grad():
        out_zero = net(x, t, zeros)
        out_one = net(x, t, zeros + 1)
        out_null = net(x, t, null)  # the null class index is a valid label
        out_none = net(x, t, None)
    assert not torch.allclose(out_zero, out_one, atol=1e-5)
    assert not torch.allclose(out_zero, out_null, atol=1e-5)
    assert torch.equal(out_none, out_null)


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_unconditional_net_ignores_labels(kind):
    net, x = build(kind)
    perturb_zero_init(net)
    t = torch.rand(x.shape[0])
    with torch.no_grad():
        assert torch.equal(net(x, t, torch.arange(x.shape[0])), net(x, t))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_gradients_reach_every_parameter(kind):
    net, x = build(kind, NUM_CLASSES)
    perturb_zero_init(net)
    net.train()
    y = torch.arange(x.shape[0]) % (NUM_CLASSES + 1)
    loss = (net(x, torch.rand(x.shape[0]), y) - x).pow(2).mean()
    loss.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert missing == []
    for name, p in net.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    # every layer (not just its existence in the graph) receives signal
    zero_grad = [name for name, p in net.named_parameters() if not p.grad.any()]
    assert zero_grad == []


def test_invalid_image_size_raises():
    with pytest.raises(ValueError, match=r"image size 28.*channel_mults=\(1, 2, 2, 2\)"):
        UNet(1, 28, base_channels=16, channel_mults=(1, 2, 2, 2))


def test_cifar10_recipe_parameter_count():
    net = UNet(
        3,
        32,
        base_channels=128,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        num_classes=0,
    )
    num_params = sum(p.numel() for p in net.parameters())
    assert 30e6 < num_params < 40e6


def test_attention_resolutions_add_attention_layers():
    def num_params(net):
        return sum(p.numel() for p in net.parameters())

    with_attention = small_unet(8, attn_resolutions=(8,))
    without_attention = small_unet(8, attn_resolutions=())
    assert num_params(with_attention) > num_params(without_attention)
