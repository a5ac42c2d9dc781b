"""The interpolant toolkit against ground truth: adaptive and SDE solvers, time grids, likelihood,
guidance interval, x0 clipping, stochastic interpolants, non-Gaussian bases, OT pairing."""

import itertools
import json
import math

import pytest
import torch
from helpers import run_main, tiny_config
from test_sampling import MEAN, STD, GaussianOracle, terminal_error

import main
import prediction
import sampling
import trainer as trainer_lib
import utils
from processes import GAMMAS, build_process
from trainer import minibatch_ot_permutation


@pytest.mark.usefixtures("float64")
def test_dopri5_meets_its_tolerance_and_counts_nfe():
    """The terminal error shrinks with the tolerance while the reported NFE grows."""
    process = build_process("trig")
    runs = [
        terminal_error(process, "eps", "dopri5", 4, 0.999, 0.0, rtol=tol, atol=tol)
        for tol in (1e-3, 1e-6, 1e-9)
    ]
    errors, nfes = [e for e, _ in runs], [n for _, n in runs]
    assert errors[0] < 5e-2 and errors[1] < 1e-4 and errors[2] < 1e-7, errors
    assert errors[2] < errors[1] < errors[0]
    assert 6 <= nfes[0] < nfes[1] < nfes[2], nfes


def test_dopri5_that_cannot_meet_its_tolerance_says_which_settings_to_change():
    """A tolerance float32 cannot reach stops after max_attempts with one line (a ValueError,
    which main prints as `error: ...`) naming sample.rtol / sample.atol, not a traceback."""
    field = lambda x, t: torch.cos(40 * x) * 50  # noqa: E731  (fast, oscillating)
    grid = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match=r"^dopri5: no progress after 50 attempted steps: loosen "):
        sampling.dopri5(field, torch.ones(4, 2), grid, rtol=1e-12, atol=1e-12, max_attempts=50)


@pytest.mark.parametrize("solver", ["heun_sde", "euler_maruyama"])
@pytest.mark.parametrize("diffusion", ["decreasing", "process"])
@pytest.mark.usefixtures("float64")
def test_sde_solvers_reproduce_mean_and_variance(solver, diffusion):
    process = build_process("trig")
    n = 20_000
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(n, 2, generator=gen)
    x, nfe = sampling.sample(
        GaussianOracle(process, "eps"),
        process,
        "eps",
        x1,
        solver=solver,
        steps=200,
        t_max=0.999,
        t_min=1e-3,
        diffusion=diffusion,
        denoise_final=True,
        noise=lambda x: torch.randn(x.shape, generator=gen),
    )
    assert nfe == 200 * sampling.NFE_PER_STEP[solver] + 1
    assert ((x.mean(0) - MEAN).abs() < 4 * STD / n**0.5 + 0.01).all(), x.mean(0)
    assert ((x.var(0) - STD**2).abs() < 4 * STD**2 * (2 / n) ** 0.5 + 0.03 * STD**2).all()


@pytest.mark.usefixtures("float64")
def test_heun_sde_without_noise_is_heun():
    """With eps = 0 the stochastic Heun step is Heun's ODE step (its drift corrector)."""
    process = build_process("trig")
    x1 = torch.randn(32, 2)
    kwargs = dict(steps=7, t_max=0.999, t_min=0.01)
    ode, _ = sampling.sample(
        GaussianOracle(process, "eps"), process, "eps", x1, solver="heun", **kwargs
    )
    sde, _ = sampling.sample(
        GaussianOracle(process, "eps"),
        process,
        "eps",
        x1,
        solver="heun_sde",
        diffusion="constant",
        diffusion_scale=0.0,
        **kwargs,
    )
    torch.testing.assert_close(sde, ode)


