"""MeanFlow and consistency objectives, and the few-step sampler (objectives.py)."""

import math
import os

import pytest
import torch
from helpers import ROOT, perturb_zero_init, run_torchrun
from objectives_ddp_worker import one_step

import objectives
import prediction
import sampling
from mlp import MLP
from processes import PROCESSES, build_process
from time_samplers import build_time_sampler
from unet import UNet

WORKER = os.path.join(ROOT, "tests", "objectives_ddp_worker.py")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets: one intra-op thread is faster, and robust on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def analytic_field(x, t, y=None, r=None):
    """A smooth known u(x, r, t) with the network's calling convention."""
    t_, r_ = t.reshape(-1, 1), r.reshape(-1, 1)
    return torch.sin(x) * t_ + r_ * x**2 + torch.cos(3 * t_ - r_) * x.sum(1, keepdim=True)


def random_mlp(dim, time_inputs, seed=0, std=0.3):
    """A tiny MLP with every weight drawn (no zero-initialised output)."""
    torch.manual_seed(seed)
    net = MLP(dim, hidden=16, num_blocks=2, time_inputs=time_inputs)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=std)
    return net


def gaussian_average_velocity(process, scale):
    """The exact average velocity of data N(0, scale^2 I) under `process`: x_t has std
    std(t) = sqrt(alpha^2 scale^2 + sigma^2), the flow is z_t = std(t) / std(r) z_r, so
    u(z, r, t) = z (1 - std(r) / std(t)) / (t - r), and v(z, t) = z std'(t) / std(t)."""

    def std(t):
        return torch.sqrt(process.alpha(t) ** 2 * scale**2 + process.sigma(t) ** 2)

    def u(x, t, y=None, r=None):
        ratio = (std(r) / std(t)).reshape(-1, 1)
        return x * (1 - ratio) / (t - r).reshape(-1, 1)

    def v(x, t):
        a, s, a_dot, s_dot = process.coefficients(t)
        rate = (a * a_dot * scale**2 + s * s_dot) / std(t) ** 2
        return x * rate.reshape(-1, 1)

    return u, v


