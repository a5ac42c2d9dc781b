"""ODE / SDE samplers and likelihoods: integrate between t = t_max (base) and t = t_min (data).

Probability-flow ODE: dx/dt = velocity(x, t), integrated from 1 to 0.
Reverse SDE with a diffusion coefficient eps(t) >= 0 chosen at sampling time (not at training):
    x <- x - h * (velocity - eps(t) * score) + sqrt(2 eps(t) h) * noise,  for a step h > 0,
and eps(t) = 0 recovers the ODE. Likelihood: d/dt log p_t(x_t) = -div velocity(x_t, t) along
the ODE, so log p_{t_min}(x) = log p_base(x(t_max)) + int_{t_min}^{t_max} div velocity dt.

Every sampler reports the number of function evaluations (NFE): one NFE is one evaluation of
the (guided) field on the whole batch. Adding a solver, a time grid or a diffusion coefficient
is one entry in ODE_SOLVERS / SDE_SOLVERS, TIME_GRIDS or DIFFUSIONS.
"""

import math

import torch

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
    """Wraps `net(x_t * input_scale(t), t, y)` -> model output of type `model_output`, counts NFE.

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
    ):
        self.net, self.process, self.model_output = net, process, model_output
        self.y, self.guidance_scale, self.num_classes = y, guidance_scale, num_classes
        self.guidance_interval = tuple(guidance_interval)
        self.clipper, self.clip_percentile = CLIPPERS[clip_x0], clip_percentile
        self.learn_z = learn_z
        self.nfe = 0

    def output(self, x, t):
        """Raw (guided) network output at (x, t) for a scalar time t."""
        self.nfe += 1
        t_batch = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        x_in = x * self.process.input_scale(torch.tensor(float(t), dtype=x.dtype)).item()
        lo, hi = self.guidance_interval
        guided = self.y is not None and self.guidance_scale != 1.0 and lo <= float(t) <= hi
        if not guided:
            return self.net(x_in, t_batch, self.y)
        null = torch.full_like(self.y, self.num_classes)
        out_cond, out_null = self.net(
            torch.cat([x_in, x_in]), torch.cat([t_batch, t_batch]), torch.cat([self.y, null])
        ).chunk(2)
        return out_null + self.guidance_scale * (out_cond - out_null)

    def coefs(self, x, t):
        return prediction.coefs_at(self.process, torch.tensor(float(t), dtype=torch.float64), x)

    def _x0_eps(self, out, x, c):
        x0_hat, eps_hat = prediction.to_x0_eps(out, self.model_output, x, c)
        if self.clipper is not None:
            x0_hat = self.clipper(x0_hat, self.clip_percentile)
            if float(c.sigma.reshape(-1)[0]) > 0:
                eps_hat = (x - c.alpha * x0_hat) / c.sigma
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
    return process.sigma(t) / process.alpha(t)


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


def edm_grid(steps, t_max, t_min, process, rho=7.0):
    """EDM (Karras et al. 2022, eq. 5): noise levels s = sigma / alpha spaced as
    s_i = (s_max^(1/rho) + i / steps (s_min^(1/rho) - s_max^(1/rho)))^rho, mapped back to t."""
    spacing = lambda a, b, i: (a ** (1 / rho) + i * (b ** (1 / rho) - a ** (1 / rho))) ** rho
    return grid_from_levels(lambda t: noise_level(process, t), spacing, steps, t_max, t_min)


def logsnr_grid(steps, t_max, t_min, process):
    """Uniform in log-SNR lambda = log(alpha^2 / sigma^2) between its values at t_max and t_min
    (the DPM-Solver grid), mapped back to t (through -lambda, which increases with t)."""
    spacing = lambda a, b, i: a + i * (b - a)
    return grid_from_levels(lambda t: -process.log_snr(t), spacing, steps, t_max, t_min)


TIME_GRIDS = {"uniform": uniform_grid, "edm": edm_grid, "logsnr": logsnr_grid}


def grid_is_singular(grid, process, t):
    """True when the grid cannot use t as an endpoint (an infinite noise level or log-SNR)."""
    t = torch.tensor(float(t), dtype=torch.float64)
    if grid == "edm":
        return not torch.isfinite(noise_level(process, t))
    if grid == "logsnr":
        return not torch.isfinite(process.log_snr(t))
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


def dopri5(f, x, grid, callback=None, rtol=1e-5, atol=1e-5):
    """Adaptive Dormand-Prince 5(4) through torchdiffeq with tolerances rtol / atol; the grid
    only says where the state is reported (its end points bound the integration)."""
    from torchdiffeq import odeint  # imported lazily: only this solver needs it

    states = odeint(
        lambda t, state: f(state, float(t)),
        x,
        grid.to(x.device, x.dtype),
        rtol=rtol,
        atol=atol,
        method="dopri5",
    )
    if callback:
        for i in range(1, len(grid)):
            callback(i, states[i])
    return states[-1]


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
SOLVERS = {**ODE_SOLVERS, **SDE_SOLVERS}
NFE_PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4, "euler_maruyama": 1, "heun_sde": 2}


def needs_score(solver):
    return solver in SDE_SOLVERS


# ---------------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------------
def initial_state(process, x1, t_max):
    """The sampler's start sigma(t_max) x1: x1 itself at t_max = 1 for the processes with
    sigma(1) = 1, sigma_max x1 for VE. (The alpha(t_max) x0 and gamma(t_max) z terms, small or
    zero at t_max near 1, are dropped.)"""
    return process.sigma(torch.tensor(float(t_max), dtype=torch.float64)).item() * x1


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
):
    """Integrate from the base sample x1 at t_max to t_min; returns (x, nfe).

    `denoise_final` replaces the last state by the model's x0 estimate at t_min (one more NFE).
    `noise(x)` draws the SDE noise (default torch.randn_like). `trajectory`, if a list, receives
    (t, x) at every grid time from t_max down to t_min.
    """
    if solver not in SOLVERS:
        raise ValueError(f"sample.solver={solver!r} is unknown; valid choices: {sorted(SOLVERS)}")
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
    )
    times = TIME_GRIDS[grid](steps, t_max, t_min, process)
    x = initial_state(process, x1, t_max)
    callback = None
    if trajectory is not None:
        trajectory.append((float(times[0]), x))
        callback = lambda i, state: trajectory.append((float(times[i]), state))
    if solver in SDE_SOLVERS:
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
    **sampler_kwargs,
):
    """Samples number `indices` (a list of ints) of a run with base seed `seed`, in batches of
    `batch_size`. `labels` gives the class of each index (a (len(indices),) long tensor) for a
    conditional net; `base_sampler(n, generator)` draws a non-Gaussian base. Returns (x, nfe of
    one batch). `trajectory`, if a list, receives the (t, x) states of the first batch."""
    outputs, nfe = [], 0
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        noise = PerSampleNoise(seed, chunk, device)
        template = torch.empty((len(chunk), *shape), device=device)
        x1 = noise(template) if base_sampler is None else noise.base(base_sampler, shape).to(device)
        y = None if labels is None else labels[start : start + batch_size].to(device)
        record = trajectory if start == 0 else None
        x, nfe = sample(
            net, process, model_output, x1, y=y, noise=noise, trajectory=record, **sampler_kwargs
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
):
    """The times among `times` where this sampler cannot evaluate its field: a singular
    prediction conversion (velocity, plus score for SDEs and x0 for denoising / clipping), an
    infinite noise level for the edm / logsnr grids, an infinite SDE coefficient, or gamma = 0
    where the score comes from the z-denoiser."""
    dsts = ("velocity",)
    if not learn_z:
        dsts += ("score",) if needs_score(solver) else ()
        dsts += ("x0",) if need_x0 else ()
    bad = set(prediction.singular_times(process, model_output, dsts, times))
    bad |= {t for t in times if grid_is_singular(grid, process, t)}
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
):
    """One-line error message if the sampler's field is singular anywhere on its time grid,
    else None. Called before any sampling starts."""
    bad = singular_sampling_times(
        process, model_output, solver, [t_max, t_min], diffusion, scale, grid, learn_z, need_x0
    )
    if not bad:
        times = TIME_GRIDS[grid](steps, t_max, t_min, process).tolist()
        bad = singular_sampling_times(
            process, model_output, solver, times, diffusion, scale, grid, learn_z, need_x0
        )
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
def exact_divergence(f, x, t):
    """(f(x, t), div_x f(x, t)) per sample, with one backward pass per dimension."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = f(x, t)
        flat_out, div = (
            out.reshape(out.shape[0], -1),
            torch.zeros(x.shape[0], device=x.device, dtype=x.dtype),
        )
        for i in range(flat_out.shape[1]):
            (grad,) = torch.autograd.grad(flat_out[:, i].sum(), x, retain_graph=True)
            div = div + grad.reshape(grad.shape[0], -1)[:, i]
    return out.detach(), div.detach()


