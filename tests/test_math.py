"""Processes, prediction conversions and time samplers against closed forms and autograd."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

import prediction
from processes import PROCESSES, Process, build_process
from time_samplers import TIME_SAMPLERS, build_time_sampler

TIMES = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_derivatives_match_autograd(name):
    process = build_process(name)
    t = TIMES.clone().requires_grad_(True)
    for value, derivative in (
        (process.alpha, process.alpha_dot),
        (process.sigma, process.sigma_dot),
    ):
        (grad,) = torch.autograd.grad((value(t) + 0 * t).sum(), t)  # + 0 t: constant alpha (ve)
        torch.testing.assert_close(derivative(t.detach()), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_endpoints_and_shapes(name):
    process = build_process(name)
    t = torch.tensor([0.0, 1.0])
    alpha, sigma = process.alpha(t), process.sigma(t)
    assert alpha[0].item() == pytest.approx(1.0) and sigma[0].item() == pytest.approx(0.0)
    assert sigma[1].item() == pytest.approx(80.0 if name == "ve" else 1.0, abs=1e-3)
    expected_alpha = 1.0 if name == "ve" else 0.0  # vp_linear: exp(-10.05 / 2) ~ 0.007
    assert alpha[1].item() == pytest.approx(expected_alpha, abs=1e-2)
    grid = torch.rand(3, 5)
    for c in process.coefficients(grid):
        assert c.shape == grid.shape


def test_specific_closed_forms():
    t = TIMES
    torch.testing.assert_close(build_process("linear").native_diffusion(t), t / (1 - t))
    vp = build_process("vp_linear")
    torch.testing.assert_close(vp.native_diffusion(t), 0.5 * (0.1 + t * 19.9))
    # The closed form equals the generic formula sigma sigma' - sigma^2 alpha' / alpha.
    torch.testing.assert_close(vp.native_diffusion(t), Process.native_diffusion(vp, t))
    for name in ("trig", "vp_linear", "vp_cosine"):  # variance preserving
        p = build_process(name)
        torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t))
    cosine = build_process("vp_cosine")
    s = 0.008
    expected = math.cos(math.pi / 2 * (0.5 + s) / (1 + s)) / math.cos(math.pi / 2 * s / (1 + s))
    assert cosine.alpha(torch.tensor(0.5)).item() == pytest.approx(expected)


def test_unknown_process_error():
    with pytest.raises(ValueError, match=r"process.name='nope' is unknown; valid choices: \["):
        build_process("nope")


def _pair(process, n=6):
    gen = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(n, 3, 4, generator=gen), torch.randn(n, 3, 4, generator=gen)
    t = torch.linspace(0.05, 0.95, n)
    x_t = process.interpolate(x0, x1, t)
    return x0, x1, x_t, prediction.coefs_at(process, t, x_t)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_every_type_round_trips(name):
    x0, x1, x_t, c = _pair(build_process(name))
    for kind in prediction.PREDICTION_TYPES:
        value = prediction.FROM_X0_EPS[kind](x0, x1, c)
        x0_hat, eps_hat = prediction.to_x0_eps(value, kind, x_t, c)
        torch.testing.assert_close(x0_hat, x0)
        torch.testing.assert_close(eps_hat, x1)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_every_conversion_pair(name):
    x0, x1, x_t, c = _pair(build_process(name))
    for src, dst in itertools.product(prediction.PREDICTION_TYPES, repeat=2):
        value = prediction.FROM_X0_EPS[src](x0, x1, c)
        converted = prediction.convert(value, src, dst, x_t, c)
        torch.testing.assert_close(converted, prediction.FROM_X0_EPS[dst](x0, x1, c))


def test_velocity_target_is_time_derivative():
    """The velocity target alpha' x0 + sigma' x1 is d/dt of x_t (finite differences)."""
    for name in sorted(PROCESSES):
        process = build_process(name)
        x0, x1 = torch.randn(5, 2), torch.randn(5, 2)
        t, h = torch.full((5,), 0.4), 1e-6
        numeric = (process.interpolate(x0, x1, t + h) - process.interpolate(x0, x1, t - h)) / (
            2 * h
        )
        torch.testing.assert_close(
            process.velocity_target(x0, x1, t), numeric, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_oracle_output_gives_zero_loss_for_every_pairing(name):
    x0, x1, x_t, c = _pair(build_process(name))
    for model_output, target in itertools.product(prediction.PREDICTION_TYPES, repeat=2):
        oracle = prediction.FROM_X0_EPS[model_output](x0, x1, c)
        pred, tgt = prediction.regression_pair(oracle, x0, x1, x_t, c, model_output, target)
        assert (pred - tgt).pow(2).mean().item() < 1e-20, (model_output, target)
        wrong = oracle + 0.1
        pred, tgt = prediction.regression_pair(wrong, x0, x1, x_t, c, model_output, target)
        assert (pred - tgt).abs().max().item() > 1e-5, (model_output, target)


def test_velocity_and_score_closed_form():
    process = build_process("trig")
    x0, x1, x_t, c = _pair(process)
    velocity, score = prediction.velocity_and_score(x1, "eps", x_t, c)
    torch.testing.assert_close(
        velocity, process.velocity_target(x0, x1, torch.linspace(0.05, 0.95, 6))
    )
    torch.testing.assert_close(score, -x1 / c.sigma)
    drift = prediction.reverse_sde_drift(velocity, score, 0.7)
    torch.testing.assert_close(drift, velocity - 0.7 * score)


def test_singular_times_found():
    linear = build_process("linear")
    assert prediction.singular_times(linear, "velocity", ["velocity"], [0.0, 1.0]) == []
    assert prediction.singular_times(linear, "eps", ["velocity"], [0.0, 0.5, 1.0]) == [1.0]
    assert prediction.singular_times(linear, "x0", ["velocity"], [0.0, 0.5, 1.0]) == [0.0]
    assert prediction.singular_times(linear, "velocity", ["score"], [0.0, 1.0]) == [0.0]
    vp = build_process("vp_cosine")
    assert prediction.singular_times(vp, "eps", ["eps"], [0.0, 1.0]) == [0.0]  # sigma_dot(0)


# ---------------------------------------------------------------------------------------------
# Time samplers.
# ---------------------------------------------------------------------------------------------
def test_uniform_range_and_ks():
    sampler = build_time_sampler("uniform", 0.1, 0.9)
    t = sampler(20_000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0.1 and t.max() <= 0.9
    assert stats.kstest(t.numpy(), stats.uniform(0.1, 0.8).cdf).pvalue > 1e-3


def test_logit_normal_matches_its_cdf():
    m, s = -0.5, 0.8
    sampler = build_time_sampler("logit_normal", 0.0, 1.0, mean=m, std=s)
    t = sampler(20_000, generator=torch.Generator().manual_seed(0)).double().numpy()
    cdf = lambda x: stats.norm.cdf((np.log(x) - np.log1p(-x) - m) / s)
    assert stats.kstest(t, cdf).pvalue > 1e-3
    assert stats.kstest(t, stats.uniform(0, 1).cdf).pvalue < 1e-6  # not uniform


def test_stratified_one_per_stratum_and_lower_variance():
    sampler = build_time_sampler("stratified", 0.0, 1.0)
    gen = torch.Generator().manual_seed(0)
    t = sampler(64, generator=gen)
    strata = torch.floor(t * 64).long().sort().values
    assert torch.equal(strata, torch.arange(64))
    uniform = build_time_sampler("uniform", 0.0, 1.0)
    means_s = torch.stack([sampler(64, generator=gen).mean() for _ in range(500)])
    means_u = torch.stack([uniform(64, generator=gen).mean() for _ in range(500)])
    assert means_s.var() < 0.1 * means_u.var()
    assert abs(means_s.mean().item() - 0.5) < 0.01


def test_time_sampler_errors():
    with pytest.raises(ValueError, match="valid choices"):
        build_time_sampler("beta")
    with pytest.raises(ValueError, match="t_min < t_max"):
        build_time_sampler("uniform", 0.5, 0.4)


@pytest.mark.parametrize("name", sorted(TIME_SAMPLERS))
def test_every_time_sampler_respects_its_range_and_seed(name):
    """Generic contract of every registered sampler (a new entry is tested automatically): n
    times in the default dtype inside [t_min, t_max], reproducible from the generator, and
    spread over the range (not a constant)."""
    process = build_process("linear")
    kwargs = {"inverse_noise_level": process.inverse_noise_level}  # only samplers taking it
    sampler = build_time_sampler(name, 0.2, 0.7, **kwargs)
    t = sampler(4096, generator=torch.Generator().manual_seed(3))
    assert t.shape == (4096,) and t.dtype == torch.get_default_dtype()
    assert t.min() >= 0.2 and t.max() <= 0.7
    again = sampler(4096, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, again)
    assert t.std() > 0.02 and len(torch.unique(t)) > 100


# ---------------------------------------------------------------------------------------------
# Issue 7, defects 1 and 3: exact endpoints, tolerant singularity checks, stable VP sigma.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["trig", "vp_cosine", "linear"])
def test_alpha_is_exactly_zero_at_one_and_sigma_at_zero(name):
    process = build_process(name)
    for dtype in (torch.float32, torch.float64):
        ends = torch.tensor([0.0, 1.0], dtype=dtype)
        assert process.alpha(ends).tolist() == [1.0, 0.0]
        assert process.sigma(ends).tolist() == [0.0, 1.0]


class CosineTrig(Process):
    """The old trig interpolant, alpha = cos(pi t / 2): alpha(1) = 6e-17, not 0."""

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def alpha_dot(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def sigma_dot(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


def test_singular_times_tolerate_tiny_coefficients():
    """An alpha of 6e-17 is a zero: eps -> velocity divides by it (1.6e16 times the error)."""
    for process in (build_process("trig"), build_process("vp_cosine"), CosineTrig()):
        assert prediction.singular_times(process, "eps", ["velocity"], [0.5, 1.0]) == [1.0]
        assert prediction.singular_times(process, "eps", ["x0"], [0.5, 1.0]) == [1.0]
        assert prediction.singular_times(process, "velocity", ["velocity"], [0.5, 1.0]) == []


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine"])
def test_vp_sigma_is_stable_in_float32_near_zero(name):
    """sqrt(1 - alpha^2) loses 1e-4..1e-2 of sigma to cancellation in float32 at t = 1e-3..1e-4;
    expm1 / trigonometric identities keep sigma and sigma_dot to a few ulps."""
    process = build_process(name)
    t64 = torch.tensor([1e-4, 3e-4, 1e-3, 1e-2, 0.5], dtype=torch.float64)
    t32 = t64.float()
    alpha, alpha_dot = process.alpha(t32.double()), process.alpha_dot(t32.double())
    sigma_ref = torch.sqrt(1 - alpha**2)  # float64 cancellation: relative error 1e-11 at 1e-4
    sigma_dot_ref = -alpha * alpha_dot / sigma_ref
    rel = lambda a, b: ((a.double() - b) / b).abs().max().item()
    assert rel(process.sigma(t32), sigma_ref) < 1e-6
    assert rel(process.sigma_dot(t32), sigma_dot_ref) < 1e-6
