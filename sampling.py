"""ODE / SDE samplers and likelihoods: integrate between t = t_max (base) and t = t_min (data).

Probability-flow ODE: dx/dt = velocity(x, t), integrated from 1 to 0.
Reverse SDE with a diffusion coefficient eps(t) >= 0 chosen at sampling time (not at training):
    x <- x - h * (velocity - eps(t) * score) + sqrt(2 eps(t) h) * noise,  for a step h > 0,
and eps(t) = 0 recovers the ODE. EDM's stochastic sampler (edm_sde) works in the noise level
s = sigma / alpha on x_hat = x / alpha. Likelihood: d/dt log p_t(x_t) = -div velocity(x_t, t)
along the ODE, so log p_{t_min}(x) = log p_{t_max}(x(t_max)) + int_{t_min}^{t_max} div velocity
dt, with p_{t_max} the Gaussian the samplers start from (prior_moments: it keeps the
alpha(t_max) x0 part of x_{t_max} where alpha(t_max) != 0).

Every sampler reports the number of function evaluations (NFE): one NFE is one evaluation of
the (guided) field on the whole batch. Every sample depends only on its own base draw and noise
stream, never on its batch companions (dopri5 included: per-sample step sizes). Adding a solver,
a time grid or a diffusion coefficient is one entry in ODE_SOLVERS / SDE_SOLVERS /
NOISE_LEVEL_SOLVERS, TIME_GRIDS or DIFFUSIONS.
"""

import contextlib
import math

import torch

import objectives
import prediction
import utils
from processes import bcast


# ---------------------------------------------------------------------------------------------
# The field a sampler integrates: network + prediction type + process (+ guidance, clipping).
# ---------------------------------------------------------------------------------------------
def clip_static(x0_hat, percentile=None):
    """Clip the data estimate to the data range [-1, 1]."""
    return x0_hat.clamp(-1, 1)


def clip_dynamic(x0_hat, percentile=0.995):
    """Dynamic thresholding (Saharia et al. 2022, Imagen): per sample, s = max(1, the
    `percentile` quantile of |x0_hat|), then x0_hat <- clip(x0_hat, -s, s) / s."""
    flat = x0_hat.reshape(x0_hat.shape[0], -1).abs()
    s = torch.quantile(flat.float(), percentile, dim=1).clamp_min(1.0).to(x0_hat.dtype)
    s = bcast(s, x0_hat)
    return torch.maximum(torch.minimum(x0_hat, s), -s) / s


CLIPPERS = {"none": None, "static": clip_static, "dynamic": clip_dynamic}


class Field:
    """Wraps the network as a model output of type `model_output` at (x_t, t), counts NFE.

    `preconditioning` (a prediction.PRECONDITIONINGS name): `none` feeds
    net(x_t * input_scale(t), t, y) and takes its output as is; `edm` feeds
    net(c_in x_hat, c_noise, y) and returns the denoiser D = c_skip x_hat + c_out net(...), an x0
    output (model_output must be x0), with data standard deviation `sigma_data`.

    Classifier-free guidance (for a net trained with label dropout to the null class
    `num_classes`): out = out(null) + w * (out(y) - out(null)) for t inside `guidance_interval`
    (Kynkaenniemi et al. 2024 guide only in the middle of the trajectory), plain conditional
    output elsewhere. w = 1 costs one forward pass, w != 1 two (batched together). Every
    conversion between prediction types is affine in the output, so guiding the output guides
    the velocity, the score and x0_hat alike.

    `learn_z`: the net also outputs eta_z = E[z | x_t], the denoiser of the latent of a
    stochastic interpolant (its channels follow the velocity's); the score is -eta_z / gamma.
    `clip_x0`: a CLIPPERS entry applied to x0_hat (eps_hat is then recomputed from x_t) before
    the velocity and score are formed; images only, needs a Gaussian base.
    """

    def __init__(
        self,
        net,
        process,
        model_output,
        y=None,
        guidance_scale=1.0,
        num_classes=0,
        guidance_interval=(0.0, 1.0),
        clip_x0="none",
        clip_percentile=0.995,
        learn_z=False,
        preconditioning="none",
        sigma_data=0.5,
    ):
        self.precond = prediction.build_preconditioning(preconditioning, process, sigma_data)
        wanted = self.precond.output_type
        if wanted is not None and model_output != wanted:
            raise ValueError(
                f"prediction.preconditioning={preconditioning} needs prediction.model_output="
                f"{wanted}, got {model_output}"
            )
        self.net, self.process, self.model_output = net, process, model_output
        self.y, self.guidance_scale, self.num_classes = y, guidance_scale, num_classes
        self.guidance_interval = tuple(guidance_interval)
        self.clipper, self.clip_percentile = CLIPPERS[clip_x0], clip_percentile
        self.learn_z = learn_z
        self.nfe = 0

    def times(self, x, t):
        """t as a (B,) float64 tensor: a scalar time broadcast, or per-sample times (dopri5)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        return t.expand(x.shape[0]) if t.dim() == 0 else t

    def output(self, x, t):
        """Raw (guided) network output at (x, t) for a scalar time t or per-sample times (B,)."""
        self.nfe += 1
        t64 = self.times(x, t)
        return self.precond.output(self.raw_output(x, t64), x, t64)

    def raw_output(self, x, t64):
        """The (guided) network output before the preconditioning's output scaling (affine in
        the network output, so guiding here guides the model output alike)."""
        x_in, t_net = self.precond.inputs(x, t64)
        lo, hi = self.guidance_interval
        inside = (lo <= t64) & (t64 <= hi)
        guided = self.y is not None and self.guidance_scale != 1.0 and bool(inside.any())
        if not guided:
            return self.net(x_in, t_net, self.y)
        null = torch.full_like(self.y, self.num_classes)
        out_cond, out_null = self.net(
            torch.cat([x_in, x_in]), torch.cat([t_net, t_net]), torch.cat([self.y, null])
        ).chunk(2)
        out = out_null + self.guidance_scale * (out_cond - out_null)
        return torch.where(inside.reshape(-1, *[1] * (out.dim() - 1)), out, out_cond)

    def coefs(self, x, t):
        return prediction.coefs_at(self.process, self.times(x, t), x)

    def _x0_eps(self, out, x, c):
        x0_hat, eps_hat = prediction.to_x0_eps(out, self.model_output, x, c)
        if self.clipper is not None:
            x0_hat = self.clipper(x0_hat, self.clip_percentile)
            recomputed = (x - c.alpha * x0_hat) / c.sigma.clamp_min(prediction.TINY)
            eps_hat = torch.where(c.sigma > 0, recomputed, eps_hat)
        return x0_hat, eps_hat

    def velocity(self, x, t):
        return self.velocity_and_score(x, t, need_score=False)[0]

    def velocity_and_score(self, x, t, need_score=True):
        """(velocity, score) at (x, t); the score is None when not asked for."""
        c = self.coefs(x, t)
        out = self.output(x, t)
        if self.learn_z:
            out, eta_z = out.chunk(2, dim=1)
            score = -eta_z / c.gamma if need_score else None
            return out, score
        if self.clipper is None and not need_score:
            return prediction.convert(out, self.model_output, "velocity", x, c), None
        x0_hat, eps_hat = self._x0_eps(out, x, c)
        velocity = prediction.FROM_X0_EPS["velocity"](x0_hat, eps_hat, c)
        return velocity, (-eps_hat / c.sigma if need_score else None)

    def x0(self, x, t):
        c = self.coefs(x, t)
        return self._x0_eps(self.output(x, t), x, c)[0]


# ---------------------------------------------------------------------------------------------
# Time grids: steps + 1 decreasing times from t_max to t_min.
# ---------------------------------------------------------------------------------------------
def invert_monotone(fn, targets, lo, hi, iterations=80):
    """t in [lo, hi] with fn(t) = target for an increasing fn, by vectorised bisection."""
    lo = torch.full_like(targets, lo)
    hi = torch.full_like(targets, hi)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        below = fn(mid) < targets
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def noise_level(process, t):
    """sigma(t) / alpha(t): EDM's noise level of a process (increasing in t)."""
    return process.noise_level(t)


