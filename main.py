"""Entry point: `sh run.sh [FLAGS]` (torchrun) or `python main.py [FLAGS]` (one process).

    --config=config.py:PRESET        preset (default: digits); --config.KEY=VALUE overrides
    --mode=train|sample|eval|info    default train
    --ckpt=PATH                      checkpoint (or run directory) for sample / eval / info
    --out=DIR                        where --mode=sample writes samples.npz and a picture

A stop signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) ends training after the current step with a
checkpoint; rerunning the same command resumes. See README "When things go wrong".

Config keys: every field, its default and its valid choices are in config.py (`base_config`),
e.g. --config.train.steps=2000 --config.process.name=trig --config.sample.solver=rk4.

Builds the parts (dataset, network, process, time sampler) from the config, checks every choice
before any work starts, and dispatches the mode.
"""

import errno
import importlib.util
import os
import sys

import torch
from absl import app, flags
from ml_collections import ConfigDict, config_flags

import checkpoints
import config as config_lib
import data_utils
import dit
import ema
import evaluation
import logging_utils
import objectives
import optimizers
import prediction
import sampling
import time_samplers
import trainer as trainer_lib
import utils
from dit import DiT
from mlp import MLP
from processes import GAMMAS, PROCESSES, build_process
from trainer import DiffusionTrainer, TrainingDiverged
from unet import UNet

__doc__ += f"\nPresets (config.PRESETS): {', '.join(config_lib.PRESETS)}.\n"
HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("train", "sample", "eval", "info")

FLAGS = flags.FLAGS


def define_flags():
    """Defined only when run as a script: ml_collections reads sys.argv when the config flag is
    defined, so unknown keys are checked first (check_argv) for a one-line error."""
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(HERE, "config.py"),
        "config file and preset: config.py:PRESET",
        lock_config=True,
    )
    flags.DEFINE_enum("mode", "train", MODES, "what to do")
    flags.DEFINE_string(
        "ckpt", None, "checkpoint file or run directory (sample / eval / info modes)"
    )
    flags.DEFINE_string("out", None, "output directory of --mode=sample")


# ---------------------------------------------------------------------------------------------
# Building the parts from a config.
# ---------------------------------------------------------------------------------------------
NETWORKS = {
    "unet": lambda m, shape, num_classes, out: UNet(
        shape[0],
        shape[1],
        base_channels=m.base_channels,
        channel_mults=tuple(m.channel_mults),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        num_heads=m.num_heads,
        num_classes=num_classes,
        out_channels=out,
        time_inputs=m.time_inputs,
    ),
    "mlp": lambda m, shape, num_classes, out: MLP(
        shape[0],
        hidden=m.hidden,
        num_blocks=m.num_blocks,
        dropout=m.dropout,
        num_classes=num_classes,
        out_dim=out,
        time_inputs=m.time_inputs,
    ),
    "dit": lambda m, shape, num_classes, out: DiT(
        shape[0],
        shape[1],
        patch_size=m.patch_size,
        width=m.width,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        num_classes=num_classes,
        out_channels=out,
        dropout=m.dropout,
        pos_embed=m.pos_embed,
        time_inputs=m.time_inputs,
    ),
}
# What each network takes: images (C, H, W) or points (D,).
NETWORK_DATA = {"unet": "images", "dit": "images", "mlp": "points"}
BASES = ("gaussian", *data_utils.TOY_SETS)


def registry_choices():
    """The valid values of every registry-backed config field, from the registries themselves."""
    return {
        "data.name": data_utils.DATASETS,
        "model.name": NETWORKS,
        "model.pos_embed": dit.POSITION_EMBEDDINGS,
        "model.time_inputs": (1, 2),
        "train.ema": ema.EMAS,
        "train.objective": objectives.OBJECTIVES,
        "process.name": PROCESSES,
        "process.gamma": GAMMAS,
        "process.base": BASES,
        "prediction.model_output": prediction.PREDICTION_TYPES,
        "prediction.target": prediction.PREDICTION_TYPES,
        "prediction.preconditioning": prediction.PRECONDITIONINGS,
        "prediction.loss_weight": prediction.LOSS_WEIGHTS,
        "time_sampler.name": time_samplers.TIME_SAMPLERS,
        "sample.solver": sampling.SOLVERS,
        "sample.grid": sampling.TIME_GRIDS,
        "sample.diffusion": sampling.DIFFUSIONS,
        "sample.clip_x0": sampling.CLIPPERS,
        "train.lr_schedule": optimizers.LR_SCHEDULES,
        "train.precision": ("fp32", "bf16"),
        "eval.feature_extractor": evaluation.FEATURE_EXTRACTORS,
        "eval.nll_solver": sampling.ODE_SOLVERS,
        "eval.nll_grid": ("sample", *sampling.TIME_GRIDS),
        "eval.divergence": ("auto", *sampling.DIVERGENCES),
        "logging.wandb": logging_utils.WANDB_MODES,
    }


def build_net(config, data_info):
    """The network; its output doubles (velocity, z-denoiser) for a stochastic interpolant."""
    num_classes = data_info["num_classes"] if config.model.class_conditional else 0
    shape = tuple(data_info["shape"])
    out = shape[0] * (2 if config.process.gamma != "none" else 1)
    return NETWORKS[config.model.name](config.model, shape, num_classes, out)


