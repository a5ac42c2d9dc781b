"""ODE / SDE samplers: integrate from t = t_max (base) down to t = t_min (data).

Probability-flow ODE: dx/dt = velocity(x, t), integrated from 1 to 0.
Reverse SDE with a diffusion coefficient eps(t) >= 0 chosen at sampling time (not at training):
    x <- x - h * (velocity - eps(t) * score) + sqrt(2 eps(t) h) * noise,  for a step h > 0,
and eps(t) = 0 recovers the ODE. Every sampler reports the number of function evaluations (NFE):
one NFE is one evaluation of the (guided) field on the whole batch.

Adding a solver, a time grid or a diffusion coefficient is one entry in SOLVERS, TIME_GRIDS or
DIFFUSIONS.
"""

import torch

import prediction
import utils


# ---------------------------------------------------------------------------------------------
# The field a sampler integrates: network + prediction type + process (+ guidance).
# ---------------------------------------------------------------------------------------------
class Field:
    """Wraps `net(x_t, t, y) -> model output of type model_output` and counts NFE.

    Classifier-free guidance (for a net trained with label dropout to the null class
    `num_classes`): out = out(null) + w * (out(y) - out(null)); w = 1 is plain conditional
    sampling and costs one forward pass, w != 1 costs two (batched together). Since every
    conversion between prediction types is affine in the output, guiding the output guides the
    velocity, the score and x0_hat alike.
    """

    def __init__(self, net, process, model_output, y=None, guidance_scale=1.0, num_classes=0):
        self.net, self.process, self.model_output = net, process, model_output
        self.y, self.guidance_scale, self.num_classes = y, guidance_scale, num_classes
        self.nfe = 0

    def output(self, x, t):
        """Model output at (x, t) for a scalar time t."""
        self.nfe += 1
        t_batch = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        guided = self.y is not None and self.guidance_scale != 1.0
        if not guided:
            return self.net(x, t_batch, self.y)
        null = torch.full_like(self.y, self.num_classes)
        out_cond, out_null = self.net(
            torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([self.y, null])
        ).chunk(2)
        return out_null + self.guidance_scale * (out_cond - out_null)

    def coefs(self, x, t):
        return prediction.coefs_at(self.process, torch.tensor(float(t), dtype=torch.float64), x)

    def velocity(self, x, t):
        c = self.coefs(x, t)
        return prediction.convert(self.output(x, t), self.model_output, "velocity", x, c)

    def velocity_and_score(self, x, t):
        c = self.coefs(x, t)
        return prediction.velocity_and_score(self.output(x, t), self.model_output, x, c)

    def x0(self, x, t):
        c = self.coefs(x, t)
        return prediction.convert(self.output(x, t), self.model_output, "x0", x, c)


# ---------------------------------------------------------------------------------------------
# Time grids: steps + 1 decreasing times from t_max to t_min.
# ---------------------------------------------------------------------------------------------
def uniform_grid(steps, t_max, t_min, process=None):
    """t_i = t_max + (t_min - t_max) i / steps."""
    return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)


TIME_GRIDS = {"uniform": uniform_grid}


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
}