def uniform_grid(steps, t_max, t_min, process):
    """t_i = t_max + (t_min - t_max) i / steps."""
    return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)


def grid_from_levels(level_fn, spacing, steps, t_max, t_min):
    """The times where an increasing function of t, level_fn, takes the values `spacing(a, b, i)`
    for i = i / steps in [0, 1], between a = level_fn(t_max) and b = level_fn(t_min)."""
    a, b = level_fn(torch.tensor([t_max, t_min], dtype=torch.float64))
    i = torch.arange(steps + 1, dtype=torch.float64) / steps
    times = invert_monotone(level_fn, spacing(a, b, i), t_min, t_max)
    times[0], times[-1] = t_max, t_min
    return times


EDM_SIGMA_MIN = 0.002  # Karras et al. 2022: the smallest nonzero noise level of the edm grid


def edm_grid(steps, t_max, t_min, process, rho=7.0, sigma_min=EDM_SIGMA_MIN):
    """EDM (Karras et al. 2022, eq. 5): noise levels s = sigma / alpha spaced as
    s_i = (s_max^(1/rho) + i / n (s_min^(1/rho) - s_max^(1/rho)))^rho, mapped back to t.

    When the noise level at t_min is 0 (sigma(t_min) = 0, e.g. t_min = 0), where the spacing
    would degenerate to s_max (1 - i / n)^rho, this is Karras's grid: n = steps - 1 rho-spaced
    intervals from s_max down to `sigma_min`, then a final step to t_min (k-diffusion's appended
    sigma = 0). Otherwise all `steps` intervals are rho-spaced from
    s_max to s(t_min) > 0.
    """
    spacing = lambda a, b, i: (a ** (1 / rho) + i * (b ** (1 / rho) - a ** (1 / rho))) ** rho
    ends = process.noise_level(torch.tensor([t_max, t_min], dtype=torch.float64))
    karras = float(ends[1]) < prediction.TINY and float(ends[0]) > sigma_min
    if steps == 1 or not karras:
        return grid_from_levels(process.noise_level, spacing, steps, t_max, t_min)
    target = torch.tensor([sigma_min], dtype=torch.float64)
    t_sigma_min = float(invert_monotone(process.noise_level, target, t_min, t_max)[0])
    head = grid_from_levels(process.noise_level, spacing, steps - 1, t_max, t_sigma_min)
    return torch.cat([head, torch.tensor([t_min], dtype=torch.float64)])


def logsnr_grid(steps, t_max, t_min, process):
    """Uniform in log-SNR lambda = log(alpha^2 / sigma^2) between its values at t_max and t_min
    (the DPM-Solver grid), mapped back to t (through -lambda, which increases with t)."""
    spacing = lambda a, b, i: a + i * (b - a)
    return grid_from_levels(lambda t: -process.log_snr(t), spacing, steps, t_max, t_min)


TIME_GRIDS = {"uniform": uniform_grid, "edm": edm_grid, "logsnr": logsnr_grid}


def grid_is_singular(grid, process, t):
    """True when the grid cannot use t as an endpoint: an infinite (or above prediction.HUGE)
    noise level for edm, an infinite (or above 2 log HUGE in magnitude) log-SNR for logsnr."""
    t = torch.tensor(float(t), dtype=torch.float64)
    if grid == "edm":
        return not bool(process.noise_level(t) < prediction.HUGE)
    if grid == "logsnr":
        return not bool(process.log_snr(t).abs() < 2 * math.log(prediction.HUGE))
    return False


# ---------------------------------------------------------------------------------------------
# Diffusion coefficients eps(t) for the SDE, before the user's scale.
# ---------------------------------------------------------------------------------------------
DIFFUSIONS = {
    # The process's own forward SDE (DDPM / score SDE for VP): eps = g(t)^2 / 2.
    "process": lambda process, t: process.native_diffusion(t),
    # eps(t) = 1.
    "constant": lambda process, t: torch.ones_like(t),
    # eps(t) = sigma(t): vanishes at the data end, where the score ~ 1 / sigma^2 is stiff.
    "sigma": lambda process, t: process.sigma(t),
    # eps(t) = t: decreases linearly to zero at t = 0, whatever the process.
    "decreasing": lambda process, t: t.clone(),
}


