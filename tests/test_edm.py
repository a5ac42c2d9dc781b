"""EDM (Karras et al. 2022) generalised to every process through the noise level s = sigma / alpha:
preconditioning, loss weights, the log-normal noise-level sampler and the stochastic sampler,
against Table 1 / Algorithm 2 written out here and closed forms on Gaussian data.

For x0 ~ N(0, c^2 I) the exact denoiser of x_hat = x0 + s x1 is D(x_hat; s) = c^2 / (c^2 + s^2)
x_hat, and the marginal of x_hat at noise level s is N(0, (c^2 + s^2) I).
"""

import math

import pytest
import torch
from scipy import stats
from test_sampling import MEAN, STD, GaussianOracle

import prediction
import sampling
from processes import PROCESSES, build_process
from time_samplers import build_time_sampler

pytestmark = pytest.mark.usefixtures("float64")

SD = 0.5  # sigma_data


class Wiggle(torch.nn.Module):
    """A fixed nonlinear F(x, t) of both inputs, for checking how inputs and outputs are scaled."""

    def forward(self, x, t, y=None):
        return torch.sin(3 * x) + t.reshape(-1, *[1] * (x.dim() - 1)) * x**2


# ---------------------------------------------------------------------------------------------
# Preconditioning.
# ---------------------------------------------------------------------------------------------
def test_edm_coefficients_are_table_1_for_ve():
    ve = build_process("ve")
    precond = prediction.build_preconditioning("edm", ve, SD)
    s = torch.tensor([0.002, 0.1, 1.0, 20.0, 80.0])
    x = torch.ones(5, 3)
    c_in, c_skip, c_out, c_noise = precond.coefficients(x, s / 80)
    torch.testing.assert_close(c_in[:, 0], 1 / torch.sqrt(s**2 + SD**2))
    torch.testing.assert_close(c_skip[:, 0], SD**2 / (s**2 + SD**2))
    torch.testing.assert_close(c_out[:, 0], s * SD / torch.sqrt(s**2 + SD**2))
    torch.testing.assert_close(c_noise, torch.log(s) / 4)
    # the EDM loss weight on an x0 target undoes c_out: lambda c_out^2 = 1
    weight = prediction.loss_weight("edm", ve, s / 80, "x0", SD)
    torch.testing.assert_close(weight, (s**2 + SD**2) / (s * SD) ** 2)
    torch.testing.assert_close(weight * c_out[:, 0] ** 2, torch.ones(5))


@pytest.mark.parametrize("name", ["linear", "trig", "vp_linear", "vp_cosine"])
def test_edm_preconditioning_acts_on_the_scaled_state(name):
    """D(x_t) = c_skip(s) x_hat + c_out(s) F(c_in(s) x_hat, c_noise(s)) with x_hat = x_t / alpha."""
    process = build_process(name)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    x_t = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))
    field = sampling.Field(Wiggle(), process, "x0", preconditioning="edm", sigma_data=SD)
    alpha, sigma = process.alpha(t)[:, None, None], process.sigma(t)[:, None, None]
    s, x_hat = sigma / alpha, x_t / alpha
    c_in, c_skip = 1 / torch.sqrt(s**2 + SD**2), SD**2 / (s**2 + SD**2)
    c_out, c_noise = s * SD / torch.sqrt(s**2 + SD**2), torch.log(s.reshape(-1)) / 4
    expected = c_skip * x_hat + c_out * Wiggle()(c_in * x_hat, c_noise)
    torch.testing.assert_close(field.output(x_t, t), expected)
    torch.testing.assert_close(field.x0(x_t, t), expected)


@pytest.mark.parametrize("name", ["linear", "vp_cosine", "ve"])
def test_zero_network_is_the_exact_denoiser_when_sigma_data_is_the_data_std(name):
    """With sigma_data = c and a zero F, D = c^2 / (c^2 + s^2) x_hat: exact for N(0, c^2) data,
    so the preconditioned ODE sampler maps the base to the data exactly."""
    process, c = build_process(name), 0.7
    zero = lambda x, t, y=None: torch.zeros_like(x)
    field = sampling.Field(zero, process, "x0", preconditioning="edm", sigma_data=c)
    t = torch.tensor(0.4)
    x_t = torch.randn(6, 2)
    s, alpha = process.noise_level(t), process.alpha(t)
    torch.testing.assert_close(field.x0(x_t, t), c**2 / (c**2 + s**2) * x_t / alpha)
    t_max, t_min = process.default_t_max, process.default_t_min  # s is 0 or infinite beyond
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    x, _ = sampling.sample(
        zero,
        process,
        "x0",
        x1,
        solver="rk4",
        steps=40,
        t_max=t_max,
        t_min=t_min,
        grid="edm",
        preconditioning="edm",
        sigma_data=c,
        data_std=c,
    )
    end = torch.tensor(t_min)  # the exact flow keeps x1 as the standardised state
    exact = torch.sqrt(process.alpha(end) ** 2 * c**2 + process.sigma(end) ** 2) * x1
    torch.testing.assert_close(x, exact, rtol=0, atol=1e-4)