def diffusion_coefficient(name, scale, process, t):
    """eps(t) = scale * DIFFUSIONS[name](process, t) as a float tensor."""
    return scale * DIFFUSIONS[name](process, torch.as_tensor(t, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Solvers: fn(field, x, grid, diffusion, noise) -> x at grid[-1]. ODE solvers ignore the
# diffusion and the noise; SDE solvers take `diffusion(t) -> eps(t)` and `noise(x) -> z ~ N(0, I)`
# shaped like x.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def euler(field, x, grid, diffusion=None, noise=None):
    """x_{i+1} = x_i + (t_{i+1} - t_i) velocity(x_i, t_i): first order, 1 NFE per step."""
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        x = x + (t_next - t).item() * field.velocity(x, t)
    return x


@torch.no_grad()
def heun(field, x, grid, diffusion=None, noise=None):
    """Heun's method (explicit trapezoidal rule): second order, 2 NFE per step.

    x~ = x_i + dt v(x_i, t_i);  x_{i+1} = x_i + dt (v(x_i, t_i) + v(x~, t_{i+1})) / 2.
    """
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        dt = (t_next - t).item()
        velocity = field.velocity(x, t)
        x_euler = x + dt * velocity
        x = x + 0.5 * dt * (velocity + field.velocity(x_euler, t_next))
    return x


@torch.no_grad()
def euler_maruyama(field, x, grid, diffusion, noise):
    """Euler-Maruyama on the reverse SDE, 1 NFE per step:

    x_{i+1} = x_i - h (v(x_i, t_i) - eps(t_i) s(x_i, t_i)) + sqrt(2 eps(t_i) h) z,
    with h = t_i - t_{i+1} and z ~ N(0, I).
    """
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        h = (t - t_next).item()
        eps_t = float(diffusion(t))
        velocity, score = field.velocity_and_score(x, t)
        x = x - h * (velocity - eps_t * score) + (2 * eps_t * h) ** 0.5 * noise(x)
    return x


SOLVERS = {"euler": euler, "heun": heun, "euler_maruyama": euler_maruyama}
SDE_SOLVERS = ("euler_maruyama",)


def needs_score(solver):
    return solver in SDE_SOLVERS


# ---------------------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------------------
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
    num_classes=0,
    noise=None,
):
    """Integrate from the base sample x1 at t_max to t_min; returns (x, nfe).

    `denoise_final` replaces the last state by the model's x0 estimate at t_min (one more NFE),
    which removes the noise an SDE leaves at t_min > 0. `noise(x)` draws the SDE noise (default:
    torch.randn_like).
    """
    if solver not in SOLVERS:
        raise ValueError(f"sample.solver={solver!r} is unknown; valid choices: {sorted(SOLVERS)}")
    field = Field(net, process, model_output, y, guidance_scale, num_classes)
    times = TIME_GRIDS[grid](steps, t_max, t_min, process)
    eps = lambda t: diffusion_coefficient(diffusion, diffusion_scale, process, t)
    x = SOLVERS[solver](field, x1, times, eps, noise or torch.randn_like)
    if denoise_final:
        x = field.x0(x, times[-1])
    return x, field.nfe


class PerSampleNoise:
    """Gaussian noise in which sample i's stream depends only on (seed, i): the same samples come
    out whatever the batch size or the number of ranks. Each call draws the next N(0, I) tensor
    of every sample in `indices`, stacked along the batch dimension."""

    def __init__(self, seed, indices, device="cpu"):
        self.device = torch.device(device)
        self.generators = [
            torch.Generator(self.device).manual_seed(sample_seed(seed, i)) for i in indices
        ]

    def __call__(self, like):
        return torch.stack(
            [
                torch.randn(like.shape[1:], generator=g, device=self.device, dtype=like.dtype)
                for g in self.generators
            ]
        )


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
    **sampler_kwargs,
):
    """Samples number `indices` (a list of ints) of a run with base seed `seed`, in batches of
    `batch_size`. `labels` gives the class of each index (a (len(indices),) long tensor) for a
    conditional net. Returns (x, nfe_per_sample_batch)."""
    outputs, nfe = [], 0
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        noise = PerSampleNoise(seed, chunk, device)
        x1 = noise(torch.empty((len(chunk), *shape), device=device))
        y = None if labels is None else labels[start : start + batch_size].to(device)
        x, nfe = sample(net, process, model_output, x1, y=y, noise=noise, **sampler_kwargs)
        outputs.append(x)
    empty = torch.empty((0, *shape), device=device)
    return (torch.cat(outputs) if outputs else empty), nfe


def check_sampling_range(process, model_output, solver, t_min, t_max, diffusion, scale, steps):
    """One-line error message if the field (or the SDE's eps) is not finite on the time grid of
    this sampler, else None. Called before any sampling starts."""
    times = uniform_grid(steps, t_max, t_min).tolist()
    dsts = ("velocity", "score") if needs_score(solver) else ("velocity",)
    bad = prediction.singular_times(process, model_output, dsts, times)
    if needs_score(solver):
        eps = diffusion_coefficient(diffusion, scale, process, torch.tensor(times[:-1]))
        bad += [t for t, e in zip(times[:-1], eps.tolist(), strict=True) if not abs(e) < 1e30]
    if bad:
        return (
            f"sampling {model_output} outputs of process {process.name!r} with {solver} is "
            f"singular at t={sorted(set(bad))[0]:g} (sample.t_min={t_min:g}, "
            f"sample.t_max={t_max:g}): move sample.t_min / sample.t_max inside (0, 1)"
        )
    return None
