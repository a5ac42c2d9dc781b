"""Optimizer, learning-rate schedule and gradient clipping."""

import math

import torch
from torch.optim import lr_scheduler


def param_groups(model, weight_decay):
    """Weight decay on matrices and convolution kernels only; none on norms, biases, embeddings'
    1-D parameters (anything with fewer than 2 dimensions)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
    """Fused AdamW (CUDA and CPU kernels). Setting `optimizer.found_inf` to a 0-dim tensor that
    is 1 makes `step()` a no-op on device, without a host sync: parameters, moments and the
    step count stay as they were (GradScaler's mechanism); the trainer uses it to skip
    non-finite steps. `optimizer.grad_scale` (a 0-dim tensor s) makes it step with the
    gradients g / s: clip_gradients clips that way."""
    groups = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)


# After warmup: name -> f(k, decay_steps, min_ratio), the lr multiplier k steps into the decay.
LR_SCHEDULES = {
    "constant": lambda k, steps, r: 1.0,
    "cosine": lambda k, steps, r: r + (1.0 - r) * (1.0 + math.cos(math.pi * k / steps)) / 2.0,
    "linear": lambda k, steps, r: 1.0 - (1.0 - r) * k / steps,
}


def lr_multiplier(step, schedule, total_steps, warmup_steps=0, min_lr_ratio=0.0):
    """lr(step) / lr: (step + 1) / warmup_steps during warmup, then `schedule` over the
    remaining `total_steps - warmup_steps` steps (min_lr_ratio from the last step on)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    k = min(step - warmup_steps, decay_steps)
    return LR_SCHEDULES[schedule](k, decay_steps, min_lr_ratio)


def build_scheduler(
    optimizer, schedule, total_steps, warmup_steps=0, min_lr_ratio=0.0, start_step=0
):
    """Linear warmup from lr / warmup_steps over `warmup_steps`, then `schedule` until
    `total_steps`: constant, cosine or linear decay to `min_lr_ratio * lr`. Stepped once per
    optimizer step. The lr is a closed-form function of the step, so a scheduler built with
    `start_step=s` is exactly where one stepped s times is; a resumed run rebuilds it from its
    config, so a changed train.lr or train.steps takes effect at once: the schedule is re-defined
    over the new total and continues at the current step (warmup is not restarted).

    The base lr is each param group's `initial_lr` (its `lr` when it has none).
    """
    if schedule not in LR_SCHEDULES:
        choices = sorted(LR_SCHEDULES)
        raise ValueError(f"train.lr_schedule={schedule!r} is unknown; valid choices: {choices}")

    def multiplier(step):
        return lr_multiplier(step, schedule, total_steps, warmup_steps, min_lr_ratio)

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    scheduler = lr_scheduler.LambdaLR(optimizer, multiplier)
    if start_step:
        scheduler.last_epoch, scheduler._step_count = start_step, start_step + 1
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * multiplier(start_step)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler


def clip_gradients(optimizer, params, max_norm):
    """Clip the global gradient norm ||g|| of `params` (a list of parameters; the 2-norm of all
    their gradients together, torch's get_total_norm) to `max_norm` in `optimizer`'s next step
    (no clipping when it is 0 or None) and return ||g|| before clipping as a 0-dim tensor.

    Clipping is g <- g * c with c = min(1, max_norm / (||g|| + 1e-6)), torch's clip_grad_norm_.
    It runs inside build_optimizer's fused AdamW: the kernel divides every gradient by
    `optimizer.grad_scale` (GradScaler's unscaling) as it reads them for the update, so setting
    it to 1 / c = max(1, (||g|| + 1e-6) / max_norm) clips with no multiply of its own and, with
    c kept on the device, no host sync. p.grad is unclipped until `step()` (on the CPU the
    kernel writes g / s back to it). A non-finite norm gives a non-finite divisor; the trainer
    skips such a step (optimizer.found_inf)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # 0 for no gradients
    optimizer.grad_scale = ((norm + 1e-6) / float(max_norm)).clamp(min=1.0) if max_norm else None
    return norm
