"""What the network outputs, what the loss regresses, and the closed-form conversions between them.

With x_t = alpha x0 + sigma x1 (x1 the Gaussian base sample, estimated by eps_hat), every
prediction type is a function of (x_t, t) and the pair (x0_hat, eps_hat) (docs/design.md):

    x0       = x0_hat
    eps      = eps_hat
    score    = -eps_hat / sigma
    velocity = alpha_dot x0_hat + sigma_dot eps_hat
    v        = alpha eps_hat - sigma x0_hat

and each one determines (x0_hat, eps_hat) through the 2x2 linear system it forms with
x_t = alpha x0_hat + sigma eps_hat. So any (model output, loss target) pair works: the model
output is converted to the target's type before the MSE. Every conversion is affine in the model
output for fixed (x_t, t), so classifier-free guidance commutes with it.
"""

from typing import NamedTuple

import torch

from processes import bcast

PREDICTION_TYPES = ("velocity", "eps", "x0", "score", "v")


class Coefs(NamedTuple):
    """alpha, sigma, their time derivatives, and the latent-noise gamma, gamma_dot of a
    stochastic interpolant (zero otherwise), each broadcastable against x_t."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    alpha_dot: torch.Tensor
    sigma_dot: torch.Tensor
    gamma: torch.Tensor
    gamma_dot: torch.Tensor


def coefs_at(process, t, x):
    """The process's coefficients at times t (B,) (or a scalar), shaped to broadcast against x."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    values = (*process.coefficients(t), process.gamma(t), process.gamma_dot(t))
    return Coefs(*(bcast(c, x) for c in values))


# (x0_hat, eps_hat) from each prediction type. Each solves the 2x2 system
# [alpha sigma; row of the type] [x0; eps] = [x_t; out].
def _from_x0(out, x_t, c):
    return out, (x_t - c.alpha * out) / c.sigma


def _from_eps(out, x_t, c):
    return (x_t - c.sigma * out) / c.alpha, out


def _from_score(out, x_t, c):
    eps_hat = -c.sigma * out
    return (x_t - c.sigma * eps_hat) / c.alpha, eps_hat


def _from_velocity(out, x_t, c):
    det = c.alpha * c.sigma_dot - c.sigma * c.alpha_dot
    return (c.sigma_dot * x_t - c.sigma * out) / det, (c.alpha * out - c.alpha_dot * x_t) / det


def _from_v(out, x_t, c):
    det = c.alpha**2 + c.sigma**2
    return (c.alpha * x_t - c.sigma * out) / det, (c.sigma * x_t + c.alpha * out) / det


TO_X0_EPS = {
    "x0": _from_x0,
    "eps": _from_eps,
    "score": _from_score,
    "velocity": _from_velocity,
    "v": _from_v,
}

FROM_X0_EPS = {
    "x0": lambda x0, eps, c: x0,
    "eps": lambda x0, eps, c: eps,
    "score": lambda x0, eps, c: -eps / c.sigma,
    "velocity": lambda x0, eps, c: c.alpha_dot * x0 + c.sigma_dot * eps,
    "v": lambda x0, eps, c: c.alpha * eps - c.sigma * x0,
}


def to_x0_eps(out, kind, x_t, c):
    """(x0_hat, eps_hat) from a model output of type `kind`."""
    return TO_X0_EPS[kind](out, x_t, c)


def convert(out, src, dst, x_t, c):
    """Convert a prediction of type `src` into type `dst` (identity when they agree)."""
    if src == dst:
        return out
    x0_hat, eps_hat = to_x0_eps(out, src, x_t, c)
    return FROM_X0_EPS[dst](x0_hat, eps_hat, c)


def regression_pair(out, x0, x1, x_t, c, model_output, target, z=None):
    """(prediction, target) for the training loss: the model output converted to the target type,
    and the target computed from the true (x0, x1). For a stochastic interpolant (or another
    base) only velocity -> velocity is valid and the target gains gamma_dot z."""
    target_value = FROM_X0_EPS[target](x0, x1, c)
    if z is not None:
        target_value = target_value + c.gamma_dot * z
    return convert(out, model_output, target, x_t, c), target_value


def velocity_and_score(out, kind, x_t, c):
    """The probability-flow velocity and the score implied by a model output of type `kind`."""
    x0_hat, eps_hat = to_x0_eps(out, kind, x_t, c)
    velocity = FROM_X0_EPS["velocity"](x0_hat, eps_hat, c)
    return velocity, -eps_hat / c.sigma


def reverse_sde_drift(velocity, score, diffusion):
    """Drift of the reverse-time SDE, velocity - eps(t) * score, for diffusion coefficient eps(t).

    Integrated backwards as x <- x - h * drift + sqrt(2 eps(t) h) * noise (docs/design.md).
    """
    return velocity - diffusion * score


