"""Moving averages of a model's weights, used for sampling and evaluation.

Two kinds (`build_ema(kind, ...)`, registry `EMAS`):

- `classic`: a fixed decay d, ema <- d * ema + (1 - d) * param (with a warmup).
- `power`: power-function EMAs (Karras et al. 2024, "Analyzing and improving the training
  dynamics of diffusion models", EDM2, section 3), one per relative standard deviation in
  `stds`, with periodic snapshots from which the EMA of any other relative std is reconstructed
  after training (`posthoc_state_dict`, used by scripts/posthoc_ema.py).

Power-function EMA. After t updates with parameters theta_1..theta_t, the profile with exponent
gamma > 0 holds

    theta_hat(t) = sum_k w_k theta_k,   w_k = (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1),

the average of the piecewise-constant trajectory theta(tau) = theta_k on (k-1, k] under the
density p(tau) = (gamma+1) tau^gamma / t^(gamma+1) on (0, t]. It is the recursion
theta_hat(t) = beta_t theta_hat(t-1) + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma+1)
(beta_1 = 0: no dependence on the initial weights). Its width relative to t, the relative std,
is sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))), so gamma follows from sigma_rel in
(0, 1/sqrt(12)) (gamma = 6.94 for 0.10, 16.97 for 0.05).

Post-hoc EMA. Snapshots theta_hat_i of profiles (t_i, gamma_i) combine into
sum_i x_i theta_hat_i, whose density is sum_i x_i p_i. The x minimising
|| sum_i x_i p_i - p_r ||_L2 for a target profile p_r = (t_r, gamma_r) solve A x = b with
A_ij = <p_i, p_j>, b_i = <p_i, p_r>, in closed form:

    <p_a, p_b> = (g_a+1)(g_b+1) min(t_a, t_b)^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)).

This module imports no sibling module.
"""

import copy
import glob
import math
import os

import torch

# sigma_rel of gamma = 0 (a uniform average over (0, t]): the largest a power profile can have
MAX_SIGMA_REL = 1 / math.sqrt(12)
SNAPSHOT_DIR = "ema_snapshots"


# ---------------------------------------------------------------------------------------------
# Classic fixed-decay EMA
# ---------------------------------------------------------------------------------------------
class EMA:
    """Keeps `self.model`, a frozen copy of the model whose parameters track

        ema <- d * ema + (1 - d) * param,   d = min(decay, (1 + n) / (10 + n))

    after the n-th update (the warmup of Tensorflow's ExponentialMovingAverage with num_updates):
    early on the average forgets the random initialisation quickly. Buffers (e.g. norm statistics)
    are copied. `decay = 0` makes the EMA a plain copy of the model.
    """

    def __init__(self, model, decay=0.9999, warmup=True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.pairs = TensorPairs()

    def current_decay(self):
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model, keep=1.0):
        """One step towards `model`; `keep` (a number or 0-dim device tensor, 1 or 0) scales the
        step weight: 0 leaves the average as it was (a skipped training step), no host sync."""
        self.num_updates += 1
        weight = (1.0 - self.current_decay()) * keep
        lerp_towards(self.model, model, weight, keep, self.pairs(self.model, model))

    def averages(self):
        """The averaged copies of the model this EMA keeps."""
        return [self.model]

    def state_dict(self):
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]


def paired_tensors(average, model):
    """(average's parameters, model's parameters, average's buffers, model's buffers) as lists,
    in matching order (read under no_grad). Listing a module's tensors walks all its submodules,
    so an EMA caches these lists (see TensorPairs)."""
    return (
        list(average.parameters()),
        list(model.parameters()),  # the Parameter objects: they follow `.data` reassignments
        list(average.buffers()),
        list(model.buffers()),
    )


class TensorPairs:
    """paired_tensors of (average, model), computed once per pair: the modules keep their
    tensor objects (load_state_dict copies in place), so the lists stay valid."""

    def __init__(self):
        self.cache = {}

    def __call__(self, average, model):
        key = (id(average), id(model))
        if key not in self.cache:  # holds the modules, so their ids cannot be reused
            self.cache[key] = (average, model, paired_tensors(average, model))
        return self.cache[key][2]