def diffusion_coefficient(name, scale, process, t):
    """eps(t) = scale * DIFFUSIONS[name](process, t) as a float64 tensor."""
    return scale * DIFFUSIONS[name](process, torch.as_tensor(t, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# ODE solvers: fn(f, x, grid, callback) -> x at grid[-1] for dx/dt = f(x, t). `callback(i, x)`
# sees the state at grid[i] for i = 1 .. steps.
# ---------------------------------------------------------------------------------------------
def _steps(grid):
    return [
        (i + 1, float(t), float(t_next))
        for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:], strict=True))
    ]


def euler(f, x, grid, callback=None):
    """x_{i+1} = x_i + dt f(x_i, t_i): order 1, 1 NFE per step."""
    for i, t, t_next in _steps(grid):
        x = x + (t_next - t) * f(x, t)
        if callback:
            callback(i, x)
    return x


def heun(f, x, grid, callback=None):
    """Heun (explicit trapezoid): k1 = f(x, t), k2 = f(x + dt k1, t + dt),
    x <- x + dt (k1 + k2) / 2: order 2, 2 NFE per step."""
    for i, t, t_next in _steps(grid):
        dt = t_next - t
        k1 = f(x, t)
        x = x + 0.5 * dt * (k1 + f(x + dt * k1, t_next))
        if callback:
            callback(i, x)
    return x


def midpoint(f, x, grid, callback=None):
    """Explicit midpoint: x <- x + dt f(x + dt/2 f(x, t), t + dt/2): order 2, 2 NFE per step."""
    for i, t, t_next in _steps(grid):
        dt = t_next - t
        x = x + dt * f(x + 0.5 * dt * f(x, t), t + 0.5 * dt)
        if callback:
            callback(i, x)
    return x


def rk4(f, x, grid, callback=None):
    """Classical Runge-Kutta: order 4, 4 NFE per step."""
    for i, t, t_next in _steps(grid):
        dt = t_next - t
        k1 = f(x, t)
        k2 = f(x + 0.5 * dt * k1, t + 0.5 * dt)
        k3 = f(x + 0.5 * dt * k2, t + 0.5 * dt)
        k4 = f(x + dt * k3, t_next)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if callback:
            callback(i, x)
    return x


# Dormand-Prince 5(4) (Dormand & Prince 1980): nodes c, stage matrix a, the fifth-order weights
# (which equal the last stage row: first same as last) and the embedded fourth-order weights.
DOPRI5_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DOPRI5_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DOPRI5_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
DOPRI5_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def _per_sample_rms(v):
    return v.reshape(v.shape[0], -1).pow(2).mean(1).sqrt()


def _dopri5_initial_step(f, x, t, k1, direction, rtol, atol, span):
    """Per-sample first step size (Hairer, Norsett & Wanner, II.4): h0 = min(0.01 |x| / |f|,
    span), then h1 = (0.01 / max(|f|, |f'|))^(1/5) from one Euler probe at t + h0; h = min(100
    h0, h1, span). Capping h0 by the span keeps the probe inside the integration range: where
    the field is small (a VP process near t = 1), 0.01 |x| / |f| can be tens of time units, and
    a probe at t = -30 meets alpha = 0 and a NaN."""
    scale = atol + rtol * x.abs()
    d0, d1 = _per_sample_rms(x / scale), _per_sample_rms(k1 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = h0.to(torch.float64).clamp(max=span)
    probe = f(x + bcast(direction * h0, x) * k1, t + direction * h0)
    d2 = (_per_sample_rms((probe - k1) / scale) / h0).to(torch.float64)
    biggest = torch.maximum(d1.to(torch.float64), d2)
    h1 = torch.where(
        biggest <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / biggest) ** (1 / 5)
    )
    return torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h1, span))


def _dopri5_attempt(f, x, t, k1, dt):
    """One Dormand-Prince step of per-sample size dt (B,): (fifth-order state, error estimate,
    the derivative at the new state)."""
    stages = [k1]
    for c_j, a_j in zip(DOPRI5_C[1:], DOPRI5_A[1:], strict=True):
        increment = sum(a * k for a, k in zip(a_j, stages, strict=False) if a != 0.0)
        stages.append(f(x + bcast(dt, x) * increment, t + c_j * dt))
    weights = zip(DOPRI5_B5, DOPRI5_B4, stages, strict=True)
    error = bcast(dt, x) * sum((b5 - b4) * k for b5, b4, k in weights)
    # the last stage was evaluated at the fifth-order solution (first same as last)
    x_new = x + bcast(dt, x) * sum(a * k for a, k in zip(DOPRI5_A[6], stages, strict=False) if a)
    return x_new, error, stages[-1]


def dopri5(f, x, grid, callback=None, rtol=1e-5, atol=1e-5, max_attempts=100_000):
    """Adaptive Dormand-Prince 5(4) with a step size and an error control per sample.

    Every sample has its own time t_b and step h_b; each attempt evaluates the field on the whole
    batch at per-sample times (one NFE per stage: 6 per attempt, plus 2 to choose the first
    step), accepts the samples whose error norm sqrt(mean((err / (atol + rtol max(|x|, |x_new|)))
    ^2)) is at most 1 and rescales h_b by clip(0.9 norm^(-1/5), 0.2, 10). A sample's result
    depends only on its own trajectory, never on its batch companions (samples that finish a
    segment wait with a zero step). Steps end exactly on the grid, whose times are where the
    state is reported; its end points bound the integration."""
    n, grid = x.shape[0], grid.to(torch.float64)
    direction = 1.0 if float(grid[-1]) > float(grid[0]) else -1.0
    t = torch.full((n,), float(grid[0]), dtype=torch.float64, device=x.device)
    k1 = f(x, t)
    span = abs(float(grid[-1] - grid[0]))
    h = _dopri5_initial_step(f, x, t, k1, direction, rtol, atol, span)
    for i in range(1, len(grid)):
        end, attempts = float(grid[i]), 0
        while True:
            remaining = ((end - t) * direction).clamp_min(0)
            active = remaining > 0
            if not bool(active.any()):
                break
            attempts += 1
            if attempts > max_attempts:
                raise ValueError(
                    f"dopri5: no progress after {max_attempts} attempted steps: loosen "
                    f"sample.rtol / sample.atol, or use a fixed-step solver (sample.solver=heun)"
                )
            step = torch.where(active, torch.minimum(h, remaining), torch.zeros_like(h))
            x_new, error, k_new = _dopri5_attempt(f, x, t, k1, direction * step)
            scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
            norm = _per_sample_rms(error / scale).to(torch.float64)
            accept = active & (norm <= 1)
            factor = (0.9 * norm.clamp_min(1e-10) ** (-1 / 5)).clamp(0.2, 10.0)
            mask = accept.reshape(-1, *[1] * (x.dim() - 1))
            x, k1 = torch.where(mask, x_new, x), torch.where(mask, k_new, k1)
            reached = step >= remaining
            t = torch.where(accept, torch.where(reached, end, t + direction * step), t)
            # a step shortened to land on the grid keeps h if accepted
            grown = torch.where(accept & reached & (step < h), h, step * factor)
            h = torch.where(active, grown, h)
        if callback:
            callback(i, x)
    return x