# ---------------------------------------------------------------------------------------------
# Preconditioning: how the network's input and output are scaled (Karras et al. 2022, Table 1).
# ---------------------------------------------------------------------------------------------
def _alpha_sigma(process, t, like):
    """alpha(t), sigma(t) in float64 for t a scalar or (B,) tensor, broadcastable to `like`."""
    t = torch.as_tensor(t, dtype=torch.float64, device=like.device)
    return bcast(process.alpha(t), like.double()), bcast(process.sigma(t), like.double())


class NoPreconditioning:
    """The network sees (x_t * input_scale(t), t) and its output is the model output itself."""

    output_type = None  # the configured prediction.model_output

    def __init__(self, process, sigma_data=0.5):
        self.process, self.sigma_data = process, sigma_data

    def inputs(self, x_t, t):
        """(network input, network time) for x_t (B, ...) at t (B,) or a scalar."""
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x_t.device)
        t_net = t64.expand(x_t.shape[0]) if t64.dim() == 0 else t64
        return x_t * bcast(self.process.input_scale(t64).to(x_t.dtype), x_t), t_net.to(x_t.dtype)

    def output(self, raw, x_t, t):
        return raw

    def singular(self, t):
        return False


class EDMPreconditioning(NoPreconditioning):
    """EDM's preconditioning for every process through its noise level s = sigma / alpha.

    x_t / alpha = x0 + s x1 =: x_hat is the VE (EDM) state at noise level s, and the model's x0
    estimate is the denoiser (Karras et al. 2022, Table 1, sigma_data = sd):
        D(x_hat; s) = c_skip(s) x_hat + c_out(s) F(c_in(s) x_hat, c_noise(s)),
        c_skip = sd^2 / (s^2 + sd^2),  c_out = s sd / sqrt(s^2 + sd^2),
        c_in = 1 / sqrt(s^2 + sd^2),   c_noise = log(s) / 4,
    with F the raw network, which receives c_noise in place of t. Written with x_t, alpha and
    sigma so that nothing divides by alpha (d^2 = sigma^2 + alpha^2 sd^2 is the variance of x_t
    for data of variance sd^2):
        c_in x_hat = x_t / d,  c_skip x_hat = sd^2 alpha x_t / d^2,  c_out = sigma sd / d.
    D is an x0 prediction (use prediction.model_output = x0); with the `edm` loss weight on an x0
    target the loss is |F - F_target|^2 (lambda c_out^2 = 1). c_noise is finite only for
    0 < s < inf, so t must avoid the ends where sigma = 0 or alpha = 0.
    """

    output_type = "x0"

    def coefficients(self, x_t, t):
        """(c_in, c_skip, c_out) acting on x_t, broadcastable against x_t, and c_noise (B,)."""
        alpha, sigma = _alpha_sigma(self.process, t, x_t)
        sd = self.sigma_data
        d2 = sigma**2 + alpha**2 * sd**2
        c_in, c_skip, c_out = d2.rsqrt(), sd**2 * alpha / d2, sigma * sd * d2.rsqrt()
        c_noise = (torch.log(sigma) - torch.log(alpha)).reshape(-1) / 4
        c_noise = c_noise.expand(x_t.shape[0]) if c_noise.numel() == 1 else c_noise
        cast = lambda v: v.to(x_t.dtype)
        return cast(c_in), cast(c_skip), cast(c_out), cast(c_noise)

    def inputs(self, x_t, t):
        c_in, _, _, c_noise = self.coefficients(x_t, t)
        return c_in * x_t, c_noise

    def output(self, raw, x_t, t):
        _, c_skip, c_out, _ = self.coefficients(x_t, t)
        return c_skip * x_t + c_out * raw

    def singular(self, t):
        """True where the noise level is 0, infinite or beyond [TINY, HUGE]."""
        s = self.process.noise_level(torch.as_tensor(float(t), dtype=torch.float64))
        return not bool(TINY < s < HUGE)


PRECONDITIONINGS = {"none": NoPreconditioning, "edm": EDMPreconditioning}


def build_preconditioning(name, process, sigma_data=0.5):
    """A PRECONDITIONINGS entry for `process` with the data standard deviation `sigma_data`."""
    if name not in PRECONDITIONINGS:
        choices = sorted(PRECONDITIONINGS)
        raise ValueError(
            f"prediction.preconditioning={name!r} is unknown; valid choices: {choices}"
        )
    return PRECONDITIONINGS[name](process, sigma_data)