@torch.no_grad()
def lerp_by_device_scalar(averages, targets, weight):
    """averages <- averages + weight * (targets - averages) for a 0-dim device tensor `weight`,
    without a host sync, in three fused multi-tensor kernels. (torch._foreach_lerp_ would read
    the weight with .item() through its scalar overload, and its list overload takes CUDA's
    fast path only for weights shaped like each tensor: one kernel per tensor otherwise.)"""
    deltas = torch._foreach_sub(targets, averages)
    torch._foreach_mul_(deltas, weight)
    torch._foreach_add_(averages, deltas)


@torch.no_grad()
def lerp_towards(average, model, weight, keep=1.0, tensors=None):
    """average <- average + weight * (model - average) for the parameters; buffers copied
    where keep > 0. `weight` and `keep` may be 0-dim device tensors (no host sync either way).
    `tensors`: paired_tensors(average, model), if already listed."""
    ema_params, params, ema_buffers, buffers = tensors or paired_tensors(average, model)
    if not isinstance(weight, torch.Tensor):
        torch._foreach_lerp_(ema_params, params, weight)
    elif weight.device.type == "cpu":  # the list overload: no .item(), and no slower on the CPU
        torch._foreach_lerp_(ema_params, params, [weight] * len(ema_params))
    else:
        lerp_by_device_scalar(ema_params, params, weight)
    for ema_buffer, buffer in zip(ema_buffers, buffers, strict=True):
        if isinstance(keep, torch.Tensor):
            ema_buffer.copy_(torch.where(keep > 0, buffer, ema_buffer))
        elif keep > 0:
            ema_buffer.copy_(buffer)


# ---------------------------------------------------------------------------------------------
# Power-function EMA
# ---------------------------------------------------------------------------------------------
def sigma_rel_of_gamma(gamma):
    """Relative std of the power profile with exponent gamma."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of_sigma_rel(sigma_rel):
    """The exponent gamma >= 0 whose profile has relative std `sigma_rel` (bisection: sigma_rel
    decreases in gamma >= 0, like 1/gamma for large gamma)."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(
            f"relative std {sigma_rel} must be in (0, {MAX_SIGMA_REL:.4f}) (typical: 0.05-0.15)"
        )
    low, high = 0.0, 4.0 / sigma_rel**2 + 10.0  # sigma_rel(high) < sigma_rel
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if sigma_rel_of_gamma(mid) > sigma_rel else (low, mid)
    return 0.5 * (low + high)


def power_weights(num_steps, gamma):
    """(num_steps,) float64 weights w_k, k = 1..num_steps, of the power profile (closed form)."""
    k = torch.arange(1, num_steps + 1, dtype=torch.float64)
    return (k / num_steps) ** (gamma + 1) - ((k - 1) / num_steps) ** (gamma + 1)