def check_combinations(config, process, world_size=1):
    """Reject process / prediction / sampler combinations that cannot work (one line each)."""
    p, s, base = config.prediction, config.sample, config.process.base
    stochastic = config.process.gamma != "none"
    where = (
        f"process.base={base}" if base != "gaussian" else f"process.gamma={config.process.gamma}"
    )
    kind = "points" if config.data.name in data_utils.TOY_SETS else "images"
    if NETWORK_DATA[config.model.name] != kind:
        fits = sorted(name for name, takes in NETWORK_DATA.items() if takes == kind)
        raise ValueError(
            f"model.name={config.model.name} takes {NETWORK_DATA[config.model.name]}, but "
            f"data.name={config.data.name} holds {kind}: use model.name in {fits}"
        )
    if kind == "points" and s.clip_x0 != "none":
        raise ValueError(
            f"sample.clip_x0={s.clip_x0} clips x0_hat to the image range [-1, 1], but "
            f"data.name={config.data.name} holds 2-D points: set sample.clip_x0=none"
        )
    if base != "gaussian" and kind != "points":
        raise ValueError(
            f"process.base={base} needs 2-D data; data.name={config.data.name} is "
            f"not one of {sorted(data_utils.TOY_SETS)}"
        )
    if (base != "gaussian" or stochastic) and (p.model_output, p.target) != ("velocity",) * 2:
        raise ValueError(
            f"{where} trains velocity only: set prediction.model_output=velocity and "
            f"prediction.target=velocity"
        )
    if base != "gaussian" and not stochastic and sampling.needs_score(s.solver):
        raise ValueError(
            f"sample.solver={s.solver} needs a score, which process.base={base} "
            f"without a gamma lacks: set process.gamma=sqrt (or use an ODE solver)"
        )
    check_objective(config, process, world_size)
    if p.preconditioning == "edm" and p.model_output != "x0":
        raise ValueError(
            f"prediction.preconditioning=edm makes the network an x0 predictor (EDM's D): set "
            f"prediction.model_output=x0 (prediction.target may be any type), not "
            f"{p.model_output}"
        )
    if p.loss_weight != "none" and (stochastic or base != "gaussian"):
        raise ValueError(
            f"prediction.loss_weight={p.loss_weight} needs process.gamma=none and "
            f"process.base=gaussian (it is defined through x0 / eps errors)"
        )
    no_x0 = base != "gaussian" or stochastic
    if no_x0 and s.solver in sampling.NOISE_LEVEL_SOLVERS:
        raise ValueError(
            f"sample.solver={s.solver} works on the denoiser x0_hat, which {where} lacks: use "
            f"{sorted(sampling.ODE_SOLVERS)} or {sorted(sampling.SDE_SOLVERS)}"
        )
    if no_x0 and (s.denoise_final or s.clip_x0 != "none"):
        raise ValueError(
            f"sample.denoise_final / sample.clip_x0 need an x0 estimate, which "
            f"{where} lacks: set sample.denoise_final=False, sample.clip_x0=none"
        )
    if no_x0 and config.eval.nll_num and base != "gaussian":
        raise ValueError(
            f"eval.nll_num > 0 needs a Gaussian base density: set eval.nll_num=0 "
            f"for process.base={base}"
        )


def check_objective(config, process, world_size=1):
    """One line for a train.objective that cannot work with the rest of the config."""
    c, s, p = config.train, config.sample, config.prediction
    objective = objectives.build_objective(
        c.objective,
        time_sampler=None,
        ratio=c.meanflow_ratio,
        s_min=c.consistency_s_min,
        s_max=c.consistency_s_max,
    )
    if objective.needs_time_inputs != config.model.time_inputs:
        raise ValueError(
            f"train.objective={c.objective} needs model.time_inputs="
            f"{objective.needs_time_inputs} (it is {config.model.time_inputs})"
        )
    micro_batch = utils.micro_batch_size(c.batch_size, world_size, c.grad_accum)
    for message in (
        objective.processes_allowed(process, config.process.base),
        objective.batch_allowed(micro_batch),
    ):
        if message:
            raise ValueError(message)
    few_step = s.solver in sampling.FEW_STEP_SOLVERS
    if few_step != (c.objective != "flow"):
        raise ValueError(
            f"sample.solver={s.solver} does not fit train.objective={c.objective}: use "
            f"sample.solver=few_step for meanflow / consistency models, an ODE / SDE solver "
            f"for flow models"
        )
    own = (p.preconditioning, p.loss_weight, p.model_output, p.target)
    if c.objective != "flow" and own != ("none", "none", "velocity", "velocity"):
        raise ValueError(
            f"train.objective={c.objective} sets its own parametrisation and weighting: set "
            f"prediction.preconditioning=none, prediction.loss_weight=none, "
            f"prediction.model_output=velocity and prediction.target=velocity"
        )
    if few_step and s.guidance_scale != 1.0:
        raise ValueError(
            "sample.solver=few_step does not apply guidance: set sample.guidance_scale=1"
        )


def check_guidance(guidance_scale, num_classes, class_dropout):
    """Classifier-free guidance needs labels and a null class the network was trained on."""
    if guidance_scale == 1.0:
        return
    if not num_classes:
        raise ValueError(
            f"sample.guidance_scale={guidance_scale:g} needs a class-conditional model, and this "
            f"one is unconditional (unlabelled data or model.class_conditional=False): set "
            f"sample.guidance_scale=1"
        )
    if class_dropout <= 0:
        raise ValueError(
            f"sample.guidance_scale={guidance_scale:g} needs a model trained with label dropout "
            f"(model.class_dropout > 0; this one has 0, so its null class is untrained): set "
            f"sample.guidance_scale=1"
        )