@pytest.mark.usefixtures("float64")
def test_time_grids():
    ve = build_process("ve")
    grid = sampling.edm_grid(18, 1.0, 0.002 / 80, ve)
    sigmas = 80 * grid
    i = torch.arange(19) / 18
    expected = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # EDM eq. 5
    torch.testing.assert_close(sigmas, expected, rtol=1e-9, atol=1e-12)
    trig = build_process("trig")
    grid = sampling.logsnr_grid(10, 0.99, 0.01, trig)
    lam = trig.log_snr(grid)
    torch.testing.assert_close(lam[1:] - lam[:-1], torch.full((10,), (lam[-1] - lam[0]) / 10))
    assert grid[0] == 0.99 and grid[-1] == 0.01 and (grid[1:] < grid[:-1]).all()
    assert sampling.grid_is_singular("logsnr", build_process("linear"), 1.0)
    assert sampling.grid_is_singular("edm", build_process("linear"), 1.0)
    assert not sampling.grid_is_singular("edm", ve, 1.0)


def gaussian_log_density(x):
    return (-0.5 * ((x - MEAN) / STD) ** 2 - torch.log(STD) - 0.5 * math.log(2 * math.pi)).sum(1)


@pytest.mark.parametrize(
    "name,kind,t_max", [("linear", "velocity", 1.0), ("vp_cosine", "eps", 0.999)]
)
@pytest.mark.usefixtures("float64")
def test_likelihood_exact_divergence_matches_closed_form(name, kind, t_max):
    process = build_process(name)
    x0 = MEAN + STD * torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    t_min = 0.0 if name == "linear" else 1e-4
    log_p, nfe = sampling.log_likelihood(
        GaussianOracle(process, kind),
        process,
        kind,
        x0,
        solver="rk4",
        steps=64,
        t_min=t_min,
        t_max=t_max,
        data_mean=MEAN,
        data_std=STD,
    )
    expected = gaussian_log_density(x0)
    assert (log_p - expected).abs().max().item() / 2 < 0.01  # nats per dimension
    assert nfe == 64 * 4


class Rotated(torch.nn.Module):
    """The field of R x for x ~ the oracle's data: f(x) = R g(R^T x), R a rotation (so the
    Jacobian is not diagonal and Hutchinson's estimate is not exact per probe)."""

    def __init__(self, inner, angle=0.6):
        super().__init__()
        c, s = math.cos(angle), math.sin(angle)
        self.inner, self.rotation = inner, torch.tensor([[c, -s], [s, c]])

    def forward(self, x, t, y=None):
        return self.inner(x @ self.rotation, t) @ self.rotation.T


@pytest.mark.usefixtures("float64")
def test_likelihood_hutchinson_within_standard_error():
    process = build_process("linear")
    oracle = Rotated(GaussianOracle(process, "velocity"))
    data = MEAN + STD * torch.randn(400, 2, generator=torch.Generator().manual_seed(1))
    x0 = data @ oracle.rotation.T
    expected = gaussian_log_density(data)  # rotations keep densities
    log_p, _ = sampling.log_likelihood(
        oracle,
        process,
        "velocity",
        x0,
        solver="rk4",
        steps=32,
        divergence="hutchinson",
        num_probes=1,
        seed=3,
    )
    error = log_p - expected
    stderr = error.std() / len(error) ** 0.5
    assert error.std() > 0.01  # a real estimator: it is noisy per sample
    assert abs(error.mean()) < 3 * stderr
    exact, _ = sampling.log_likelihood(oracle, process, "velocity", x0, solver="rk4", steps=32)
    assert (exact - expected).abs().max() / 2 < 0.01


def test_bits_per_dim_formula():
    # a uniform density on [-1, 1)^D has log p = -D log 2: exactly 8 bits per dimension
    assert sampling.bits_per_dim(torch.tensor(-10 * math.log(2)), 10).item() == pytest.approx(8.0)


class LabelNet(torch.nn.Module):
    def forward(self, x, t, y=None):
        value = torch.where(y == 3, torch.zeros_like(y), y + 1).to(x.dtype)
        return value.reshape(-1, 1).expand_as(x)


