"""DiffusionTrainer: the training loop, checkpoints, periodic sampling and evaluation.

One optimizer step (read `train_step` and `loss` top to bottom):
  batch -> (x0, y) -> t ~ time_sampler -> x1 ~ base (N(0, I) or a toy set), z ~ N(0, I) when
  gamma != 0 -> (optional minibatch-OT pairing of x1 to x0)
  -> x_t = alpha(t) x0 + sigma(t) x1 (+ gamma(t) z) -> out = net(x_t * input_scale(t), t, y)
  -> (pred, target) = prediction conversion -> MSE (+ MSE of the z-denoiser)
  -> backward (accumulated over micro-batches, DDP sync only on the last) -> clip
  -> optimizer + LR step -> EMA -> occasional log / sample / eval / save.

Randomness: the times, base samples, latents and label dropout of a step are drawn for the
GLOBAL batch from a generator seeded by (seed, step), and each rank takes its rows (row W * i + r
of the micro-batch, matching the data loader's interleaving). So a run is identical for any
number of ranks with the same global batch (except with OT pairing, which couples within each
rank's micro-batch), and resuming needs no RNG state for them. Dropout inside the network uses
the per-rank torch RNG (seeded by seed + rank), saved in every checkpoint.
"""

import contextlib
import glob
import os
import re
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch.nn.parallel import DistributedDataParallel

import data_utils
import evaluation
import logging_utils
import prediction
import sampling
import utils
from ema import EMA
from optimizers import build_optimizer, build_scheduler, clip_gradients
from processes import bcast

CKPT_PATTERN = re.compile(r"ckpt_(\d+)\.pt$")


