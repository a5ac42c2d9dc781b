"""Interpolants: x_t = alpha(t) * x0 + sigma(t) * x1 + gamma(t) * z, with t in [0, 1].

Conventions (see docs/design.md): x0 is data, x1 is the base sample (standard Gaussian unless the
config names another base), z ~ N(0, I) is the latent of a stochastic interpolant, t = 0 is data
and t = 1 is base. Every process gives alpha, sigma and their time derivatives alpha_dot,
sigma_dot, vectorised over a tensor t of any shape (the result has the shape of t); gamma and
gamma_dot come from a GAMMAS entry (zero by default).

Adding a process is one class and one entry in PROCESSES; a gamma, one entry in GAMMAS.
"""

import math

import torch


class Process:
    """Base class. Subclasses define alpha, sigma, alpha_dot and sigma_dot.

    `gamma` is the latent-noise schedule of a stochastic interpolant (a GAMMAS entry; NoGamma
    gives the deterministic interpolant x_t = alpha x0 + sigma x1).
    """

    name = "base"
    gamma_schedule = None  # set by build_process; None means gamma = 0
    # The ends of the time range used where t = 0 or t = 1 is singular for a prediction pairing,
    # a sampler or a grid (main.resolve_time_ranges): 1e-3 from the end by default.
    default_t_min = 1e-3
    default_t_max = 1.0 - 1e-3

    @property
    def stochastic(self):
        """True when gamma(t) z is part of x_t."""
        return self.gamma_schedule is not None

    def gamma(self, t):
        return torch.zeros_like(t) if self.gamma_schedule is None else self.gamma_schedule(t)

    def gamma_dot(self, t):
        if self.gamma_schedule is None:
            return torch.zeros_like(t)
        return self.gamma_schedule.derivative(t)

    def input_scale(self, t):
        """Factor applied to x_t before the network (1 here; VE shrinks its large inputs)."""
        return torch.ones_like(t)

    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def alpha_dot(self, t):
        raise NotImplementedError

    def sigma_dot(self, t):
        raise NotImplementedError

    def coefficients(self, t):
        """(alpha, sigma, alpha_dot, sigma_dot) at t, each shaped like t."""
        return self.alpha(t), self.sigma(t), self.alpha_dot(t), self.sigma_dot(t)

    def interpolate(self, x0, x1, t, z=None):
        """x_t = alpha(t) x0 + sigma(t) x1 (+ gamma(t) z) for t (B,) and x0, x1, z (B, ...)."""
        x_t = bcast(self.alpha(t), x0) * x0 + bcast(self.sigma(t), x1) * x1
        if z is not None and self.stochastic:
            x_t = x_t + bcast(self.gamma(t), z) * z
        return x_t

    def velocity_target(self, x0, x1, t, z=None):
        """d/dt x_t = alpha_dot(t) x0 + sigma_dot(t) x1 (+ gamma_dot(t) z)."""
        target = bcast(self.alpha_dot(t), x0) * x0 + bcast(self.sigma_dot(t), x1) * x1
        if z is not None and self.stochastic:
            target = target + bcast(self.gamma_dot(t), z) * z
        return target

    def native_diffusion(self, t):
        """The diffusion coefficient eps(t) of the process's own forward SDE.

        The forward SDE dx = f(t) x dt + g(t) dW with the same marginals as x_t has
        f = alpha_dot / alpha and g^2 = 2 sigma^2 d/dt log(sigma / alpha), and the reverse-time
        SDE of docs/design.md uses
        eps(t) = g(t)^2 / 2 = sigma * sigma_dot - sigma^2 * alpha_dot / alpha.
        For a VP process this is beta(t) / 2; for `linear` it is t / (1 - t).
        """
        alpha, sigma, alpha_dot, sigma_dot = self.coefficients(t)
        return sigma * sigma_dot - sigma**2 * alpha_dot / alpha

    def log_snr(self, t):
        """log(alpha^2 / sigma^2), decreasing in t."""
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def noise_level(self, t):
        """EDM's noise level s = sigma / alpha (increasing in t): x_t / alpha = x0 + s x1."""
        return self.sigma(t) / self.alpha(t)

    def inverse_noise_level(self, s):
        """The time t in [0, 1] with sigma(t) / alpha(t) = s (by bisection; subclasses with a
        closed form override it). Levels beyond the range of the process map to 0 or 1."""
        s = torch.as_tensor(s, dtype=torch.float64)
        lo, hi = torch.zeros_like(s), torch.ones_like(s)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            below = self.noise_level(mid) < s
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)


def bcast(coef, x):
    """Reshape a per-sample coefficient (B,) (or a scalar) to broadcast against x (B, ...)."""
    coef = torch.as_tensor(coef, dtype=x.dtype, device=x.device)
    if coef.dim() == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (x.dim() - 1)))


