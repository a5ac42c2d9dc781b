"""DiffusionTrainer: the training loop, checkpoints, periodic sampling and evaluation.

One optimizer step (read `train_step` and `loss` top to bottom):
  batch -> (x0, y) -> t ~ time_sampler -> x1 ~ base (N(0, I) or a toy set), z ~ N(0, I) when
  gamma != 0 -> (optional minibatch-OT pairing of x1 to x0)
  -> x_t = alpha(t) x0 + sigma(t) x1 (+ gamma(t) z) -> out = net(x_t * input_scale(t), t, y)
  -> (pred, target) = prediction conversion -> MSE (+ MSE of the z-denoiser)
  -> backward (accumulated over micro-batches, DDP sync only on the last) -> gradient norm
  -> one all-reduce of two flags (non-finite loss / grad norm on any rank; stop requested on
  any rank) -> optimizer step (which also clips) + LR step -> EMA, both no-ops on device for a
  non-finite step
  -> occasional log / sample / eval / save; a stop request ends the loop with a checkpoint.

Randomness: the times, base samples, latents and label dropout of a step are drawn for the
GLOBAL batch from a generator seeded by (seed, step), and each rank takes its rows (row W * i + r
of the micro-batch, matching the data loader's interleaving). So a run is identical for any
number of ranks with the same global batch (except with OT pairing, which couples within each
rank's micro-batch, and MeanFlow when train.meanflow_ratio x micro-batch is not an integer: its
r != t rows are the first ones of each micro-batch), and resuming needs no RNG state for them.
Dropout inside the network uses the per-rank torch RNG (seeded by seed + rank), saved in every
checkpoint.
"""

import contextlib
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import checkpoints
import data_utils
import evaluation
import logging_utils
import objectives
import prediction
import sampling
import utils
from ema import build_ema, save_snapshot_if_due
from optimizers import build_optimizer, build_scheduler, clip_gradients
from processes import bcast

# Divergence guard: a log window whose mean loss exceeds DIVERGENCE_FACTOR x the median of the
# last DIVERGENCE_WINDOW healthy windows (once there are DIVERGENCE_MIN_HISTORY of them) marks
# the state as diverged: checkpoints written then are flagged unhealthy and never make pruning
# remove the newest healthy checkpoint. Diffusion losses fall or stay flat over training; a
# tenfold jump of a window mean over the recent median is a blow-up, not noise.
DIVERGENCE_FACTOR = 10.0
DIVERGENCE_WINDOW = 50
DIVERGENCE_MIN_HISTORY = 5
# Host reads of the per-step flags (stop agreed, consecutive skipped steps): every step on the
# CPU (free), every few steps on accelerators (a read is a host sync).
POLL_EVERY = {"cpu": 1}
POLL_EVERY_DEFAULT = 10

find_latest_checkpoint = checkpoints.find_latest


class TrainingDiverged(FloatingPointError):
    """Too many consecutive non-finite steps, or non-finite weights at a save."""