@pytest.mark.usefixtures("float64")
def test_guidance_interval():
    field = sampling.Field(
        LabelNet(),
        build_process("linear"),
        "velocity",
        y=torch.tensor([0, 1]),
        guidance_scale=3.0,
        num_classes=3,
        guidance_interval=(0.2, 0.6),
    )
    inside, outside = field.output(torch.zeros(2, 2), 0.4), field.output(torch.zeros(2, 2), 0.8)
    torch.testing.assert_close(inside[:, 0], torch.tensor([3.0, 6.0]))
    torch.testing.assert_close(outside[:, 0], torch.tensor([1.0, 2.0]))


@pytest.mark.usefixtures("float64")
def test_clipping():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.1]])
    torch.testing.assert_close(sampling.clip_static(x0), torch.tensor([[0.5, -1.0, 1.0, 0.1]]))
    s = torch.quantile(x0.abs(), 0.75, dim=1)
    expected = x0.clamp(-s.item(), s.item()) / s.item()
    torch.testing.assert_close(sampling.clip_dynamic(x0, 0.75), expected)
    small = torch.tensor([[0.5, -0.2]])  # s = max(1, quantile) = 1: unchanged
    torch.testing.assert_close(sampling.clip_dynamic(small, 0.9), small)
    # the clipped field: x0 estimate inside [-1, 1] and eps recomputed from x_t
    process = build_process("linear")
    field = sampling.Field(
        GaussianOracle(process, "x0", mean=torch.tensor([3.0, 3.0]), std=torch.tensor([0.1, 0.1])),
        process,
        "x0",
        clip_x0="static",
    )
    x = torch.randn(8, 2)
    assert field.x0(x, 0.5).abs().max() <= 1.0


@pytest.mark.parametrize("gamma", ["sqrt", "quadratic"])
@pytest.mark.usefixtures("float64")
def test_gamma_derivatives_and_interpolation(gamma):
    process = build_process("linear", gamma=gamma, gamma_scale=0.7)
    t = torch.linspace(0.05, 0.95, 19, requires_grad=True)
    (grad,) = torch.autograd.grad(process.gamma(t).sum(), t)
    torch.testing.assert_close(process.gamma_dot(t.detach()), grad)
    assert process.gamma(torch.tensor([0.0, 1.0])).abs().max() == 0
    x0, x1, z = torch.randn(3, 4, 2).unbind(0)
    tt = torch.full((4,), 0.3)
    expected = 0.7 * x0 + 0.3 * x1 + process.gamma(tt)[:, None] * z
    torch.testing.assert_close(process.interpolate(x0, x1, tt, z), expected)
    h = 1e-6
    numeric = (process.interpolate(x0, x1, tt + h, z) - process.interpolate(x0, x1, tt - h, z)) / (
        2 * h
    )
    torch.testing.assert_close(
        process.velocity_target(x0, x1, tt, z), numeric, rtol=1e-5, atol=1e-6
    )
    assert set(GAMMAS) == {"none", "sqrt", "quadratic"}


@pytest.mark.usefixtures("float64")
def test_learned_z_field_gives_velocity_and_score():
    process = build_process("linear", gamma="sqrt")

    class Halves(torch.nn.Module):
        def forward(self, x, t, y=None):
            return torch.cat([x * 2, torch.ones_like(x)], dim=1)

    field = sampling.Field(Halves(), process, "velocity", learn_z=True)
    x = torch.randn(5, 2)
    velocity, score = field.velocity_and_score(x, 0.5)
    torch.testing.assert_close(velocity, 2 * x)
    torch.testing.assert_close(score, -torch.ones_like(x) / math.sqrt(0.25))


@pytest.mark.usefixtures("float64")
def test_ot_pairing_is_optimal():
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    perm = minibatch_ot_permutation(x0, x1)
    cost = lambda p: ((x0 - x1[list(p)]) ** 2).sum().item()
    best = min(cost(p) for p in itertools.permutations(range(6)))
    assert cost(perm.tolist()) == pytest.approx(best)
    assert sorted(perm.tolist()) == list(range(6))