class Linear(Process):
    """Rectified flow / linear interpolant: alpha = 1 - t, sigma = t.

    alpha_dot = -1, sigma_dot = 1, so the velocity is x1 - x0.
    """

    name = "linear"

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def alpha_dot(self, t):
        return -torch.ones_like(t)

    def sigma_dot(self, t):
        return torch.ones_like(t)

    def inverse_noise_level(self, s):
        """s = t / (1 - t), so t = s / (1 + s)."""
        s = torch.as_tensor(s, dtype=torch.float64)
        return torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s))


class Trig(Process):
    """Trigonometric interpolant: alpha = cos(pi t / 2), sigma = sin(pi t / 2).

    Written alpha = sin(pi (1 - t) / 2) so that alpha(1) = 0 exactly (cos(pi / 2) is 6e-17 in
    floating point, and an eps output would divide by it). alpha_dot = -(pi / 2) cos(pi (1 - t)
    / 2), sigma_dot = (pi / 2) cos(pi t / 2); alpha^2 + sigma^2 = 1; the noise
    level is s = tan(pi t / 2).
    """

    name = "trig"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * (1 - t))

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def alpha_dot(self, t):
        return -0.5 * math.pi * torch.cos(0.5 * math.pi * (1 - t))

    def sigma_dot(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def inverse_noise_level(self, s):
        """t = (2 / pi) atan(s)."""
        return torch.atan(torch.as_tensor(s, dtype=torch.float64)) * (2 / math.pi)


class VPProcess(Process):
    """Variance preserving: alpha^2 + sigma^2 = 1, so sigma_dot = -alpha alpha_dot / sigma.

    Subclasses give alpha, alpha_dot and a sigma free of the cancellation in sqrt(1 - alpha^2)
    (which loses 1e-4..1e-2 of sigma in float32 at t = 1e-3..1e-4). sigma_dot is singular at
    t = 0 (sigma = 0); the time range [t_min, t_max] keeps training and sampling away from it.
    """

    def sigma_dot(self, t):
        return -self.alpha(t) * self.alpha_dot(t) / self.sigma(t)


class VPLinear(VPProcess):
    """DDPM / score-SDE VP with a linear beta schedule beta(t) = b0 + t (b1 - b0).

    alpha = exp(-B(t) / 2) with B(t) = b0 t + (b1 - b0) t^2 / 2, alpha_dot = -beta(t) alpha / 2,
    sigma = sqrt(1 - exp(-B)) = sqrt(-expm1(-B)) (stable near t = 0),
    sigma_dot = beta exp(-B) / (2 sigma). Defaults b0 = 0.1, b1 = 20 (Song et al. 2021).
    alpha(1) = exp(-10.05 / 2) = 0.0066 is not 0: samplers and the likelihood account for it
    (sampling.prior_moments).
    """

    name = "vp_linear"

    def __init__(self, beta_min=0.1, beta_max=20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral(self, t):
        """B(t) = int_0^t beta = b0 t + (b1 - b0) t^2 / 2."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha(self, t):
        return torch.exp(-0.5 * self.integral(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self.integral(t)))

    def alpha_dot(self, t):
        return -0.5 * self.beta(t) * self.alpha(t)

    def sigma_dot(self, t):
        return 0.5 * self.beta(t) * torch.exp(-self.integral(t)) / self.sigma(t)

    def native_diffusion(self, t):
        """eps(t) = beta(t) / 2 in closed form (equal to the generic formula)."""
        return 0.5 * self.beta(t)

    def inverse_noise_level(self, s):
        """s^2 = exp(B) - 1, so B = log(1 + s^2) and t solves b0 t + (b1 - b0) t^2 / 2 = B."""
        s = torch.as_tensor(s, dtype=torch.float64)
        big_b, slope = torch.log1p(s**2), self.beta_max - self.beta_min
        if slope == 0:
            return big_b / self.beta_min
        # the positive root, written to avoid cancellation for small B
        return 2 * big_b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * slope * big_b))


class VPCosine(VPProcess):
    """Improved-DDPM cosine schedule: alpha = cos(a(t)) / cos(a(0)), a(t) = pi/2 (t + s) / (1 + s).

    With u = pi / (2 (1 + s)) and n = cos(a(0)) = cos(u s) (s = 0.008, Nichol & Dhariwal 2021):
        alpha     = sin(u (1 - t)) / n                      (= cos(a(t)) / n, exactly 0 at t = 1)
        alpha_dot = -u cos(u (1 - t)) / n
        sigma     = sqrt(sin(u t) sin(u (t + 2 s))) / n     (= sqrt(1 - alpha^2), exactly 0 at 0,
                                                             from cos^2 x - cos^2 y =
                                                             sin(y - x) sin(y + x))
        sigma_dot = u sin(2 u (t + s)) / (2 n^2 sigma)      (= -alpha alpha_dot / sigma)
    """

    name = "vp_cosine"

    def __init__(self, s=0.008):
        self.s = s
        self.u = 0.5 * math.pi / (1 + s)
        self.norm = math.cos(self.u * s)

    def alpha(self, t):
        return (torch.sin(self.u * (1 - t)) / self.norm).clamp(0, 1)

    def alpha_dot(self, t):
        return -self.u * torch.cos(self.u * (1 - t)) / self.norm

    def sigma(self, t):
        product = torch.sin(self.u * t) * torch.sin(self.u * (t + 2 * self.s))
        return torch.sqrt(product.clamp_min(0)) / self.norm

    def sigma_dot(self, t):
        return self.u * torch.sin(2 * self.u * (t + self.s)) / (2 * self.norm**2 * self.sigma(t))

    def inverse_noise_level(self, s):
        """alpha = 1 / sqrt(1 + s^2) gives tan(a(t)) = sqrt(s^2 + sin^2 a(0)) / n."""
        s = torch.as_tensor(s, dtype=torch.float64)
        tangent_numerator = torch.sqrt(s**2 + math.sin(self.u * self.s) ** 2)
        angle = torch.atan2(tangent_numerator, torch.full_like(s, self.norm))
        return (angle / self.u - self.s).clamp(0, 1)


class VE(Process):
    """Variance exploding (EDM-style): alpha = 1, sigma = sigma_max * t.

    alpha_dot = 0, sigma_dot = sigma_max. With t = sigma / sigma_max this is EDM's parameterisation
    (Karras et al. 2022): the probability-flow ODE dx/dsigma = eps_hat, and the `edm` time grid
    gives EDM's rho-spaced noise levels. Where t = 0 is singular the time range starts at
    default_t_min = 0.002 / sigma_max, EDM's sigma_min. The base at t = 1 is N(0, sigma_max^2 I)
    (plus the data's variance, see sampling.prior_moments). The network sees
    x_t / sqrt(sigma_data^2 + sigma^2) (EDM's c_in). The native SDE has
    eps(t) = sigma sigma' = sigma_max^2 t. Train with eps or x0 outputs (velocity =
    sigma_max * eps_hat has a large scale).
    """

    name = "ve"
    default_t_max = 1.0  # never singular: sigma(1) = sigma_max is finite

    def __init__(self, sigma_max=80.0, sigma_data=0.5):
        self.sigma_max, self.sigma_data = sigma_max, sigma_data
        self.default_t_min = 0.002 / sigma_max  # EDM's sigma_min = 0.002

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return self.sigma_max * t

    def alpha_dot(self, t):
        return torch.zeros_like(t)

    def sigma_dot(self, t):
        return torch.full_like(t, self.sigma_max)

    def input_scale(self, t):
        return 1 / torch.sqrt(self.sigma_data**2 + self.sigma(t) ** 2)

    def inverse_noise_level(self, s):
        """t = s / sigma_max."""
        return torch.as_tensor(s, dtype=torch.float64) / self.sigma_max


PROCESSES = {cls.name: cls for cls in (Linear, Trig, VPLinear, VPCosine, VE)}


# ---------------------------------------------------------------------------------------------
# gamma(t) of a stochastic interpolant: zero at both ends, so x_0 = x0 and x_1 = x1.
# ---------------------------------------------------------------------------------------------
class SqrtGamma:
    """gamma = sqrt(a t (1 - t)), gamma_dot = a (1 - 2t) / (2 gamma): infinite slope at t = 0, 1
    (Albergo et al. 2023); the time range keeps training and sampling inside (0, 1)."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, t):
        return torch.sqrt((self.scale * t * (1 - t)).clamp_min(0))

    def derivative(self, t):
        return self.scale * (1 - 2 * t) / (2 * self(t))


class QuadraticGamma:
    """gamma = a t (1 - t), gamma_dot = a (1 - 2t): smooth at the ends."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, t):
        return self.scale * t * (1 - t)

    def derivative(self, t):
        return self.scale * (1 - 2 * t)


GAMMAS = {"none": None, "sqrt": SqrtGamma, "quadratic": QuadraticGamma}


def build_process(name, gamma="none", gamma_scale=1.0, **kwargs):
    """Instantiate a registered process, with the latent-noise schedule `gamma` (GAMMAS)."""
    if name not in PROCESSES:
        raise ValueError(f"process.name={name!r} is unknown; valid choices: {sorted(PROCESSES)}")
    if gamma not in GAMMAS:
        raise ValueError(f"process.gamma={gamma!r} is unknown; valid choices: {sorted(GAMMAS)}")
    process = PROCESSES[name](**kwargs)
    if GAMMAS[gamma] is not None:
        process.gamma_schedule = GAMMAS[gamma](gamma_scale)
    return process