class DiffusionTrainer:
    def __init__(
        self, config, net, process, time_sampler, dataset, dist_info, run_dir, eval_dataset=None
    ):
        self.config, self.process, self.time_sampler = config, process, time_sampler
        self.dataset, self.dist, self.run_dir = dataset, dist_info, run_dir
        self.eval_dataset = eval_dataset or dataset  # likelihoods of train.eval_every
        self.device = dist_info.device
        c = config.train
        self.steps, self.grad_accum = c.steps, c.grad_accum
        self.micro_batch = utils.micro_batch_size(c.batch_size, dist_info.world_size, c.grad_accum)
        self.model_output, self.target = config.prediction.model_output, config.prediction.target
        self.num_classes = dataset.num_classes if config.model.class_conditional else 0
        self.learn_z = process.stochastic  # the net also outputs the z-denoiser eta_z
        p = config.prediction
        self.precond = prediction.build_preconditioning(p.preconditioning, process, p.sigma_data)
        self.loss_weighting = (p.loss_weight, p.sigma_data, p.min_snr_gamma)
        self.objective = objectives.build_objective(
            c.objective,
            time_sampler=time_sampler,
            ratio=c.meanflow_ratio,
            adaptive_p=c.meanflow_p,
            adaptive_c=c.meanflow_c,
            time_scale=c.meanflow_time_scale,
            curriculum=c.meanflow_curriculum,
            s_min=c.consistency_s_min,
            s_max=c.consistency_s_max,
            sigma_data=p.sigma_data,
            p_mean=c.consistency_p_mean,
            p_std=c.consistency_p_std,
            s0=c.consistency_s0,
            s1=c.consistency_s1,
        )
        self.base_sampler = base_sampler(config.process.base)
        self.ot_pairing = config.train.ot_pairing
        self.class_dropout = config.model.class_dropout if self.num_classes else 0.0

        self.net = net.to(self.device)  # the raw module: its weights are what we save
        self.params = list(self.net.parameters())  # listed once: clipping runs every step
        self.ema = build_ema(c.ema, self.net, c.ema_decay, c.ema_stds)
        self.optimizer = build_optimizer(self.net, c.lr, c.weight_decay, c.betas, c.adam_eps)
        self.scheduler = self.build_scheduler(start_step=0)
        model = torch.compile(self.net) if c.compile else self.net
        if dist_info.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        self.model = model  # what the training step calls (compiled and/or DDP-wrapped)
        self.autocast_dtype = torch.bfloat16 if c.precision == "bf16" else None

        self.loader = data_utils.InfiniteLoader(
            dataset,
            self.micro_batch,
            dist_info.rank,
            dist_info.world_size,
            config.seed,
            flip=config.data.flip,
            num_workers=config.data.num_workers,
            device=self.device,
        )
        self.step = 0
        self.run_id = None
        self.last_metrics = {}
        # Non-finite steps, counted on device (no host sync): total, current run, longest run.
        zero = torch.zeros((), device=self.device)
        self.skipped_steps, self.bad_run, self.longest_bad_run = zero, zero.clone(), zero.clone()
        # This rank's sums over the open log window (loss, grad norm, healthy steps), kept in
        # checkpoints so that the first window after a resume averages the same steps.
        self.window_sums = [zero.clone(), zero.clone(), zero.clone()]
        self.loss_history = []  # mean losses of healthy log windows (divergence guard)
        self.diverged = False
        self.last_healthy_ckpt = None  # protected from pruning
        self.poll_every = POLL_EVERY.get(self.device.type, POLL_EVERY_DEFAULT)
        self.stopped = None  # (reason, checkpoint path) after a stop signal

    def build_scheduler(self, start_step):
        c = self.config.train
        return build_scheduler(
            self.optimizer, c.lr_schedule, c.steps, c.warmup_steps, c.min_lr_ratio, start_step
        )

    # -----------------------------------------------------------------------------------------
    # One step.
    # -----------------------------------------------------------------------------------------
    def draw_step_noise(self):
        """t, x1, z (None unless stochastic), the label-dropout mask and the objective's extra
        randomness (None for flow) of the whole global batch of this step, from generators
        seeded by (seed, step), shaped (accum, micro, world, ...)."""
        generator = utils.step_generator(self.config.seed, self.step, self.device)
        n, shape = self.config.train.batch_size, self.dataset.shape
        t = self.time_sampler(n, generator=generator, device=self.device)
        if self.base_sampler is None:
            x1 = torch.randn((n, *shape), generator=generator, device=self.device)
        else:  # toy-set base, drawn on the CPU
            cpu_generator = torch.Generator().manual_seed(
                utils.mix_seed(self.config.seed, self.step, 1)
            )
            x1 = utils.to_device(self.base_sampler(n, cpu_generator), self.device)
        drop = torch.rand(n, generator=generator, device=self.device) < self.class_dropout
        z = None
        if self.process.stochastic:
            z = torch.randn((n, *shape), generator=generator, device=self.device)
        extra = self.objective.draw(n, generator, self.device, t)  # drawn last: flow unchanged
        split = (self.grad_accum, self.micro_batch, self.dist.world_size)
        draws = (t, x1, z, drop, extra)
        return [None if v is None else v.reshape(*split, *v.shape[1:]) for v in draws]

    def loss(self, x0, y, t, x1, z, drop, extra=None):
        """MSE between the model output (converted to the target type) and the target, plus the
        MSE of the z-denoiser eta_z against z for a stochastic interpolant; or the loss of a
        meanflow / consistency objective (objectives.py), given the DDP-wrapped model."""
        if self.ot_pairing:
            x1 = x1[minibatch_ot_permutation(x0, x1)]
        if self.num_classes:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        else:
            y = None
        if self.objective.name != "flow":
            with self.autocast():
                return self.objective.loss(
                    self.model, self.process, x0, x1, t, extra, y, self.step, self.steps
                )
        x_t = self.process.interpolate(x0, x1, t, z)
        x_in, t_in = self.precond.inputs(x_t, t)  # x_t * input_scale(t), t; EDM: c_in, c_noise
        with self.autocast():
            out = self.model(x_in, t_in, y).float()
        c = prediction.coefs_at(self.process, t, x_t)
        if self.learn_z:
            out, eta_z = out.chunk(2, dim=1)
        out = self.precond.output(out, x_t, t)  # EDM: c_skip x + c_out F
        pred, target = prediction.regression_pair(
            out, x0, x1, x_t, c, self.model_output, self.target, z
        )
        weight = prediction.loss_weight(
            self.loss_weighting[0], self.process, t, self.target, *self.loss_weighting[1:]
        )
        loss = (bcast(weight, pred) * (pred - target).pow(2)).mean()
        if self.learn_z:
            loss = loss + (eta_z - z).pow(2).mean()
        return loss

    def train_step(self, stop_requested=False):
        """One optimizer step over `grad_accum` micro-batches. Returns (loss, grad_norm, skipped,
        stop) as 0-dim device tensors (no host sync): `skipped` is 1 when the loss or the
        gradient norm was non-finite on any rank, and then the step changed no weight,
        optimizer moment or EMA; `stop` is 1 when any rank had `stop_requested`. Both come from
        one all-reduce of two flags, so every rank takes the same decisions."""
        if not (self.model.training and self.net.training):  # train() walks every submodule
            self.model.train()
        t_all, x1_all, z_all, drop_all, extra_all = self.draw_step_noise()
        rank = self.dist.rank
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x0, y = next(self.loader)
            t, x1, drop = t_all[micro, :, rank], x1_all[micro, :, rank], drop_all[micro, :, rank]
            z = None if z_all is None else z_all[micro, :, rank]
            extra = None if extra_all is None else extra_all[micro, :, rank]
            last = micro == self.grad_accum - 1
            sync = (
                contextlib.nullcontext()
                if last or self.dist.world_size == 1
                else self.model.no_sync()
            )
            with sync:
                loss = self.loss(x0, y, t, x1, z, drop, extra) / self.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = clip_gradients(self.optimizer, self.params, self.config.train.grad_clip)
        local_bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        skipped, stop = utils.any_rank([local_bad, stop_requested], self.device)
        self.optimizer.found_inf = skipped  # fused AdamW: no update at all when 1
        self.optimizer.step()  # clips too (clip_gradients set its divisor)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.net, keep=1.0 - skipped)  # no EMA step when skipped
        self.count_skipped(skipped)
        self.step += 1
        return loss_sum, grad_norm, skipped, stop

    def count_skipped(self, skipped):
        self.skipped_steps = self.skipped_steps + skipped
        self.bad_run = (self.bad_run + skipped) * skipped
        self.longest_bad_run = torch.maximum(self.longest_bad_run, self.bad_run)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -----------------------------------------------------------------------------------------
    # The loop.
    # -----------------------------------------------------------------------------------------
    def train(self, logger_factory, until=None, stop=None):
        """Train from self.step to train.steps (or to step `until`, as if interrupted there).
        `logger_factory(run_id)` makes the metrics logger (after a resume, so that wandb
        continues the same run). `stop`: an installed utils.StopRequest, when the caller's
        (one that also covers the building of the trainer); else one installed here.

        A stop signal (utils.STOP_SIGNALS) or the launcher's death ends the run after the
        current step with a checkpoint: `self.stopped` = (reason, path). Too many consecutive
        non-finite steps raise TrainingDiverged (checked every `poll_every` steps); checkpoints
        written during a run of skipped steps are marked unhealthy, and the newest healthy one
        is never pruned."""
        c = self.config.train
        until = self.steps if until is None else min(until, self.steps)
        logger = logger_factory(self.run_id)
        self.run_id = logger.run_id
        bar = logging_utils.progress_bar(self.steps, self.step, self.dist.is_main)
        loss_acc, norm_acc, good_acc = self.window_sums  # updated in place
        tic, step_at_tic, skipped_at_log = time.time(), self.step, int(self.skipped_steps.item())
        watch_parent = "TORCHELASTIC_RUN_ID" in os.environ  # launched by torchrun
        own_stop = stop is None
        stop = utils.StopRequest().install() if own_stop else stop
        try:
            while self.step < until:
                loss, grad_norm, skipped, stop_flag = self.train_step(stop.requested(watch_parent))
                keep = 1.0 - skipped
                loss_acc += torch.where(keep > 0, loss, 0.0)
                norm_acc += torch.where(keep > 0, grad_norm.detach(), 0.0)
                good_acc += keep
                bar.update(1)
                if self.step % self.poll_every == 0 or self.step == until:
                    self.check_bad_steps()
                if self.step % c.log_every == 0 or self.step == self.steps:
                    good = good_acc.item()
                    metrics = {
                        "loss": self.window_mean(loss_acc, good),
                        "grad_norm": self.window_mean(norm_acc, good),
                        "lr": self.scheduler.get_last_lr()[0],
                        "steps_per_sec": (self.step - step_at_tic) / max(time.time() - tic, 1e-9),
                        "skipped_steps": int(self.skipped_steps.item()),
                        "peak_memory_mib": utils.peak_memory_mib(self.device),
                    }
                    metrics["samples_per_sec"] = metrics["steps_per_sec"] * c.batch_size
                    self.report_skipped(metrics["skipped_steps"] - skipped_at_log, step_at_tic)
                    self.check_divergence(metrics["loss"])
                    self.last_metrics = metrics
                    logger.log(self.step, metrics)
                    if metrics["loss"] is not None:
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                    loss_acc.zero_(), norm_acc.zero_(), good_acc.zero_()
                    tic, step_at_tic = time.time(), self.step
                    skipped_at_log = metrics["skipped_steps"]
                if self.dist.is_main:  # power EMA: snapshots for post-hoc reconstruction
                    save_snapshot_if_due(  # before a stop: a resume does not redo this step
                        self.ema, self.run_dir, c.ema_snapshot_every, utils.atomic_torch_save
                    )
                if (self.step % self.poll_every == 0 or self.step == until) and stop_flag.item():
                    self.stopped = (stop.reason or "a signal to another rank", self.save())
                    break
                sample_due = c.sample_every and self.step % c.sample_every == 0
                sample_due = sample_due or self.step == self.steps
                eval_due = c.eval_every and self.step % c.eval_every == 0
                if self.step % c.save_every == 0 or sample_due or eval_due:
                    self.save()  # first: a stop during slow sampling or eval loses no step
                if sample_due:
                    path = self.save_samples()
                    if path:
                        logger.log_image(self.step, "samples", path)
                if eval_due:
                    metrics = self.evaluate()
                    logger.log(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        finally:
            if own_stop:
                stop.restore()
            bar.close()
            logger.close()

    def window_mean(self, total, count):
        """Mean over the healthy steps of a log window (None when every step was skipped)."""
        return utils.all_reduce_mean(total).item() / count if count else None

    def check_bad_steps(self):
        """Raise TrainingDiverged after train.max_bad_steps consecutive non-finite steps."""
        limit = self.config.train.max_bad_steps
        longest = int(self.longest_bad_run.item())
        self.longest_bad_run.zero_()
        if limit and longest >= limit:
            raise TrainingDiverged(
                f"stopped at step {self.step}: {longest} consecutive non-finite steps "
                f"(train.max_bad_steps={limit}), none of which changed the weights; the last "
                f"healthy checkpoint is {self.last_healthy_ckpt or 'none'}: lower "
                f"--config.train.lr (allowed on resume) or check the data, then rerun"
            )

    def report_skipped(self, count, since):
        if count and self.dist.is_main:
            print(
                f"warning: {count} non-finite step(s) between steps {since + 1} and {self.step} "
                f"skipped (no weight, optimizer or EMA update)"
            )

    def check_divergence(self, loss):
        """Update self.diverged from a log window's mean loss (see DIVERGENCE_FACTOR)."""
        if loss is None:
            return
        recent = self.loss_history[-DIVERGENCE_WINDOW:]
        median = statistics.median(recent) if len(recent) >= DIVERGENCE_MIN_HISTORY else None
        if median is not None and loss > DIVERGENCE_FACTOR * median:
            if not self.diverged and self.dist.is_main:
                print(
                    f"warning: loss {loss:.4g} at step {self.step} is over "
                    f"{DIVERGENCE_FACTOR:g}x the recent median {median:.4g}: the run looks "
                    f"diverged; checkpoints from now on are marked unhealthy and the last "
                    f"healthy one ({self.last_healthy_ckpt}) is kept"
                )
            self.diverged = True
            return
        self.diverged = False
        self.loss_history = (self.loss_history + [loss])[-DIVERGENCE_WINDOW:]

    # -----------------------------------------------------------------------------------------
    # Sampling (all ranks share the work; rank 0 writes).
    # -----------------------------------------------------------------------------------------
    def generate(self, num, use_ema=True, trajectory=None, **overrides):
        """`num` samples from the EMA (or raw) weights with the config's sampler settings
        (`overrides` replace any of them), split over ranks and gathered in index order on
        every rank. Returns (x, labels, nfe)."""
        net = self.ema.model if use_ema else self.net
        return generate_distributed(
            net.eval(),
            self.process,
            self.model_output,
            self.dataset.shape,
            num,
            self.num_classes,
            self.dist,
            sampler_kwargs(self.config, **overrides),
            trajectory=trajectory,
        )

    def evaluate(self):
        """evaluate_model with the EMA weights on the eval dataset (see evaluate_model)."""
        e = self.config.eval
        nll = (
            data_utils.likelihood_data(self.eval_dataset, e.nll_num, e.seed) if e.nll_num else None
        )
        return evaluate_model(
            self.ema.model.eval(),
            self.process,
            self.config,
            data_info_of(self.dataset),
            nll,
            self.dist,
            self.num_classes,
        )

    def samples_path(self):
        """run_dir/samples_<step>.png: where save_samples writes this step's grid or scatter."""
        return os.path.join(self.run_dir, f"samples_{self.step:07d}.png")

    def save_samples(self):
        """Sample the config's `sample.num` images / points into `samples_path()`."""
        was_training = self.net.training
        x, labels, nfe = self.generate(self.config.sample.num, self.config.sample.use_ema)
        self.net.train(was_training)
        if not self.dist.is_main:
            return None
        message = degenerate_samples_message(x, self.model_output, self.process.name)
        if message:
            print(f"{message} (step {self.step})")
        stem = self.samples_path().removesuffix(".png")
        reference = self.dataset.x[: len(x)] if self.dataset.kind == "points" else None
        logging_utils.save_loss_curve(
            logging_utils.read_metrics(self.run_dir), os.path.join(self.run_dir, "loss.png")
        )
        return write_samples(x, labels, self.dataset.kind, stem, reference)

    # -----------------------------------------------------------------------------------------
    # Checkpoints.
    # -----------------------------------------------------------------------------------------
    def state_dict(self, rng_states, healthy, window_sums):
        """Everything to continue exactly, in types torch.load(weights_only=True) accepts.
        `rng_states` and `window_sums` hold every rank's, in rank order."""
        return {
            "step": self.step,
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": list(rng_states),
            "world_size": self.dist.world_size,
            "config": json.dumps(self.config.to_dict()),
            "data_info": data_info_of(self.dataset),
            "run_id": self.run_id,
            "metrics": self.last_metrics,
            "healthy": healthy,
            "skipped_steps": int(self.skipped_steps.item()),
            "loss_history": list(self.loss_history),
            "window_sums": list(window_sums),
        }

    def save(self):
        """Write ckpt_<step>.pt atomically (rank 0) and prune to the newest `keep_ckpts` (plus
        the newest healthy one, if older). Refuses to write non-finite weights. A checkpoint is
        healthy unless the run looks diverged or the last step was skipped. Returns the path."""
        own = (utils.get_rng_state(), [float(v) for v in self.window_sums])
        rng_states, window_sums = zip(*utils.all_gather_objects(own), strict=True)
        path = checkpoints.checkpoint_path(self.run_dir, self.step)
        for module in (self.net, *self.ema.averages()):  # equal on every rank: all raise
            if not all(torch.isfinite(p).all() for p in module.parameters()):
                raise TrainingDiverged(f"non-finite weights at step {self.step}: not saving")
        if not self.dist.is_main:
            utils.barrier()
            return path
        healthy = not self.diverged and self.bad_run.item() == 0
        checkpoints.save(self.state_dict(rng_states, healthy, window_sums), path)
        if healthy:
            self.last_healthy_ckpt = path
        self.prune_checkpoints()
        utils.barrier()
        return path

    def prune_checkpoints(self):
        paths = [p for _, p in checkpoints.list_checkpoints(self.run_dir)]
        protected = os.path.basename(self.last_healthy_ckpt or "")
        for old in paths[: max(0, len(paths) - self.config.train.keep_ckpts)]:
            if os.path.basename(old) != protected:
                os.remove(old)

    def load(self, state, path=None):
        """Restore everything from a checkpoint's state (checkpoints.load) to continue exactly
        where it stopped. The LR schedule is rebuilt from this config at the checkpoint's step,
        so a changed train.lr / train.steps applies (see optimizers.build_scheduler)."""
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.train.lr
        self.scheduler = self.build_scheduler(start_step=state["step"])
        self.loader.load_state_dict(state["loader"])
        self.step, self.run_id = state["step"], state["run_id"]
        self.last_metrics = state["metrics"]
        self.skipped_steps.fill_(state.get("skipped_steps", 0))
        self.loss_history = list(state.get("loss_history", []))
        self.last_healthy_ckpt = path if state["healthy"] else None
        if state["world_size"] == self.dist.world_size:
            utils.set_rng_state(state["rng"][self.dist.rank])
            windows = state.get("window_sums") or []  # absent in older checkpoints
            if len(windows) == self.dist.world_size:
                for total, value in zip(self.window_sums, windows[self.dist.rank], strict=True):
                    total.fill_(value)
        elif self.dist.is_main:
            print(
                f"resuming with world size {self.dist.world_size} (checkpoint: "
                f"{state['world_size']}): per-rank dropout RNG streams are reseeded"
            )
        return state

    def init_weights(self, state):
        """Start from another run's model and EMA weights (train.init_from, whose shapes
        main.init_from_state has checked); everything else (optimizer, schedule, step, data
        order) starts fresh."""
        self.net.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"]["model"])


def check_same_shapes(own, other, source, hint="use the same model.* settings as that run"):
    """ValueError (one line) unless `other` has exactly the tensors of `own`, shape for shape."""
    missing = sorted(set(own) - set(other))
    extra = sorted(set(other) - set(own))
    wrong = [
        f"{k} {tuple(other[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in other and other[k].shape != v.shape
    ]
    if missing or extra or wrong:
        details = "; ".join(
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", extra), ("shape", wrong))
            if items
        )
        raise ValueError(f"{source}: its weights do not fit this model ({details}); {hint}")


# ---------------------------------------------------------------------------------------------
# Helpers shared with main.py's sample mode.
# ---------------------------------------------------------------------------------------------
def sampler_kwargs(config, **overrides):
    """Keyword arguments of sampling.generate from a config's `sample` and `process` sections."""
    s = config.sample
    kwargs = dict(
        seed=s.seed,
        batch_size=s.batch_size,
        solver=s.solver,
        steps=s.steps,
        t_min=s.t_min,
        t_max=s.t_max,
        grid=s.grid,
        diffusion=s.diffusion,
        diffusion_scale=s.diffusion_scale,
        denoise_final=s.denoise_final,
        guidance_scale=s.guidance_scale,
        guidance_interval=tuple(s.guidance_interval),
        clip_x0=s.clip_x0,
        clip_percentile=s.clip_percentile,
        rtol=s.rtol,
        atol=s.atol,
        learn_z=config.process.gamma != "none",
        base_sampler=base_sampler(config.process.base),
        preconditioning=config.prediction.preconditioning,
        sigma_data=config.prediction.sigma_data,
        data_std=config.prediction.sigma_data,
        s_churn=s.s_churn,
        s_tmin=s.s_tmin,
        s_tmax=s.s_tmax,
        s_noise=s.s_noise,
        objective=config.train.objective,
        time_scale=config.train.meanflow_time_scale,
        levels=tuple(s.consistency_levels),
    )
    kwargs.update(overrides)
    return kwargs


def generate_distributed(
    net, process, model_output, shape, num, num_classes, dist_info, kwargs, trajectory=None
):
    """Rank r makes samples r, r + W, r + 2W, ... (per-sample seeds make the result independent
    of W); all ranks receive the full set in index order. Class of sample i: i % num_classes.
    `trajectory`, if a list, receives this rank's first batch's (t, x) states."""
    indices = list(range(dist_info.rank, num, dist_info.world_size))
    labels = torch.tensor(indices, dtype=torch.long) % num_classes if num_classes else None
    with logging_utils.TaskProgress("sampling", dist_info.is_main) as progress:
        x, nfe = sampling.generate(
            net,
            process,
            model_output,
            shape,
            indices,
            labels=labels,
            num_classes=num_classes,
            device=dist_info.device,
            trajectory=trajectory,
            progress=progress,
            **kwargs,
        )
    parts = utils.all_gather_objects((indices, x.cpu()))
    order = torch.tensor([i for idx, _ in parts for i in idx]).argsort()
    x = torch.cat([p for _, p in parts])[order]
    all_labels = torch.arange(num) % num_classes if num_classes else None
    return x, all_labels, nfe


def evaluate_model(net, process, config, data_info, nll_data, dist_info, num_classes):
    """Sample quality of `sample.num` samples and the NLL of `nll_data`, both spread over ranks.

    Images: Frechet distance of `eval.feature_extractor` features (computed per rank, gathered,
    float64 statistics against cached reference statistics of the training set). 2-D: sliced
    Wasserstein distance and MMD against fresh data. NLL: `nll_data` = (x, y) in model space
    (images dequantised), through the probability-flow ODE; nats per dimension with its
    standard error, and bits per dimension for images. Returns the metrics dict on every rank.
    """
    e, kind = config.eval, data_info["kind"]
    shape, model_output = tuple(data_info["shape"]), config.prediction.model_output
    kwargs = sampler_kwargs(config)
    x, _, nfe = generate_distributed(
        net, process, model_output, shape, config.sample.num, num_classes, dist_info, kwargs
    )
    message = dist_info.is_main and degenerate_samples_message(x, model_output, process.name)
    if message:  # rank 0 alone: every rank holds the gathered samples
        print(message, file=sys.stderr)
    metrics = {"sample_nfe": nfe, "num_samples": config.sample.num}
    if kind == "image":
        d = config.data
        build = lambda: evaluation.build_feature_extractor(
            e.feature_extractor, d.name, d.root, dist_info.device, d.image_size, d.path or None
        )
        if dist_info.is_main:  # trains and caches the classifier once, before others read it
            extractor = build()
        utils.barrier()
        if not dist_info.is_main:
            extractor = build()
        mine = x[dist_info.rank :: dist_info.world_size].to(dist_info.device)
        features = torch.cat(utils.all_gather_objects(evaluation.compute_features(extractor, mine)))
        if dist_info.is_main:
            mu, sigma = evaluation.feature_statistics(features.numpy())
            ref_mu, ref_sigma = evaluation.reference_statistics(
                d.name, e.feature_extractor, extractor, d.root, d.image_size, d.path or None
            )
            metrics[f"fd_{e.feature_extractor}"] = evaluation.frechet_distance(
                mu, sigma, ref_mu, ref_sigma
            )
    elif dist_info.is_main:
        metrics.update(evaluation.points_metrics(x, config.data.name, seed=e.seed))
    if nll_data is not None:
        metrics.update(nll_metrics(net, process, config, nll_data, dist_info, num_classes, kind))
    return utils.all_gather_objects(metrics)[0]


def likelihood_grid(e, s):
    """The likelihood ODE's time grid for the config sections eval `e` and sample `s`:
    eval.nll_grid, or sample.grid for `sample`."""
    return s.grid if e.nll_grid == "sample" else e.nll_grid


def nll_metrics(net, process, config, nll_data, dist_info, num_classes, kind):
    """Negative log-likelihood (nats per dimension, its standard error, bits per dimension for
    images) of nll_data = (x, y), the points split over ranks and gathered: the probability-flow
    ODE of the objective's velocity (objectives: a MeanFlow net at r = t, its times scaled as in
    training) over [eval.nll_t_min, eval.nll_t_max] (main.resolve_likelihood_range)."""
    e, s = config.eval, config.sample
    objective = objectives.build_objective(
        config.train.objective, time_sampler=None, time_scale=config.train.meanflow_time_scale
    )
    x, y = nll_data
    mine = slice(dist_info.rank, None, dist_info.world_size)
    x, y = x[mine].to(dist_info.device), y[mine].to(dist_info.device)
    dims = x[0].numel()
    divergence = sampling.choose_divergence(e.divergence, dims)
    progress = logging_utils.TaskProgress("likelihood", dist_info.is_main)
    with progress:
        log_p, nfe = sampling.log_likelihood(
            objective.velocity_net(net),
            process,
            config.prediction.model_output,
            x,
            solver=e.nll_solver,
            steps=e.nll_steps,
            t_min=e.nll_t_min,
            t_max=e.nll_t_max,
            grid=likelihood_grid(e, s),
            divergence=divergence,
            num_probes=e.num_probes,
            seed=e.seed + dist_info.rank,
            y=y if num_classes else None,
            rtol=s.rtol,
            atol=s.atol,
            learn_z=process.stochastic,
            preconditioning=config.prediction.preconditioning,
            sigma_data=config.prediction.sigma_data,
            data_std=config.prediction.sigma_data,
            progress=progress,
        )
    nll = torch.cat(utils.all_gather_objects((-log_p / dims).double().cpu()))
    metrics = {
        "nll_nats_per_dim": nll.mean().item(),
        "nll_stderr": (nll.std() / len(nll) ** 0.5).item() if len(nll) > 1 else 0.0,
        "nll_num": len(nll),
        "nll_nfe": nfe,
        "nll_divergence": divergence,
        "nll_t_min": e.nll_t_min,  # > 0: the density of x_{t_min}, not of the data
    }
    if kind == "image":
        metrics["bits_per_dim"] = sampling.bits_per_dim(-nll.mean().item() * dims, dims)
    return metrics


def base_sampler(name):
    """None for the standard Gaussian base, else `fn(n, generator)` drawing a 2-D toy set."""
    return None if name == "gaussian" else data_utils.TOY_SETS[name]


def minibatch_ot_permutation(x0, x1):
    """Permutation of x1 that minimises sum_i |x0_i - x1_perm(i)|^2 within the batch (exact, with
    scipy's linear_sum_assignment): the minibatch optimal-transport coupling of OT-CFM
    (Tong et al. 2023; Pooladian et al. 2023)."""
    from scipy.optimize import linear_sum_assignment  # here: a slow import few runs need

    cost = torch.cdist(x0.reshape(len(x0), -1).double(), x1.reshape(len(x1), -1).double()) ** 2
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(cols[rows.argsort()], device=x1.device)


def data_info_of(dataset):
    """What sampling needs to know about the data, saved in every checkpoint."""
    return {"shape": list(dataset.shape), "num_classes": dataset.num_classes, "kind": dataset.kind}


def write_trajectory(trajectory, kind, stem, frames=8, rows=8):
    """Write `<stem>.png` showing the states from noise (left) to data (right) of `trajectory`,
    a list of (t, x) from sampling.generate: for images one strip per sample (the first `rows`),
    for 2-D data a row of scatter snapshots. Returns the path."""
    picks = sorted({round(i * (len(trajectory) - 1) / (frames - 1)) for i in range(frames)})
    chosen = [trajectory[i] for i in picks]
    if kind == "points":
        snapshots = [(t, data_utils.to_data_space(x, kind)) for t, x in chosen]
        return logging_utils.save_scatter_snapshots(snapshots, stem + ".png")
    states = [data_utils.to_data_space(x[:rows], kind) for _, x in chosen]  # (frames, N, H, W, C)
    strips = np.stack(states, axis=1).reshape(-1, *states[0].shape[1:])  # sample-major
    upscale = max(1, 64 // strips.shape[1])
    return logging_utils.save_image_grid(
        strips, stem + ".png", nrow=len(chosen), upscale=upscale, padding=max(1, upscale // 2)
    )


def degenerate_samples_message(x, model_output, process_name):
    """One line describing samples that cannot be right (non-finite values, or every sample
    the same), with the likely cause; None for healthy-looking samples."""
    flat = x.reshape(len(x), -1).double()
    bad = (~torch.isfinite(flat)).any(1)
    if bad.any():
        return (
            f"warning: {int(bad.sum())} of {len(x)} samples hold NaN or inf (images: written "
            f"as 0; points: left out of plots, kept as they are in --mode=sample's samples.npz): "
            f"the "
            f"sampler diverged; likely causes: a prediction conversion that divides by a tiny "
            f"alpha or sigma at the ends of the time range ({model_output} outputs of process "
            f"{process_name!r}: try sample.t_max < 1, another sample.grid, more sample.steps, or "
            f"a velocity output), or a diverged model (see skipped_steps in metrics.jsonl)"
        )
    if len(x) > 1 and float((flat - flat.mean(0)).abs().max()) < 1e-6 * (1 + flat.abs().max()):
        return (
            f"warning: all {len(x)} samples are identical (collapsed): the model ignores its "
            f"input or the sampler's field is degenerate; check the loss curve and sample.*"
        )
    return None


def write_samples(x, labels, kind, stem, reference=None):
    """Write `<stem>.png`: an image grid (one class per column when conditional), or for 2-D
    sets a scatter over `reference` data points (model space)."""
    data = data_utils.to_data_space(x, kind)
    if kind == "image":
        nrow = 10 if labels is not None and len(data) >= 10 else None
        upscale = max(1, 64 // data.shape[1])
        return logging_utils.save_image_grid(
            data, stem + ".png", nrow=nrow, upscale=upscale, padding=max(1, upscale // 2)
        )
    if reference is not None:
        reference = data_utils.to_data_space(reference, kind)
    return logging_utils.save_scatter(data, stem + ".png", reference=reference)
