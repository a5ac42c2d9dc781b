"""Samplers driven by the exact field of Gaussian data, where everything is closed-form.

For x0 ~ N(m, s^2) (per dimension) and x_t = a x0 + b x1 with x1 ~ N(0, 1):
    E[x1 | x_t] = b (x_t - a m) / (a^2 s^2 + b^2),   E[x0 | x_t] = (x_t - b E[x1 | x_t]) / a,
the probability-flow ODE maps x1 to m + s x1 exactly, and the score is -E[x1 | x_t] / b.
"""

from types import SimpleNamespace

import pytest
import torch

import prediction
import sampling
from processes import bcast, build_process

MEAN = torch.tensor([1.5, -0.5], dtype=torch.float64)
STD = torch.tensor([0.5, 2.0], dtype=torch.float64)

pytestmark = pytest.mark.usefixtures("float64")


class GaussianOracle(torch.nn.Module):
    """The exact model output of type `kind` for Gaussian data under `process`."""

    def __init__(self, process, kind, mean=MEAN, std=STD):
        super().__init__()
        self.process, self.kind, self.mean, self.std = process, kind, mean, std

    def forward(self, x, t, y=None):
        x = x / bcast(self.process.input_scale(t), x)  # samplers feed x_t * input_scale(t)
        c = prediction.coefs_at(self.process, t, x)
        var = c.alpha**2 * self.std**2 + c.sigma**2
        eps_hat = c.sigma * (x - c.alpha * self.mean) / var
        x0_hat = self.mean + c.alpha * self.std**2 * (x - c.alpha * self.mean) / var
        return prediction.FROM_X0_EPS[self.kind](x0_hat, eps_hat, c)


def terminal_error(process, kind, solver, steps, t_max=1.0, t_min=0.0, grid="uniform", **kw):
    x1 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    net = GaussianOracle(process, kind)
    x, nfe = sampling.sample(
        net,
        process,
        kind,
        x1,
        solver=solver,
        steps=steps,
        t_max=t_max,
        t_min=t_min,
        grid=grid,
        **kw,
    )
    # exact flow from the start sigma(t_max) x1: invert the affine marginal map at t_max, then
    # map to data
    c = prediction.coefs_at(process, torch.tensor(t_max), x1)
    start = sampling.initial_state(process, x1, t_max)
    z = (start - c.alpha * MEAN) / torch.sqrt(c.alpha**2 * STD**2 + c.sigma**2)
    c0 = prediction.coefs_at(process, torch.tensor(t_min), x1)
    exact = c0.alpha * MEAN + torch.sqrt(c0.alpha**2 * STD**2 + c0.sigma**2) * z
    return (x - exact).abs().max().item(), nfe


@pytest.mark.parametrize(
    "name,kind,t_max,t_min,grid",
    [
        ("linear", "velocity", 1.0, 0.0, "uniform"),
        ("trig", "eps", 0.999, 0.0, "uniform"),
        ("vp_cosine", "v", 0.995, 0.01, "logsnr"),
        ("ve", "eps", 1.0, 0.002 / 80, "edm"),  # EDM's sigma range [0.002, 80] and grid
    ],
)
@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4)])
def test_ode_convergence_order(name, kind, t_max, t_min, grid, solver, order):
    """Halving the step divides the terminal error by 2^order (at least: midpoint happens to
    reach third order on the linear interpolant's Gaussian field)."""
    process = build_process(name)
    steps = (40, 80, 160) if order < 4 else (10, 20, 40)  # RK4 hits float64 round-off later
    errors = [terminal_error(process, kind, solver, n, t_max, t_min, grid)[0] for n in steps]
    rates = [torch.log2(torch.tensor(errors[i] / errors[i + 1])).item() for i in range(2)]
    assert errors[-1] < 0.1
    for rate in rates:
        assert order - 0.3 < rate < order + 1.2, (errors, rates)


