"""Training objectives beside flow matching, and the few-step sampler of the models they train.

Conventions of docs/design.md: x_t = alpha(t) x0 + sigma(t) x1, t = 0 data, t = 1 base, and the
conditional velocity v_t = alpha_dot x0 + sigma_dot x1. An objective is selected by
`train.objective` (OBJECTIVES) and gives:
  - needs_time_inputs: 1 (net(x, t, y)) or 2 (net(x, t, y, r));
  - processes_allowed(process, base) -> None, or a one-line error naming the valid processes;
  - batch_allowed(micro_batch) -> None, or a one-line error for a micro-batch it cannot use;
  - draw(n, generator, device, t) -> the extra per-sample randomness of the global batch
    (a (n,) tensor, split across ranks and micro-batches like t), or None;
  - loss(model, process, x0, x1, t, extra, y, step, total_steps) -> the scalar loss, mean over
    the micro-batch, where `model` is what the trainer calls (DDP-wrapped and/or compiled);
  - defines_velocity, velocity_net(net) -> the net as the likelihood's probability-flow ODE
    reads it, net(x, t, y) giving the configured model output (None where the objective
    defines no such velocity).

`flow` is today's regression (trainer.DiffusionTrainer.loss); its entry only describes it.

MeanFlow (Geng et al. 2025). The network predicts the average velocity over [r, t],
    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_tau, tau) dtau,
so one jump z_r = z_t - (t - r) u(z_t, r, t) is exact along the probability-flow ODE, for any
process (v is whatever the marginal velocity is). Differentiating (t - r) u = int_r^t v in t
gives the MeanFlow identity
    u = v(z_t, t) - (t - r) du/dt,   du/dt = v . d_z u + d_t u  (total derivative along the flow),
and the loss regresses u_theta(z_t, r, t) on the stop-gradient target
    u_tgt = v_t - (t - r) (v_t . d_z u_theta + d_t u_theta),
with v_t the conditional velocity and the bracket one forward-mode JVP of
(z, r, t) -> u_theta with tangents (v_t, 0, 1). At r = t the target is v_t: flow matching, and
no derivative is needed, so the JVP runs only on the samples with r != t (a fraction `ratio`,
25% in the paper): u itself comes from one ordinary forward pass with its graph.

Consistency training (Song & Dhariwal 2023, iCT; Geng et al. 2024, ECT) works on EDM's noise
level s = sigma / alpha, where x_t / alpha = x0 + s x1 =: x_hat for every process, so one model
serves them all. The consistency function
    f(x_hat, s) = c_skip(s) x_hat + c_out(s) F(c_in(s) x_hat, c_noise(s)),
    c_skip = sd^2 / ((s - s_min)^2 + sd^2),  c_out = (s - s_min) sd / sqrt(s^2 + sd^2),
    c_in = 1 / sqrt(s^2 + sd^2),             c_noise = log(s) / 4   (EDM's, prediction.py),
meets f(x_hat, s_min) = x_hat exactly. The loss compares f at adjacent levels s_n < s_{n+1} of
iCT's discretisation with the same (x0, x1): lambda(s_n) d(f(x0 + s_{n+1} x1), sg f(x0 + s_n x1)),
lambda = 1 / (s_{n+1} - s_n), d the pseudo-Huber metric.
"""

import inspect
import math

import torch
from torch.nn.parallel import DistributedDataParallel

import utils
from processes import bcast

# ---------------------------------------------------------------------------------------------
# Helpers shared by the objectives.
# ---------------------------------------------------------------------------------------------


def deterministic_only(name, process):
    """The one-line error for a stochastic interpolant (gamma != 0), else None."""
    if process.stochastic:
        return (
            f"train.objective={name} needs process.gamma=none (a deterministic interpolant); "
            f"got a stochastic one"
        )
    return None


def per_sample_mean(x):
    """Mean of the squares over every dimension but the batch: (B, ...) -> (B,)."""
    return x.pow(2).reshape(x.shape[0], -1).mean(dim=1)


def call_net(model, x, t, y, r=None):
    """model(x, t, y) or model(x, t, y, r) for a network with one or two time inputs."""
    return model(x, t, y) if r is None else model(x, t, y, r)