def resolve_time_ranges(config, process):
    """Fill unset t_min / t_max: [0, 1] trimmed to the process's default_t_min / default_t_max
    (1e-3 from the ends; EDM's sigma_min for ve) at an end where the training pairing (or the
    sampler's field, grid or diffusion) is singular; then check the whole range."""
    p, s = config.prediction, config.sample
    train_dsts = (p.target,)
    sampler = dict(
        process=process,
        model_output=p.model_output,
        solver=s.solver,
        diffusion=s.diffusion,
        scale=s.diffusion_scale,
        grid=s.grid,
        learn_z=process.stochastic,
        need_x0=s.denoise_final or s.clip_x0 != "none",
        preconditioning=p.preconditioning,
        sigma_data=p.sigma_data,
    )
    weighting = (p.preconditioning, p.loss_weight, p.sigma_data, p.min_snr_gamma)

    def train_singular_times(times):
        return prediction.singular_times(process, p.model_output, train_dsts, times, *weighting)

    def train_singular(t):
        return bool(train_singular_times([t]))

    def sample_singular(t):
        return bool(sampling.singular_sampling_times(times=[t], **sampler))

    def fill(section, singular):
        if section.t_min is None:
            section.t_min = process.default_t_min if singular(0.0) else 0.0
        if section.t_max is None:
            section.t_max = process.default_t_max if singular(1.0) else 1.0

    with config.unlocked():
        fill(config.time_sampler, train_singular)
        fill(s, sample_singular)
    ts = config.time_sampler
    bad = train_singular_times([ts.t_min, ts.t_max])
    if bad:
        raise ValueError(
            f"training {p.model_output} outputs against {p.target} targets with process "
            f"{process.name!r} is singular at t={bad[0]:g}: set time_sampler.t_min / t_max "
            f"inside (0, 1)"
        )
    message = sampling.check_sampling_range(t_min=s.t_min, t_max=s.t_max, steps=s.steps, **sampler)
    if message:
        raise ValueError(message)
    if config.eval.nll_num:
        resolve_likelihood_range(config.eval, s, process, sampler)


def resolve_likelihood_range(e, s, process, sampler):
    """Fill unset eval.nll_t_min / nll_t_max with the sampler's range, moved to the process's
    default_t_min / default_t_max at an end where the likelihood's ODE (its velocity, on its
    grid of eval.nll_steps) is singular: EDM samples down to sigma = 0, where the velocity of an
    x0 output is 0 / 0. Then check its whole grid."""
    grid = trainer_lib.likelihood_grid(e, s)
    field = {**sampler, "solver": e.nll_solver, "grid": grid, "need_x0": False}

    def singular(times):
        return sampling.singular_sampling_times(times=times, **field)

    with e.unlocked():
        if e.nll_t_min is None:
            e.nll_t_min = process.default_t_min if singular([s.t_min]) else s.t_min
        if e.nll_t_max is None:
            e.nll_t_max = process.default_t_max if singular([s.t_max]) else s.t_max
    if not e.nll_t_min < e.nll_t_max:
        raise ValueError(
            f"eval.nll_t_min={e.nll_t_min:g}, eval.nll_t_max={e.nll_t_max:g}: need "
            f"nll_t_min < nll_t_max"
        )
    bad = singular(
        sampling.TIME_GRIDS[grid](e.nll_steps, e.nll_t_max, e.nll_t_min, process).tolist()
    )
    if bad:
        raise ValueError(
            f"the likelihood's ODE ({sampler['model_output']} outputs of process "
            f"{process.name!r}) is singular at t={bad[0]:g} (eval.nll_t_min={e.nll_t_min:g}, "
            f"eval.nll_t_max={e.nll_t_max:g}): move them inside (0, 1), or set eval.nll_num=0"
        )


def check_config(config, world_size, evaluating=None):
    """All validation that needs no data: choices, values, combinations, the feature extractor
    when an evaluation will run (`evaluating`, default: train.eval_every > 0), time ranges.
    Returns the process."""
    config_lib.validate(config, registry_choices(), world_size)
    pc = config.process
    process = build_process(pc.name, gamma=pc.gamma, gamma_scale=pc.gamma_scale)
    check_combinations(config, process, world_size)
    if config.train.eval_every if evaluating is None else evaluating:
        evaluation.check_feature_extractor(
            config.eval.feature_extractor, config.data.name, config.sample.num
        )
        if (
            config.eval.nll_num
            and not objectives.OBJECTIVES[config.train.objective].defines_velocity
        ):
            raise ValueError(
                f"eval.nll_num={config.eval.nll_num}: a train.objective={config.train.objective} "
                f"model defines no probability-flow velocity, hence no likelihood: set "
                f"eval.nll_num=0"
            )
    resolve_time_ranges(config, process)
    return process