class PowerEMA:
    """Power-function EMAs of the model, one frozen copy per relative std in `stds`.

    `self.profiles[i]` tracks stds[i]; `self.model` (the weights used for sampling and saved
    under "model" in the state_dict) is the first profile. `num_updates` counts updates; it is
    the time t of the profiles and should equal the trainer's step.
    """

    def __init__(self, model, stds=(0.05, 0.10)):
        if len(stds) == 0:
            raise ValueError("the power EMA needs at least one relative std (train.ema_stds)")
        self.stds = [float(s) for s in stds]
        self.gammas = [gamma_of_sigma_rel(s) for s in self.stds]
        self.profiles = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.stds]
        self.model = self.profiles[0]
        self.num_updates = 0
        self.pairs = TensorPairs()

    @torch.no_grad()
    def update(self, model, keep=1.0):
        """Step t = num_updates + 1: profile <- beta_t profile + (1 - beta_t) model, the weight
        1 - beta_t scaled by `keep` (see EMA.update)."""
        self.num_updates += 1
        t = self.num_updates
        for profile, gamma in zip(self.profiles, self.gammas, strict=True):
            beta = (1 - 1 / t) ** (gamma + 1)
            lerp_towards(profile, model, (1.0 - beta) * keep, keep, self.pairs(profile, model))

    def averages(self):
        """The averaged copies of the model this EMA keeps: one per profile."""
        return list(self.profiles)

    def state_dict(self):
        """The entry "model" (profile 0, for sampling) shares its tensors with "profiles"[0], so
        it costs no extra space in a file written by torch.save."""
        return {
            "kind": "power",
            "model": self.model.state_dict(),
            "profiles": [p.state_dict() for p in self.profiles],
            "stds": list(self.stds),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state):
        if "profiles" not in state:
            raise ValueError("the checkpoint holds a classic EMA: it cannot resume train.ema=power")
        if [float(s) for s in state["stds"]] != self.stds:
            raise ValueError(
                f"train.ema_stds={tuple(self.stds)} but the checkpoint tracks "
                f"{tuple(state['stds'])}"
            )
        for profile, profile_state in zip(self.profiles, state["profiles"], strict=True):
            profile.load_state_dict(profile_state)
        self.num_updates = state["num_updates"]

    def snapshot(self):
        """What a snapshot file holds: CPU copies of every profile with their time and exponent,
        and the names of the buffers (copied, not averaged: post-hoc takes the newest)."""
        buffer_names = [name for name, _ in self.model.named_buffers()]
        return {
            "step": self.num_updates,
            "stds": list(self.stds),
            "gammas": list(self.gammas),
            "profiles": [
                {k: v.detach().cpu().clone() for k, v in p.state_dict().items()}
                for p in self.profiles
            ],
            "buffer_names": buffer_names,
        }


EMAS = {
    "classic": lambda model, decay, stds: EMA(model, decay),
    "power": lambda model, decay, stds: PowerEMA(model, stds),
}


def build_ema(kind, model, decay=0.9999, stds=(0.05, 0.10)):
    """The EMA named `kind` (an EMAS key): `decay` is used by 'classic', `stds` by 'power'."""
    if kind not in EMAS:
        raise ValueError(f"unknown EMA kind {kind!r}; valid choices: {sorted(EMAS)}")
    return EMAS[kind](model, decay, stds)


# ---------------------------------------------------------------------------------------------
# Snapshot files
# ---------------------------------------------------------------------------------------------
def snapshot_path(run_dir, step):
    return os.path.join(run_dir, SNAPSHOT_DIR, f"ema_{step:07d}.pt")


def list_snapshots(snapshot_dir):
    return sorted(glob.glob(os.path.join(glob.escape(snapshot_dir), "ema_*.pt")))


def save_snapshot_if_due(ema, run_dir, every, write):
    """For a power EMA whose update count is a multiple of `every` (> 0), write `ema.snapshot()`
    to run_dir/ema_snapshots/ema_<step>.pt with `write(obj, path)` (an atomic writer such as
    utils.atomic_torch_save) and return the path; otherwise None. Rank 0 only."""
    if not isinstance(ema, PowerEMA) or every <= 0 or ema.num_updates % every != 0:
        return None
    path = snapshot_path(run_dir, ema.num_updates)
    write(ema.snapshot(), path)
    return path