# ---------------------------------------------------------------------------------------------
# Flow matching (today's trainer path).
# ---------------------------------------------------------------------------------------------
class FlowMatching:
    """Regression of the configured prediction type (trainer.DiffusionTrainer.loss). The trainer
    keeps its own code path; this entry only describes the objective."""

    name = "flow"
    needs_time_inputs = 1
    defines_velocity = True  # a probability-flow velocity, hence a likelihood

    def processes_allowed(self, process, base="gaussian"):
        return None

    def batch_allowed(self, micro_batch):
        return None

    def draw(self, n, generator, device, t):
        return None

    def velocity_net(self, net):
        """The net as the likelihood's ODE reads it, net(x, t, y): itself."""
        return net


# ---------------------------------------------------------------------------------------------
# MeanFlow.
# ---------------------------------------------------------------------------------------------
# The factor on (t, r) before the network (MeanFlow.time_scale): the nets embed 1000 t.
MEANFLOW_TIME_SCALE = 1e-3


class MeanFlow:
    """MeanFlow (Geng et al. 2025): the net's output is the average velocity u(z_t, r, t).

    (r, t): the trainer's t and a second time s from `time_sampler` (the same distribution),
    sorted so that t >= r, for the first round(`ratio` * B) samples of each micro-batch of B
    (the paper's fraction with r != t, 25%); the others get r = t. The rows of a micro-batch are
    i.i.d. (shuffled data, independent times), so taking the first ones is a random choice with
    a fixed count: static shapes and no host sync, and the JVP (meanflow_target) runs on those
    rows only. Loss per sample: the mean over dimensions of delta^2, delta = u_theta - sg(u_tgt),
    times the adaptive weight sg(1 / (delta^2 + c)^p) (p = 1, c = 1e-3 in the paper; p = 0 is
    the plain squared error, which at r = t is the flow-matching velocity loss). The net sees
    z_t * input_scale(t) like every other net, and the times (t, r) multiplied by `time_scale`:
    the networks embed t * 1000 by default, whose fastest sinusoid has d/dt = 1000, and d_t u
    of that size swamps the target (measured: the loss blows up to 10-50x its start on 2-D
    data); the default 1e-3 gives the embedding of t itself, as in MeanFlow's reference model
    (fastest d/dt = 1).

    `curriculum` > 0: the interval length t - r is capped at min(1, k / (curriculum K)) at step
    k of K (r = max(r, t - cap)), so training starts as flow matching and reaches full-length
    intervals after a fraction `curriculum` of the run (the instantaneous velocity first, then
    ever longer averages, as the AlphaFlow and "Understanding, accelerating, and improving
    MeanFlow training" papers (2025) motivate).
    """

    name = "meanflow"
    needs_time_inputs = 2
    defines_velocity = True

    def __init__(
        self,
        time_sampler,
        ratio=0.25,
        adaptive_p=1.0,
        adaptive_c=1e-3,
        time_scale=None,
        curriculum=0.0,
    ):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"train.meanflow_ratio={ratio} must be in [0, 1]")
        if not 0.0 <= curriculum <= 1.0:
            raise ValueError(f"train.meanflow_curriculum={curriculum} must be in [0, 1]")
        self.time_sampler, self.ratio, self.curriculum = time_sampler, ratio, curriculum
        self.adaptive_p, self.adaptive_c = adaptive_p, adaptive_c
        self.time_scale = MEANFLOW_TIME_SCALE if time_scale is None else time_scale

    def processes_allowed(self, process, base="gaussian"):
        """Any deterministic interpolant and any base: the identity holds for every flow."""
        return deterministic_only(self.name, process)

    def velocity_net(self, net):
        """The instantaneous velocity v(z_t, t) = u(z_t, t, t) (the interval of length 0) as a
        net(x, t, y) with the times scaled as in training: what the likelihood's ODE reads."""
        return InstantaneousVelocity(net, self.time_scale)

    def draw(self, n, generator, device, t):
        """The second time of every sample; the loss pairs it with t on the interval rows."""
        return self.time_sampler(n, generator=generator, device=device).to(t.dtype)

    def interval_count(self, batch):
        """How many rows of a micro-batch of `batch` get r != t: round(ratio * batch)."""
        return round(self.ratio * batch)

    def batch_allowed(self, micro_batch):
        """An error when ratio > 0 but no row of the micro-batch would get r != t."""
        if self.ratio == 0 or self.interval_count(micro_batch):
            return None
        return (
            f"train.meanflow_ratio={self.ratio} gives no sample with r != t in a micro-batch "
            f"of {micro_batch} (train.batch_size / (world size x train.grad_accum)): raise the "
            f"batch or the ratio (above {0.5 / micro_batch:.3g} for one sample per micro-batch)"
        )

    def max_interval(self, step, total_steps):
        """The cap on t - r at `step` of `total_steps` (1: no cap)."""
        if not self.curriculum:
            return 1.0
        return min(1.0, step / (self.curriculum * total_steps))

    def pair_times(self, t, second, step=0, total_steps=1):
        """(t, r) of a micro-batch: (max, min) of (t, second) on the first interval_count rows,
        with t - r capped at max_interval, and (t, t) on the rest. Returns (t, r, count)."""
        count = self.interval_count(t.shape[0])
        upper, lower = torch.maximum(t, second)[:count], torch.minimum(t, second)[:count]
        lower = torch.maximum(lower, upper - self.max_interval(step, total_steps))
        return torch.cat([upper, t[count:]]), torch.cat([lower, t[count:]]), count

    def loss(self, model, process, x0, x1, t, extra, y=None, step=0, total_steps=1):
        t, r, count = self.pair_times(t, extra, step, total_steps)
        z_t = process.interpolate(x0, x1, t)
        v_t = process.velocity_target(x0, x1, t)
        u, u_target = meanflow_target(model, process, z_t, v_t, r, t, y, self.time_scale, count)
        delta_sq = per_sample_mean(u - u_target)
        weight = adaptive_weight(delta_sq.detach(), self.adaptive_p, self.adaptive_c)
        return (weight * delta_sq).mean()