def build_dataset(config, dist_info, train=True):
    """The training split, or the test split (generated 2-D sets: enough points for the NLL)."""
    d = config.data
    if dist_info.is_main:
        data_utils.ensure_available(d.name, d.root, d.path or None, splits=(train,))
    utils.barrier()
    num_points = d.num_points if train else max(d.num_points // 10, config.eval.nll_num)
    return data_utils.build_dataset(
        d.name,
        d.root,
        train,
        image_size=d.image_size,
        path=d.path or None,
        num_points=num_points,
        seed=config.seed,
    )


# ---------------------------------------------------------------------------------------------
# Modes.
# ---------------------------------------------------------------------------------------------
def build_trainer(config, dist_info):
    """Validate the config, build the data and the network, lock the run directory, pick the
    newest good checkpoint and check that the config may resume from it, then build the trainer
    and restore (or initialise from train.init_from). Returns the trainer; its `run_lock` is
    released by `train`. Every mistake of the user's is found before the lock, which makes the
    run directory: a failed start leaves nothing behind."""
    say = print if dist_info.is_main else (lambda *a, **k: None)
    process = check_config(config, dist_info.world_size)
    run_dir = os.path.join(config.workdir, config.name)
    dataset = build_dataset(config, dist_info)
    t, world = config.train, dist_info.world_size
    data_utils.batches_per_epoch(  # before the lock: nothing is written for a batch too big
        len(dataset), utils.micro_batch_size(t.batch_size, world, t.grad_accum), world
    )
    num_classes = dataset.num_classes if config.model.class_conditional else 0
    check_guidance(config.sample.guidance_scale, num_classes, config.model.class_dropout)
    eval_dataset = None  # the likelihoods of train.eval_every use the test split
    if config.train.eval_every and config.eval.nll_num:
        eval_dataset = build_dataset(config, dist_info, train=False)
    time_sampler = build_time_sampler(config.time_sampler, process)
    utils.seed_everything(config.seed)  # identical initial weights on every rank
    net = build_net(config, trainer_lib.data_info_of(dataset))
    utils.seed_everything(config.seed + dist_info.rank)  # per-rank dropout streams
    init = None  # train.init_from of a new run (a resumed run ignores it)
    if not checkpoints.list_checkpoints(run_dir):
        init = init_from_state(config.train.init_from, net)

    run_lock, state, path, refusal = None, None, None, None
    if dist_info.is_main:
        try:
            run_lock, state, path = lock_and_find_checkpoint(
                run_dir, say, resumable_check(config, net)
            )
        except (ValueError, OSError) as e:
            refusal = e
    # Every rank resumes from rank 0's choice, or raises its error (none waits for rank 0 in a
    # collective while rank 0 exits).
    path, refusal = utils.all_gather_objects((path, refusal))[0]
    if refusal is not None:
        raise refusal
    if path is not None and not dist_info.is_main:
        state = checkpoints.load(path)
    if state is not None:
        say(resume_line(config, checkpoints.config_of(state), path, state["step"]))
        init = None
    elif init is None:  # its checkpoints went away between the look and the lock
        init = init_from_state(config.train.init_from, net)
    trainer = DiffusionTrainer(
        config, net, process, time_sampler, dataset, dist_info, run_dir, eval_dataset
    )
    trainer.run_lock = run_lock
    if state is not None:
        try:
            restore(trainer, state, path)
        except ValueError:
            if run_lock is not None:
                run_lock.release()
            raise
    elif init is not None:
        trainer.init_weights(init[0])
        say(f"initialised model and EMA weights from {init[1]} (train.init_from)")
    if dist_info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        utils.atomic_write_json(config.to_dict(), os.path.join(run_dir, "config.json"))
        truncate_metrics(run_dir, trainer.step)
        abandoned = checkpoints.set_aside_snapshots_after(run_dir, trainer.step)
        if abandoned:
            say(
                f"set aside {len(abandoned)} EMA snapshot(s) written after step {trainer.step} "
                f"by a run that stopped before its next checkpoint (renamed *.abandoned)"
            )
    return trainer


def build_time_sampler(ts, process):
    """The time sampler of the config section `ts` (config.time_sampler)."""
    return time_samplers.build_time_sampler(
        ts.name,
        ts.t_min,
        ts.t_max,
        mean=ts.mean,
        std=ts.std,
        p_mean=ts.p_mean,
        p_std=ts.p_std,
        inverse_noise_level=process.inverse_noise_level,
    )


def lock_and_find_checkpoint(run_dir, say, check=None):
    """(lock, state, path): lock the run directory, remove a dead run's half-written files and
    load its newest good checkpoint (state and path None for a new run), `check`ed as
    checkpoints.load_newest_good does; rank 0 only. The lock is released when it raises."""
    run_lock = checkpoints.RunLock(run_dir).acquire()
    try:
        stale = checkpoints.remove_stale_temporaries(run_dir)
        if stale:
            say(f"removed {len(stale)} half-written temporary file(s) of a dead run: {stale}")
        state, path = checkpoints.load_newest_good(run_dir, set_aside=True, warn=say, check=check)
        if state is None and had_corrupt_checkpoints(run_dir):
            raise ValueError(
                f"no checkpoint in {run_dir} could be loaded (all renamed to *.corrupt): move a "
                f"good one back, or start a new run with --config.name=NEW"
            )
    except BaseException:
        run_lock.release()
        raise
    return run_lock, state, path


def resumable_check(config, net):
    """check(state, path) for resuming with `config` and the freshly built `net`: ValueError
    (one line, the run stops) when the config may not resume the checkpoint (resume_line);
    CheckpointError (the file is set aside) when its contents do not fit (shapes, counters,
    loader position, RNG states, optimizer moments: checkpoints.check_training_state)."""
    group_shapes = [[p.shape for p in g["params"]] for g in optimizers.param_groups(net, 0.0)]

    def check(state, path):
        resume_line(config, checkpoints.config_of(state), path, state["step"])
        checkpoints.check_training_state(state, path, net.state_dict(), group_shapes)

    return check


class RankError(ValueError):
    """A failure of this rank's own, which other ranks may not share: every rank prints it."""


def restore(trainer, state, path):
    """trainer.load(state, path); a checkpoint that passed resumable_check and still fails to
    restore gives one line naming it (never a traceback) instead of a half-restored run."""
    try:
        trainer.load(state, path)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        if is_out_of_memory(e):  # not the file's fault: main says what to lower
            raise
        why = str(e).split("\n")[0][:200] or type(e).__name__
        raise RankError(
            f"{path} could not be restored ({why}): move it out of the run directory to resume "
            f"from an older checkpoint"
        ) from None


def had_corrupt_checkpoints(run_dir):
    """True when run_dir holds checkpoints set aside as corrupt (and so none that loads)."""
    return any(".pt.corrupt" in f for f in os.listdir(run_dir))


def init_from_state(source, net):
    """(state, path) of train.init_from (a checkpoint or a run directory) whose model and EMA
    weights fit `net` (one line otherwise), or None when unset."""
    if not source:
        return None
    try:
        state, path = checkpoints.resolve(source, flag="train.init_from")
    except ValueError as e:
        if str(e).startswith("train.init_from="):
            raise
        raise ValueError(f"train.init_from: {e}") from None
    for weights in (state["model"], state["ema"]["model"]):
        trainer_lib.check_same_shapes(net.state_dict(), weights, f"train.init_from={source}")
    return state, path


def resume_line(config, saved, path, step):
    """Check that `config` may resume a run saved with config `saved`; return the one line that
    says so (with the changed keys it applies). ValueError listing keys that may not change."""
    mutable, immutable = checkpoints.config_changes(saved, config.to_dict())
    if immutable:
        raise ValueError(
            f"cannot resume {path} with a changed config: "
            f"{checkpoints.describe_changes(immutable)} (these define the model, data or math): "
            f"undo the change, or start a new run "
            f"with --config.name=NEW (add --config.train.init_from={path} to start from its "
            f"weights)"
        )
    line = f"resuming from {path} at step {step}"
    ignored = [c for c in mutable if c[0] == "train.init_from" and c[2]]
    mutable = [c for c in mutable if c[0] != "train.init_from"]
    if ignored:
        line += (
            f"; ignoring the changed train.init_from={ignored[0][2]!r}: a run resumes from its "
            f"own checkpoint (start a new run with --config.name=NEW to initialise from it)"
        )
    if mutable:
        line += f"; applying changed {checkpoints.describe_changes(mutable)}"
        keys = {key for key, _, _ in mutable}
        if keys & {"train.steps", "train.lr"} and config.train.lr_schedule != "constant":
            line += (
                f" (the {config.train.lr_schedule} lr schedule is re-defined over "
                f"{config.train.steps} steps and continues at step {step}; warmup is not restarted)"
            )
    return line


def train(config, overrides, dist_info, until=None):
    """--mode=train: train (or resume) the run ckpts/<name>/; returns the trainer."""
    stop = utils.StopRequest().install()  # a stop while building: checkpoint after one step
    trainer = None
    try:
        trainer = build_trainer(config, dist_info)  # validates `config` (with `overrides`)
        warn_unused_sample_flags(config, overrides, dist_info.is_main)
        return run_training(trainer, config, dist_info, until, stop)
    finally:
        stop.restore()
        if trainer is not None and trainer.run_lock is not None:
            trainer.run_lock.release()


def run_training(trainer, config, dist_info, until, stop=None):
    """Train (the loop), then say how it ended: done, or stopped by a signal with a checkpoint."""
    say = print if dist_info.is_main else (lambda *a, **k: None)
    n_params = sum(p.numel() for p in trainer.net.parameters())
    dataset, process = trainer.dataset, trainer.process
    say(
        f"run directory: {trainer.run_dir} | data: {config.data.name} {tuple(dataset.shape)} x "
        f"{len(dataset)} | model: {config.model.name} {n_params / 1e6:.2f}M params | process: "
        f"{process.name} | {config.prediction.model_output} -> {config.prediction.target} | "
        f"world size {dist_info.world_size} on {dist_info.device}"
    )
    mode, reason = logging_utils.resolve_wandb_mode(config.logging.wandb)
    say(reason)

    def logger_factory(run_id):
        return logging_utils.MetricsLogger(
            trainer.run_dir,
            dist_info.is_main,
            mode,
            config.logging.project,
            config.name,
            config.to_dict(),
            run_id,
            verbose_wandb=config.logging.wandb_verbose,
        )

    if trainer.step >= config.train.steps:
        say(f"nothing to do: step {trainer.step} >= train.steps={config.train.steps}")
        final = trainer.samples_path()
        if not os.path.exists(final):  # a stop came at the last step, before its samples
            say(f"writing the final samples {final}")
            trainer.save_samples()
    else:
        trainer.train(logger_factory, until, stop)
    if trainer.stopped:
        reason, path = trainer.stopped
        say(
            f"stopped by {reason} at step {trainer.step}; checkpoint {path}; rerun the same "
            f"command to resume"
        )
        return trainer
    grids = sorted(f for f in os.listdir(trainer.run_dir) if f.startswith("samples_"))
    if grids:
        say(f"done: step {trainer.step}; samples in {os.path.join(trainer.run_dir, grids[-1])}")
    return trainer


def truncate_metrics(run_dir, step):
    """Drop metrics logged after `step` (by a run that stopped before its next checkpoint), and
    lines that are not records (cut off by a crash or a full disk while being written)."""
    records, torn = logging_utils.read_metrics_lines(run_dir)
    kept = [r for r in records if r["step"] <= step]
    if torn:
        path = os.path.join(run_dir, "metrics.jsonl")
        print(f"warning: {path}: dropped {torn} unreadable line(s), cut off while being written")
    if torn or len(kept) != len(records):
        text = "".join(logging_utils.json_line(r) + "\n" for r in kept)
        utils.atomic_write_text(text, os.path.join(run_dir, "metrics.jsonl"))


def load_checkpoint(path, flag="--ckpt"):
    """(state, path) of a checkpoint file or of the newest good checkpoint in a run directory,
    loaded safely (never runs code from the file); one line for anything else."""
    return checkpoints.resolve(path, warn=lambda line: print(line, file=sys.stderr), flag=flag)


# Where the data is (not what it is): may change between the run and its evaluation.
DATA_LOCATION_KEYS = ("data.root", "data.path", "data.num_workers")


def checkpoint_config(state, overrides):
    """The checkpoint's config with the command line's --config.sample.* / eval.* / logging.*
    overrides and the data's location (DATA_LOCATION_KEYS).

    The sampling time range is re-resolved for the sampler now asked for, unless given."""
    config = config_lib.with_defaults(checkpoints.config_of(state))
    for key in overrides:  # one line for a key that cannot apply, not silence
        if not (key.startswith(("sample.", "eval.", "logging.")) or key in DATA_LOCATION_KEYS):
            raise ValueError(
                f"--config.{key}: only --config.sample.*, eval.*, logging.* and "
                f"{', '.join(DATA_LOCATION_KEYS)} overrides apply to a checkpoint"
            )
    config_lib.set_values(config, overrides)
    for key in ("sample.t_min", "sample.t_max", "eval.nll_t_min", "eval.nll_t_max"):
        if key not in overrides:  # re-resolved for the sampler and likelihood asked for now
            section, name = key.split(".")
            config[section][name] = None
    return config


def load_for_sampling(
    config_overrides, dist_info, ckpt=None, evaluating=None, flag="--ckpt", preset=None
):
    """(config, process, EMA-or-raw net, data_info, num_classes, state, path) of --ckpt (or of
    `ckpt`, named `flag` in messages). `preset`: the command line's --config, compared with the
    checkpoint's (warn_about_preset)."""
    ckpt = FLAGS.ckpt if ckpt is None else ckpt
    evaluating = FLAGS.mode == "eval" if evaluating is None else evaluating
    state, path = load_checkpoint(ckpt, flag)
    if preset is not None:
        warn_about_preset(preset, checkpoints.config_of(state), path, dist_info)
    config = checkpoint_config(state, config_overrides)
    process = check_config(config, dist_info.world_size, evaluating=evaluating)
    warn_unused_sample_flags(config, config_overrides, dist_info.is_main)
    info = state["data_info"]
    net = build_net(config, info).to(dist_info.device)
    weights = state["ema"]["model"] if config.sample.use_ema else state["model"]
    hint = "its weights and its stored config disagree (an edited or mixed file)"
    trainer_lib.check_same_shapes(net.state_dict(), weights, path, hint)
    net.load_state_dict(weights)
    num_classes = info["num_classes"] if config.model.class_conditional else 0
    check_guidance(config.sample.guidance_scale, num_classes, config.model.class_dropout)
    return config, process, net.eval(), info, num_classes, state, path


class LoadedModel:
    """A checkpoint ready to sample from in Python (a notebook), without the command line:

        import main
        model = main.load_model("ckpts/digits")          # newest good checkpoint, EMA weights
        images, labels, nfe = model.sample(16, solver="heun", steps=10)

    `sample` returns samples in data space (uint8 NHWC images or float 2-D points), the labels
    (class i % num_classes for sample i; None when unconditional) and the NFE; any `sample.*`
    key can be overridden by keyword. `net`, `process`, `config` and `data_info` are there for
    anything else (e.g. sampling.generate or sampling.log_likelihood)."""

    def __init__(self, ckpt, use_ema=True, device=None):
        self.dist = utils.DistInfo(device=api_device(device))
        overrides = {"sample.use_ema": use_ema}
        loaded = load_for_sampling(overrides, self.dist, ckpt, evaluating=False, flag="ckpt")
        self.config, self.process, self.net, self.data_info, self.num_classes = loaded[:5]
        self.state, self.path, self.use_ema = loaded[5], loaded[6], use_ema

    def sample(self, num, **sample_overrides):
        if "use_ema" in sample_overrides:
            raise ValueError(
                "sample(use_ema=...): the weights are chosen by load_model(ckpt, use_ema=...)"
            )
        given = {f"sample.{k}": v for k, v in sample_overrides.items()}
        overrides = {**given, "sample.num": num, "sample.use_ema": self.use_ema}
        config = checkpoint_config(self.state, overrides)
        process = check_config(config, 1, evaluating=False)  # checks num; re-resolves t range
        check_guidance(config.sample.guidance_scale, self.num_classes, config.model.class_dropout)
        warn_unused_sample_flags(config, given, api=True)
        x, labels, nfe = trainer_lib.generate_distributed(
            self.net,
            process,
            config.prediction.model_output,
            tuple(self.data_info["shape"]),
            config.sample.num,
            self.num_classes,
            self.dist,
            trainer_lib.sampler_kwargs(config),
        )
        labels = None if labels is None else labels.numpy()
        return data_utils.to_data_space(x, self.data_info["kind"]), labels, nfe


# Device types load_model can sample on, and whether this machine has one.
API_DEVICES = {
    "cpu": lambda: True,
    "cuda": torch.cuda.is_available,
    "mps": torch.backends.mps.is_available,
}


def api_device(device):
    """torch.device of load_model's `device` (default: cuda when available); one line for a
    name torch does not know or a device this machine lacks."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = [name for name, available in API_DEVICES.items() if available()]
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; use one of {here}") from None
    if not API_DEVICES.get(device.type, lambda: False)():
        raise ValueError(f"device={str(device)!r} is not available here; use one of {here}")
    return device


def load_model(ckpt, use_ema=True, device=None):
    """LoadedModel of a checkpoint file or run directory (see LoadedModel)."""
    return LoadedModel(ckpt, use_ema, device)


# What a preset given with --ckpt should agree on with the checkpoint (it is not used otherwise).
PRESET_KEYS = ("data.name", "model.name")


def warn_about_preset(preset, saved, path, dist_info):
    """With --ckpt the checkpoint's own config (`saved`) is used. An explicit --config=PRESET
    that describes other data or another network gets a warning line on stderr, not silence
    (not an error: the run may have been trained from that preset with overrides)."""
    if not (FLAGS["config"].present and dist_info.is_main):
        return
    flat = config_lib.flatten(config_lib.with_defaults(saved))
    given = config_lib.flatten(preset)
    for key in PRESET_KEYS:
        if key in flat and flat[key] != given[key]:
            name = config_flags.get_config_filename(FLAGS["config"])
            print(
                f"warning: --config={name} has {key}={given[key]}, but {path} was trained with "
                f"{key}={flat[key]}; the checkpoint's own config is used",
                file=sys.stderr,
            )
            return


def warn_unused_sample_flags(config, overrides, is_main=True, api=False):
    """A warning line on stderr for each --config.sample.KEY given (`overrides`) that the chosen
    sampler will not use (sampling.unused_setting), e.g. sample.s_churn with an ODE solver.
    Settings a preset carries are not named: switching the solver must not warn about them.
    `api`: the keys were keywords of LoadedModel.sample, and are named so."""
    if not is_main:
        return
    for key, value in overrides.items():
        name = key.removeprefix("sample.")
        if name == key:
            continue
        why = sampling.unused_setting(name, config.sample, config.train.objective)
        if why:
            given = f"sample({name}={value!r})" if api else f"--config.{key}={value}"
            print(f"warning: {given} has no effect: {why}", file=sys.stderr)


def sample(config, config_overrides, dist_info):
    """--mode=sample: samples.npz, grid.png / scatter.png and trajectory.png in --out."""
    config, process, net, info, num_classes, state, path = load_for_sampling(
        config_overrides, dist_info, preset=config
    )
    s = config.sample
    out = FLAGS.out or os.path.join(os.path.dirname(path), "samples")
    if not FLAGS.out:  # --out was checked with the flags
        utils.check_output_dir(out, f"the default output directory {out} (set --out=DIR)")
    trajectory = []
    x, labels, nfe = trainer_lib.generate_distributed(
        net,
        process,
        config.prediction.model_output,
        tuple(info["shape"]),
        s.num,
        num_classes,
        dist_info,
        trainer_lib.sampler_kwargs(config),
        trajectory=trajectory,
    )
    if not dist_info.is_main:
        return
    message = trainer_lib.degenerate_samples_message(
        x, config.prediction.model_output, process.name
    )
    if message:
        print(message, file=sys.stderr)
    os.makedirs(out, exist_ok=True)
    arrays = {"samples": data_utils.to_data_space(x, info["kind"])}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    npz = os.path.join(out, "samples.npz")
    utils.atomic_save_npz(arrays, npz)
    picture = "grid" if info["kind"] == "image" else "scatter"
    reference = None
    if info["kind"] == "points":
        reference = data_utils.sample_toy(
            config.data.name, min(s.num, 4096), torch.Generator().manual_seed(s.seed)
        )
    image = trainer_lib.write_samples(
        x, labels, info["kind"], os.path.join(out, picture), reference=reference
    )
    strip = trainer_lib.write_trajectory(trajectory, info["kind"], os.path.join(out, "trajectory"))
    steps = (
        f"rtol {s.rtol:g}, atol {s.atol:g}" if s.solver in sampling.ADAPTIVE else f"{s.steps} steps"
    )
    print(
        f"{s.num} samples from {path} (step {state['step']}, "
        f"{'EMA' if s.use_ema else 'raw'} weights) with {s.solver}, {steps}, "
        f"NFE {nfe}: {npz}, {image}, {strip}"
    )


def evaluate(config, config_overrides, dist_info):
    """--mode=eval: sample-quality metrics and NLL as one JSON object on the last stdout line."""
    config, process, net, info, num_classes, state, path = load_for_sampling(
        config_overrides, dist_info, preset=config
    )
    e = config.eval
    nll_data = None
    if e.nll_num:
        test_set = build_dataset(config, dist_info, train=False)
        nll_data = data_utils.likelihood_data(test_set, e.nll_num, e.seed)
    metrics = trainer_lib.evaluate_model(
        net, process, config, info, nll_data, dist_info, num_classes
    )
    if dist_info.is_main:
        bad = logging_utils.non_finite_keys(metrics)
        if bad:
            print(
                f"warning: {', '.join(bad)} not finite (printed as null): the samples or the "
                f"likelihood diverged; see the warning above, or try other sample.* / eval.* "
                f"settings",
                file=sys.stderr,
            )
        print(logging_utils.json_line({"checkpoint": path, "step": state["step"], **metrics}))


def info(config, config_overrides, dist_info):
    del config_overrides
    state, path = load_checkpoint(FLAGS.ckpt)
    warn_about_preset(config, checkpoints.config_of(state), path, dist_info)
    if not dist_info.is_main:
        return
    config = config_lib.with_defaults(checkpoints.config_of(state))
    n_params = sum(v.numel() for v in state["model"].values())
    summary = {
        "checkpoint": path,
        "step": state["step"],
        "train.steps": config.train.steps,
        "data": {"name": config.data.name, **state["data_info"]},
        "model": config.model.name,
        "parameters": n_params,
        "process": config.process.name,
        "prediction": f"{config.prediction.model_output} -> {config.prediction.target}",
        "time_sampler": config.time_sampler.name,
        "sampler": f"{config.sample.solver}, {config.sample.steps} steps",
        "world_size": state["world_size"],
        "wandb_run_id": state["run_id"],
        "healthy": state["healthy"],
        "skipped_steps": state.get("skipped_steps", 0),
        "last_metrics": state.get("metrics", {}),
    }
    if "posthoc_ema" in state:  # written by scripts/posthoc_ema.py: which EMA this is
        record = state["posthoc_ema"]
        keys = ("sigma_rel", "step", "relative_profile_error")
        summary["posthoc_ema"] = {k: record[k] for k in keys if k in record}
    print(logging_utils.json_line(summary, indent=2))


MODE_FNS = {"train": train, "sample": sample, "eval": evaluate, "info": info}


# ---------------------------------------------------------------------------------------------
# Flags.
# ---------------------------------------------------------------------------------------------
def is_first_rank():
    """True on rank 0 (and outside torchrun): only it prints the `error:` line."""
    return int(os.environ.get("RANK", "0")) == 0


def fail(message, every_rank=False, code=1):
    """Exit with status `code` after one line `error: MESSAGE` on stderr: on rank 0 only, so
    that a multi-process launch prints it once, unless the failure is this rank's own
    (`every_rank`)."""
    if every_rank or is_first_rank():
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def user_config(path, preset, config_arg):
    """The ConfigDict of the user's own config file `path` (its get_config(preset), as
    ml_collections will call it), or one line saying why there is none."""
    spec = importlib.util.spec_from_file_location("user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            fail(f"--config={config_arg}: {path} defines no get_config() function")
        base = get_config(preset) if preset else get_config()
    except Exception as e:  # the user's own code: say what failed, in one line
        reason = str(e).split("\n")[0]
        fail(f"--config={config_arg}: {path} gave no config ({type(e).__name__}: {reason})")
    if not isinstance(base, ConfigDict):
        fail(f"--config={config_arg}: get_config() returned a {type(base).__name__}")
    return base


def check_argv(argv):
    """Reject a missing config file and unknown --config.KEY flags with one line before absl
    parses them."""
    config_args = [arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith("--config=")]
    if len(config_args) > 1:
        fail(f"--config is given {len(config_args)} times ({config_args}): pass one preset")
    config_arg = config_args[0] if config_args else None
    path, _, preset = (config_arg or os.path.join(HERE, "config.py")).partition(":")
    if not os.path.isfile(path):
        fail(
            f"--config={config_arg}: no such config file; use --config=config.py:PRESET with a "
            f"preset of {sorted(config_lib.PRESETS)}"
        )
    if os.path.abspath(path) == os.path.join(HERE, "config.py"):
        try:
            base = config_lib.get_config(preset or None)
        except ValueError as e:
            fail(e)
    else:
        base = user_config(path, preset, config_arg)
    for arg in argv[1:]:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            message = config_lib.unknown_key_error(base, key)
            if message:
                fail(message)


def parse_flags(argv):
    """absl's parsing, with a bad value (`--config.train.steps=abc`) as one line."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(str(e).removeprefix("flag "))