# ---------------------------------------------------------------------------------------------
# Post-hoc reconstruction
# ---------------------------------------------------------------------------------------------
def profile_inner_products(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> of power profiles (closed form in the module docstring), computed in log
    space in float64 (t^(gamma+1) overflows for large gamma); the arguments broadcast."""
    t_a, gamma_a, t_b, gamma_b = (
        torch.as_tensor(v, dtype=torch.float64) for v in (t_a, gamma_a, t_b, gamma_b)
    )
    log_value = (
        torch.log(gamma_a + 1)
        + torch.log(gamma_b + 1)
        + (gamma_a + gamma_b + 1) * torch.log(torch.minimum(t_a, t_b))
        - torch.log(gamma_a + gamma_b + 1)
        - (gamma_a + 1) * torch.log(t_a)
        - (gamma_b + 1) * torch.log(t_b)
    )
    return torch.exp(log_value)


def solve_posthoc_coefficients(steps, gammas, target_step, target_gamma):
    """Least-squares coefficients x (float64, one per snapshot profile (steps[i], gammas[i]))
    with sum_i x_i p_i closest to the target profile in L2, and the relative L2 error
    || sum_i x_i p_i - p_r || / || p_r || of that fit."""
    steps = torch.as_tensor(steps, dtype=torch.float64)
    gammas = torch.as_tensor(gammas, dtype=torch.float64)
    gram = profile_inner_products(steps[:, None], gammas[:, None], steps[None], gammas[None])
    rhs = profile_inner_products(steps, gammas, target_step, target_gamma)
    target_norm2 = profile_inner_products(target_step, target_gamma, target_step, target_gamma)
    # normalise rows and columns by the profile norms so the system is scale-free
    scale = gram.diagonal().rsqrt()
    scaled = torch.linalg.lstsq(
        gram * scale[:, None] * scale[None], (rhs * scale)[:, None], driver="gelsd"
    ).solution[:, 0]
    x = scaled * scale
    error2 = x @ gram @ x - 2 * x @ rhs + target_norm2
    return x, math.sqrt(max(error2.item(), 0.0) / target_norm2.item())


def read_snapshot_profiles(paths):
    """[(path, index, step, gamma)] for every profile of every snapshot file (memory-mapped)."""
    entries = []
    for path in paths:
        try:
            snap = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # truncated, foreign or unsafe file
            raise ValueError(f"{path} is not an EMA snapshot ({type(e).__name__})") from None
        if not isinstance(snap, dict) or not {"step", "gammas", "profiles"} <= set(snap):
            raise ValueError(f"{path} is not an EMA snapshot (keys step, gammas, profiles)")
        for index, gamma in enumerate(snap["gammas"]):
            entries.append((path, index, int(snap["step"]), float(gamma)))
    return entries


def posthoc_state_dict(paths, sigma_rel, step=None):
    """The power EMA of relative std `sigma_rel` at `step` (default: the newest snapshot's),
    reconstructed from the snapshot files `paths`. Returns (state_dict, info) where info holds
    the coefficients, the relative L2 error of the profile fit and the snapshot count. Buffers
    come from the newest snapshot; floating tensors are summed in float64, one file at a time."""
    if not paths:
        raise ValueError("no EMA snapshot files given")
    entries = read_snapshot_profiles(paths)
    newest = max(entries, key=lambda e: e[2])
    target_step = newest[2] if step is None else step
    if target_step < 1:
        raise ValueError(f"the EMA step must be >= 1, got {target_step}")
    target_gamma = gamma_of_sigma_rel(sigma_rel)
    x, rel_error = solve_posthoc_coefficients(
        [e[2] for e in entries], [e[3] for e in entries], target_step, target_gamma
    )
    newest_snap = torch.load(newest[0], map_location="cpu", weights_only=True, mmap=True)
    buffers = set(newest_snap["buffer_names"])
    template = newest_snap["profiles"][newest[1]]
    sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in template.items()}
    for coefficient, (path, index, _, _) in zip(x.tolist(), entries, strict=True):
        profile = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["profiles"]
        for name, value in profile[index].items():
            if value.is_floating_point() and name not in buffers:
                sums[name] += coefficient * value.double()
    state = {
        k: (sums[k].to(v.dtype) if v.is_floating_point() and k not in buffers else v.clone())
        for k, v in template.items()
    }
    info = {
        "sigma_rel": float(sigma_rel),
        "gamma": target_gamma,
        "step": int(target_step),
        "num_profiles": len(entries),
        "coefficients": x.tolist(),
        "relative_profile_error": rel_error,
    }
    return state, info
