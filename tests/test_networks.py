"""Tests for the networks in unet.py, mlp.py and dit.py: shapes, zero init, conditioning,
gradients, the second time input r and the time embedding's range."""

import pytest
import torch
from helpers import perturb_zero_init

from dit import DiT
from mlp import MLP
from unet import ConditionEmbedding, UNet, timestep_embedding

NUM_CLASSES = 10


def small_unet(image_size=8, in_channels=1, num_classes=0, **kwargs):
    """A small, fast U-Net; defaults suit 8x8 images."""
    options = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    options.update(kwargs)
    return UNet(in_channels, image_size, num_classes=num_classes, **options)


def small_mlp(num_classes=0, **kwargs):
    return MLP(2, hidden=32, num_blocks=2, num_classes=num_classes, **kwargs)


def small_dit(num_classes=0, **kwargs):
    options = dict(patch_size=2, width=32, depth=2, num_heads=4)
    options.update(kwargs)
    return DiT(1, 8, num_classes=num_classes, **options)


def image_batch(net, batch_size=4):
    return torch.randn(batch_size, net.in_channels, net.image_size, net.image_size)


def vector_batch(batch_size=4):
    return torch.randn(batch_size, 2)


# (network factory, input factory) pairs; conditional versions take num_classes
NETWORKS = {
    "unet": (small_unet, image_batch),
    "mlp": (small_mlp, lambda net: vector_batch()),
    "dit": (small_dit, image_batch),
}
KINDS = list(NETWORKS)