def check_mode_flags(overrides):
    """Flags that do not fit the mode (`overrides`: the --config.KEY=VALUE ones), and an unusable
    --out: one line before any work."""
    if FLAGS.mode == "train" and FLAGS.ckpt:
        raise ValueError(
            f"--ckpt is not used by --mode=train (which resumes from its own run directory); to "
            f"start a new run from the weights of {FLAGS.ckpt}, pass "
            f"--config.train.init_from={FLAGS.ckpt}"
        )
    if FLAGS.out is not None:
        if FLAGS.mode != "sample":
            raise ValueError(f"--out is only used by --mode=sample (not --mode={FLAGS.mode})")
        if not FLAGS.out:
            raise ValueError("--out= is empty: give a directory (created if absent)")
        utils.check_output_dir(FLAGS.out, f"--out={FLAGS.out}")
    if FLAGS.mode == "info" and overrides:
        keys = list(overrides)
        more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
        raise ValueError(
            f"--mode=info prints the checkpoint as saved and takes no --config.* flag: drop "
            f"--config.{keys[0]}{more}"
        )


def os_error_line(e):
    """One line for a failed file operation: the file named (an atomic write's target rather
    than its temporary file, whose name is the second one where the rename failed), and a hint
    for the errors a disk or its permissions cause (full, read-only, denied)."""
    if not e.filename:  # a message of this codebase's (missing data files, say): complete
        return str(e)
    name = e.filename2 if e.filename2 and checkpoints.TMP_PREFIX in str(e.filename) else e.filename
    line = f"{name}: {e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        line += " (check free space and permissions there; rerun resumes)"
    return line