def adaptive_weight(delta_sq, p, c):
    """MeanFlow's adaptive loss weight 1 / (delta^2 + c)^p (computed on detached errors)."""
    return 1.0 / (delta_sq + c).pow(p) if p else torch.ones_like(delta_sq)


def meanflow_target(model, process, z_t, v_t, r, t, y, time_scale=1.0, intervals=None):
    """(u, sg(u_tgt)) with u = u_theta(z_t, r, t) = model(z_t input_scale(t), t time_scale, y,
    r time_scale) and u_tgt = v_t - (t - r) du/dt.

    u is one ordinary forward pass of `model` with its graph: under DDP the wrapped module's
    own forward, so its gradients are all-reduced as usual (tests/test_objectives.py checks 2
    processes against 1). du/dt = v_t . d_z u + d_t u is one forward-mode JVP of
    (z, r, t) -> u_theta with tangents (v_t, 0, 1) (torch.func.jvp), under no_grad since the
    target is detached, and only on the first `intervals` rows (default: all): the others must
    have r = t, where u_tgt = v_t. The JVP calls the module inside a DDP wrapper (no gradient to
    synchronise, no collective), in fp32 under bf16 autocast; with dropout its mask differs from
    u's pass.
    """
    intervals = t.shape[0] if intervals is None else intervals
    jvp_model = model.module if isinstance(model, DistributedDataParallel) else model

    def average_velocity(net, z, r_in, t_in, labels):
        scale = bcast(process.input_scale(t_in), z)
        return net(z * scale, t_in * time_scale, labels, r_in * time_scale)

    u = average_velocity(model, z_t, r, t, y)
    if intervals == 0:
        return u, v_t.detach()
    rows = slice(0, intervals)
    labels = None if y is None else y[rows]
    # The JVP runs in fp32 even under bf16 autocast: through an op that autocast keeps in fp32
    # (group_norm), forward-mode AD returns a tangent whose dtype differs from its primal's, and
    # the next convolution then fails on mixed dtypes (torch 2.13).
    with torch.no_grad(), torch.autocast(z_t.device.type, enabled=False):
        _, du_dt = torch.func.jvp(
            lambda z, r_in, t_in: average_velocity(jvp_model, z, r_in, t_in, labels),
            (z_t[rows], r[rows], t[rows]),
            (v_t[rows], torch.zeros_like(r[rows]), torch.ones_like(t[rows])),
        )
    head = v_t[rows] - bcast(t[rows] - r[rows], du_dt) * du_dt
    return u, torch.cat([head, v_t[intervals:]]).detach()


