"""Optimizer, learning-rate schedule and gradient clipping."""

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
    """AdamW: fused on CUDA, the multi-tensor (foreach) implementation elsewhere."""
    on_cuda = all(p.is_cuda for p in model.parameters())
    groups = param_groups(model, weight_decay)
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kind)


# After warmup: name -> fn(optimizer, decay_steps, min_lr) -> torch scheduler.
LR_SCHEDULES = {
    "constant": lambda opt, steps, min_lr: lr_scheduler.ConstantLR(opt, 1.0, total_iters=0),
    "cosine": lambda opt, steps, min_lr: lr_scheduler.CosineAnnealingLR(opt, steps, min_lr),
    "linear": lambda opt, steps, min_lr: lr_scheduler.LinearLR(
        opt, 1.0, max(min_lr / opt.param_groups[0]["lr"], 1e-8), total_iters=steps
    ),
}


def build_scheduler(optimizer, schedule, total_steps, warmup_steps=0, min_lr_ratio=0.0):
    """Linear warmup from ~0 over `warmup_steps`, then `schedule` until `total_steps`:
    constant, cosine or linear decay to `min_lr_ratio * lr`. Stepped once per optimizer step."""
    if schedule not in LR_SCHEDULES:
        choices = sorted(LR_SCHEDULES)
        raise ValueError(f"train.lr_schedule={schedule!r} is unknown; valid choices: {choices}")
    decay_steps = max(1, total_steps - warmup_steps)
    min_lr = optimizer.param_groups[0]["lr"] * min_lr_ratio
    after = LR_SCHEDULES[schedule](optimizer, decay_steps, min_lr)
    if warmup_steps <= 1:
        return after
    # lr * (k + 1) / warmup_steps at steps k = 0 .. warmup_steps - 1, then the decay schedule
    warmup = lr_scheduler.LinearLR(optimizer, 1.0 / warmup_steps, 1.0, total_iters=warmup_steps - 1)
    return lr_scheduler.SequentialLR(optimizer, [warmup, after], milestones=[warmup_steps])


def clip_gradients(model, max_norm):
    """Clip the global gradient norm to `max_norm` (no clipping when it is 0 or None) and return
    the norm before clipping as a 0-dim tensor, without a host sync."""
    max_norm = max_norm if max_norm else float("inf")
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