ODE_SOLVERS = {"euler": euler, "heun": heun, "midpoint": midpoint, "rk4": rk4, "dopri5": dopri5}
ADAPTIVE = ("dopri5",)


# ---------------------------------------------------------------------------------------------
# SDE solvers: fn(field, x, grid, diffusion, noise, callback) -> x at grid[-1], for the reverse
# SDE with eps(t) = diffusion(t) and noise(x) ~ N(0, I) shaped like x.
# ---------------------------------------------------------------------------------------------
def _drift(field, x, t, eps_t):
    return prediction.reverse_sde_drift(*field.velocity_and_score(x, t), eps_t)


def euler_maruyama(field, x, grid, diffusion, noise, callback=None):
    """x_{i+1} = x_i - h (v - eps s)(x_i, t_i) + sqrt(2 eps(t_i) h) z, h = t_i - t_{i+1}:
    strong order 1/2, weak order 1, 1 NFE per step."""
    for i, t, t_next in _steps(grid):
        h, eps_t = t - t_next, float(diffusion(t))
        x = x - h * _drift(field, x, t, eps_t) + math.sqrt(2 * eps_t * h) * noise(x)
        if callback:
            callback(i, x)
    return x


def heun_sde(field, x, grid, diffusion, noise, callback=None):
    """Stochastic Heun for additive noise: with one noise draw z per step,
    x~ = x - h d(x, t) + g z and x <- x - h (d(x, t) + d(x~, t - h)) / 2 + g z, where
    d = v - eps s and g = sqrt(2 eps(t) h). Second order in the drift (EDM's stochastic sampler
    uses the same corrector); 2 NFE per step."""
    for i, t, t_next in _steps(grid):
        h, eps_t = t - t_next, float(diffusion(t))
        kick = math.sqrt(2 * eps_t * h) * noise(x)
        d1 = _drift(field, x, t, eps_t)
        x_pred = x - h * d1 + kick
        d2 = _drift(field, x_pred, t_next, float(diffusion(t_next)))
        x = x - 0.5 * h * (d1 + d2) + kick
        if callback:
            callback(i, x)
    return x


SDE_SOLVERS = {"euler_maruyama": euler_maruyama, "heun_sde": heun_sde}


