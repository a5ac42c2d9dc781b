"""Exponential moving average of a model's weights, used for sampling and evaluation."""

import copy

import torch


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

    def current_decay(self):
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model):
        self.num_updates += 1
        decay = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def state_dict(self):
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]