def test_edm_preconditioning_needs_x0_and_rejects_infinite_levels():
    linear = build_process("linear")
    with pytest.raises(ValueError, match="preconditioning=edm needs prediction.model_output=x0"):
        sampling.Field(Wiggle(), linear, "velocity", preconditioning="edm")
    with pytest.raises(ValueError, match=r"preconditioning='nope' is unknown; valid choices"):
        prediction.build_preconditioning("nope", linear)
    # c_noise = log(s) / 4 is infinite at s = 0 (t = 0) and s = inf (t = 1)
    bad = prediction.singular_times(linear, "x0", ["x0"], [0.0, 0.5, 1.0], "edm")
    assert bad == [0.0, 1.0]
    assert prediction.singular_times(linear, "x0", ["x0"], [0.0, 0.5, 1.0]) == []


# ---------------------------------------------------------------------------------------------
# Loss weights.
# ---------------------------------------------------------------------------------------------
def _batch(process, n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(n, 3, generator=gen), torch.randn(n, 3, generator=gen)
    t = torch.linspace(0.05, 0.95, n)
    x_t = process.interpolate(x0, x1, t)
    return x0, x1, t, x_t, prediction.coefs_at(process, t, x_t)


@pytest.mark.parametrize("name", ["linear", "trig", "vp_linear", "vp_cosine", "ve"])
@pytest.mark.parametrize("target", ["x0", "eps", "v", "score"])
@pytest.mark.parametrize("model_output", ["x0", "velocity"])
def test_velocity_weight_makes_any_loss_the_velocity_loss(name, target, model_output):
    process = build_process(name)
    x0, x1, t, x_t, c = _batch(process)
    out = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5))  # a bad model
    pred, truth = prediction.regression_pair(out, x0, x1, x_t, c, model_output, target)
    weight = prediction.loss_weight("velocity", process, t, target)
    weighted = weight * (pred - truth).pow(2).sum(1)
    v_pred, v_truth = prediction.regression_pair(out, x0, x1, x_t, c, model_output, "velocity")
    torch.testing.assert_close(weighted, (v_pred - v_truth).pow(2).sum(1))
    assert (weighted > 0).all()


@pytest.mark.parametrize("name", ["linear", "vp_cosine", "ve"])
def test_weights_convert_between_targets(name):
    """Each weighting means the same loss whatever the target: w_T |e_T|^2 = w_x0 |e_x0|^2."""
    process = build_process(name)
    x0, x1, t, x_t, c = _batch(process, seed=1)
    out = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(6))
    for weighting in ("edm", "min_snr", "velocity"):
        losses = []
        for target in ("x0", "eps", "v", "velocity", "score"):
            pred, truth = prediction.regression_pair(out, x0, x1, x_t, c, "eps", target)
            weight = prediction.loss_weight(weighting, process, t, target, 0.5, 5.0)
            losses.append(weight * (pred - truth).pow(2).sum(1))
        for loss in losses[1:]:
            torch.testing.assert_close(loss, losses[0])


def test_min_snr_weights_are_hang_et_al():
    """Hang et al. 2023: min(SNR, gamma) for x0, min(SNR, gamma) / SNR for eps and
    min(SNR, gamma) / (SNR + 1) for v (variance-preserving process)."""
    process = build_process("vp_cosine")
    t = torch.linspace(0.02, 0.98, 25)
    snr = (process.alpha(t) / process.sigma(t)) ** 2
    clipped = torch.clamp(snr, max=5.0)
    weight = lambda target: prediction.loss_weight("min_snr", process, t, target, 0.5, 5.0)
    torch.testing.assert_close(weight("x0"), clipped)
    torch.testing.assert_close(weight("eps"), clipped / snr)
    torch.testing.assert_close(weight("v"), clipped / (snr + 1))
    assert (snr > 5).any() and (snr < 5).any()  # both branches of the min are exercised
    torch.testing.assert_close(prediction.loss_weight("none", process, t, "eps"), torch.ones(25))
    with pytest.raises(ValueError, match=r"prediction.loss_weight='nope' is unknown"):
        prediction.loss_weight("nope", process, t, "eps")