def test_nfe_counts():
    process = build_process("linear")
    net = GaussianOracle(process, "velocity")
    x1 = torch.randn(4, 2)
    for solver, per_step in (("euler", 1), ("heun", 2), ("euler_maruyama", 1)):
        _, nfe = sampling.sample(
            net,
            process,
            "velocity",
            x1,
            solver=solver,
            steps=7,
            t_min=0.01,
            t_max=0.99,
            diffusion="constant",
        )
        assert nfe == 7 * per_step
        _, nfe = sampling.sample(
            net,
            process,
            "velocity",
            x1,
            solver=solver,
            steps=7,
            t_min=0.01,
            t_max=0.99,
            diffusion="constant",
            denoise_final=True,
        )
        assert nfe == 7 * per_step + 1


@pytest.mark.parametrize("diffusion", ["process", "constant", "sigma"])
def test_sde_reproduces_mean_and_variance(diffusion):
    process = build_process("vp_linear") if diffusion == "process" else build_process("linear")
    net = GaussianOracle(process, "eps")
    n = 20_000
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(n, 2, generator=gen)
    noise = lambda x: torch.randn(x.shape, generator=gen)
    x, _ = sampling.sample(
        net,
        process,
        "eps",
        x1,
        solver="euler_maruyama",
        steps=400,
        t_max=0.999,
        t_min=1e-3,
        diffusion=diffusion,
        denoise_final=True,
        noise=noise,
    )
    mean_se = STD / n**0.5
    assert ((x.mean(0) - MEAN).abs() < 4 * mean_se + 0.01).all(), x.mean(0)
    var_se = STD**2 * (2 / n) ** 0.5
    assert ((x.var(0) - STD**2).abs() < 4 * var_se + 0.03 * STD**2).all(), x.var(0)


def test_sde_with_zero_diffusion_is_euler():
    process = build_process("linear")
    net = GaussianOracle(process, "velocity")
    x1 = torch.randn(8, 2)
    ode, _ = sampling.sample(net, process, "velocity", x1, solver="euler", steps=10)
    sde, _ = sampling.sample(
        net,
        process,
        "velocity",
        x1,
        solver="euler_maruyama",
        steps=10,
        t_max=1.0,
        t_min=0.0,
        diffusion="constant",
        diffusion_scale=0.0,
    )
    torch.testing.assert_close(sde, ode)


class LabelNet(torch.nn.Module):
    """Outputs its label (the null class num_classes outputs 0) everywhere."""

    def forward(self, x, t, y=None):
        value = torch.where(y == 3, torch.zeros_like(y), y + 1).to(x.dtype)
        return value.reshape(-1, *([1] * (x.dim() - 1))).expand_as(x)


def test_classifier_free_guidance_combination():
    field = sampling.Field(
        LabelNet(),
        build_process("linear"),
        "velocity",
        y=torch.tensor([0, 1, 2]),
        guidance_scale=2.5,
        num_classes=3,
    )
    out = field.output(torch.zeros(3, 2), 0.5)
    # null output 0, conditional y + 1: 0 + 2.5 * (y + 1 - 0)
    torch.testing.assert_close(out[:, 0], 2.5 * torch.tensor([1.0, 2.0, 3.0]))
    assert field.nfe == 1
    plain = sampling.Field(
        LabelNet(),
        build_process("linear"),
        "velocity",
        y=torch.tensor([0, 1, 2]),
        guidance_scale=1.0,
        num_classes=3,
    )
    torch.testing.assert_close(
        plain.output(torch.zeros(3, 2), 0.5)[:, 0], torch.tensor([1.0, 2.0, 3.0])
    )


@pytest.mark.parametrize("solver", ["heun", "euler_maruyama"])
def test_per_sample_seeding_independent_of_batch_size(solver):
    process = build_process("linear")
    net = GaussianOracle(process, "velocity")
    indices = list(range(20))
    kwargs = dict(solver=solver, steps=5, t_max=0.99, t_min=0.01, diffusion="constant")
    outs = [
        sampling.generate(net, process, "velocity", (2,), indices, seed=3, batch_size=b, **kwargs)[
            0
        ]
        for b in (1, 7, 64)
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=1e-12)
    other, _ = sampling.generate(
        net, process, "velocity", (2,), indices, seed=4, batch_size=64, **kwargs
    )
    assert (other - outs[0]).abs().max() > 0.1
    # a subset of indices gives the same samples for those indices (sharding over ranks)
    odd, _ = sampling.generate(
        net, process, "velocity", (2,), indices[1::2], seed=3, batch_size=4, **kwargs
    )
    torch.testing.assert_close(odd, outs[0][1::2], rtol=0, atol=1e-12)