# ---------------------------------------------------------------------------------------------
# MeanFlow target.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "ve"])  # ve: the input scale depends on t
def test_meanflow_target_matches_finite_differences(name, float64):
    process = build_process(name)
    generator = torch.Generator().manual_seed(0)
    z, v = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    t = torch.rand(5, generator=generator) * 0.8 + 0.1
    r = t * torch.rand(5, generator=generator)

    def u_of(z_, t_):  # the net sees z input_scale(t) and the times times time_scale = 0.5
        scale = process.input_scale(t_).reshape(-1, 1)
        return analytic_field(z_ * scale, 0.5 * t_, None, 0.5 * r)

    u, target = objectives.meanflow_target(analytic_field, process, z, v, r, t, None, 0.5)
    h = 1e-6
    du_dt = (u_of(z + h * v, t + h) - u_of(z - h * v, t - h)) / (2 * h)
    expected = v - (t - r).reshape(-1, 1) * du_dt
    torch.testing.assert_close(u, u_of(z, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(target, expected, rtol=1e-7, atol=1e-7)
    assert not target.requires_grad


def test_meanflow_jvp_equals_double_backward_reference(float64):
    """torch.func.jvp against torch.autograd.functional.jvp (reverse mode twice) on a tiny net."""
    net = random_mlp(3, 2).double()
    process = build_process("linear")
    generator = torch.Generator().manual_seed(1)
    z, v = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    t = torch.rand(4, generator=generator)
    r = t * torch.rand(4, generator=generator)
    u, target = objectives.meanflow_target(net, process, z, v, r, t, None)

    def field(z_, r_, t_):
        return net(z_, t_, None, r_)

    tangents = (v, torch.zeros_like(r), torch.ones_like(t))
    u_ref, du_dt = torch.autograd.functional.jvp(field, (z, r, t), tangents)
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(target, v - (t - r).reshape(-1, 1) * du_dt, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["linear", "trig"])
def test_exact_average_velocity_satisfies_the_meanflow_identity(name, float64):
    """For Gaussian data the exact u is a fixed point of the target (with the marginal v), and
    u(z, t, t) is the instantaneous velocity."""
    process, scale = build_process(name), 0.5
    u_exact, v_exact = gaussian_average_velocity(process, scale)
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(6, 2, generator=generator)
    t = torch.rand(6, generator=generator) * 0.8 + 0.15
    r = t * torch.rand(6, generator=generator)
    u, target = objectives.meanflow_target(u_exact, process, z, v_exact(z, t), r, t, None)
    torch.testing.assert_close(target, u, rtol=1e-9, atol=1e-9)
    near = u_exact(z, t, None, t - 1e-7)
    torch.testing.assert_close(near, v_exact(z, t), rtol=1e-5, atol=1e-6)


def test_meanflow_loss_at_r_equal_t_is_the_flow_matching_loss(float64):
    net = random_mlp(2, 2).double()
    process = build_process("trig")
    objective = objectives.MeanFlow(
        build_time_sampler("uniform"), ratio=0.0, adaptive_p=0.0, time_scale=0.01
    )
    generator = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(8, 2, generator=generator), torch.randn(8, 2, generator=generator)
    t = torch.rand(8, generator=generator) * 0.9 + 0.05
    extra = objective.draw(8, generator, "cpu", t)
    t_pair, r_pair, count = objective.pair_times(t, extra)
    assert count == 0 and torch.equal(t_pair, t) and torch.equal(r_pair, t)  # ratio 0: r = t
    loss = objective.loss(net, process, x0, x1, t, extra)
    x_t = process.interpolate(x0, x1, t)
    flow = (net(x_t, t * 0.01, None, t * 0.01) - process.velocity_target(x0, x1, t)).pow(2).mean()
    torch.testing.assert_close(loss, flow, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch, ratio, count", [(64, 0.25, 16), (10, 0.25, 2), (7, 1.0, 7)])
def test_meanflow_pairs_the_first_ratio_of_rows(batch, ratio, count):
    """round(ratio * B) rows get (max, min) of the two draws, the rest r = t; the second times
    follow the time sampler."""
    sampler = build_time_sampler("logit_normal", mean=-0.4, std=1.0)
    objective = objectives.MeanFlow(sampler, ratio=ratio)
    generator = torch.Generator().manual_seed(4)
    t = torch.rand(batch, generator=generator)
    second = objective.draw(batch, generator, "cpu", t)
    t_pair, r_pair, got = objective.pair_times(t, second)
    assert got == count
    torch.testing.assert_close(t_pair[:count], torch.maximum(t, second)[:count])
    torch.testing.assert_close(r_pair[:count], torch.minimum(t, second)[:count])
    assert bool((r_pair[:count] < t_pair[:count]).all())
    assert torch.equal(t_pair[count:], t[count:]) and torch.equal(r_pair[count:], t[count:])
    many = objective.draw(20000, torch.Generator().manual_seed(5), "cpu", torch.zeros(20000))
    logit = torch.log(many / (1 - many))  # logit-normal(-0.4, 1): logit is N(-0.4, 1)
    assert abs(logit.mean().item() + 0.4) < 0.03 and abs(logit.std().item() - 1.0) < 0.03


def test_meanflow_jvp_on_interval_rows_only_equals_the_full_jvp(float64):
    """The JVP restricted to the rows with r != t gives the same target, loss gradient and
    primal as the JVP over the whole batch (at r = t the target is v_t either way)."""
    net = random_mlp(2, 2).double()
    process = build_process("linear")
    generator = torch.Generator().manual_seed(6)
    z, v = torch.randn(8, 2, generator=generator), torch.randn(8, 2, generator=generator)
    t = 0.2 + 0.7 * torch.rand(8, generator=generator)
    r = torch.cat([t[:3] * torch.rand(3, generator=generator), t[3:]])  # intervals: rows 0-2

    def loss_and_grads(intervals):
        net.zero_grad()
        u, target = objectives.meanflow_target(net, process, z, v, r, t, None, 0.5, intervals)
        (u - target).pow(2).sum().backward()
        return u.detach(), target, [p.grad.clone() for p in net.parameters()]

    sub, full = loss_and_grads(3), loss_and_grads(None)
    torch.testing.assert_close(sub[0], full[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sub[1], full[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sub[1][3:], v[3:], rtol=0, atol=0)
    assert not torch.allclose(sub[1][:3], v[:3])  # the derivative term is there
    for a, b in zip(sub[2], full[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_adaptive_weight_formula():
    delta_sq = torch.tensor([0.0, 1.0, 3.0])
    weight = objectives.adaptive_weight(delta_sq, 1.0, 1e-3)
    torch.testing.assert_close(weight, 1 / (delta_sq + 1e-3))
    half = objectives.adaptive_weight(delta_sq, 0.5, 1.0)
    torch.testing.assert_close(half, 1 / torch.sqrt(delta_sq + 1.0))
    assert torch.equal(objectives.adaptive_weight(delta_sq, 0.0, 1e-3), torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Consistency.
# ---------------------------------------------------------------------------------------------
def test_consistency_boundary_condition_is_exact():
    net = random_mlp(3, 1, std=1.0)
    x = torch.randn(5, 3)
    f = objectives.consistency_function(net, x, 0.002, None, s_min=0.002, sigma_data=0.5)
    assert torch.equal(f, x)
    away = objectives.consistency_function(net, x, 0.5, None, s_min=0.002, sigma_data=0.5)
    assert (away - x).abs().max() > 1e-2  # the network does act away from s_min


@pytest.mark.parametrize("name", ["linear", "vp_linear", "ve"])
def test_consistency_network_inputs_are_edm_preconditioning(name, float64):
    """c_in x_hat and c_noise equal prediction.EDMPreconditioning's on x_t = alpha x_hat."""
    process = build_process(name)
    t = torch.tensor([0.05, 0.3, 0.7])
    alpha, level = process.alpha(t), process.noise_level(t)
    x_hat = torch.randn(3, 4)
    c_in, _, _, c_noise = objectives.consistency_coefficients(level, 0.002, 0.5)
    precond = prediction.EDMPreconditioning(process, 0.5)
    x_in, t_in = precond.inputs(alpha.reshape(-1, 1) * x_hat, t)
    torch.testing.assert_close(c_in.reshape(-1, 1) * x_hat, x_in)
    torch.testing.assert_close(c_noise, t_in)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_noise_level_states_are_every_process_state(name, float64):
    """The consistency objective works on x0 + s x1: that is x_t / alpha(t) at the time
    t = inverse_noise_level(s) of any process, over iCT's whole range [0.002, 80]."""
    process = build_process(name)
    levels = objectives.karras_levels(7, 0.002, 80.0)
    t = process.inverse_noise_level(levels)
    x0, x1 = torch.randn(7, 3), torch.randn(7, 3)
    x_t = process.interpolate(x0, x1, t)
    expected = x0 + levels.reshape(-1, 1) * x1
    torch.testing.assert_close(x_t / process.alpha(t).reshape(-1, 1), expected, rtol=1e-6, atol=0)


def test_ict_discretisation_schedule_and_interval_distribution():
    counts = [objectives.discretisation_steps(k, 800) for k in (0, 99, 100, 350, 799)]
    assert counts == [10, 10, 20, 80, 1280]  # K' = 800 // 8 = 100 steps per stage
    levels = objectives.karras_levels(11, 0.002, 80.0)
    assert levels[0].item() == pytest.approx(0.002) and levels[-1].item() == pytest.approx(80.0)
    probs = objectives.lognormal_interval_probs(levels, -1.1, 2.0)
    assert probs.sum().item() == pytest.approx(1.0)
    cdf = torch.erf((torch.log(levels) - (-1.1)) / (math.sqrt(2) * 2.0))
    torch.testing.assert_close(probs, (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0]))
    objective = objectives.Consistency()
    low, high = objective.pick_intervals(torch.tensor([0.0, 0.5, 0.999999]), 0, 800)
    assert torch.equal(high, levels[torch.searchsorted(levels, low) + 1])
    assert low[0].item() == pytest.approx(0.002) and high[2].item() == pytest.approx(80.0)


def test_pseudo_huber_metric():
    a, b = torch.zeros(2, 4), torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    c = 0.00054 * 2.0  # sqrt(d) = 2
    expected = torch.tensor([math.sqrt(25 + c**2) - c, 0.0])
    torch.testing.assert_close(objectives.pseudo_huber(a, b), expected)


def test_consistency_loss_is_the_weighted_metric_of_adjacent_levels(float64):
    net = random_mlp(2, 1).double()
    objective = objectives.Consistency()
    generator = torch.Generator().manual_seed(5)
    x0, x1 = torch.randn(6, 2, generator=generator), torch.randn(6, 2, generator=generator)
    extra = objective.draw(6, generator, "cpu", torch.zeros(6))
    loss = objective.loss(net, build_process("linear"), x0, x1, None, extra, None, 300, 1000)
    low, high = objective.pick_intervals(extra, 300, 1000)

    def f(s):
        c_in, c_skip, c_out, c_noise = objectives.consistency_coefficients(s, 0.002, 0.5)
        x_hat = x0 + s.reshape(-1, 1) * x1
        raw = net(c_in.reshape(-1, 1) * x_hat, c_noise, None)
        return c_skip.reshape(-1, 1) * x_hat + c_out.reshape(-1, 1) * raw

    distance = torch.sqrt((f(high) - f(low)).pow(2).sum(1) + (0.00054 * math.sqrt(2)) ** 2)
    expected = ((distance - 0.00054 * math.sqrt(2)) / (high - low)).mean()
    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------------------------------------
# Processes and registry.
# ---------------------------------------------------------------------------------------------
def test_processes_allowed():
    meanflow = objectives.MeanFlow(build_time_sampler("uniform"))
    consistency = objectives.Consistency()
    for name in PROCESSES:
        assert meanflow.processes_allowed(build_process(name)) is None, name
        assert consistency.processes_allowed(build_process(name)) is None, name
    stochastic = build_process("linear", gamma="sqrt")
    for objective in (meanflow, consistency):
        message = objective.processes_allowed(stochastic)
        assert "process.gamma=none" in message and "\n" not in message
    short_ve = consistency.processes_allowed(build_process("ve", sigma_max=10.0))
    assert "process.name=ve" in short_ve and "linear" in short_ve and "\n" not in short_ve
    assert "process.base=gaussian" in consistency.processes_allowed(
        build_process("linear"), base="moons"
    )
    assert meanflow.processes_allowed(build_process("linear"), base="moons") is None


def test_registry_and_build_errors():
    assert set(objectives.OBJECTIVES) == {"flow", "meanflow", "consistency"}
    needs = {n: cls.needs_time_inputs for n, cls in objectives.OBJECTIVES.items()}
    assert needs == {"flow": 1, "meanflow": 2, "consistency": 1}
    built = objectives.build_objective(
        "meanflow", time_sampler=build_time_sampler("uniform"), ratio=0.5, s_min=0.01
    )
    assert built.ratio == 0.5
    with pytest.raises(ValueError, match=r"train.objective='nope' is unknown; valid choices"):
        objectives.build_objective("nope")
    with pytest.raises(ValueError, match="train.meanflow_ratio"):
        objectives.MeanFlow(build_time_sampler("uniform"), ratio=1.5)


# ---------------------------------------------------------------------------------------------
# Training learns the closed form (data N(0, 0.3^2 I) in 2-D).
# ---------------------------------------------------------------------------------------------
DATA_STD = 0.3


def train(objective, net, steps, batch=64, lr=2e-3, total_steps=1000):
    """`steps` Adam steps of `objective` on Gaussian data; returns the per-step losses."""
    process = build_process("linear")
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        x0 = DATA_STD * torch.randn(batch, 2, generator=generator)
        x1 = torch.randn(batch, 2, generator=generator)
        t = torch.rand(batch, generator=generator)
        extra = objective.draw(batch, generator, "cpu", t)
        loss = objective.loss(net, process, x0, x1, t, extra, None, step, total_steps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_meanflow_training_learns_the_average_velocity():
    """A tiny MLP trained with the paper's settings (adaptive p = 1) approaches the exact u."""
    torch.manual_seed(0)
    objective = objectives.MeanFlow(build_time_sampler("uniform"), ratio=0.5)
    net = MLP(2, hidden=32, num_blocks=2, time_inputs=2)
    u_exact, _ = gaussian_average_velocity(build_process("linear"), DATA_STD)
    generator = torch.Generator().manual_seed(99)
    t = 0.1 + 0.9 * torch.rand(512, generator=generator)
    r = (t - 0.05) * torch.rand(512, generator=generator)
    marginal_std = torch.sqrt((1 - t) ** 2 * DATA_STD**2 + t**2).reshape(-1, 1)
    z = marginal_std * torch.randn(512, 2, generator=generator)
    scale = objective.time_scale

    def error():
        with torch.no_grad():
            return (net(z, t * scale, None, r * scale) - u_exact(z, t, None, r)).pow(2).mean()

    before = error().item()
    train(objective, net, steps=100)
    after = error().item()
    assert after < 0.25 * before, (before, after)


def test_consistency_training_learns_the_flow_map():
    """f(x_hat, s) of Gaussian data is x_hat sqrt(a^2 + s_min^2) / sqrt(a^2 + s^2) (the
    probability-flow map to s_min); training lowers both the loss and the error to it."""
    torch.manual_seed(0)
    objective = objectives.Consistency()
    net = MLP(2, hidden=32, num_blocks=2)
    generator = torch.Generator().manual_seed(99)
    s = torch.exp(-1.1 + 2.0 * torch.randn(512, generator=generator)).clamp(0.01, 80).double()
    x_hat = torch.sqrt(DATA_STD**2 + s**2).reshape(-1, 1) * torch.randn(512, 2, dtype=s.dtype)
    exact = x_hat * (math.sqrt(DATA_STD**2 + 0.002**2) / torch.sqrt(DATA_STD**2 + s**2)).reshape(
        -1, 1
    )

    def error():
        with torch.no_grad():
            f = objectives.consistency_function(net, x_hat.float(), s)
            return (f.double() - exact).pow(2).mean().item()

    before = error()
    train(objective, net, steps=100, total_steps=100)
    after = error()
    assert after < 0.65 * before, (before, after)


def test_consistency_training_lowers_the_loss_on_clusters():
    """On four 2-D clusters (far from the c_skip-only start) the held-out loss at a fixed
    discretisation stage falls."""
    torch.manual_seed(0)
    objective = objectives.Consistency()
    net = MLP(2, hidden=64, num_blocks=2)
    centres = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])

    def batch(n, seed):
        generator = torch.Generator().manual_seed(seed)
        x0 = centres[torch.randint(0, 4, (n,), generator=generator)]
        x0 = x0 + 0.1 * torch.randn(n, 2, generator=generator)
        x1 = torch.randn(n, 2, generator=generator)
        return x0, x1, None, objective.draw(n, generator, "cpu", torch.zeros(n))

    held_out = batch(1024, 99)
    linear = build_process("linear")
    before = objective.loss(net, linear, *held_out, None, 0, 1000).item()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(150):
        loss = objective.loss(net, linear, *batch(128, step), None, 0, 1000)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = objective.loss(net, linear, *held_out, None, 0, 1000).item()
    assert after < 0.8 * before, (before, after)


# ---------------------------------------------------------------------------------------------
# DDP: 2 gloo processes against 1 with the same global batch.
# ---------------------------------------------------------------------------------------------
def launch(nproc, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    run_torchrun(nproc, WORKER, out_dir)

    def load(case, rank):
        return torch.load(os.path.join(out_dir, f"{case}_rank{rank}.pt"), weights_only=True)

    return load


def test_two_processes_give_the_single_process_update(tmp_path):
    two = launch(2, tmp_path / "two")
    for case in ("meanflow_ddp", "consistency_ddp"):
        single = one_step(case.split("_")[0], "ddp")
        for kind in ("grads", "params"):
            for key, value in two(case, 0)[kind].items():
                assert torch.equal(value, two(case, 1)[kind][key]), (case, kind, key)
                torch.testing.assert_close(value, single[kind][key], rtol=1e-5, atol=1e-7)
    # the trap: a JVP on DDP's .module bypasses its hooks, and the ranks' gradients differ
    trap = [two("meanflow_unwrapped", rank)["grads"] for rank in (0, 1)]
    assert max((trap[0][k] - trap[1][k]).abs().max().item() for k in trap[0]) > 1e-3


# ---------------------------------------------------------------------------------------------
# Few-step sampling.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "trig"])
def test_one_meanflow_jump_with_the_exact_field_lands_on_the_data(name, float64):
    process, scale = build_process(name), 0.3
    u_exact, _ = gaussian_average_velocity(process, scale)
    x1 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(6))
    x, nfe = objectives.few_step_sample(u_exact, process, x1, 1, "meanflow", time_scale=1.0)
    assert nfe == 1
    torch.testing.assert_close(x, scale * x1, rtol=1e-10, atol=1e-10)  # N(0, scale^2) exactly
    states = []
    x4, nfe4 = objectives.few_step_sample(
        u_exact, process, x1, 4, "meanflow", time_scale=1.0, trajectory=states
    )
    assert nfe4 == 4 and [t for t, _ in states] == [1.0, 0.75, 0.5, 0.25, 0.0]
    half = torch.tensor(0.5)
    std_half = torch.sqrt(process.alpha(half) ** 2 * scale**2 + process.sigma(half) ** 2)
    torch.testing.assert_close(states[2][1], std_half * x1)  # z_{1/2} = std(1/2) x1
    torch.testing.assert_close(x4, scale * x1, rtol=1e-10, atol=1e-10)
    # a point mass: every sample lands on it
    point_u, _ = gaussian_average_velocity(process, 0.0)
    x_point, _ = objectives.few_step_sample(point_u, process, x1, 1, "meanflow", time_scale=1.0)
    assert x_point.abs().max() < 1e-10


def samples_in_batches(net, objective, indices_list, steps):
    out = []
    for indices in indices_list:
        noise = sampling.PerSampleNoise(seed=7, indices=indices)
        x1 = noise(torch.zeros(len(indices), 3))
        x, nfe = objectives.few_step_sample(
            net, build_process("linear"), x1, steps, objective, noise=noise
        )
        assert nfe == steps
        out.append(x)
    return torch.cat(out)


@pytest.mark.parametrize("objective,time_inputs", [("meanflow", 2), ("consistency", 1)])
def test_few_step_samples_do_not_depend_on_the_batch(objective, time_inputs):
    net = random_mlp(3, time_inputs).eval()
    whole = samples_in_batches(net, objective, [list(range(6))], steps=3)
    split = samples_in_batches(net, objective, [[0, 1], [2, 3, 4], [5]], steps=3)
    torch.testing.assert_close(whole, split, rtol=1e-5, atol=1e-6)
    assert (whole[0] - whole[1]).abs().max() > 1e-3  # different samples differ


def test_consistency_sampling_levels_and_errors():
    levels = objectives.consistency_sample_levels(2)
    assert levels[0].item() == pytest.approx(80.0) and 0.002 < levels[1].item() < 80.0
    net = random_mlp(3, 1)
    x1 = torch.randn(4, 3)
    x, nfe = objectives.few_step_sample(net, build_process("linear"), x1, 1, "consistency")
    assert nfe == 1
    expected = objectives.consistency_function(net, 80.0 * x1, 80.0)
    torch.testing.assert_close(x, expected)
    with pytest.raises(ValueError, match="needs a noise callable"):
        objectives.few_step_sample(net, build_process("linear"), x1, 2, "consistency")
    with pytest.raises(ValueError, match="train.objective in"):
        objectives.few_step_sample(net, build_process("linear"), x1, 2, "flow")
    with pytest.raises(ValueError, match="sample.steps=0"):
        objectives.few_step_sample(net, build_process("linear"), x1, 0, "meanflow")


def test_meanflow_curriculum_caps_the_interval_then_lets_it_go():
    """curriculum c: t - r <= step / (c K) on the interval rows; from step c K on, no cap."""
    objective = objectives.MeanFlow(build_time_sampler("uniform"), ratio=1.0, curriculum=0.5)
    generator = torch.Generator().manual_seed(8)
    t, second = torch.rand(256, generator=generator), torch.rand(256, generator=generator)
    for step, cap in ((0, 0.0), (25, 0.25), (50, 0.5), (100, 1.0)):
        t_pair, r_pair, _ = objective.pair_times(t, second, step, total_steps=200)
        gap = t_pair - r_pair
        assert gap.max().item() <= cap + 1e-7 and bool((gap >= 0).all())
        free = (t - second).abs()
        torch.testing.assert_close(gap, torch.minimum(free, torch.tensor(cap)))
    off = objectives.MeanFlow(build_time_sampler("uniform"), ratio=1.0)
    torch.testing.assert_close(off.pair_times(t, second, 0, 200)[1], torch.minimum(t, second))
    with pytest.raises(ValueError, match="train.meanflow_curriculum=2"):
        objectives.MeanFlow(build_time_sampler("uniform"), curriculum=2)


def test_meanflow_target_under_bf16_autocast_is_the_fp32_target():
    """Under bf16 autocast the JVP runs in fp32 (torch's forward-mode AD through group_norm, which
    autocast keeps in fp32, mixes dtypes and the next convolution fails): the target equals the
    target computed without autocast, while u itself comes from the bf16 forward pass."""
    net = UNet(1, 8, 8, (1, 2), 1, (), num_classes=3, time_inputs=2)
    perturb_zero_init(net)
    process = build_process("linear")
    generator = torch.Generator().manual_seed(7)
    z, v = (
        torch.randn(4, 1, 8, 8, generator=generator),
        torch.randn(4, 1, 8, 8, generator=generator),
    )
    t = 0.2 + 0.7 * torch.rand(4, generator=generator)
    r, y = t * torch.rand(4, generator=generator), torch.tensor([0, 1, 2, 3])
    u32, target32 = objectives.meanflow_target(net, process, z, v, r, t, y, 1.0, 2)
    with torch.autocast("cpu", torch.bfloat16):
        u16, target16 = objectives.meanflow_target(net, process, z, v, r, t, y, 1.0, 2)
    assert u16.dtype == torch.bfloat16 and target16.dtype == torch.float32
    torch.testing.assert_close(target16, target32, rtol=0, atol=0)
    torch.testing.assert_close(u16.float(), u32, rtol=0.05, atol=0.05)