def test_invalid_combinations_fail_with_one_line():
    c = tiny_config(
        "moons",
        "/tmp/unused",
        process__base="gaussians8",
        prediction__model_output="eps",
        prediction__target="eps",
    )
    with pytest.raises(ValueError, match="process.base=gaussians8 trains velocity only"):
        main.check_config(c, 1)
    c = tiny_config(
        "moons",
        "/tmp/unused",
        process__base="gaussians8",
        sample__solver="euler_maruyama",
        sample__denoise_final=False,
        eval__nll_num=0,
    )
    with pytest.raises(ValueError, match="needs a score, which process.base=gaussians8"):
        main.check_config(c, 1)
    c = tiny_config("digits", "/tmp/unused", process__base="moons")
    with pytest.raises(ValueError, match="process.base=moons needs 2-D data"):
        main.check_config(c, 1)
    c = tiny_config("digits", "/tmp/unused", process__gamma="sqrt")
    with pytest.raises(ValueError, match="sample.denoise_final / sample.clip_x0 need an x0"):
        main.check_config(c, 1)
    c = tiny_config("checkerboard", "/tmp/unused", sample__grid="edm")
    main.check_config(c, 1)  # linear: t_max trimmed where sigma / alpha is infinite
    assert c.sample.t_max == 1 - 1e-3


def test_stochastic_interpolant_between_toy_sets_trains_and_samples_sde(tmp_path):
    config = tiny_config(
        "gaussians8_to_moons",
        tmp_path,
        train__steps=3,
        sample__solver="heun_sde",
        sample__diffusion="decreasing",
        train__ot_pairing=True,
    )
    trainer = main.train(config, {}, utils.DistInfo())
    assert trainer.learn_z and trainer.base_sampler is not None
    assert config.time_sampler.t_min == 1e-3 and config.time_sampler.t_max == 1 - 1e-3
    assert trainer.net.out[-1].out_features == 4  # velocity and z-denoiser
    x, _, nfe = trainer.generate(16)
    assert x.shape == (16, 2) and torch.isfinite(x).all() and nfe == 3 * 2
    x_again, _, _ = trainer.generate(16)
    torch.testing.assert_close(x, x_again)  # per-sample seeds, base included