def build(kind, num_classes=0, **kwargs):
    torch.manual_seed(0)
    make_net, make_input = NETWORKS[kind]
    net = make_net(num_classes=num_classes, **kwargs).eval()
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
def test_output_is_zero_at_init(kind, num_classes):
    net, x = build(kind, num_classes)
    y = torch.arange(x.shape[0]) if num_classes else None
    out = net(x, torch.rand(x.shape[0]), y)
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("kind", KINDS)
def test_output_depends_on_time(kind):
    net, x = build(kind)
    perturb_zero_init(net)
    batch_size = x.shape[0]
    with torch.no_grad():
        early = net(x, torch.full((batch_size,), 0.1))
        late = net(x, torch.full((batch_size,), 0.9))
    assert not torch.allclose(early, late, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_scalar_time_is_broadcast(kind):
    net, x = build(kind)
    perturb_zero_init(net)
    with torch.no_grad():
        expected = net(x, torch.full((x.shape[0],), 0.3))
        assert torch.equal(net(x, torch.tensor(0.3)), expected)
        assert torch.equal(net(x, 0.3), expected)


@pytest.mark.parametrize("kind", KINDS)
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


@pytest.mark.parametrize("kind", KINDS)
def test_unconditional_net_ignores_labels(kind):
    net, x = build(kind)
    perturb_zero_init(net)
    t = torch.rand(x.shape[0])
    with torch.no_grad():
        assert torch.equal(net(x, t, torch.arange(x.shape[0])), net(x, t))


@pytest.mark.parametrize("kind", KINDS)
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


# -----------------------------------------------------------------------------
# the second time input r (time_inputs=2) and the unchanged default


BLOCK_LAYERS = ("emb_proj", "fc1", "fc2")


def test_default_mlp_state_dict_keys_are_unchanged():
    """time_inputs=1 keeps the parameters of the networks before r existed: old checkpoints
    load. The list is the small conditional MLP's state_dict before the change."""
    layers = ["cond_embed.time_mlp.0", "cond_embed.time_mlp.2"]
    layers += ["input_proj"] + [f"blocks.{i}.{name}" for i in range(2) for name in BLOCK_LAYERS]
    expected = [f"{layer}.{p}" for layer in layers for p in ("weight", "bias")]
    expected.insert(4, "cond_embed.class_embed.weight")
    expected += ["out.0.weight", "out.0.bias", "out.2.weight", "out.2.bias"]
    assert list(small_mlp(NUM_CLASSES).state_dict()) == expected


@pytest.mark.parametrize(
    "kind, num_tensors, num_values, out_sum, out_abs_sum",
    # measured with the networks of commit 3549baf (before the second time input)
    [("unet", 129, 191073, 39.75695747, 107.05865296), ("mlp", 23, 10626, 2.20088864, 3.89813233)],
)
def test_default_networks_are_unchanged(kind, num_tensors, num_values, out_sum, out_abs_sum):
    net, x = build(kind, NUM_CLASSES)
    perturb_zero_init(net)
    state = net.state_dict()
    assert (len(state), sum(v.numel() for v in state.values())) == (num_tensors, num_values)
    torch.manual_seed(2)
    t = torch.rand(x.shape[0])
    with torch.no_grad():
        out = net(x, t, torch.arange(x.shape[0])).double()
    assert out.sum().item() == pytest.approx(out_sum, rel=1e-4)
    assert out.abs().sum().item() == pytest.approx(out_abs_sum, rel=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_two_time_inputs_add_only_the_interval_embedding(kind):
    one, _ = build(kind, NUM_CLASSES)
    two, _ = build(kind, NUM_CLASSES, time_inputs=2)
    added = set(two.state_dict()) - set(one.state_dict())
    assert set(one.state_dict()) <= set(two.state_dict())
    assert added and all(k.startswith("cond_embed.interval_mlp.") for k in added)


@pytest.mark.parametrize("kind", KINDS)
def test_output_depends_on_second_time(kind):
    net, x = build(kind, NUM_CLASSES, time_inputs=2)
    perturb_zero_init(net)
    t = torch.full((x.shape[0],), 0.8)
    y = torch.arange(x.shape[0])
    with torch.no_grad():
        near = net(x, t, y, r=torch.full_like(t, 0.7))
        far = net(x, t, y, r=torch.full_like(t, 0.1))
        assert not torch.allclose(near, far, atol=1e-5)
        # r = None is the empty interval r = t; a scalar r is broadcast like t
        assert torch.equal(net(x, t, y), net(x, t, y, r=t))
        assert torch.equal(net(x, t, y, r=0.7), near)


@pytest.mark.parametrize("kind", KINDS)
def test_second_time_needs_two_time_inputs(kind):
    net, x = build(kind)
    t = torch.rand(x.shape[0])
    with pytest.raises(ValueError, match="time_inputs=2"):
        net(x, t, None, r=t)


def test_time_inputs_must_be_one_or_two():
    with pytest.raises(ValueError, match="time_inputs=3 must be 1"):
        ConditionEmbedding(8, 16, time_inputs=3)


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-2.0, 1.5)])
def test_time_features_separate_times_over_the_documented_range(low, high):
    """Times in [0, 1] and EDM's c_noise = log(s) / 4 in about [-2, 1.5] get finite, well
    separated sinusoidal features (t * 1000 at 32 frequencies): any two times 0.01 apart differ
    by more than 1 in feature space (the features have norm 4)."""
    c = torch.linspace(low, high, round((high - low) / 0.01) + 1)
    features = timestep_embedding(c * 1000.0, 32)
    assert torch.isfinite(features).all()
    distances = torch.cdist(features, features)
    apart = (c[:, None] - c[None]).abs() > 0.005
    assert distances[apart].min() > 1.0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func internals
@pytest.mark.parametrize("kind", KINDS)
def test_jvp_matches_reverse_mode(kind):
    """torch.func.jvp through the net (MeanFlow's objective differentiates u(x, r, t) along
    (dx, dr, dt)) works, attention included, and agrees with reverse mode: for any cotangent w,
    w . (J u) from the JVP equals (J^T w) . u from autograd.grad."""
    net, x = build(kind, NUM_CLASSES, time_inputs=2)
    perturb_zero_init(net)
    torch.manual_seed(3)
    t = torch.rand(x.shape[0])
    r = t * torch.rand(x.shape[0])
    y = torch.arange(x.shape[0])
    tangents = (torch.randn_like(x), torch.randn_like(t), torch.randn_like(r))

    def u(x, t, r):
        return net(x, t, y, r=r)

    _, jvp_out = torch.func.jvp(u, (x, t, r), tangents)
    w = torch.randn_like(jvp_out)
    inputs = [v.clone().requires_grad_() for v in (x, t, r)]
    grads = torch.autograd.grad((u(*inputs) * w).sum(), inputs)
    forward = (jvp_out * w).sum().item()
    reverse = sum((g * d).sum() for g, d in zip(grads, tangents, strict=True)).item()
    assert forward == pytest.approx(reverse, rel=1e-4, abs=1e-4)
