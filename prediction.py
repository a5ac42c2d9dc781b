"""What the network outputs, what the loss regresses, and the closed-form conversions between them.

With x_t = alpha x0 + sigma x1 (x1 the Gaussian base sample, estimated by eps_hat), every
prediction type is a function of (x_t, t) and the pair (x0_hat, eps_hat) (DESIGN.md):

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

    Integrated backwards as x <- x - h * drift + sqrt(2 eps(t) h) * noise (DESIGN.md).
    """
    return velocity - diffusion * score


def singular_times(process, src, dsts, times):
    """The times among `times` where converting `src` into any of `dsts` is not finite.

    Used before any work starts to reject time ranges that touch an endpoint where the 2x2 system
    of a conversion is singular (e.g. x0 -> velocity at sigma = 0, eps -> x0 at alpha = 0).
    """
    bad = []
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in times:
        c = coefs_at(process, torch.full((4,), float(t), dtype=torch.float64), x)
        finite = all(torch.isfinite(c_i).all() for c_i in c)
        for dst in dsts:
            converted = convert(x, src, dst, x, c)
            from_truth = FROM_X0_EPS[dst](x, x, c)
            finite = finite and bool(torch.isfinite(converted).all())
            finite = finite and bool(torch.isfinite(from_truth).all())
        if not finite:
            bad.append(float(t))
    return bad