def test_check_sampling_range_messages():
    linear = build_process("linear")
    assert (
        sampling.check_sampling_range(linear, "velocity", "heun", 0.0, 1.0, "sigma", 1, 10) is None
    )
    message = sampling.check_sampling_range(linear, "x0", "heun", 0.0, 1.0, "sigma", 1, 10)
    assert "singular at t=0" in message and "sample.t_min" in message
    message = sampling.check_sampling_range(
        linear, "velocity", "euler_maruyama", 0.01, 1.0, "process", 1, 10
    )
    assert "singular at t=1" in message


# ---------------------------------------------------------------------------------------------
# Issue 7, defects 1, 2, 4 and 5.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["trig", "vp_cosine"])
@pytest.mark.parametrize("grid", ["edm", "logsnr"])
def test_noise_level_grids_reject_alpha_zero_and_spread_their_steps(name, grid):
    """alpha(1) = 0 makes t = 1 singular for these grids; from the trimmed t_max the steps spread
    over the trajectory (with alpha(1) = 6e-17 almost every step sat at t > 0.99)."""
    process = build_process(name)
    assert sampling.grid_is_singular(grid, process, 1.0)
    assert not sampling.grid_is_singular(grid, process, process.default_t_max)
    times = sampling.TIME_GRIDS[grid](20, process.default_t_max, 1e-3, process)
    assert (times > 0.99).sum() <= 7
    errors = [
        terminal_error(process, "velocity", "heun", n, process.default_t_max, 1e-3, grid)[0]
        for n in (20, 40)
    ]
    assert errors[1] < 0.03 and errors[0] / errors[1] > 3.5  # second order: every step counts


def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """k-diffusion's get_sigmas_karras(n, ...) with its appended zero (EDM eq. 5)."""
    ramp = torch.linspace(0, 1, n)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1)])


def test_edm_grid_is_karras_grid_when_sigma_min_is_zero():
    ve = build_process("ve")
    torch.testing.assert_close(80 * sampling.edm_grid(18, 1.0, 0.0, ve), karras_sigmas(18))
    linear = build_process("linear")  # the same noise levels s = t / (1 - t) for linear
    times = sampling.edm_grid(18, 80 / 81, 0.0, linear)
    torch.testing.assert_close(linear.noise_level(times), karras_sigmas(18))
    assert ve.default_t_min * ve.sigma_max == pytest.approx(0.002)  # EDM's sigma_min for ve
    assert ve.default_t_max == 1.0


def test_dopri5_samples_do_not_depend_on_the_batch():
    process = build_process("trig")
    net = GaussianOracle(process, "eps")
    kwargs = dict(solver="dopri5", steps=2, t_max=0.999, t_min=0.0, rtol=1e-4, atol=1e-4)
    outs = [
        sampling.generate(net, process, "eps", (2,), list(range(10)), 3, b, **kwargs)[0]
        for b in (1, 3, 7, 10)
    ]
    for other in outs[1:]:
        assert (other - outs[0]).abs().max().item() < 1e-12