# How torch's allocators word a failed allocation (CPU, std::bad_alloc, CUDA, cuBLAS).
OUT_OF_MEMORY_TEXTS = ("out of memory", "can't allocate memory", "bad_alloc", "alloc_failed")


def is_out_of_memory(error):
    """True for a failed allocation: Python's MemoryError, torch's OutOfMemoryError, or a
    RuntimeError in one of OUT_OF_MEMORY_TEXTS' words."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return any(text in str(error).lower() for text in OUT_OF_MEMORY_TEXTS)


# What to lower, per mode, when memory runs out.
MEMORY_KNOBS = {
    "train": "sample.batch_size or eval.nll_num (both allowed on resume), or train.batch_size "
    "or raise train.grad_accum (a new run: --config.name=NEW)",
    "sample": "sample.batch_size or sample.num",
    "eval": "sample.batch_size, sample.num or eval.nll_num",
    "info": "nothing: the checkpoint itself does not fit",
}


def out_of_memory_line(error, mode):
    """One line for running out of memory in `mode`: torch's first line and what to lower."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return f"out of memory in --mode={mode} ({first}): lower {MEMORY_KNOBS[mode]}"


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected argument(s) {argv[1:]}: every option is a flag, e.g. --mode=sample")
    overrides = config_flags.get_override_values(FLAGS["config"])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: stop if the launcher dies
        utils.die_with_parent()
    if FLAGS.mode != "train":  # training checkpoints on a stop signal (utils.StopRequest)
        utils.raise_on_stop_signals()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dist_info = None
    try:
        dist_info = utils.setup_distributed()  # inside: a stop during a rendezvous is one line
        check_mode_flags(overrides)
        MODE_FNS[FLAGS.mode](FLAGS.config, overrides, dist_info)
        utils.barrier()  # leave together: none tears the group down while rank 0 still writes
        utils.mark_worker("done")
    except utils.Stopped as e:  # each node's first worker says it, so that its launcher need not
        utils.mark_worker("stopped")
        name, number = e.args
        fail(
            f"stopped by {name} during --mode={FLAGS.mode} before it finished: rerun it",
            every_rank=os.environ.get("LOCAL_RANK", "0") == "0",
            code=128 + number,
        )
    except RankError as e:  # this rank's own failure: the others may not share it
        fail(e, every_rank=True)
    except (ValueError, TrainingDiverged) as e:
        fail(e)
    except OSError as e:  # includes FileNotFoundError and PermissionError
        fail(os_error_line(e))
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        where = f"rank {dist_info.rank}: " if dist_info and dist_info.world_size > 1 else ""
        fail(where + out_of_memory_line(e, FLAGS.mode), every_rank=True)  # may be one rank's
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    check_argv(sys.argv)
    define_flags()
    try:
        app.run(main, flags_parser=parse_flags)
    except SystemExit as e:  # absl's --help exits with status 1: asking for help is no error
        help_asked = {"-h", "--help", "--helpshort", "--helpfull"} & set(sys.argv[1:])
        sys.exit(0 if help_asked and e.code == 1 else e.code)