def test_loss_includes_z_denoiser(tmp_path):
    """A net whose outputs are zero has loss E|target velocity|^2 + E|z|^2."""
    config = tiny_config("gaussians8_to_moons", tmp_path)
    trainer = main.build_trainer(config, utils.DistInfo())
    x0, y = next(trainer.loader)
    n = len(x0)
    t = torch.full((n,), 0.5, dtype=torch.float32)
    x1, z = torch.randn(n, 2, dtype=torch.float32), torch.randn(n, 2, dtype=torch.float32)
    loss = trainer.loss(x0, y, t, x1, z, torch.zeros(n, dtype=torch.bool))
    c = prediction.coefs_at(trainer.process, t, x0)
    target = -x0 + x1 + c.gamma_dot * z
    expected = target.pow(2).mean() + z.pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_eval_mode_points(tmp_path):
    config = tiny_config("checkerboard", tmp_path, train__steps=2)
    trainer = main.train(config, {}, utils.DistInfo())
    result = run_main(
        "--mode=eval",
        f"--ckpt={trainer.run_dir}",
        "--config.sample.num=256",
        "--config.eval.nll_num=64",
        "--config.sample.steps=4",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("sliced_wasserstein", "mmd", "nll_nats_per_dim", "nll_stderr", "sample_nfe"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["nll_divergence"] == "exact" and metrics["nll_num"] == 64
    assert metrics["step"] == 2


def test_eval_mode_images_reports_fd_and_bits_per_dim(tmp_path):
    config = tiny_config("digits", tmp_path, train__steps=2, data__root=str(tmp_path / "data"))
    trainer = main.train(config, {}, utils.DistInfo())
    result = run_main(
        "--mode=eval",
        f"--ckpt={trainer.run_dir}",
        "--config.sample.num=40",
        "--config.sample.steps=2",
        "--config.eval.nll_num=8",
        "--config.eval.nll_steps=2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["fd_classifier"] > 0 and math.isfinite(metrics["fd_classifier"])
    assert metrics["nll_divergence"] == "hutchinson"  # 64 dimensions: auto picks Hutchinson
    # bits/dim = (nats/dim + log 128) / log 2 for dequantised 8-bit pixels
    expected = (metrics["nll_nats_per_dim"] + math.log(128)) / math.log(2)
    assert metrics["bits_per_dim"] == pytest.approx(expected)
    assert (tmp_path / "data" / "classifiers").is_dir() and (
        tmp_path / "data" / "fid_stats"
    ).is_dir()


@pytest.mark.usefixtures("float64")
def test_likelihood_base_density_is_the_marginal_at_t_max():
    """Issue 7 defect 5: vp_linear has alpha(1) = 0.0066; the base density at t_max is the
    marginal N(alpha m, alpha^2 s^2 + sigma^2) of Gaussian data, so the likelihood is exact."""
    process = build_process("vp_linear")
    x0 = MEAN + STD * torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    t_min = 1e-4
    kwargs = dict(solver="rk4", steps=64, t_min=t_min, t_max=1.0)
    oracle = GaussianOracle(process, "eps")
    log_p, _ = sampling.log_likelihood(
        oracle, process, "eps", x0, data_mean=MEAN, data_std=STD, **kwargs
    )
    c = prediction.coefs_at(process, torch.tensor(t_min), x0)  # the density of x_{t_min}
    std = torch.sqrt(c.alpha**2 * STD**2 + c.sigma**2)
    expected = (
        -0.5 * ((x0 - c.alpha * MEAN) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    ).sum(1)
    assert (log_p - expected).abs().max().item() < 1e-3
    legacy, _ = sampling.log_likelihood(
        oracle, process, "eps", x0, data_mean=0.0, data_std=0.0, **kwargs
    )
    assert (legacy - expected).abs().max().item() > 1e-2  # the base N(0, sigma^2) of before


# ---------------------------------------------------------------------------------------------
# Issue 8 item 1: divergences batched through torch.func.
# ---------------------------------------------------------------------------------------------
def loop_exact_divergence(f, x, t):
    """The old exact divergence: one backward pass per dimension."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = f(x, t)
        flat = out.reshape(out.shape[0], -1)
        div = torch.zeros(x.shape[0], dtype=x.dtype)
        for i in range(flat.shape[1]):
            (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
            div = div + grad.reshape(grad.shape[0], -1)[:, i]
    return out.detach(), div


def loop_hutchinson(f, x, t, probes):
    """The old Hutchinson estimate: one backward pass per probe."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = f(x, t)
        total = sum(
            (torch.autograd.grad(out, x, p, retain_graph=True)[0] * p).reshape(len(x), -1).sum(1)
            for p in probes
        )
    return total / len(probes)


def test_batched_divergences_match_the_backward_loops():
    from unet import UNet

    torch.manual_seed(0)
    net = UNet(1, 4, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=())
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)  # the zero-initialised output layer
    field = sampling.Field(net, build_process("linear"), "velocity")
    x = torch.randn(3, 1, 4, 4)
    ref_out, ref_div = loop_exact_divergence(field.velocity, x, 0.4)
    assert ref_div.abs().min() > 1e-2  # a real Jacobian
    probes = torch.randint(0, 2, (4, *x.shape), generator=torch.Generator().manual_seed(1)) * 2.0
    probes = probes - 1
    ref_estimate = loop_hutchinson(field.velocity, x, 0.4, probes)
    for mode in sampling.JACOBIAN_MODES:
        with torch.no_grad():  # as in evaluation: the products need no outer grad mode
            out, div = sampling.exact_divergence(field.velocity, x, 0.4, mode, chunk_size=5)
            _, estimate = sampling.hutchinson_divergence(field.velocity, x, 0.4, probes, mode)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(div, ref_div, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(estimate, ref_estimate, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="mode='sideways' is unknown"):
        sampling.exact_divergence(field.velocity, x, 0.4, "sideways")
    assert sampling.default_jacobian_mode("cpu") == "loop"
    log_p, _ = sampling.log_likelihood(net, field.process, "velocity", x, steps=1)
    assert torch.isfinite(log_p).all()
    assert all(p.requires_grad for p in net.parameters())  # unfrozen after the likelihood


@pytest.mark.usefixtures("float64")
def test_exact_divergence_of_a_linear_field_is_the_trace():
    matrix = torch.randn(5, 5, generator=torch.Generator().manual_seed(2))
    x = torch.randn(7, 5)
    per_sample_t = torch.linspace(0.1, 0.7, 7)  # per-sample times (dopri5) are passed through
    f = lambda x, t: (x @ matrix.T) * torch.as_tensor(t)[..., None]
    out, div = sampling.exact_divergence(f, x, per_sample_t)
    torch.testing.assert_close(div, torch.trace(matrix) * per_sample_t)
    torch.testing.assert_close(out, f(x, per_sample_t))


def test_choose_divergence():
    assert sampling.choose_divergence("auto", 2) == "exact"
    assert sampling.choose_divergence("auto", 64) == "hutchinson"
    assert sampling.choose_divergence("exact", 3072) == "exact"
    assert sampling.choose_divergence("hutchinson", 2) == "hutchinson"


@pytest.mark.usefixtures("float64")
def test_likelihood_with_per_sample_dopri5_and_progress():
    process = build_process("linear")
    x0 = MEAN + STD * torch.randn(50, 2, generator=torch.Generator().manual_seed(4))
    seen = []
    log_p, nfe = sampling.log_likelihood(
        GaussianOracle(process, "velocity"),
        process,
        "velocity",
        x0,
        solver="dopri5",
        steps=3,
        rtol=1e-7,
        atol=1e-7,
        progress=lambda i, n: seen.append((i, n)),
    )
    assert (log_p - gaussian_log_density(x0)).abs().max() < 1e-4
    assert seen == [(1, 3), (2, 3), (3, 3)] and nfe > 8


class MeanFlowOracle(torch.nn.Module):
    """A MeanFlow net u(x, t, y, r) whose times arrive multiplied by `time_scale` and whose
    instantaneous velocity u(x, t, t) is the exact one of the oracle's Gaussian data (the
    likelihood reads only r = t)."""

    def __init__(self, process, time_scale):
        super().__init__()
        self.oracle, self.time_scale = GaussianOracle(process, "velocity"), time_scale

    def forward(self, x, t, y=None, r=None):
        assert r is not None and torch.equal(r, t)
        return self.oracle(x, t / self.time_scale, y)


@pytest.mark.usefixtures("float64")
def test_meanflow_likelihood_reads_the_instantaneous_velocity_at_training_times(tmp_path):
    """eval's NLL of a MeanFlow model integrates u(x, t, t) with the times scaled as in
    training (train.meanflow_time_scale): the closed-form Gaussian density. (It used to feed
    the raw t: 1.05 nats/dim instead of 0.77 on such data.)"""
    config = tiny_config("checkerboard", tmp_path, train__objective="meanflow")
    config = main.config_lib.set_values(
        config,
        {"model.time_inputs": 2, "sample.solver": "few_step", "eval.nll_steps": 64},
    )
    process = main.check_config(config, 1, evaluating=True)
    net = MeanFlowOracle(process, config.train.meanflow_time_scale)
    x0 = MEAN + STD * torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    metrics = trainer_lib.nll_metrics(
        net, process, config, (x0, torch.zeros(64)), utils.DistInfo(), 0, "points"
    )
    expected = -gaussian_log_density(x0).mean().item() / 2
    assert metrics["nll_nats_per_dim"] == pytest.approx(expected, abs=1e-3)
    assert metrics["nll_t_min"] == 0.0


def test_an_edm_model_s_likelihood_starts_where_its_velocity_is_defined(tmp_path):
    """EDM samples down to sigma = 0 (sample.t_min = 0), where the velocity of its x0 output is
    0 / 0: the likelihood's range starts at EDM's sigma_min instead (eval.nll_t_min unset), and
    an explicit eval.nll_t_min there is one line. The NLL is finite (it was NaN)."""
    config = tiny_config("edm_digits", tmp_path, eval__nll_steps=4)
    process = main.check_config(config, 1, evaluating=True)
    assert config.sample.t_min == 0.0 and config.eval.nll_t_min == process.default_t_min
    assert process.noise_level(torch.tensor(config.eval.nll_t_min)).item() == pytest.approx(0.002)
    data_info = {"shape": [1, 8, 8], "num_classes": 10, "kind": "image"}
    torch.manual_seed(0)
    net = main.build_net(config, data_info)
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.arange(4)
    metrics = trainer_lib.nll_metrics(net, process, config, (x0, y), utils.DistInfo(), 10, "image")
    assert math.isfinite(metrics["nll_nats_per_dim"]) and math.isfinite(metrics["bits_per_dim"])
    assert metrics["nll_t_min"] == process.default_t_min
    explicit = tiny_config("edm_digits", tmp_path, eval__nll_t_min=0.0)
    with pytest.raises(ValueError) as info:
        main.check_config(explicit, 1, evaluating=True)
    assert str(info.value).startswith(
        "the likelihood's ODE (x0 outputs of process 've') is singular at t=0 "
        "(eval.nll_t_min=0, eval.nll_t_max=1): move them inside (0, 1), or set eval.nll_num=0"
    )


def test_a_consistency_model_has_no_likelihood_and_says_so(tmp_path):
    config = tiny_config("digits_consistency", tmp_path, eval__nll_num=8)
    with pytest.raises(ValueError) as info:
        main.check_config(config, 1, evaluating=True)
    assert str(info.value) == (
        "eval.nll_num=8: a train.objective=consistency model defines no probability-flow "
        "velocity, hence no likelihood: set eval.nll_num=0"
    )
    main.check_config(tiny_config("digits_consistency", tmp_path), 1, evaluating=True)  # preset


@pytest.mark.usefixtures("float64")
def test_ve_likelihood_on_the_edm_grid_matches_the_closed_form():
    """VE's velocity is stiff near the data: on 32 uniform steps rk4's log-density of
    Gaussian data is off by more than 0.02 nats/dim, on the edm grid (eval.nll_grid, by default
    the sampler's) by less than 1e-3. The exact density of x_{t_min} = x0 + sigma(t_min) x1."""
    process = build_process("ve")
    x0 = MEAN + STD * torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    t_min = process.default_t_min
    sigma_min = process.sigma(torch.tensor(t_min, dtype=torch.float64))
    spread = torch.sqrt(STD**2 + sigma_min**2)
    exact = -0.5 * ((x0 - MEAN) / spread) ** 2 - torch.log(spread) - 0.5 * math.log(2 * math.pi)
    errors = {}
    for grid in ("uniform", "edm"):
        log_p, _ = sampling.log_likelihood(
            GaussianOracle(process, "x0"),
            process,
            "x0",
            x0,
            steps=32,
            t_min=t_min,
            grid=grid,
            data_mean=MEAN,
            data_std=STD,
        )
        errors[grid] = (log_p - exact.sum(1)).abs().mean().item() / 2
    assert errors["uniform"] > 0.02 and errors["edm"] < 1e-3, errors


def test_eval_of_diverged_samples_prints_strict_json_and_says_why(tmp_path):
    """An SDE whose noise overwhelms a step (diffusion_scale 1e4 on 10 steps) gives NaN
    samples: eval warns about them and prints the metrics as null in strict JSON (json's NaN
    token is not JSON; jq rejects it), with status 0."""
    trainer = main.train(tiny_config("moons", tmp_path, train__steps=1), {}, utils.DistInfo())
    result = run_main(
        "--mode=eval",
        f"--ckpt={trainer.run_dir}",
        "--config.eval.nll_num=0",
        "--config.sample.solver=euler_maruyama",
        "--config.sample.diffusion_scale=1e4",
        "--config.sample.steps=10",
        "--config.sample.num=64",
    )
    assert result.returncode == 0, result.stderr[-2000:]

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    metrics = json.loads(result.stdout.strip().splitlines()[-1], parse_constant=refuse)
    assert metrics["sliced_wasserstein"] is None and metrics["mmd"] is None
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings[0].startswith("warning: 64 of 64 samples hold NaN or inf")
    assert warnings[1].startswith("warning: sliced_wasserstein, mmd not finite (printed as null)")