# ---------------------------------------------------------------------------------------------
# Consistency training (iCT / ECT).
# ---------------------------------------------------------------------------------------------
def consistency_coefficients(s, s_min, sigma_data):
    """(c_in, c_skip, c_out, c_noise) at noise levels s (float64 tensor): EDM's c_in and c_noise,
    and iCT's c_skip, c_out shifted so that c_skip(s_min) = 1, c_out(s_min) = 0 exactly."""
    sd = sigma_data
    root = torch.sqrt(s**2 + sd**2)
    c_skip = sd**2 / ((s - s_min) ** 2 + sd**2)
    c_out = (s - s_min) * sd / root
    return 1.0 / root, c_skip, c_out, torch.log(s) / 4


def consistency_function(model, x_hat, s, y=None, s_min=0.002, sigma_data=0.5):
    """f(x_hat, s) = c_skip x_hat + c_out F(c_in x_hat, c_noise) for x_hat = x0 + s x1 (the EDM
    state; x_t / alpha of any process) at noise levels s (B,) or a scalar."""
    s64 = torch.as_tensor(s, dtype=torch.float64, device=x_hat.device)
    s64 = s64.expand(x_hat.shape[0]) if s64.dim() == 0 else s64
    c_in, c_skip, c_out, c_noise = (
        v.to(x_hat.dtype) for v in consistency_coefficients(s64, s_min, sigma_data)
    )
    raw = model(bcast(c_in, x_hat) * x_hat, c_noise, y)
    return bcast(c_skip, x_hat) * x_hat + bcast(c_out, x_hat) * raw


def karras_levels(count, s_min, s_max, rho=7.0):
    """`count` noise levels from s_min up to s_max, rho-spaced (Karras et al. 2022), float64."""
    i = torch.arange(count, dtype=torch.float64) / max(count - 1, 1)
    a, b = s_min ** (1 / rho), s_max ** (1 / rho)
    return (a + i * (b - a)) ** rho