@pytest.mark.parametrize(
    "name,kind,t_max,t_min",
    [("vp_linear", "eps", 1.0, 1e-3), ("vp_cosine", "eps", 0.999, 1e-3), ("trig", "eps", 0.999, 0)],
)
def test_dopri5_evaluates_the_net_only_inside_its_time_range(name, kind, t_max, t_min):
    """Near t = 1 a VP field is tiny, so the first-step heuristic's 0.01 |x| / |f| is tens of
    time units: its probe must still stay inside [t_min, t_max]. Before, in float32, the probe
    of vp_linear went to t = -30, where alpha = 0, and the solve ended in NaN after 600k network
    calls. The exact field of N(0, 0.5^2) data; the result against the exact flow."""
    process = build_process(name)
    zeros = torch.zeros(2, dtype=torch.float32)
    oracle = GaussianOracle(process, kind, mean=zeros, std=zeros + 0.5)

    def net(x, t, y=None):
        times = t.double()  # the net sees float32 times: 0.999 is 0.99900001
        assert t_min - 1e-6 <= times.min() and times.max() <= t_max + 1e-6, t  # before any NaN
        return oracle(x, t, y)

    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    kwargs = dict(solver="dopri5", steps=4, t_max=t_max, t_min=t_min, data_std=0.5)
    x, nfe = sampling.sample(net, process, kind, x1, **kwargs)
    c1, c0 = (prediction.coefs_at(process, torch.tensor(t), x1) for t in (t_max, t_min))
    z = (
        sampling.initial_state(process, x1, t_max, 0.0, 0.5)
        / (c1.alpha**2 / 4 + c1.sigma**2).sqrt()
    )
    exact = (c0.alpha**2 / 4 + c0.sigma**2).sqrt() * z
    assert (x - exact).abs().max().item() < 1e-3 and nfe < 500, nfe


def test_sampler_start_is_the_marginal_at_t_max():
    """vp_linear has alpha(1) = 0.0066: x_1 = alpha x0 + sigma x1 is N(alpha m, alpha^2 s^2 +
    sigma^2), not N(0, sigma^2). Started there, the exact flow maps x1 to m + s x1."""
    process = build_process("vp_linear")
    x1 = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    net = GaussianOracle(process, "eps")
    kwargs = dict(solver="rk4", steps=64, t_max=1.0, t_min=1e-4, grid="logsnr")
    x, _ = sampling.sample(net, process, "eps", x1, data_mean=MEAN, data_std=STD, **kwargs)
    c0 = prediction.coefs_at(process, torch.tensor(1e-4), x1)
    exact = c0.alpha * MEAN + torch.sqrt(c0.alpha**2 * STD**2 + c0.sigma**2) * x1
    assert (x - exact).abs().max().item() < 1e-4
    legacy, _ = sampling.sample(net, process, "eps", x1, data_mean=0.0, data_std=0.0, **kwargs)
    assert (legacy - exact).abs().max().item() > 5e-3  # the start N(0, sigma^2) of before


@pytest.mark.parametrize("solver", sorted(set(sampling.SOLVERS) - set(sampling.FEW_STEP_SOLVERS)))
def test_every_solver_samples_gaussian_data_batch_independently(solver):
    """Generic contract of every registered solver (a new entry is tested automatically): with
    the exact x0 predictor of Gaussian data it reproduces the data's mean and std, reports its
    NFE, and sample i is the same whatever the batch it is drawn in (per-sample seeding). The
    few_step jumps need a meanflow / consistency model: tests/test_objectives.py."""
    process = build_process("linear")
    net = GaussianOracle(process, "x0")
    singular_at_1 = sampling.singular_sampling_times(process, "x0", solver, [1.0], "sigma", 1.0)
    kwargs = dict(
        solver=solver,
        steps=24,
        t_max=process.default_t_max if singular_at_1 else 1.0,  # as main.resolve_time_ranges
        grid="edm" if solver in sampling.NOISE_LEVEL_SOLVERS else "uniform",
        t_min=1e-3,
        diffusion="sigma",
        denoise_final=True,
        data_mean=MEAN,
        data_std=STD,
    )
    x, nfe = sampling.generate(net, process, "x0", (2,), list(range(2000)), 7, 2000, **kwargs)
    assert nfe >= 24
    assert torch.allclose(x.mean(0), MEAN, atol=0.15), x.mean(0)
    assert torch.allclose(x.std(0), STD, rtol=0.1), x.std(0)
    small, _ = sampling.generate(net, process, "x0", (2,), [5, 9, 11], 7, 2, **kwargs)
    torch.testing.assert_close(small, x[[5, 9, 11]], rtol=1e-9, atol=1e-9)