# ---------------------------------------------------------------------------------------------
# Loss weights: a per-sample weight w(t) of the squared error in the target's space.
# ---------------------------------------------------------------------------------------------
def error_factor(target, c):
    """k_target with (target error) = k_target * (x0 error), for any prediction consistent with
    x_t (x_t = alpha x0_hat + sigma eps_hat = alpha x0 + sigma x1, gamma = 0), so that
    sigma e_eps = -alpha e_x0:
        x0: 1,  eps: -alpha / sigma,  score: alpha / sigma^2,
        velocity: alpha_dot - sigma_dot alpha / sigma,  v: -(alpha^2 + sigma^2) / sigma."""
    factors = {
        "x0": lambda: torch.ones_like(c.alpha),
        "eps": lambda: -c.alpha / c.sigma,
        "score": lambda: c.alpha / c.sigma**2,
        "velocity": lambda: c.alpha_dot - c.sigma_dot * c.alpha / c.sigma,
        "v": lambda: -(c.alpha**2 + c.sigma**2) / c.sigma,
    }
    return factors[target]()


# Each named weighting as a weight on the squared x0 error; loss_weight converts it to the target.
X0_WEIGHTS = {
    # EDM (Karras et al. 2022): lambda(s) = (s^2 + sd^2) / (s sd)^2, s = sigma / alpha.
    "edm": lambda c, sd, gamma: (c.sigma**2 + c.alpha**2 * sd**2) / (c.sigma * sd) ** 2,
    # Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma), SNR = alpha^2 / sigma^2; for eps targets
    # this is min(SNR, gamma) / SNR, for v targets of VP processes min(SNR, gamma) / (SNR + 1).
    "min_snr": lambda c, sd, gamma: torch.clamp((c.alpha / c.sigma) ** 2, max=gamma),
    # The velocity loss: |e_velocity|^2 = k_velocity^2 |e_x0|^2.
    "velocity": lambda c, sd, gamma: error_factor("velocity", c) ** 2,
}
LOSS_WEIGHTS = ("none", *X0_WEIGHTS)


def loss_weight(name, process, t, target, sigma_data=0.5, min_snr_gamma=5.0):
    """The per-sample weight (B,) of the squared `target` error at times t (B,), such that
    w |e_target|^2 = X0_WEIGHTS[name] |e_x0|^2 (`none`: 1): w = X0_WEIGHTS[name] / k_target^2
    with k_target from error_factor. Computed in float64, returned in t's dtype."""
    if name not in LOSS_WEIGHTS:
        raise ValueError(
            f"prediction.loss_weight={name!r} is unknown; valid choices: {LOSS_WEIGHTS}"
        )
    t = torch.as_tensor(t)
    if name == "none":
        return torch.ones_like(t)
    t64 = t.to(torch.float64)
    c = coefs_at(process, t64, t64)
    weight = X0_WEIGHTS[name](c, sigma_data, min_snr_gamma) / error_factor(target, c) ** 2
    return weight.to(t.dtype)


# Singularity checks: a coefficient below TINY in magnitude counts as zero (cos(pi / 2) = 6e-17 is
# a zero), and a converted value above HUGE (for inputs of order 1) counts as infinite.
TINY = 1e-9
HUGE = 1e9


def _is_usable(value):
    return bool(torch.isfinite(value).all()) and bool((value.abs() < HUGE).all())


def snapped_coefs(process, t, x):
    """coefs_at with every coefficient of magnitude below TINY set to exactly 0."""
    c = coefs_at(process, t, x)
    return Coefs(*(torch.where(v.abs() < TINY, torch.zeros_like(v), v) for v in c))


def singular_times(
    process,
    src,
    dsts,
    times,
    preconditioning="none",
    loss_weight_name="none",
    sigma_data=0.5,
    min_snr_gamma=5.0,
):
    """The times among `times` where converting `src` into any of `dsts` is singular.

    Used before any work starts to reject time ranges that touch an endpoint where the 2x2 system
    of a conversion is singular (e.g. x0 -> velocity at sigma = 0, eps -> x0 at alpha = 0). In
    float64, coefficients below TINY count as zero, and a time is singular when a coefficient, a
    conversion of order-1 inputs or the target computed from order-1 (x0, x1) is not finite or
    exceeds HUGE. With `preconditioning` (a PRECONDITIONINGS name) a time is also singular where
    its network input is (EDM: noise level 0 or infinite), and with `loss_weight_name` where the
    weight of a dst (as the loss target) is not finite or exceeds HUGE.
    """
    bad = []
    precond = build_preconditioning(preconditioning, process, sigma_data)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in times:
        t_batch = torch.full((4,), float(t), dtype=torch.float64)
        c = snapped_coefs(process, t_batch, x)
        usable = all(_is_usable(c_i) for c_i in c) and not precond.singular(t)
        for dst in dsts:
            usable = usable and _is_usable(convert(x, src, dst, x, c))
            usable = usable and _is_usable(FROM_X0_EPS[dst](x, x, c))
            if usable and loss_weight_name != "none":
                weight = loss_weight(
                    loss_weight_name, process, t_batch, dst, sigma_data, min_snr_gamma
                )
                usable = _is_usable(weight)
        if not usable:
            bad.append(float(t))
    return bad