def discretisation_steps(step, total_steps, s0=10, s1=1280):
    """iCT's number of discretisation intervals N(k) = min(s0 2^floor(k / K'), s1) with
    K' = floor(K / (log2(s1 / s0) + 1)) (the doubling schedule, scaled to K = total_steps);
    there are N(k) + 1 levels."""
    stages = int(math.log2(s1 // s0)) + 1
    per_stage = max(total_steps // stages, 1)
    return min(s0 * 2 ** (step // per_stage), s1)


def lognormal_interval_probs(levels, p_mean, p_std):
    """iCT's probability of interval [s_n, s_{n+1}]: proportional to
    erf((ln s_{n+1} - P_mean) / (sqrt2 P_std)) - erf((ln s_n - P_mean) / (sqrt2 P_std))."""
    cdf = torch.erf((torch.log(levels) - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def pseudo_huber(a, b):
    """sqrt(|a - b|^2 + c^2) - c per sample, c = 0.00054 sqrt(d), d the data dimension."""
    diff_sq = (a - b).pow(2).reshape(a.shape[0], -1).sum(dim=1)
    c = 0.00054 * math.sqrt(a[0].numel())
    return torch.sqrt(diff_sq + c**2) - c


class InstantaneousVelocity(torch.nn.Module):
    """A MeanFlow net u(x, t, y, r) seen as net(x, t, y) -> u(x, t, t) with the times multiplied
    by `time_scale` (MeanFlow.velocity_net)."""

    def __init__(self, net, time_scale):
        super().__init__()
        self.net, self.time_scale = net, time_scale

    def forward(self, x, t, y=None):
        t = t * self.time_scale
        return self.net(x, t, y, t)


class Consistency:
    """Consistency training from scratch (iCT, Song & Dhariwal 2023; ECT, Geng et al. 2024).

    At step k: N(k) + 1 rho-spaced levels in [s_min, s_max] (discretisation_steps), an interval
    index n drawn with lognormal_interval_probs from the uniform `extra` (inverse CDF), and
        loss = mean over samples of d(f(x0 + s_{n+1} x1, s_{n+1}), sg f(x0 + s_n x1, s_n))
               / (s_{n+1} - s_n),
    d the pseudo-Huber metric. The teacher is the student itself under no_grad (no EMA
    teacher, as in iCT). The trainer's t is not used: levels come from the discretisation.
    """

    name = "consistency"
    needs_time_inputs = 1
    defines_velocity = False

    def __init__(
        self, s_min=0.002, s_max=80.0, sigma_data=0.5, p_mean=-1.1, p_std=2.0, s0=10, s1=1280
    ):
        self.s_min, self.s_max, self.sigma_data = s_min, s_max, sigma_data
        self.p_mean, self.p_std, self.s0, self.s1 = p_mean, p_std, s0, s1
        self.on_device = {}  # (level count, device) -> (levels, cdf), copied once

    def processes_allowed(self, process, base="gaussian"):
        """Deterministic processes with a Gaussian base whose noise level sigma / alpha spans
        [s_min, s_max] over t in [0, 1]."""
        message = deterministic_only(self.name, process)
        if message:
            return message
        if base != "gaussian":
            return f"train.objective={self.name} needs process.base=gaussian, got {base!r}"
        ends = process.noise_level(torch.tensor([0.0, 1.0], dtype=torch.float64))
        if not (ends[0] <= self.s_min and ends[1] >= self.s_max):
            return (
                f"train.objective={self.name} needs noise levels sigma/alpha from "
                f"{self.s_min:g} to {self.s_max:g}; process.name={process.name} covers "
                f"[{float(ends[0]):g}, {float(ends[1]):g}] (valid: linear, trig, vp_linear, "
                f"vp_cosine, ve with sigma_max >= {self.s_max:g})"
            )
        return None

    def batch_allowed(self, micro_batch):
        return None

    def velocity_net(self, net):
        """None: a consistency function maps x_t to the start of its ODE trajectory, which is
        not E[x0 | x_t], so it defines no probability-flow velocity and no likelihood."""
        return None

    def draw(self, n, generator, device, t):
        """Uniforms in [0, 1) that pick each sample's interval (by the inverse CDF at the step)."""
        return torch.rand(n, generator=generator, device=device).to(t.dtype)

    def pick_intervals(self, uniforms, step, total_steps):
        """(s_n, s_{n+1}) (float64, (B,)) for the uniforms of the batch at training step `step`."""
        count = discretisation_steps(step, total_steps, self.s0, self.s1) + 1
        key = (count, uniforms.device)
        if key not in self.on_device:  # the count changes a few times per run (s0 to s1)
            levels = karras_levels(count, self.s_min, self.s_max)
            cdf = torch.cumsum(lognormal_interval_probs(levels, self.p_mean, self.p_std), 0)
            self.on_device[key] = tuple(utils.to_device(v, uniforms.device) for v in (levels, cdf))
        levels, cdf = self.on_device[key]
        index = torch.searchsorted(cdf, uniforms.double(), right=True)
        index = index.clamp(max=len(levels) - 2)
        return levels[index], levels[index + 1]

    def loss(self, model, process, x0, x1, t, extra, y=None, step=0, total_steps=1):
        """x0 + s x1 is x_t / alpha(t) at the time where sigma / alpha = s for every process
        (checked by processes_allowed to reach [s_min, s_max]), so neither `process` nor the
        trainer's `t` enters: the levels come from the discretisation at `step`."""
        s_low, s_high = self.pick_intervals(extra, step, total_steps)
        f = lambda s: consistency_function(  # noqa: E731
            model, x0 + bcast(s, x0) * x1, s, y, self.s_min, self.sigma_data
        )
        with torch.no_grad():
            teacher = f(s_low)
        student = f(s_high)
        weight = (1.0 / (s_high - s_low)).to(x0.dtype)
        return (weight * pseudo_huber(student, teacher)).mean()


OBJECTIVES = {"flow": FlowMatching, "meanflow": MeanFlow, "consistency": Consistency}


def build_objective(name, **kwargs):
    """An OBJECTIVES entry; keywords the objective does not take are ignored (like
    time_samplers.build_time_sampler), so a caller can pass every setting."""
    if name not in OBJECTIVES:
        raise ValueError(
            f"train.objective={name!r} is unknown; valid choices: {sorted(OBJECTIVES)}"
        )
    cls = OBJECTIVES[name]
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


# ---------------------------------------------------------------------------------------------
# Few-step sampling.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def few_step_sample(
    net,
    process,
    x1,
    steps,
    objective,
    y=None,
    noise=None,
    t_max=1.0,
    t_min=0.0,
    levels=None,
    s_min=0.002,
    s_max=80.0,
    sigma_data=0.5,
    time_scale=None,
    trajectory=None,
    data_mean=0.0,
    data_std=0.5,
    gaussian_base=True,
):
    """`steps` jumps from t = 1 to t = 0 (one network evaluation each). Returns (x, nfe).

    `objective`: an OBJECTIVES name or instance (a MeanFlow instance brings its time_scale;
    `time_scale` overrides it; the default is MeanFlow's, 1e-3). `trajectory`, if a list,
    receives the (t, x) states: meanflow's z at each grid time; consistency's x0 estimate
    after each jump (recorded at t = 0).

    meanflow: start z = sampling.initial_state(process, x1, t_max, data_mean, data_std,
    gaussian_base) (x1 itself at t_max = 1 for linear, trig, vp_cosine) and jump
    z_r = z_t - (t - r) u(z_t, r, t) along a uniform grid t_max -> t_min; returns z_{t_min}.
    consistency: x_hat = s_max x1, x = f(x_hat, s_max); for each further level s (from
    `levels`, default the rho-spaced levels of consistency_sample_levels), re-noise
    x_hat = x + sqrt(s^2 - s_min^2) noise(x) with fresh per-sample noise and x = f(x_hat, s).
    `noise` is a callable like sampling.PerSampleNoise (needed for steps > 1).
    """
    import sampling  # here: sampling may import this module for its few_step solver

    name = getattr(objective, "name", objective)
    if name not in FEW_STEP_SAMPLERS:
        raise ValueError(
            f"sample.solver=few_step needs train.objective in {sorted(FEW_STEP_SAMPLERS)}, "
            f"got {name!r}"
        )
    if steps < 1:
        raise ValueError(f"sample.steps={steps} must be >= 1 for sample.solver=few_step")
    if name == "meanflow":
        if time_scale is None:
            time_scale = getattr(objective, "time_scale", MEANFLOW_TIME_SCALE)
        start = sampling.initial_state(process, x1, t_max, data_mean, data_std, gaussian_base)
        return meanflow_sample(net, process, start, steps, y, t_max, t_min, time_scale, trajectory)
    if steps > 1 and noise is None:
        raise ValueError("few_step consistency sampling with steps > 1 needs a noise callable")
    if levels is None:
        levels = consistency_sample_levels(steps, s_min, s_max)
    return consistency_sample(net, x1, levels, y, noise, s_min, sigma_data, trajectory)


def meanflow_sample(
    net, process, z, steps, y=None, t_max=1.0, t_min=0.0, time_scale=1.0, trajectory=None
):
    """MeanFlow jumps z_r = z_t - (t - r) u(z_t, r, t) from the state z at t_max on a uniform
    grid, the net seeing the times multiplied by `time_scale` (as in training). Returns
    (x, nfe)."""
    grid = torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)
    batch = z.shape[0]
    record = trajectory.append if trajectory is not None else lambda state: None
    record((t_max, z))
    for t, r in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
        t_vec = torch.full((batch,), t * time_scale, dtype=z.dtype, device=z.device)
        r_vec = torch.full((batch,), r * time_scale, dtype=z.dtype, device=z.device)
        scale = process.input_scale(torch.tensor(t, dtype=torch.float64)).to(z.dtype)
        z = z - (t - r) * net(z * scale, t_vec, y, r_vec)
        record((r, z))
    return z, steps


def consistency_sample_levels(steps, s_min=0.002, s_max=80.0):
    """The noise levels of a `steps`-jump consistency sample: s_max, then `steps - 1` levels of
    the rho = 7 grid between s_max and s_min (s_min itself excluded: a jump to it is the
    identity). 2 steps: s_max and 2.5 (iCT used 0.821 on CIFAR-10; pass `levels` to choose)."""
    return karras_levels(steps + 1, s_min, s_max).flip(0)[:-1]


def consistency_sample(
    net, x1, levels, y=None, noise=None, s_min=0.002, sigma_data=0.5, trajectory=None
):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) at the decreasing noise
    `levels` (first = the start, s_max). Returns (x0 estimate, nfe = len(levels))."""
    levels = torch.as_tensor(levels, dtype=torch.float64)
    x = None
    for i, s in enumerate(levels.tolist()):
        if i == 0:
            x_hat = s * x1
        else:
            x_hat = x + math.sqrt(max(s**2 - s_min**2, 0.0)) * noise(x)
        x = consistency_function(net, x_hat, s, y, s_min, sigma_data)
        if trajectory is not None:
            trajectory.append((0.0, x))
    return x, len(levels)


FEW_STEP_SAMPLERS = ("consistency", "meanflow")