def test_loss_weight_singular_ends_are_found():
    """The edm weight on x0 targets is infinite at s = 0; min_snr on eps targets is 0 / 0 at
    alpha = 0 for linear (SNR = 0)."""
    linear = build_process("linear")
    find = lambda weight, dst: prediction.singular_times(
        linear, "x0", [dst], [0.0, 0.5], loss_weight_name=weight
    )
    assert find("edm", "x0") == [0.0]
    assert find("none", "x0") == []
    bad = prediction.singular_times(linear, "eps", ["eps"], [0.5, 1.0], loss_weight_name="min_snr")
    assert bad == [1.0]


# ---------------------------------------------------------------------------------------------
# Noise levels and the log-normal time sampler.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_inverse_noise_level_round_trips(name):
    process = build_process(name)
    t = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(process.inverse_noise_level(process.noise_level(t)), t)
    # the generic bisection agrees with the closed form
    generic = type(process).__mro__[-2].inverse_noise_level  # Process.inverse_noise_level
    torch.testing.assert_close(generic(process, process.noise_level(t)), t)


@pytest.mark.parametrize("name", ["ve", "vp_cosine"])
def test_edm_lognormal_has_lognormal_noise_levels(name):
    process = build_process(name)
    t_min, t_max = (0.002 / 80, 1.0) if name == "ve" else (1e-3, 0.999)
    sampler = build_time_sampler(
        "edm_lognormal",
        t_min,
        t_max,
        p_mean=-1.2,
        p_std=1.2,
        mean=0.3,  # logit_normal's keywords are ignored
        inverse_noise_level=process.inverse_noise_level,
    )
    t = sampler(20_000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= t_min and t.max() <= t_max
    log_s = torch.log(process.noise_level(t)).numpy()
    lo, hi = (math.log(float(process.noise_level(torch.tensor(v)))) for v in (t_min, t_max))
    inside = (log_s > lo + 1e-9) & (log_s < hi - 1e-9)
    normal = stats.norm(-1.2, 1.2)
    truncated = lambda x: (normal.cdf(x) - normal.cdf(lo)) / (normal.cdf(hi) - normal.cdf(lo))
    assert stats.kstest(log_s[inside], truncated).pvalue > 1e-3
    clamped = 1 - inside.mean()  # the mass outside [lo, hi] lands on the ends
    expected = normal.cdf(lo) + normal.sf(hi)
    assert abs(clamped - expected) < 4 * math.sqrt(expected / 20_000) + 1e-3
    with pytest.raises(ValueError, match="edm_lognormal needs inverse_noise_level"):
        build_time_sampler("edm_lognormal", 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# The stochastic sampler (Algorithm 2).
# ---------------------------------------------------------------------------------------------
def reference_edm_sampler(denoiser, x, sigmas, noise, s_churn, s_tmin, s_tmax, s_noise):
    """Algorithm 2 of Karras et al. 2022 in sigma space (as k-diffusion's sample_heun), with
    x starting at sigmas[0] * z; noise(x) is drawn only when the step churns."""
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (gamma + 1)
        if gamma > 0:
            x = x + noise(x) * s_noise * (s_hat**2 - s**2) ** 0.5
        d = (x - denoiser(x, s_hat)) / s_hat
        if s_next == 0:
            x = x + d * (s_next - s_hat)
        else:
            x_2 = x + d * (s_next - s_hat)
            d_2 = (x_2 - denoiser(x_2, s_next)) / s_next
            x = x + (d + d_2) / 2 * (s_next - s_hat)
    return x


def _seeded_noise(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=gen)


C = 0.8  # data std of the N(0, C^2) data in the comparisons below
ZERO_MEAN = torch.zeros(2)


@pytest.mark.parametrize("name,t_max", [("ve", 1.0), ("linear", 80 / 81), ("vp_cosine", None)])
def test_edm_sde_matches_algorithm_2(name, t_max):
    """Same noise, same noise levels: every process gives the reference's samples (x_hat
    dynamics do not depend on the process; alpha(t_min = 0) = 1)."""
    process = build_process(name)
    if t_max is None:  # s(t_max) = 80
        t_max = float(process.inverse_noise_level(torch.tensor(80.0)))
    x1 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    churn = dict(s_churn=30.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    oracle = GaussianOracle(process, "x0", mean=ZERO_MEAN, std=torch.full((2,), C))
    x, nfe = sampling.sample(
        oracle,
        process,
        "x0",
        x1,
        solver="edm_sde",
        steps=18,
        t_max=t_max,
        t_min=0.0,
        grid="edm",
        data_std=0.0,  # start at sigma(t_max) x1, as k-diffusion does
        noise=_seeded_noise(7),
        **churn,
    )
    assert nfe == 2 * 18 - 1
    sigmas = torch.tensor(
        [(80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(18)]
        + [0.0]
    )
    denoiser = lambda x, s: C**2 / (C**2 + s**2) * x
    expected = reference_edm_sampler(denoiser, 80 * x1, sigmas, _seeded_noise(7), **churn)
    alpha_max = float(process.alpha(torch.tensor(t_max)))
    # (the process starts at sigma(t_max) x1 = 80 alpha(t_max) x1, i.e. x_hat = 80 x1)
    torch.testing.assert_close(x, expected, rtol=1e-7, atol=1e-7)
    assert alpha_max > 0


def edm_sde_moments(process, steps, t_max, s_churn):
    """The exact per-dimension mean and variance of edm_sde's samples on N(MEAN, STD^2) data.

    With the exact (affine) denoiser the sample is affine in the base draw x1 and the churn
    noises z_k: x = m + A x1 + sum_k B_k z_k, so one run on a batch of unit inputs gives
    mean m and variance A^2 + sum_k B_k^2 without Monte Carlo error. Row 0 has x1 = 0 and no
    noise, row 1 has x1 = 1, row 2 + k has only the k-th noise draw equal to 1."""
    rows = steps + 2
    x1 = torch.zeros(rows, 2)
    x1[1] = 1.0
    calls = []

    def unit_noise(x):
        z = torch.zeros_like(x)
        z[2 + len(calls)] = 1.0
        calls.append(1)
        return z

    x, _ = sampling.sample(
        GaussianOracle(process, "x0"),
        process,
        "x0",
        x1,
        solver="edm_sde",
        steps=steps,
        t_max=t_max,
        t_min=0.0,
        grid="edm",
        data_mean=MEAN,
        data_std=STD,
        noise=unit_noise,
        s_churn=s_churn,
    )
    assert len(calls) > steps // 2  # the churn is on for most steps
    mean, coefficients = x[0], x[1:] - x[0]
    return mean, coefficients.pow(2).sum(0)


@pytest.mark.parametrize("name", ["linear", "vp_cosine"])
def test_edm_sde_marginals_converge_to_the_data(name):
    """With ImageNet's S_churn = 40 the samples' mean is exact and their variance converges to
    STD^2 as the steps grow (10 %, 4 %, 1.5 %, 0.4 % off at 32, 64, 128, 256 steps)."""
    process = build_process(name)
    t_max = float(process.inverse_noise_level(torch.tensor(80.0)))  # EDM's sigma_max
    errors = []
    for steps in (32, 64, 128, 256):
        mean, var = edm_sde_moments(process, steps, t_max, s_churn=40.0)
        torch.testing.assert_close(mean, MEAN, rtol=0, atol=1e-6)
        errors.append((var / STD**2 - 1).abs().max().item())
    assert errors[-1] < 0.006, errors
    assert all(errors[i] / errors[i + 1] > 2 for i in range(3)), errors


def test_edm_sde_needs_finite_noise_levels():
    linear = build_process("linear")
    kwargs = dict(diffusion="process", scale=1.0, grid="uniform")
    assert sampling.singular_sampling_times(linear, "x0", "edm_sde", [0.5, 1.0], **kwargs) == [1.0]
    message = sampling.check_sampling_range(linear, "x0", "edm_sde", 0.0, 1.0, steps=4, **kwargs)
    assert "singular at t=1" in message


def test_edm_recipe_samples_down_to_sigma_zero():
    """EDM's sampler with EDM's preconditioning on ve reaches s = 0 (its last step evaluates
    nothing there, so t_min = 0 is allowed) on Karras's grid: 2 * 18 - 1 NFE."""
    ve = build_process("ve")
    kwargs = dict(diffusion="process", scale=1.0, grid="edm", preconditioning="edm")
    assert sampling.singular_sampling_times(ve, "x0", "edm_sde", [0.0, 0.5, 1.0], **kwargs) == []
    assert sampling.singular_sampling_times(ve, "x0", "heun", [0.0, 0.5], **kwargs) == [0.0]
    need_x0 = dict(kwargs, need_x0=True)  # a final denoising step would evaluate at s = 0
    assert sampling.singular_sampling_times(ve, "x0", "edm_sde", [0.0], **need_x0) == [0.0]
    zero = lambda x, t, y=None: torch.zeros_like(x)
    x1 = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    x, nfe = sampling.sample(
        zero,
        ve,
        "x0",
        x1,
        solver="edm_sde",
        steps=18,
        t_max=1.0,
        t_min=0.0,
        grid="edm",
        preconditioning="edm",
        sigma_data=C,
        data_std=C,
    )
    assert nfe == 35
    torch.testing.assert_close(x, C * x1, rtol=0.06, atol=1e-3)  # Heun at 18 steps: 5 %