def find_latest_checkpoint(run_dir):
    """Path of the checkpoint with the highest step in run_dir, or None."""
    found = [
        (int(m.group(1)), p)
        for p in glob.glob(os.path.join(run_dir, "ckpt_*.pt"))
        if (m := CKPT_PATTERN.search(p))
    ]
    return max(found)[1] if found else None


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
        self.micro_batch = c.batch_size // (dist_info.world_size * c.grad_accum)
        self.model_output, self.target = config.prediction.model_output, config.prediction.target
        self.num_classes = dataset.num_classes if config.model.class_conditional else 0
        self.learn_z = process.stochastic  # the net also outputs the z-denoiser eta_z
        self.base_sampler = base_sampler(config.process.base)
        self.ot_pairing = config.train.ot_pairing
        self.class_dropout = config.model.class_dropout if self.num_classes else 0.0

        self.net = net.to(self.device)  # the raw module: its weights are what we save
        self.ema = EMA(self.net, c.ema_decay)
        self.optimizer = build_optimizer(self.net, c.lr, c.weight_decay, c.betas, c.adam_eps)
        self.scheduler = build_scheduler(
            self.optimizer, c.lr_schedule, c.steps, c.warmup_steps, c.min_lr_ratio
        )
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

    # -----------------------------------------------------------------------------------------
    # One step.
    # -----------------------------------------------------------------------------------------
    def draw_step_noise(self):
        """t, x1, z (None unless stochastic) and the label-dropout mask of the whole global batch
        of this step, from generators seeded by (seed, step), shaped (accum, micro, world, ...)."""
        generator = utils.step_generator(self.config.seed, self.step, self.device)
        n, shape = self.config.train.batch_size, self.dataset.shape
        t = self.time_sampler(n, generator=generator, device=self.device)
        if self.base_sampler is None:
            x1 = torch.randn((n, *shape), generator=generator, device=self.device)
        else:  # toy-set base, drawn on the CPU
            cpu_generator = torch.Generator().manual_seed(
                utils.mix_seed(self.config.seed, self.step, 1)
            )
            x1 = self.base_sampler(n, cpu_generator).to(self.device)
        drop = torch.rand(n, generator=generator, device=self.device) < self.class_dropout
        z = None
        if self.process.stochastic:
            z = torch.randn((n, *shape), generator=generator, device=self.device)
        split = (self.grad_accum, self.micro_batch, self.dist.world_size)
        return [None if v is None else v.reshape(*split, *v.shape[1:]) for v in (t, x1, z, drop)]

    def loss(self, x0, y, t, x1, z, drop):
        """MSE between the model output (converted to the target type) and the target, plus the
        MSE of the z-denoiser eta_z against z for a stochastic interpolant."""
        if self.ot_pairing:
            x1 = x1[minibatch_ot_permutation(x0, x1)]
        x_t = self.process.interpolate(x0, x1, t, z)
        if self.num_classes:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        else:
            y = None
        x_in = x_t * bcast(self.process.input_scale(t), x_t)
        with self.autocast():
            out = self.model(x_in, t, y).float()
        c = prediction.coefs_at(self.process, t, x_t)
        if self.learn_z:
            out, eta_z = out.chunk(2, dim=1)
        pred, target = prediction.regression_pair(
            out, x0, x1, x_t, c, self.model_output, self.target, z
        )
        loss = (pred - target).pow(2).mean()
        if self.learn_z:
            loss = loss + (eta_z - z).pow(2).mean()
        return loss

    def train_step(self):
        """One optimizer step over `grad_accum` micro-batches; returns (loss, grad_norm) as
        0-dim device tensors (no host sync)."""
        self.model.train()
        t_all, x1_all, z_all, drop_all = self.draw_step_noise()
        rank = self.dist.rank
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x0, y = next(self.loader)
            t, x1, drop = t_all[micro, :, rank], x1_all[micro, :, rank], drop_all[micro, :, rank]
            z = None if z_all is None else z_all[micro, :, rank]
            last = micro == self.grad_accum - 1
            sync = (
                contextlib.nullcontext()
                if last or self.dist.world_size == 1
                else self.model.no_sync()
            )
            with sync:
                loss = self.loss(x0, y, t, x1, z, drop) / self.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = clip_gradients(self.net, self.config.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.net)
        self.step += 1
        return loss_sum, grad_norm

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -----------------------------------------------------------------------------------------
    # The loop.
    # -----------------------------------------------------------------------------------------
    def train(self, logger_factory, until=None):
        """Train from self.step to train.steps (or to step `until`, as if interrupted there).
        `logger_factory(run_id)` makes the metrics logger (after a resume, so that wandb
        continues the same run)."""
        c = self.config.train
        until = self.steps if until is None else min(until, self.steps)
        logger = logger_factory(self.run_id)
        self.run_id = logger.run_id
        bar = logging_utils.progress_bar(self.steps, self.step, self.dist.is_main)
        loss_acc, norm_acc, n_acc = torch.zeros((), device=self.device), 0.0, 0
        tic, step_at_tic = time.time(), self.step
        while self.step < until:
            loss, grad_norm = self.train_step()
            loss_acc += loss
            norm_acc = norm_acc + grad_norm.detach()
            n_acc += 1
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == self.steps:
                elapsed = time.time() - tic
                metrics = {
                    "loss": utils.all_reduce_mean(loss_acc / n_acc).item(),
                    "grad_norm": utils.all_reduce_mean(norm_acc / n_acc).item(),
                    "lr": self.scheduler.get_last_lr()[0],
                    "steps_per_sec": (self.step - step_at_tic) / max(elapsed, 1e-9),
                }
                metrics["samples_per_sec"] = metrics["steps_per_sec"] * c.batch_size
                self.last_metrics = metrics
                logger.log(self.step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                loss_acc.zero_()
                norm_acc, n_acc = 0.0, 0
                tic, step_at_tic = time.time(), self.step
            if c.sample_every and self.step % c.sample_every == 0 or self.step == self.steps:
                path = self.save_samples()
                if path:
                    logger.log_image(self.step, "samples", path)
            if c.eval_every and self.step % c.eval_every == 0:
                metrics = self.evaluate()
                logger.log(self.step, {f"eval/{k}": v for k, v in metrics.items()})
            if self.step % c.save_every == 0 or self.step == self.steps:
                self.save()
        bar.close()
        logger.close()

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

    def save_samples(self):
        """Sample the config's `sample.num` images / points into the run directory."""
        was_training = self.net.training
        x, labels, nfe = self.generate(self.config.sample.num, self.config.sample.use_ema)
        self.net.train(was_training)
        if not self.dist.is_main:
            return None
        stem = os.path.join(self.run_dir, f"samples_{self.step:07d}")
        reference = self.dataset.x[: len(x)] if self.dataset.kind == "points" else None
        return write_samples(x, labels, self.dataset.kind, stem, reference)

    # -----------------------------------------------------------------------------------------
    # Checkpoints.
    # -----------------------------------------------------------------------------------------
    def state_dict(self, rng_states):
        return {
            "step": self.step,
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng_states,
            "world_size": self.dist.world_size,
            "config": self.config.to_dict(),
            "data_info": data_info_of(self.dataset),
            "run_id": self.run_id,
            "metrics": self.last_metrics,
        }

    def save(self):
        """Write ckpt_<step>.pt atomically (rank 0), keep the newest `keep_ckpts`. Refuses to
        write non-finite weights."""
        rng_states = utils.all_gather_objects(utils.get_rng_state())
        if not self.dist.is_main:
            utils.barrier()
            return None
        if not all(torch.isfinite(p).all() for p in self.net.parameters()):
            raise FloatingPointError(f"non-finite weights at step {self.step}: not saving")
        path = os.path.join(self.run_dir, f"ckpt_{self.step:07d}.pt")
        utils.atomic_torch_save(self.state_dict(rng_states), path)
        self.prune_checkpoints()
        utils.barrier()
        return path

    def prune_checkpoints(self):
        paths = sorted(glob.glob(os.path.join(self.run_dir, "ckpt_*.pt")))
        for old in paths[: max(0, len(paths) - self.config.train.keep_ckpts)]:
            os.remove(old)

    def load(self, path):
        """Restore everything from a checkpoint to continue exactly where it stopped."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.step, self.run_id = state["step"], state["run_id"]
        self.last_metrics = state.get("metrics", {})
        if state["world_size"] == self.dist.world_size:
            utils.set_rng_state(state["rng"][self.dist.rank])
        elif self.dist.is_main:
            print(
                f"resuming with world size {self.dist.world_size} (checkpoint: "
                f"{state['world_size']}): per-rank dropout RNG streams are reseeded"
            )
        return state


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


def nll_metrics(net, process, config, nll_data, dist_info, num_classes, kind):
    """Negative log-likelihood (nats per dimension, its standard error, bits per dimension for
    images) of nll_data = (x, y), the points split over ranks and gathered."""
    e, s = config.eval, config.sample
    x, y = nll_data
    mine = slice(dist_info.rank, None, dist_info.world_size)
    x, y = x[mine].to(dist_info.device), y[mine].to(dist_info.device)
    dims = x[0].numel()
    divergence = (
        e.divergence if e.divergence != "auto" else ("exact" if dims <= 64 else "hutchinson")
    )
    log_p, nfe = sampling.log_likelihood(
        net,
        process,
        config.prediction.model_output,
        x,
        solver=e.nll_solver,
        steps=e.nll_steps,
        t_min=s.t_min,
        t_max=s.t_max,
        divergence=divergence,
        num_probes=e.num_probes,
        seed=e.seed + dist_info.rank,
        y=y if num_classes else None,
        rtol=s.rtol,
        atol=s.atol,
        learn_z=process.stochastic,
    )
    nll = torch.cat(utils.all_gather_objects((-log_p / dims).double().cpu()))
    metrics = {
        "nll_nats_per_dim": nll.mean().item(),
        "nll_stderr": (nll.std() / len(nll) ** 0.5).item() if len(nll) > 1 else 0.0,
        "nll_num": len(nll),
        "nll_nfe": nfe,
        "nll_divergence": divergence,
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
