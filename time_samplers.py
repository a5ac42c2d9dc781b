"""Distributions of training times t on [t_min, t_max].

Every sampler is called as sampler(n, generator=None, device="cpu") and returns n times in the
default dtype.
Adding a sampler is one class and one entry in TIME_SAMPLERS.
"""

import inspect

import torch


class Uniform:
    """t ~ U[t_min, t_max]."""

    def __init__(self, t_min=0.0, t_max=1.0):
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"time range needs 0 <= t_min < t_max <= 1, got [{t_min}, {t_max}]")
        self.t_min, self.t_max = t_min, t_max

    def _scale(self, u):
        return self.t_min + (self.t_max - self.t_min) * u

    def __call__(self, n, generator=None, device="cpu"):
        return self._scale(torch.rand(n, generator=generator, device=device))


class LogitNormal(Uniform):
    """t = t_min + (t_max - t_min) * sigmoid(m + s * n), n ~ N(0, 1) (Esser et al. 2024, SD3).

    Concentrates training on intermediate times; m shifts the mode towards data (m < 0) or noise.
    """

    def __init__(self, t_min=0.0, t_max=1.0, mean=0.0, std=1.0):
        super().__init__(t_min, t_max)
        self.mean, self.std = mean, std

    def __call__(self, n, generator=None, device="cpu"):
        normal = torch.randn(n, generator=generator, device=device)
        return self._scale(torch.sigmoid(self.mean + self.std * normal))


class Stratified(Uniform):
    """One uniform draw per stratum: u_i = (i + U_i) / n, shuffled, then scaled to [t_min, t_max].

    Marginally uniform, but the batch covers [t_min, t_max] evenly, so the batch-mean loss has
    lower variance than with i.i.d. uniform times.
    """

    def __call__(self, n, generator=None, device="cpu"):
        jitter = torch.rand(n, generator=generator, device=device)
        order = torch.randperm(n, generator=generator, device=device)
        return self._scale((order + jitter) / n)


class EDMLogNormal(Uniform):
    """EDM's noise-level distribution (Karras et al. 2022): ln s ~ N(p_mean, p_std^2), with
    P_mean = -1.2, P_std = 1.2 by default, mapped to the process's time t = s^{-1}(s) through
    `inverse_noise_level` (the process's inverse of its noise level s(t) = sigma(t) / alpha(t),
    a callable float64 tensor -> float64 tensor, e.g. process.inverse_noise_level) and clamped to
    [t_min, t_max] (levels outside the range land on its ends).
    """

    def __init__(self, t_min=0.0, t_max=1.0, p_mean=-1.2, p_std=1.2, inverse_noise_level=None):
        super().__init__(t_min, t_max)
        if inverse_noise_level is None:
            raise ValueError(
                "time_sampler.name=edm_lognormal needs inverse_noise_level (the process's)"
            )
        self.p_mean, self.p_std = p_mean, p_std
        self.inverse_noise_level = inverse_noise_level

    def __call__(self, n, generator=None, device="cpu"):
        normal = torch.randn(n, generator=generator, device=device)
        levels = torch.exp(self.p_mean + self.p_std * normal.double())
        t = self.inverse_noise_level(levels).clamp(self.t_min, self.t_max)
        return t.to(torch.get_default_dtype())


TIME_SAMPLERS = {
    "uniform": Uniform,
    "logit_normal": LogitNormal,
    "stratified": Stratified,
    "edm_lognormal": EDMLogNormal,
}


def build_time_sampler(name, t_min=0.0, t_max=1.0, **kwargs):
    """Instantiate a registered time sampler; each keyword goes to the samplers that take it."""
    if name not in TIME_SAMPLERS:
        raise ValueError(
            f"time_sampler.name={name!r} is unknown; valid choices: {sorted(TIME_SAMPLERS)}"
        )
    cls = TIME_SAMPLERS[name]
    accepted = inspect.signature(cls).parameters
    return cls(t_min, t_max, **{k: v for k, v in kwargs.items() if k in accepted})