# ---------------------------------------------------------------------------------------------
# Noise-level solvers: fn(field, x, grid, noise, callback, **churn) -> x at grid[-1], working in
# the VE-equivalent state x_hat = x / alpha at noise level s = sigma / alpha.
# ---------------------------------------------------------------------------------------------
def edm_sde(
    field,
    x,
    grid,
    noise,
    callback=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2), for every process.

    With x_hat = x_t / alpha = x0 + s x1 every process is EDM's VE process in the noise level
    s = sigma / alpha, whose probability-flow ODE is dx_hat / ds = (x_hat - D(x_hat; s)) / s with
    the denoiser D(x_hat; s) = x0_hat(alpha(t) x_hat, t), t = s^{-1}(s). For each grid step
    s_i -> s_{i+1} (N steps):
        gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= s_i <= S_tmax else 0
        s_up = s_i (1 + gamma_i)  (capped at s_0, where the trained range ends)
        x_hat <- x_hat + sqrt(s_up^2 - s_i^2) S_noise z,  z ~ N(0, I)   (only when s_up > s_i)
        d = (x_hat - D(x_hat; s_up)) / s_up,  x_next = x_hat + (s_{i+1} - s_up) d
        if s_{i+1} > 0: d' = (x_next - D(x_next; s_{i+1})) / s_{i+1},
                        x_next = x_hat + (s_{i+1} - s_up) (d + d') / 2
    S_churn = 0 is EDM's deterministic Heun sampler. 2 NFE per step, 1 for a last step to s = 0
    (the edm grid from t_min = 0: 2 N - 1 in all). The grid's noise levels must be finite
    (alpha > 0 on the grid)."""
    process = field.process
    grid = grid.to(torch.float64)
    levels, alphas = process.noise_level(grid), process.alpha(grid)
    denoise = lambda x_hat, t, alpha: field.x0(float(alpha) * x_hat, t)
    steps, s_max = len(grid) - 1, float(levels[0])
    x_hat = x / float(alphas[0])
    for i in range(steps):
        s, s_next = float(levels[i]), float(levels[i + 1])
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_up, t_up, alpha_up = s, float(grid[i]), float(alphas[i])
        if gamma > 0 and s * (1 + gamma) <= s_max:
            s_up = s * (1 + gamma)
            t_up = float(process.inverse_noise_level(torch.tensor(s_up, dtype=torch.float64)))
            alpha_up = float(process.alpha(torch.tensor(t_up, dtype=torch.float64)))
            x_hat = x_hat + math.sqrt(s_up**2 - s**2) * s_noise * noise(x_hat)
        slope = (x_hat - denoise(x_hat, t_up, alpha_up)) / s_up
        x_next = x_hat + (s_next - s_up) * slope
        if s_next > 0:
            slope_next = (x_next - denoise(x_next, float(grid[i + 1]), alphas[i + 1])) / s_next
            x_next = x_hat + (s_next - s_up) * 0.5 * (slope + slope_next)
        x_hat = x_next
        if callback:
            callback(i + 1, float(alphas[i + 1]) * x_hat)
    return float(alphas[-1]) * x_hat


NOISE_LEVEL_SOLVERS = {"edm_sde": edm_sde}
# Jumps of a model trained with train.objective=meanflow / consistency (objectives.py).
FEW_STEP_SOLVERS = {"few_step": objectives.few_step_sample}
SOLVERS = {**ODE_SOLVERS, **SDE_SOLVERS, **NOISE_LEVEL_SOLVERS, **FEW_STEP_SOLVERS}
NFE_PER_STEP = {
    "euler": 1,
    "heun": 2,
    "midpoint": 2,
    "rk4": 4,
    "euler_maruyama": 1,
    "heun_sde": 2,
    "edm_sde": 2,
}


def needs_score(solver):
    return solver in SDE_SOLVERS


# sample.* settings that only some solvers read: name -> those solvers. (`steps` and `grid` of
# dopri5 set the times where its state is reported, so they are read by every solver but few_step.)
INTEGRATORS = (*ODE_SOLVERS, *SDE_SOLVERS, *NOISE_LEVEL_SOLVERS)
SOLVER_SETTINGS = {
    "diffusion": tuple(SDE_SOLVERS),
    "diffusion_scale": tuple(SDE_SOLVERS),
    "rtol": ADAPTIVE,
    "atol": ADAPTIVE,
    "s_churn": tuple(NOISE_LEVEL_SOLVERS),
    "s_tmin": tuple(NOISE_LEVEL_SOLVERS),
    "s_tmax": tuple(NOISE_LEVEL_SOLVERS),
    "s_noise": tuple(NOISE_LEVEL_SOLVERS),
    "grid": INTEGRATORS,
    "denoise_final": INTEGRATORS,
    "clip_x0": INTEGRATORS,
    "clip_percentile": INTEGRATORS,
    "guidance_interval": INTEGRATORS,
    "consistency_levels": tuple(FEW_STEP_SOLVERS),
}


def unused_setting(name, settings, objective="flow"):
    """Why the sample setting `name` has no effect with the others in `settings` (an object
    with the sample.* attributes) and train.objective `objective`, as the setting that decides
    it (e.g. "sample.solver=euler ignores it (used by: edm_sde)"); None when it is read."""
    s = settings
    readers = SOLVER_SETTINGS.get(name)
    if readers is not None and s.solver not in readers:
        return f"sample.solver={s.solver} ignores it (used by: {', '.join(readers)})"
    if name in ("s_tmin", "s_tmax", "s_noise") and s.s_churn == 0:
        return "sample.s_churn=0 (no churn, so no noise to bound or scale)"
    if name == "clip_percentile" and s.clip_x0 != "dynamic":
        return f"sample.clip_x0={s.clip_x0} (the percentile is used by clip_x0=dynamic only)"
    if name == "guidance_interval" and s.guidance_scale == 1.0:
        return "sample.guidance_scale=1 (no guidance)"
    if name == "consistency_levels" and objective != "consistency":
        return f"train.objective={objective} (the levels are used by consistency models only)"
    return None


# ---------------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------------
def prior_moments(process, t_max, data_mean=0.0, data_std=0.5):
    """(mean, std) of the Gaussian that stands for x_{t_max}: the sampler's start and the
    likelihood's base density.

    x_{t_max} = alpha x0 + sigma x1 (+ gamma z) has mean alpha E[x0] and variance
    alpha^2 Var[x0] + sigma^2 (+ gamma^2), evaluated at t_max with the data's per-dimension
    `data_mean` and `data_std` (floats, or tensors broadcastable to one sample). This is the
    exact marginal when the data are Gaussian with those moments, and N(0, sigma^2) whatever the
    data when alpha(t_max) = 0 (t_max = 1 for linear, trig, vp_cosine). Where alpha(t_max) != 0
    (vp_linear: alpha(1) = 0.0066, ve: alpha = 1 with sigma_max = 80) the old start N(0, sigma^2)
    dropped the alpha x0 term; its error is now of order alpha^2 times the data's departure from
    these moments. data_std = 0.5 is EDM's sigma_data.
    """
    t = torch.tensor(float(t_max), dtype=torch.float64)
    alpha, sigma, gamma = process.alpha(t), process.sigma(t), process.gamma(t)
    data_mean = torch.as_tensor(data_mean, dtype=torch.float64)
    data_std = torch.as_tensor(data_std, dtype=torch.float64)
    std = torch.sqrt(alpha**2 * data_std**2 + sigma**2 + gamma**2)
    return alpha * data_mean, std


def initial_state(process, x1, t_max, data_mean=0.0, data_std=0.5, gaussian_base=True):
    """The sampler's start from the base draw x1: mean + std * x1 with prior_moments (x1 itself
    at t_max = 1 for the processes with alpha(1) = 0 and sigma(1) = 1). A non-Gaussian base
    (toy sets) starts at alpha(t_max) data_mean + sigma(t_max) x1."""
    mean, std = prior_moments(process, t_max, data_mean, data_std)
    if not gaussian_base:
        t = torch.tensor(float(t_max), dtype=torch.float64)
        std = process.sigma(t)
    as_x = lambda v: v.to(device=x1.device, dtype=x1.dtype)
    return as_x(mean) + as_x(std) * x1


@torch.no_grad()
def sample(
    net,
    process,
    model_output,
    x1,
    *,
    solver="euler",
    steps=100,
    t_max=1.0,
    t_min=0.0,
    grid="uniform",
    diffusion="process",
    diffusion_scale=1.0,
    denoise_final=False,
    y=None,
    guidance_scale=1.0,
    guidance_interval=(0.0, 1.0),
    num_classes=0,
    clip_x0="none",
    clip_percentile=0.995,
    learn_z=False,
    rtol=1e-5,
    atol=1e-5,
    noise=None,
    trajectory=None,
    data_mean=0.0,
    data_std=0.5,
    gaussian_base=True,
    preconditioning="none",
    sigma_data=0.5,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    progress=None,
    objective="flow",
    time_scale=None,
    levels=None,
):
    """Integrate from the base sample x1 at t_max to t_min; returns (x, nfe).

    `solver=few_step` instead makes `steps` jumps of a meanflow / consistency model
    (`objective`, with its `time_scale` and consistency `levels`; objectives.few_step_sample).

    `preconditioning`, `sigma_data`: how the net's input and output are scaled (Field).
    `s_churn`, `s_tmin`, `s_tmax`, `s_noise`: the churn of the `edm_sde` solver (EDM's
    Algorithm 2; S_tmin / S_tmax are noise levels s = sigma / alpha).

    The start is initial_state(process, x1, t_max, data_mean, data_std, gaussian_base): the
    Gaussian with the mean and variance of x_{t_max} (prior_moments).

    `denoise_final` replaces the last state by the model's x0 estimate at t_min (one more NFE).
    `noise(x)` draws the SDE noise (default torch.randn_like). `trajectory`, if a list, receives
    (t, x) at every grid time from t_max down to t_min. `progress(i, steps)`, if given, is
    called after grid step i.
    """
    if solver not in SOLVERS:
        raise ValueError(f"sample.solver={solver!r} is unknown; valid choices: {sorted(SOLVERS)}")
    if solver in FEW_STEP_SOLVERS:
        return FEW_STEP_SOLVERS[solver](
            net,
            process,
            x1,
            steps,
            objective,
            y=y,
            noise=noise,
            t_max=t_max,
            t_min=t_min,
            levels=levels or None,
            sigma_data=sigma_data,
            time_scale=time_scale,
            trajectory=trajectory,
            data_mean=data_mean,
            data_std=data_std,
            gaussian_base=gaussian_base,
        )
    field = Field(
        net,
        process,
        model_output,
        y,
        guidance_scale,
        num_classes,
        guidance_interval,
        clip_x0,
        clip_percentile,
        learn_z,
        preconditioning,
        sigma_data,
    )
    times = TIME_GRIDS[grid](steps, t_max, t_min, process)
    x = initial_state(process, x1, t_max, data_mean, data_std, gaussian_base)
    callbacks = []
    if trajectory is not None:
        trajectory.append((float(times[0]), x))
        callbacks.append(lambda i, state: trajectory.append((float(times[i]), state)))
    if progress is not None:
        callbacks.append(lambda i, state: progress(i, steps))
    callback = (lambda i, state: [fn(i, state) for fn in callbacks]) if callbacks else None
    if solver in NOISE_LEVEL_SOLVERS:
        churn = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
        x = NOISE_LEVEL_SOLVERS[solver](
            field, x, times, noise or torch.randn_like, callback, **churn
        )
    elif solver in SDE_SOLVERS:
        eps = lambda t: diffusion_coefficient(diffusion, diffusion_scale, process, t)
        x = SDE_SOLVERS[solver](field, x, times, eps, noise or torch.randn_like, callback)
    elif solver in ADAPTIVE:
        x = ODE_SOLVERS[solver](field.velocity, x, times, callback, rtol=rtol, atol=atol)
    else:
        x = ODE_SOLVERS[solver](field.velocity, x, times, callback)
    if denoise_final:
        x = field.x0(x, times[-1])
    return x, field.nfe


class PerSampleNoise:
    """Gaussian noise in which sample i's stream depends only on (seed, i): the same samples come
    out whatever the batch size or the number of ranks. Each call draws the next N(0, I) tensor
    of every sample in `indices`, stacked along the batch dimension."""

    def __init__(self, seed, indices, device="cpu"):
        self.device = torch.device(device)
        self.seeds = [sample_seed(seed, i) for i in indices]
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in self.seeds]

    def __call__(self, like):
        return torch.stack(
            [
                torch.randn(like.shape[1:], generator=g, device=self.device, dtype=like.dtype)
                for g in self.generators
            ]
        )

    def base(self, base_sampler, shape):
        """One draw per sample from `base_sampler(n, generator)` (a non-Gaussian base, drawn on
        the CPU from its own per-sample stream), on this device."""
        draws = [base_sampler(1, torch.Generator().manual_seed(s ^ 1)) for s in self.seeds]
        return torch.cat([d.reshape(1, *shape) for d in draws]).to(self.device)


def sample_seed(seed, index):
    """The seed of sample `index` of a run with base seed `seed`."""
    return utils.mix_seed(seed, index, 0x5A)


@torch.no_grad()
def generate(
    net,
    process,
    model_output,
    shape,
    indices,
    seed,
    batch_size,
    labels=None,
    device="cpu",
    base_sampler=None,
    trajectory=None,
    progress=None,
    **sampler_kwargs,
):
    """Samples number `indices` (a list of ints) of a run with base seed `seed`, in batches of
    `batch_size`. `labels` gives the class of each index (a (len(indices),) long tensor) for a
    conditional net; `base_sampler(n, generator)` draws a non-Gaussian base. Returns (x, nfe of
    one batch). `trajectory`, if a list, receives the (t, x) states of the first batch.
    `progress(done, total)`, if given, is called after every grid step of every batch."""
    outputs, nfe = [], 0
    num_batches = -(-len(indices) // batch_size)
    for start in range(0, len(indices), batch_size):
        batch_progress = None
        if progress is not None:
            batch = start // batch_size
            batch_progress = lambda i, steps, b=batch: progress(b * steps + i, num_batches * steps)
        chunk = indices[start : start + batch_size]
        noise = PerSampleNoise(seed, chunk, device)
        template = torch.empty((len(chunk), *shape), device=device)
        x1 = noise(template) if base_sampler is None else noise.base(base_sampler, shape).to(device)
        y = None if labels is None else labels[start : start + batch_size].to(device)
        record = trajectory if start == 0 else None
        x, nfe = sample(
            net,
            process,
            model_output,
            x1,
            y=y,
            noise=noise,
            trajectory=record,
            gaussian_base=base_sampler is None,
            progress=batch_progress,
            **sampler_kwargs,
        )
        outputs.append(x)
    empty = torch.empty((0, *shape), device=device)
    return (torch.cat(outputs) if outputs else empty), nfe


def singular_sampling_times(
    process,
    model_output,
    solver,
    times,
    diffusion,
    scale,
    grid="uniform",
    learn_z=False,
    need_x0=False,
    preconditioning="none",
    sigma_data=0.5,
):
    """The times among `times` where this sampler cannot evaluate its field: a singular
    prediction conversion (velocity, plus score for SDEs and x0 for denoising / clipping; only
    x0 for the noise-level solvers), a singular network input of the preconditioning, an
    infinite noise level for the edm / logsnr grids and the noise-level solvers, an infinite SDE
    coefficient, or gamma = 0 where the score comes from the z-denoiser."""
    dsts = ("x0",) if solver in NOISE_LEVEL_SOLVERS else ("velocity",)
    if not learn_z:
        dsts += ("score",) if needs_score(solver) else ()
        dsts += ("x0",) if need_x0 and "x0" not in dsts else ()
    evaluated = times
    if solver in NOISE_LEVEL_SOLVERS and not need_x0:  # a last step to s = 0 evaluates nothing
        levels = process.noise_level(torch.tensor(times, dtype=torch.float64)).tolist()
        evaluated = [t for t, s in zip(times, levels, strict=True) if s > 0]
    bad = set(
        prediction.singular_times(
            process, model_output, dsts, evaluated, preconditioning, sigma_data=sigma_data
        )
    )
    bad |= {t for t in times if grid_is_singular(grid, process, t)}
    if solver in NOISE_LEVEL_SOLVERS:
        bad |= {t for t in times if grid_is_singular("edm", process, t)}
    if needs_score(solver):
        t = torch.tensor(times, dtype=torch.float64)
        eps = diffusion_coefficient(diffusion, scale, process, t).tolist()
        bad |= {s for s, e in zip(times, eps, strict=True) if not abs(e) < 1e30}
        if learn_z:
            gamma = process.gamma(t).tolist()
            bad |= {s for s, g in zip(times, gamma, strict=True) if not g > 0}
    return sorted(bad)


def check_sampling_range(
    process,
    model_output,
    solver,
    t_min,
    t_max,
    diffusion,
    scale,
    steps,
    grid="uniform",
    learn_z=False,
    need_x0=False,
    preconditioning="none",
    sigma_data=0.5,
):
    """One-line error message if the sampler's field is singular anywhere on its time grid,
    else None. Called before any sampling starts."""
    common = (diffusion, scale, grid, learn_z, need_x0, preconditioning, sigma_data)
    bad = singular_sampling_times(process, model_output, solver, [t_max, t_min], *common)
    if not bad:
        times = TIME_GRIDS[grid](steps, t_max, t_min, process).tolist()
        bad = singular_sampling_times(process, model_output, solver, times, *common)
    if bad:
        return (
            f"sampling {model_output} outputs of process {process.name!r} with {solver} on the "
            f"{grid} grid is singular at t={bad[0]:g} (sample.t_min={t_min:g}, "
            f"sample.t_max={t_max:g}): move sample.t_min / sample.t_max inside (0, 1)"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Likelihood through the probability-flow ODE.
# ---------------------------------------------------------------------------------------------
JACOBIAN_MODES = ("loop", "reverse", "forward")


def default_jacobian_mode(device):
    """`loop` on the CPU (measured fastest there, see jacobian_products), `reverse` elsewhere,
    where batching many small backward passes into one is expected to pay (not measured here:
    no accelerator was available)."""
    return "loop" if torch.device(device).type == "cpu" else "reverse"


def jacobian_products(f, x, t, vectors, mode=None, chunk_size=None):
    """(f(x, t), the products of the Jacobian df/dx with each of `vectors` (K, *x.shape)) for a
    per-sample f; v . product is v^T (df/dx) v whatever the mode.

    `loop`: one forward pass, then one backward pass (vector-Jacobian product v^T df/dx) per
    vector; `reverse`: the same products batched with torch.func.vjp + vmap, `chunk_size`
    vectors at a time (default: about 4096 sample-rows per batched pass); `forward`:
    Jacobian-vector products (df/dx) v by forward-mode AD (torch.func.jvp + vmap; f runs once
    per chunk). None picks default_jacobian_mode(x.device). Measured on this 2-core CPU (one
    thread, other jobs running), digits U-Net (0.7M parameters), exact divergence (64 products)
    per NFE: batch 32: loop 1.08 s, reverse 1.40 s, forward 1.56 s; batch 256: loop 13.8 s,
    reverse 127 s. The network's parameters should not require gradients (log_likelihood
    freezes them): a vmapped backward pass otherwise also forms their gradients.
    """
    mode = mode or default_jacobian_mode(x.device)
    if mode not in JACOBIAN_MODES:
        raise ValueError(f"mode={mode!r} is unknown; valid choices: {JACOBIAN_MODES}")
    x = x.detach()
    chunk_size = chunk_size or max(1, 4096 // max(x.shape[0], 1))
    batched = lambda fn: torch.func.vmap(fn, chunk_size=chunk_size)(vectors)
    if mode == "forward":
        outs, products = batched(lambda v: torch.func.jvp(lambda inp: f(inp, t), (x,), (v,)))
        return outs[0].detach(), products.detach()
    with torch.enable_grad():
        if mode == "reverse":
            out, vjp_fn = torch.func.vjp(lambda inp: f(inp, t), x)
            (products,) = batched(vjp_fn)
            return out.detach(), products.detach()
        x = x.requires_grad_(True)
        out = f(x, t)
        products = torch.stack(
            [torch.autograd.grad(out, x, v, retain_graph=True)[0] for v in vectors]
        )
    return out.detach(), products


def exact_divergence(f, x, t, mode=None, chunk_size=None):
    """(f(x, t), div_x f(x, t)) per sample: the trace of the Jacobian, sum_i e_i . (df/dx) e_i,
    from its products with the D basis vectors e_i of one sample's space (each applied to every
    sample at once) through jacobian_products: the same numbers as one backward pass per
    dimension (mode `loop`), or in D / chunk_size batched passes (`reverse`, `forward`)."""
    n, d = x.shape[0], x[0].numel()
    if (mode or default_jacobian_mode(x.device)) == "loop":  # the diagonal only: O(B D) memory
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out = f(x, t)
            flat_out = out.reshape(n, -1)
            trace = torch.zeros(n, device=x.device, dtype=x.dtype)
            for i in range(d):
                (row,) = torch.autograd.grad(flat_out[:, i].sum(), x, retain_graph=True)
                trace = trace + row.reshape(n, -1)[:, i]
        return out.detach(), trace.detach()
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    basis = eye.reshape(d, 1, *x.shape[1:]).expand(d, *x.shape)
    out, products = jacobian_products(f, x, t, basis, mode, chunk_size)
    trace = products.reshape(d, n, d).diagonal(dim1=0, dim2=2).sum(1)  # sum_i products[i, b, i]
    return out, trace


def hutchinson_divergence(f, x, t, probes, mode=None):
    """(f(x, t), the Hutchinson estimate mean_k eps_k^T (df/dx) eps_k) with fixed Rademacher
    probes (K, *x.shape): unbiased for the divergence, with variance 2 sum_{i != j} J_ij^2 / K
    for J symmetrised (zero for a diagonal Jacobian); the K Jacobian products run as one
    batched pass (jacobian_products)."""
    out, products = jacobian_products(f, x, t, probes, mode, chunk_size=len(probes))
    estimate = (products * probes).reshape(len(probes), x.shape[0], -1).sum(2).mean(0)
    return out, estimate


@contextlib.contextmanager
def frozen_parameters(net):
    """Parameters of `net` (an nn.Module) set not to require gradients inside the block, and
    restored after: Jacobian products with respect to the input then form no weight gradients."""
    params = [p for p in getattr(net, "parameters", list)() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


DIVERGENCES = ("exact", "hutchinson")
EXACT_MAX_DIMS = 16  # `auto`: the exact divergence up to this many dimensions per sample


def choose_divergence(name, num_dims, max_exact_dims=EXACT_MAX_DIMS):
    """The estimator `auto` stands for: `exact` where it is cheap (num_dims <= max_exact_dims:
    2-D toy data costs 2 vector-Jacobian products per NFE), `hutchinson` elsewhere (K products
    per NFE instead of num_dims; 8x8 digits would cost 64). Other names are returned as is."""
    if name != "auto":
        return name
    return "exact" if num_dims <= max_exact_dims else "hutchinson"


def gaussian_log_density(x, mean=0.0, std=1.0):
    """log N(x; mean, diag(std^2)) per sample; mean and std are floats or tensors that
    broadcast against one sample."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).expand(x.shape[1:])
    flat = ((x - mean) / std).reshape(x.shape[0], -1)
    d = flat.shape[1]
    return -0.5 * flat.pow(2).sum(1) - torch.log(std).sum() - 0.5 * d * math.log(2 * math.pi)