class WavyLabelNet(torch.nn.Module):
    """A smooth, nonlinear velocity that depends on x, t and the label (null class 3: none)."""

    def forward(self, x, t, y=None):
        shift = torch.where(y == 3, torch.zeros_like(y), y + 1).to(x.dtype)
        return torch.tanh(1.7 * x + bcast(t, x)) * 2.0 - 0.4 * bcast(shift, x) * x


# Every solver-specific setting of sampling.SOLVER_SETTINGS, and a value other than BASE's.
BASE = dict(
    steps=4,
    t_max=0.999,
    t_min=1e-3,
    grid="uniform",
    diffusion="sigma",
    diffusion_scale=1.0,
    denoise_final=True,
    guidance_scale=2.0,
    guidance_interval=(0.0, 1.0),
    clip_x0="dynamic",
    clip_percentile=0.99,
    rtol=1e-5,
    atol=1e-5,
    s_churn=1.0,
    s_tmin=0.0,
    s_tmax=1e9,
    s_noise=1.0,
)
CHANGED = dict(
    grid="edm",
    diffusion="constant",
    diffusion_scale=2.0,
    denoise_final=False,
    guidance_interval=(0.5, 1.0),
    clip_x0="none",
    clip_percentile=0.9,
    rtol=1e-2,
    atol=1e-2,
    s_churn=0.5,
    s_tmin=0.5,  # the uniform grid's noise levels are 999, 2.98, 1, 0.33: drops the 0.33 churn
    s_tmax=1.0,  # drops the 2.98 churn (999 is never churned: above it the range ends)
    s_noise=1.5,
)


@pytest.mark.parametrize(
    "solver", [s for s in sampling.SOLVERS if s not in sampling.FEW_STEP_SOLVERS]
)
def test_unused_setting_is_exactly_the_settings_that_change_nothing(solver):
    """For each setting, the samples change with its value exactly when unused_setting says the
    solver reads it (with BASE's other values, under which every condition holds)."""
    x1 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    process = build_process("linear")
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def run(**settings):
        noise = sampling.PerSampleNoise(0, range(6))
        kwargs = dict(y=labels, num_classes=3, noise=noise)
        return sampling.sample(WavyLabelNet(), process, "velocity", x1, solver=solver, **kwargs,
                               **settings)[0]  # fmt: skip

    base = run(**BASE)
    assert torch.isfinite(base).all()
    settings = SimpleNamespace(**BASE, solver=solver)
    assert set(CHANGED) == set(sampling.SOLVER_SETTINGS) - {"consistency_levels"}
    for name, value in CHANGED.items():
        changes = not torch.equal(run(**{**BASE, name: value}), base)
        why = sampling.unused_setting(name, settings, "flow")
        assert changes == (why is None), (name, why)
        if why:
            assert why.startswith(f"sample.solver={solver} ignores it (used by: ")


def test_unused_setting_names_the_setting_that_decides():
    settings = lambda **kw: SimpleNamespace(**{**BASE, "solver": "edm_sde", **kw})
    cases = [
        ("s_noise", settings(s_churn=0.0), "sample.s_churn=0 (no churn, so no noise to bound"),
        ("s_tmax", settings(s_churn=0.0), "sample.s_churn=0 (no churn"),
        ("clip_percentile", settings(clip_x0="static"), "sample.clip_x0=static (the percentile"),
        ("guidance_interval", settings(guidance_scale=1.0), "sample.guidance_scale=1 (no gui"),
        ("consistency_levels", settings(), "sample.solver=edm_sde ignores it (used by: few_step)"),
        ("consistency_levels", settings(solver="few_step"), "train.objective=meanflow (the lev"),
        ("grid", settings(solver="few_step"), "sample.solver=few_step ignores it (used by: euler,"),
    ]
    for name, given, message in cases:
        assert sampling.unused_setting(name, given, "meanflow").startswith(message), name
    for name in ("steps", "solver", "seed", "s_churn", "s_tmin", "clip_percentile"):
        assert sampling.unused_setting(name, settings(clip_x0="dynamic"), "flow") is None
    assert sampling.unused_setting("consistency_levels", settings(solver="few_step"),
                                   "consistency") is None  # fmt: skip