def hutchinson_divergence(f, x, t, probes):
    """(f(x, t), the Hutchinson estimate mean_k eps_k^T (df/dx) eps_k) with fixed Rademacher
    probes (K, *x.shape): unbiased for the divergence, one backward pass per probe."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = f(x, t)
        estimate = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for k, probe in enumerate(probes):
            (vjp,) = torch.autograd.grad(out, x, probe, retain_graph=k < len(probes) - 1)
            estimate = estimate + (vjp * probe).reshape(x.shape[0], -1).sum(1)
    return out.detach(), estimate.detach() / len(probes)


DIVERGENCES = ("exact", "hutchinson")


def gaussian_log_density(x, std):
    """log N(x; 0, std^2 I) per sample."""
    flat = x.reshape(x.shape[0], -1)
    d = flat.shape[1]
    return -0.5 * (flat / std).pow(2).sum(1) - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)


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
    divergence="exact",
    num_probes=1,
    seed=0,
    y=None,
    rtol=1e-5,
    atol=1e-5,
    learn_z=False,
):
    """log p(x0) in nats per sample, integrating the ODE from t_min up to t_max together with
    int div velocity dt. The base density at t_max is N(0, sigma(t_max)^2 I) (exact when
    alpha(t_max) = 0, e.g. t_max = 1 for linear, trig and vp_cosine). With t_min > 0 this is the
    density of x_{t_min}. Returns (log_p, nfe); the exact divergence costs one backward pass per
    dimension, the Hutchinson estimate (seeded Rademacher probes) one per probe."""
    field = Field(net, process, model_output, y=y, learn_z=learn_z)
    shape = x0.shape
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is unknown; valid choices: {DIVERGENCES}")
    probes = None
    if divergence == "hutchinson":
        gen = torch.Generator(device=x0.device).manual_seed(seed)
        probes = torch.randint(0, 2, (num_probes, *shape), generator=gen, device=x0.device)
        probes = probes.to(x0.dtype) * 2 - 1
    div_fn = lambda x, t: (
        exact_divergence(field.velocity, x, t)
        if probes is None
        else hutchinson_divergence(field.velocity, x, t, probes)
    )

    def augmented(state, t):
        x = state[:, :-1].reshape(shape)
        velocity, div = div_fn(x, t)
        return torch.cat([velocity.reshape(shape[0], -1), div[:, None]], dim=1)

    state = torch.cat(
        [x0.reshape(shape[0], -1), torch.zeros(shape[0], 1, dtype=x0.dtype, device=x0.device)],
        dim=1,
    )
    grid = torch.linspace(t_min, t_max, steps + 1, dtype=torch.float64)
    kwargs = {"rtol": rtol, "atol": atol} if solver in ADAPTIVE else {}
    state = ODE_SOLVERS[solver](augmented, state, grid, **kwargs)
    x1, integral = state[:, :-1].reshape(shape), state[:, -1]
    sigma_max = process.sigma(torch.tensor(float(t_max), dtype=torch.float64)).item()
    return gaussian_log_density(x1, sigma_max) + integral, field.nfe


def bits_per_dim(log_p, num_dims, levels=256):
    """Bits per dimension of uint8 data whose model space is x = (k + u) / (levels / 2) - 1 for
    pixel k and dequantisation noise u ~ U[0, 1): bpd = (-log_p / D + log(levels / 2)) / log 2,
    an upper bound on the discrete negative log-likelihood."""
    return (-log_p / num_dims + math.log(levels / 2)) / math.log(2)