def log_likelihood(
    net,
    process,
    model_output,
    x0,
    *,
    solver="rk4",
    steps=50,
    t_min=0.0,
    t_max=1.0,
    grid="uniform",
    divergence="exact",
    num_probes=1,
    seed=0,
    y=None,
    rtol=1e-5,
    atol=1e-5,
    learn_z=False,
    data_mean=0.0,
    data_std=0.5,
    preconditioning="none",
    sigma_data=0.5,
    progress=None,
):
    """log p(x0) in nats per sample, integrating the ODE from t_min up to t_max together with
    int div velocity dt. The base density at t_max is the Gaussian of prior_moments(process,
    t_max, data_mean, data_std) (the sampler's start): N(0, sigma(t_max)^2 I) when
    alpha(t_max) = 0, the exact marginal for Gaussian data with those moments otherwise. With
    t_min > 0 this is the density of x_{t_min}. Returns (log_p, nfe). `grid`: a TIME_GRIDS
    name whose `steps` times run from t_min up to t_max (the edm grid's small steps near the
    data suit VE, whose velocity is stiff there).

    `divergence`: `exact` costs D Jacobian-vector products per NFE (D = dimensions per sample,
    batched through torch.func), `hutchinson` `num_probes` (Rademacher probes seeded by `seed`,
    fixed along the trajectory): unbiased per sample, so the standard error of a mean over
    samples (std / sqrt(n)) already includes the estimator's noise; choose_divergence picks one
    for `auto`. `progress(i, steps)`, if given, is called after each grid step."""
    field = Field(
        net,
        process,
        model_output,
        y=y,
        learn_z=learn_z,
        preconditioning=preconditioning,
        sigma_data=sigma_data,
    )
    shape = x0.shape
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is unknown; valid choices: {DIVERGENCES}")
    probes = None
    if divergence == "hutchinson":
        gen = torch.Generator(device=x0.device).manual_seed(seed)
        probes = torch.randint(0, 2, (num_probes, *shape), generator=gen, device=x0.device)
        probes = probes.to(x0.dtype) * 2 - 1

    def div_fn(x, t):
        """(velocity, divergence): one NFE, however many batched passes the products take."""
        before = field.nfe
        if probes is None:
            result = exact_divergence(field.velocity, x, t)
        else:
            result = hutchinson_divergence(field.velocity, x, t, probes)
        field.nfe = before + 1
        return result

    def augmented(state, t):
        x = state[:, :-1].reshape(shape)
        velocity, div = div_fn(x, t)
        return torch.cat([velocity.reshape(shape[0], -1), div[:, None]], dim=1)

    state = torch.cat(
        [x0.reshape(shape[0], -1), torch.zeros(shape[0], 1, dtype=x0.dtype, device=x0.device)],
        dim=1,
    )
    times = TIME_GRIDS[grid](steps, t_max, t_min, process).flip(0)
    kwargs = {"rtol": rtol, "atol": atol} if solver in ADAPTIVE else {}
    callback = None if progress is None else (lambda i, _: progress(i, steps))
    with frozen_parameters(net):
        state = ODE_SOLVERS[solver](augmented, state, times, callback, **kwargs)
    x1, integral = state[:, :-1].reshape(shape), state[:, -1]
    mean, std = prior_moments(process, t_max, data_mean, data_std)
    return gaussian_log_density(x1, mean, std) + integral, field.nfe


def bits_per_dim(log_p, num_dims, levels=256):
    """Bits per dimension of uint8 data whose model space is x = (k + u) / (levels / 2) - 1 for
    pixel k and dequantisation noise u ~ U[0, 1): bpd = (-log_p / D + log(levels / 2)) / log 2,
    an upper bound on the discrete negative log-likelihood."""
    return (-log_p / num_dims + math.log(levels / 2)) / math.log(2)
