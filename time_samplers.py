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


TIME_SAMPLERS = {"uniform": Uniform, "logit_normal": LogitNormal, "stratified": Stratified}


def build_time_sampler(name, t_min=0.0, t_max=1.0, **kwargs):
    """Instantiate a registered time sampler; each keyword goes to the samplers that take it."""
    if name not in TIME_SAMPLERS:
        raise ValueError(
            f"time_sampler.name={name!r} is unknown; valid choices: {sorted(TIME_SAMPLERS)}"
        )
    cls = TIME_SAMPLERS[name]
    accepted = inspect.signature(cls).parameters
    return cls(t_min, t_max, **{k: v for k, v in kwargs.items() if k in accepted})
