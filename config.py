"""Configuration: `get_config(preset)` returns an ml_collections.ConfigDict.

Pick a preset with `--config=config.py:PRESET` and override any field with
`--config.KEY=VALUE` (nested keys with dots), e.g. `--config.train.steps=1000`.
Edit the presets below to start a project. This file knows nothing of torch: the valid choices
for registry fields come from the modules that own the registries (see `validate`).
"""

import math
import numbers

from ml_collections import ConfigDict, config_dict

DEFAULT_PRESET = "digits"


def base_config():
    """Fields shared by every preset; presets override what differs."""
    c = ConfigDict()
    c.name = ""  # run directory: <workdir>/<name>/ (name defaults to the preset's)
    c.workdir = "ckpts"
    c.seed = 0

    c.data = ConfigDict()
    c.data.name = "digits"
    c.data.root = "data"  # where mnist / cifar10 files live (and get downloaded to)
    c.data.path = ""  # imagefolder: the folder of images (class subfolders optional)
    c.data.image_size = 8  # spatial size the U-Net sees (mnist: 28 or 32; imagefolder: any)
    c.data.flip = False  # random horizontal flips (images)
    c.data.num_points = 100_000  # size of the generated 2-D training sets
    c.data.num_workers = 0

    c.model = ConfigDict()
    c.model.name = "unet"  # unet | mlp | dit
    c.model.class_conditional = True  # ignored when the dataset has no labels
    c.model.class_dropout = 0.1  # label dropout to the null class, for classifier-free guidance
    c.model.base_channels = 64  # unet
    c.model.channel_mults = (1, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.num_heads = 4
    c.model.dropout = 0.0
    c.model.hidden = 256  # mlp
    c.model.num_blocks = 4
    c.model.patch_size = 2  # dit: pixels per patch side (image_size must be divisible by it)
    c.model.width = 384  # dit: token dimension (divisible by num_heads and by 4)
    c.model.depth = 12  # dit: transformer blocks
    c.model.mlp_ratio = 4.0  # dit: MLP hidden size / width
    c.model.pos_embed = "sincos"  # dit: sincos (fixed) | learned
    c.model.time_inputs = 1  # 1: net(x, t, y); 2: net(x, t, y, r), a second time input

    c.process = ConfigDict()
    c.process.name = "linear"  # linear | trig | vp_linear | vp_cosine | ve
    # Stochastic interpolant x_t = alpha x0 + sigma x1 + gamma(t) z: none | sqrt | quadratic
    # (sqrt: gamma = sqrt(a t (1 - t)), a = gamma_scale). With gamma the net also learns the
    # z-denoiser, which gives the score for SDE sampling; velocity outputs and targets only.
    c.process.gamma = "none"
    c.process.gamma_scale = 1.0
    # Base distribution of x1: gaussian, or a 2-D toy set (checkerboard | moons | gaussians8)
    # for 2-D data (velocity only; SDE sampling then needs a gamma).
    c.process.base = "gaussian"

    c.prediction = ConfigDict()
    c.prediction.model_output = "velocity"  # velocity | eps | x0 | score | v
    c.prediction.target = "velocity"  # same choices; any pairing works
    # EDM (Karras et al. 2022) through the noise level s = sigma / alpha: the net F is wrapped as
    # x0_hat = c_skip(s) x / alpha + c_out(s) F(c_in(s) x / alpha, log(s) / 4); needs x0 outputs.
    c.prediction.preconditioning = "none"  # none | edm
    c.prediction.sigma_data = 0.5  # data std: edm preconditioning / weight, sampler start, NLL base
    # Per-sample loss weight (defined on the x0 error, converted to the target's error):
    # none | edm (lambda(s) = (s^2 + sd^2) / (s sd)^2) | min_snr (Hang et al. 2023) | velocity
    # (the weight that makes an x0 / eps / ... loss equal to the velocity loss).
    c.prediction.loss_weight = "none"
    c.prediction.min_snr_gamma = 5.0

    c.time_sampler = ConfigDict()
    c.time_sampler.name = "uniform"  # uniform | logit_normal | stratified | edm_lognormal
    # Training time range. Unset: [0, 1] trimmed by 1e-3 at an end where the chosen prediction
    # pairing is singular for the process (the resolved values are saved with the run).
    c.time_sampler.t_min = config_dict.placeholder(float)
    c.time_sampler.t_max = config_dict.placeholder(float)
    c.time_sampler.mean = 0.0  # logit_normal location m
    c.time_sampler.std = 1.0  # logit_normal scale s
    c.time_sampler.p_mean = -1.2  # edm_lognormal: ln(sigma / alpha) ~ N(p_mean, p_std^2)
    c.time_sampler.p_std = 1.2

    c.train = ConfigDict()
    c.train.steps = 100_000  # optimizer steps
    c.train.batch_size = 128  # global: split over ranks and accumulation micro-steps
    c.train.grad_accum = 1
    c.train.lr = 2e-4
    c.train.lr_schedule = "constant"  # constant | cosine | linear (decay after warmup)
    c.train.warmup_steps = 1000
    c.train.min_lr_ratio = 0.0
    c.train.weight_decay = 0.0
    c.train.betas = (0.9, 0.999)
    c.train.adam_eps = 1e-8
    c.train.grad_clip = 1.0  # max global gradient norm; 0 disables clipping
    c.train.ema = "classic"  # classic (fixed ema_decay) | power (EDM2 power-function profiles)
    c.train.ema_decay = 0.9999  # classic
    c.train.ema_stds = (0.05, 0.10)  # power: relative stds tracked; sampling uses the first
    c.train.ema_snapshot_every = 0  # power: snapshot to <run>/ema_snapshots every N steps; 0: off
    c.train.precision = "fp32"  # fp32 | bf16 (autocast: meant for GPUs, runs on CPU too)
    c.train.compile = False  # torch.compile the network
    c.train.log_every = 100
    c.train.sample_every = 5000  # sample grid into the run directory; 0 disables
    c.train.save_every = 5000  # checkpoint; also the last step and before sampling or eval
    c.train.keep_ckpts = 2  # newest checkpoints kept in the run directory
    c.train.eval_every = 0  # run the evaluation (see `eval`) every N steps; 0 disables
    c.train.ot_pairing = False  # minibatch optimal-transport pairing of x0 and x1 (OT-CFM)
    # Training objective (objectives.OBJECTIVES): flow (regression, any solver) | meanflow (the
    # average velocity u(x_t, r, t), Geng et al. 2025; needs model.time_inputs=2) | consistency
    # (iCT, Song & Dhariwal 2023). The last two sample with sample.solver=few_step.
    c.train.objective = "flow"
    c.train.meanflow_ratio = 0.25  # meanflow: fraction of samples with r != t
    c.train.meanflow_p = 1.0  # meanflow: adaptive weight 1 / (|delta|^2 + c)^p; 0: plain MSE
    c.train.meanflow_c = 1e-3
    c.train.meanflow_time_scale = 1e-3  # meanflow: the net sees t * this (nets embed 1000 t)
    c.train.meanflow_curriculum = 0.0  # meanflow: cap t - r at step / (this * steps); 0: off
    c.train.consistency_s_min, c.train.consistency_s_max = 0.002, 80.0  # noise-level range
    c.train.consistency_p_mean, c.train.consistency_p_std = -1.1, 2.0  # level distribution
    c.train.consistency_s0, c.train.consistency_s1 = 10, 1280  # discretisation doubling s0 -> s1
    c.train.max_bad_steps = 20  # consecutive non-finite steps before the run stops; 0: never
    c.train.init_from = ""  # start a new run from the weights of this checkpoint (or run dir)

    c.sample = ConfigDict()
    # ODE: euler | heun | midpoint | rk4 | dopri5; SDE: euler_maruyama | heun_sde; noise level:
    # edm_sde (EDM's Algorithm 2, churn below). Steps of the grid (dopri5: reporting points only)
    c.sample.solver = "heun"
    c.sample.steps = 50
    c.sample.grid = "uniform"  # uniform | edm (rho = 7 in sigma / alpha) | logsnr
    c.sample.diffusion = "sigma"  # SDE eps(t): process | constant | sigma | decreasing
    c.sample.diffusion_scale = 1.0
    c.sample.s_churn = 0.0  # edm_sde (EDM Algorithm 2): churn; 0 is deterministic Heun in s
    c.sample.s_tmin = 0.0  # edm_sde: churn only where the noise level s is in [s_tmin, s_tmax]
    c.sample.s_tmax = 1e9
    c.sample.s_noise = 1.0  # edm_sde: std of the added noise, relative
    c.sample.consistency_levels = ()  # few_step consistency noise levels; (): rho-7 grid from 80
    c.sample.rtol = 1e-5  # dopri5 tolerances
    c.sample.atol = 1e-5
    c.sample.denoise_final = True  # finish with the model's x0 estimate at t_min
    c.sample.guidance_scale = 1.0  # classifier-free guidance w (1 = plain conditional)
    c.sample.guidance_interval = (0.0, 1.0)  # guide only for t in this interval
    c.sample.clip_x0 = "none"  # images: none | static ([-1, 1]) | dynamic (Imagen)
    c.sample.clip_percentile = 0.995  # dynamic thresholding percentile
    c.sample.num = 64
    c.sample.batch_size = 256
    c.sample.seed = 0
    c.sample.use_ema = True
    c.sample.t_min = config_dict.placeholder(float)  # unset: 0, or 1e-3 where singular
    c.sample.t_max = config_dict.placeholder(float)  # unset: 1, or 1 - 1e-3 where singular

    c.eval = ConfigDict()  # --mode=eval, and train.eval_every
    c.eval.feature_extractor = "classifier"  # images: classifier (digits, mnist) | inception
    c.eval.nll_num = 256  # data points whose likelihood is computed (0 skips the NLL)
    c.eval.nll_solver = "rk4"  # any ODE solver
    c.eval.nll_steps = 32
    # the likelihood ODE's time range; unset: sample.t_min / t_max, moved to the process's
    # default_t_min / t_max where its velocity is singular (EDM samples down to sigma = 0)
    c.eval.nll_t_min = config_dict.placeholder(float)
    c.eval.nll_t_max = config_dict.placeholder(float)
    c.eval.nll_grid = "sample"  # its time grid: sample (sample.grid) | uniform | edm | logsnr
    c.eval.divergence = "auto"  # exact | hutchinson | auto (exact up to 16 dimensions)
    c.eval.num_probes = 1  # Hutchinson probes per sample
    c.eval.seed = 0

    c.logging = ConfigDict()
    c.logging.wandb = "auto"  # auto (online with credentials, else offline) | online | offline
    c.logging.project = "interpolants"  # | disabled
    c.logging.wandb_verbose = False  # let wandb print its banner and end-of-run summary
    return c


def digits():
    """scikit-learn's 8x8 digits, class-conditional; trains in about 3 minutes on 2 CPU cores."""
    c = base_config()
    c.data.name, c.data.image_size = "digits", 8
    c.model.base_channels, c.model.channel_mults = 32, (1, 2)
    c.model.num_res_blocks, c.model.attn_resolutions = 1, ()  # attention only in the middle
    c.train.steps, c.train.batch_size, c.train.lr = 1000, 64, 2e-3
    c.train.warmup_steps, c.train.ema_decay = 100, 0.999
    c.train.lr_schedule = "cosine"
    c.train.sample_every = c.train.save_every = 500
    c.sample.num = 100
    c.sample.steps = 25
    return c


def digits_dit():
    """The digits preset with a CPU-sized DiT (patch 2, width 128, depth 4, 4 heads; 1.3M
    parameters) in place of the U-Net: about the same time per step."""
    c = digits()
    c.model.name, c.model.patch_size = "dit", 2
    c.model.width, c.model.depth, c.model.num_heads = 128, 4, 4
    return c


def _edm(c):
    """EDM's recipe (Karras et al. 2022) on top of a preset: the VE process (sigma up to 80), the
    EDM preconditioning of an x0 network with its loss weight lambda(sigma), log-normal noise
    levels (P_mean = -1.2, P_std = 1.2), and Heun's 2nd-order sampler on the rho = 7 grid down to
    sigma = 0 (edm_sde; churn 0 is EDM's deterministic sampler)."""
    c.process.name = "ve"
    c.prediction.model_output = c.prediction.target = "x0"
    c.prediction.preconditioning = c.prediction.loss_weight = "edm"
    c.prediction.sigma_data = 0.5
    c.time_sampler.name = "edm_lognormal"
    c.sample.solver, c.sample.grid, c.sample.steps = "edm_sde", "edm", 18
    c.sample.t_min, c.sample.denoise_final = 0.0, False
    return c


def edm_digits():
    """The digits preset trained and sampled with EDM's recipe (see _edm); same budget."""
    return _edm(digits())


def edm_cifar10():
    """EDM's unconditional CIFAR-10 settings on the cifar10 U-Net: batch 512, Adam 1e-3 with a
    10 Mimg warmup, 200 Mimg, EMA half-life 0.5 Mimg, dropout 0.13, no gradient clipping,
    18-step Heun (35 NFE)."""
    c = _edm(cifar10())
    c.model.dropout = 0.13
    c.train.batch_size, c.train.lr, c.train.grad_clip = 512, 1e-3, 0.0
    c.train.warmup_steps, c.train.steps = 19_500, 390_000  # 10 Mimg and 200 Mimg at batch 512
    c.train.ema_decay = 0.5 ** (1 / 977)  # half-life 0.5 Mimg = 977 steps
    return c


def digits_meanflow():
    """digits with MeanFlow: one-step generation (sample.solver=few_step, 1 step). A training
    step costs 1.75x a flow step (the Jacobian-vector product). No label dropout:
    few-step sampling uses no guidance. About 8 minutes on 2 CPU cores."""
    c = digits()
    c.train.objective, c.model.time_inputs = "meanflow", 2
    c.time_sampler.name, c.time_sampler.mean, c.time_sampler.std = "logit_normal", -0.4, 1.0
    c.train.steps, c.train.lr = 4000, 2e-3
    c.model.class_dropout = 0.0
    c.sample.solver, c.sample.steps = "few_step", 1
    return c


def digits_consistency():
    """digits with consistency training (iCT form): one-step generation. A step adds a no-grad
    forward pass for the target; a short discretisation schedule (s1 = 160) suits short runs.
    No label dropout: few-step sampling uses no guidance. About 8 minutes on 2 CPU cores."""
    c = digits()
    c.train.objective, c.train.steps, c.train.lr = "consistency", 5000, 1e-3
    c.train.consistency_s1 = 160
    c.model.class_dropout = 0.0
    c.sample.solver, c.sample.steps = "few_step", 1
    c.eval.nll_num = 0  # a consistency model has no probability-flow velocity: no likelihood
    return c


def _toy(name):
    c = base_config()
    c.data.name = name
    c.model.name = "mlp"
    c.train.steps, c.train.batch_size, c.train.lr = 5000, 512, 2e-3  # ~6 min on 2 CPU cores
    c.train.warmup_steps, c.train.ema_decay, c.train.lr_schedule = 200, 0.999, "cosine"
    c.train.sample_every = c.train.save_every = 1000
    c.sample.num, c.sample.batch_size = 4096, 4096
    return c


def checkerboard():
    """2-D checkerboard (8 unit squares scaled by 1 / 0.45), residual MLP."""
    return _toy("checkerboard")


def moons():
    """2-D two moons, residual MLP."""
    return _toy("moons")


def gaussians8():
    """2-D mixture of 8 Gaussians on a circle of radius 5, residual MLP."""
    return _toy("gaussians8")


def gaussians8_to_moons():
    """2-D transport between two data sets: x1 from 8 Gaussians, x0 from two moons, a stochastic
    interpolant (gamma = sqrt(t (1 - t))) so that SDE sampling works too."""
    c = _toy("moons")
    c.process.base, c.process.gamma = "gaussians8", "sqrt"
    c.sample.denoise_final = False  # no x0 estimate without a Gaussian base
    c.eval.nll_num = 0  # the base density is not Gaussian
    return c


def mnist():
    """MNIST at 28x28, class-conditional U-Net (files under data/mnist/)."""
    c = base_config()
    c.data.name, c.data.image_size = "mnist", 28
    c.model.base_channels, c.model.channel_mults = 64, (1, 2, 2)
    c.model.attn_resolutions, c.model.dropout = (14,), 0.1
    c.train.steps, c.train.batch_size, c.train.lr = 100_000, 128, 2e-4
    c.train.warmup_steps, c.train.ema_decay = 1000, 0.9999
    return c


def cifar10():
    """CIFAR-10 in the spirit of DDPM / the original interpolants code: ~35.7M-parameter U-Net,
    global batch 128, AdamW 2e-4 with 5k warmup, EMA 0.9999, 400k steps, random flips."""
    c = base_config()
    c.data.name, c.data.image_size, c.data.flip = "cifar10", 32, True
    c.data.num_workers = 4
    c.model.class_conditional = False
    c.model.base_channels, c.model.channel_mults = 128, (1, 2, 2, 2)
    c.model.attn_resolutions, c.model.dropout = (16,), 0.1
    c.train.steps, c.train.batch_size, c.train.lr = 400_000, 128, 2e-4
    c.train.warmup_steps, c.train.ema_decay = 5000, 0.9999
    c.train.save_every = c.train.sample_every = 10_000
    return c


def imagefolder():
    """Your own images: --config.data.path=DIR (class subfolders make it class-conditional)."""
    c = base_config()
    c.data.name, c.data.image_size, c.data.flip = "imagefolder", 64, True
    c.data.num_workers = 4
    c.model.base_channels, c.model.channel_mults = 128, (1, 2, 2, 2)
    c.model.attn_resolutions, c.model.dropout = (16,), 0.1
    c.train.steps, c.train.batch_size = 200_000, 128
    c.train.save_every = c.train.sample_every = 10_000
    return c


def cifar10_dit():
    """CIFAR-10 with DiT-S/2 (width 384, depth 12, 6 heads, patch 2; 32.5M parameters) and the
    DiT / SiT papers' optimisation: AdamW 1e-4, no warmup, no weight decay, EMA 0.9999."""
    c = cifar10()
    c.model.name, c.model.patch_size = "dit", 2
    c.model.width, c.model.depth, c.model.num_heads, c.model.dropout = 384, 12, 6, 0.0
    c.train.lr, c.train.warmup_steps, c.train.grad_clip = 1e-4, 0, 0.0
    return c


def imagefolder_small():
    """Your own images on a laptop CPU: a 2M-parameter U-Net at 32x32, no loader workers, short
    warmup; --config.data.path=DIR as for `imagefolder`."""
    c = imagefolder()
    c.data.image_size, c.data.num_workers = 32, 0
    c.model.base_channels, c.model.channel_mults = 32, (1, 2, 2)
    c.model.attn_resolutions, c.model.dropout = (8,), 0.0
    c.train.steps, c.train.batch_size, c.train.lr = 5000, 32, 5e-4
    c.train.warmup_steps, c.train.ema_decay = 100, 0.999
    c.train.save_every = c.train.sample_every = 1000
    c.sample.steps = 25
    return c


def cifar10_meanflow():
    """The cifar10 U-Net trained with MeanFlow for 1-step sampling, with the paper's general
    choices (r != t for 25% of samples, logit-normal(-0.4, 1.0) times, adaptive weight p = 1,
    times seen as t itself): a starting point at this repo's batch and schedule, not a
    reproduction of a published table. The JVP makes a step dearer than a flow step (1.75x on
    the digits U-Net, benchmarks/objectives.py)."""
    c = cifar10()
    c.train.objective, c.model.time_inputs = "meanflow", 2
    c.time_sampler.name, c.time_sampler.mean, c.time_sampler.std = "logit_normal", -0.4, 1.0
    c.sample.solver, c.sample.steps = "few_step", 1
    return c


def cifar10_consistency():
    """The cifar10 U-Net with consistency training in iCT's CIFAR-10 form (Song & Dhariwal
    2023): batch 1024, Adam 1e-4, 400k steps, dropout 0.3, noise levels 0.002-80 with the
    log-normal(-1.1, 2.0) interval distribution, discretisation doubling from 10 to 1280
    intervals, no gradient clipping; this repo's U-Net, not iCT's NCSN++. 1-step sampling
    (`sample.steps=2` for two jumps)."""
    c = cifar10()
    c.train.objective = "consistency"
    c.model.dropout = 0.3
    c.train.batch_size, c.train.lr, c.train.steps, c.train.grad_clip = 1024, 1e-4, 400_000, 0.0
    c.train.warmup_steps, c.train.ema_decay = 0, 0.99993
    c.sample.solver, c.sample.steps = "few_step", 1
    c.eval.nll_num = 0  # no probability-flow velocity: no likelihood
    return c


def with_defaults(saved):
    """A saved config (nested dict, e.g. from a checkpoint) on top of base_config(), so that keys
    added to this file since it was written take their defaults. A whole-number float where
    this file now has an int is taken as that int; any other value whose type this file no
    longer allows is one line (ValueError) naming the key."""
    c = base_config()

    def merge(node, values, prefix):
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(node.get(key), ConfigDict):
                merge(node[key], value, f"{prefix}{key}.")
                continue
            try:
                node[key] = value
            except TypeError:
                now = node[key]
                if isinstance(now, int) and isinstance(value, float) and value.is_integer():
                    node[key] = int(value)
                    continue
                declared = node.get_ref(key).get_type()  # a placeholder's too (now None)
                raise ValueError(
                    f"the stored config's {prefix}{key}={value!r} has type "
                    f"{type(value).__name__}, but config.py now declares {declared.__name__}: "
                    f"undo that edit of config.py to read checkpoints written before it"
                ) from None

    with c.unlocked():
        merge(c, saved, "")
    return c


PRESETS = {
    f.__name__: f
    for f in (
        digits,
        digits_dit,
        checkerboard,
        moons,
        gaussians8,
        gaussians8_to_moons,
        mnist,
        cifar10,
        cifar10_dit,
        edm_digits,
        edm_cifar10,
        digits_meanflow,
        digits_consistency,
        cifar10_meanflow,
        cifar10_consistency,
        imagefolder,
        imagefolder_small,
    )
}


def get_config(preset=None):
    """The ConfigDict of a preset (default: digits); its `name` defaults to the preset's."""
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ValueError(f"config preset {preset!r} is unknown; valid choices: {sorted(PRESETS)}")
    c = PRESETS[preset]()
    c.name = c.name or preset
    return c


# ---------------------------------------------------------------------------------------------
# Validation: every problem is one line `KEY=VALUE must be ...` naming the key, the bad value
# and what is valid. Registry choices come from main.py; value rules are the table VALUE_RULES
# (a key missing from the config is skipped, so a rule may precede its key); keys without a
# rule get GENERIC rules (finite floats, positive sizes and counts); CROSS_CHECKS relate keys.
# ---------------------------------------------------------------------------------------------
def flatten(c, prefix=""):
    """{dotted key: value} of a (nested) ConfigDict."""
    out = {}
    for key, value in c.items():
        if isinstance(value, ConfigDict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unknown_key_error(c, key):
    """One-line message for an unknown dotted key, or None when the key exists."""
    node, parts = c, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            parent = ".".join(parts[:depth]) or "<top level>"
            valid = sorted(node.keys()) if isinstance(node, ConfigDict) else []
            return f"config key {key!r} does not exist; valid keys under {parent}: {valid}"
        node = node[part]
    return None


def set_values(c, values):
    """Set every {dotted key: value} of `values` on config `c` in place (benchmarks, tests) and
    return `c`; an unknown key raises ValueError with unknown_key_error's line."""
    for key, value in values.items():
        message = unknown_key_error(c, key)
        if message:
            raise ValueError(message)
        *sections, field = key.split(".")
        node = c
        for section in sections:
            node = node[section]
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)  # numpy integers: ml_collections takes only int
        try:
            node[field] = value
        except TypeError:  # ml_collections keeps each field's type
            expected, given = type(node[field]).__name__, type(value).__name__
            raise ValueError(f"{key}={value!r} must be of type {expected}, not {given}") from None
    return c


MAX_SEED = 2**63  # seeds are offset by ranks and indices and must stay below 2**64


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_sequence(value):
    return isinstance(value, (tuple, list))


def _int_at_least(low, description=None):
    """Rule: an integer >= low."""
    return (lambda v: _is_int(v) and v >= low), description or f"an integer >= {low}"


def _number_in(low=None, high=None, *, low_open=False, high_open=False):
    """Rule: a finite number in [low, high] (an end None: unbounded; *_open: that end open)."""

    def ok(v):
        if not _is_finite(v):
            return False
        above = low is None or (v > low if low_open else v >= low)
        return above and (high is None or (v < high if high_open else v <= high))

    if low is not None and high is not None:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        return ok, f"a finite number in {interval}"
    if low is not None:
        return ok, f"a finite number {'>' if low_open else '>='} {low:g}"
    return ok, "a finite number"


def _optional(rule):
    """Rule: unset (None) or `rule`."""
    check, description = rule
    return (lambda v: v is None or check(v)), f"unset (None) or {description}"


def _tuple_of(rule, what, min_len=0):
    """Rule: a tuple (or list) of at least min_len items, each passing `rule`."""
    check = rule[0]
    return (lambda v: _is_sequence(v) and len(v) >= min_len and all(map(check, v))), what


def _pair_in_unit_interval(v):
    return _is_sequence(v) and len(v) == 2 and all(map(_is_finite, v)) and 0 <= v[0] < v[1] <= 1


def _safe_name(v):
    """A single directory name: no separators, no '..', no control characters, not empty."""
    return (
        isinstance(v, str)
        and v.isprintable()
        and bool(v.strip())
        and ".." not in v
        and v != "."
        and not any(sep in v for sep in ("/", "\\"))
    )


def _non_empty_path(v):
    return isinstance(v, str) and bool(v.strip()) and "\0" not in v


MAX_SAMPLES = 10**8
POSITIVE = _int_at_least(1, "positive (an integer >= 1)")
NON_NEGATIVE = _int_at_least(0)
SEED = (lambda v: _is_int(v) and 0 <= v < MAX_SEED), "an integer in [0, 2**63)"
PROBABILITY = _number_in(0, 1, high_open=True)  # a drop rate: 1 would drop everything
UNIT = _number_in(0, 1)
FINITE = _number_in()
POSITIVE_REAL = _number_in(0, low_open=True)
NON_NEGATIVE_REAL = _number_in(0)
TIME = _optional(UNIT)
STRING = (lambda v: isinstance(v, str)), "a string"

VALUE_RULES = {
    "name": (
        _safe_name,
        "a non-empty directory name inside workdir: no '/', '\\', '..' or control characters",
    ),
    "workdir": (_non_empty_path, "a non-empty directory path"),
    "seed": SEED,
    "data.root": (_non_empty_path, "a non-empty directory path"),
    "data.path": STRING,
    "data.image_size": POSITIVE,
    "data.num_points": POSITIVE,
    "data.num_workers": NON_NEGATIVE,
    "model.class_dropout": PROBABILITY,
    "model.base_channels": POSITIVE,
    "model.channel_mults": _tuple_of(
        POSITIVE, "a non-empty tuple of positive integers, e.g. (1, 2, 2)", min_len=1
    ),
    "model.num_res_blocks": POSITIVE,
    "model.attn_resolutions": _tuple_of(
        POSITIVE, "a tuple of positive integers (feature-map sizes), e.g. (16,) or ()"
    ),
    "model.num_heads": POSITIVE,
    "model.dropout": PROBABILITY,
    "model.hidden": POSITIVE,
    "model.num_blocks": POSITIVE,
    "model.width": POSITIVE,
    "model.depth": POSITIVE,
    "model.patch_size": POSITIVE,
    "process.gamma_scale": POSITIVE_REAL,
    "prediction.sigma_data": POSITIVE_REAL,
    "time_sampler.t_min": TIME,
    "time_sampler.t_max": TIME,
    "time_sampler.mean": FINITE,
    "time_sampler.std": POSITIVE_REAL,
    "train.steps": POSITIVE,
    "train.batch_size": POSITIVE,
    "train.grad_accum": POSITIVE,
    "train.lr": POSITIVE_REAL,
    "train.warmup_steps": NON_NEGATIVE,
    "train.min_lr_ratio": UNIT,
    "train.weight_decay": NON_NEGATIVE_REAL,
    "train.betas": (
        lambda v: _is_sequence(v) and len(v) == 2 and all(map(PROBABILITY[0], v)),
        "a pair (beta1, beta2), each a finite number in [0, 1)",
    ),
    "train.adam_eps": _number_in(0, 1, low_open=True),
    "train.grad_clip": _number_in(0),
    "train.ema_decay": UNIT,
    "train.ema_stds": _tuple_of(
        _number_in(0, 12**-0.5, low_open=True, high_open=True),
        "a non-empty tuple of relative stds in (0, 0.2887), e.g. (0.05, 0.10)",
        min_len=1,
    ),
    "train.ema_snapshot_every": NON_NEGATIVE,
    "model.mlp_ratio": POSITIVE_REAL,
    "train.log_every": POSITIVE,
    "train.sample_every": NON_NEGATIVE,
    "train.save_every": POSITIVE,
    "train.keep_ckpts": POSITIVE,
    "train.eval_every": NON_NEGATIVE,
    "train.max_bad_steps": NON_NEGATIVE,
    "train.init_from": STRING,
    "train.meanflow_ratio": UNIT,
    "train.meanflow_curriculum": UNIT,
    "sample.steps": POSITIVE,
    "sample.diffusion_scale": _number_in(0, 1e6),  # larger ones overflow the SDE coefficients
    "sample.rtol": _number_in(1e-12),  # dopri5 cannot reach a tighter one in float32
    "sample.atol": _number_in(1e-12),
    "sample.s_churn": NON_NEGATIVE_REAL,
    "sample.s_noise": NON_NEGATIVE_REAL,
    "sample.consistency_levels": _tuple_of(
        POSITIVE_REAL, "a tuple of positive noise levels, e.g. (80.0, 0.8), or ()"
    ),
    "prediction.min_snr_gamma": POSITIVE_REAL,
    "time_sampler.p_std": POSITIVE_REAL,
    "train.meanflow_c": POSITIVE_REAL,
    "train.meanflow_p": _number_in(0, 10),  # the paper: 0 (plain MSE) to 2
    "train.meanflow_time_scale": POSITIVE_REAL,
    "train.consistency_s_min": POSITIVE_REAL,
    "train.consistency_s_max": POSITIVE_REAL,
    "train.consistency_p_std": POSITIVE_REAL,
    "train.consistency_s0": POSITIVE,
    "train.consistency_s1": POSITIVE,
    "sample.guidance_scale": _number_in(-100, 100),  # far beyond any useful w; 1e30 gave NaN
    "sample.guidance_interval": (  # lo == hi would silently never guide
        _pair_in_unit_interval,
        "a pair (lo, hi) with 0 <= lo < hi <= 1",
    ),
    "sample.clip_percentile": _number_in(0, 1, low_open=True),
    "sample.num": (lambda v: _is_int(v) and 1 <= v <= MAX_SAMPLES, "an integer in [1, 10**8]"),
    "sample.batch_size": POSITIVE,
    "sample.seed": SEED,
    "sample.t_min": TIME,
    "sample.t_max": TIME,
    "eval.nll_t_min": TIME,
    "eval.nll_t_max": TIME,
    "eval.nll_num": (  # a standard error needs two points
        lambda v: _is_int(v) and (v == 0 or 2 <= v <= MAX_SAMPLES),
        "0 (no likelihood) or an integer in [2, 10**8]",
    ),
    "eval.nll_steps": POSITIVE,
    "eval.num_probes": POSITIVE,
    "eval.seed": SEED,
}
# Sizes and counts of keys without a rule (e.g. newly added ones): an int whose last name part
# starts or ends like this must be positive. Every float without a rule must be finite.
SIZE_PREFIXES = ("num_",)
SIZE_SUFFIXES = ("_size", "_channels", "_dim", "width", "depth", "heads")


def generic_rule(key, value):
    """The rule for a key without a VALUE_RULES entry, or None when anything goes."""
    leaf = key.rsplit(".", 1)[-1]
    if _is_int(value) and (leaf.startswith(SIZE_PREFIXES) or leaf.endswith(SIZE_SUFFIXES)):
        return POSITIVE
    if isinstance(value, float):
        return FINITE
    if _is_sequence(value) and any(isinstance(v, float) for v in value):
        finite_or_not_float = (lambda v: not isinstance(v, float) or math.isfinite(v)), ""
        return _tuple_of(finite_or_not_float, "a tuple of finite numbers")
    return None


def value_error(key, value):
    """One-line message when `value` breaks the rule of `key`, else None."""
    rule = VALUE_RULES.get(key) or generic_rule(key, value)
    if rule is None or rule[0](value):
        return None
    return f"{key}={value!r} must be {rule[1]}"


# Checks relating several keys: check(c, world_size) -> one-line message or None.
def _batch_divisible(c, world_size):
    t = c.train
    per_step = world_size * t.grad_accum
    if t.batch_size % per_step:
        return (
            f"train.batch_size={t.batch_size} is not divisible by world size {world_size} x "
            f"train.grad_accum {t.grad_accum}: choose a multiple of {per_step}"
        )
    return None


def _unet_downsampling(c, world_size):
    if c.model.name != "unet":
        return None
    downsamplings = len(c.model.channel_mults) - 1
    if c.data.image_size % 2**downsamplings:
        return (
            f"data.image_size={c.data.image_size} cannot be halved {downsamplings} times by "
            f"model.channel_mults={tuple(c.model.channel_mults)}: use an image size divisible "
            f"by {2**downsamplings} or fewer channel_mults"
        )
    return None


def _unet_attention_heads(c, world_size):
    """The U-Net's attention layers (the middle, and levels whose feature-map size is listed in
    attn_resolutions) split their channels into num_heads heads."""
    m = c.model
    if m.name != "unet":
        return None
    mults = list(m.channel_mults)
    levels = [k for k in range(len(mults)) if c.data.image_size // 2**k in m.attn_resolutions]
    channels = sorted({m.base_channels * mults[k] for k in [*levels, len(mults) - 1]})
    if any(ch % m.num_heads for ch in channels):
        return (
            f"model.num_heads={m.num_heads} must divide the channels of every attention layer "
            f"{channels} (model.base_channels x model.channel_mults)"
        )
    return None


def _dit_patches(c, world_size):
    m = c.model
    if m.name != "dit":
        return None
    if c.data.image_size % m.patch_size:
        return (
            f"data.image_size={c.data.image_size} is not divisible by model.patch_size="
            f"{m.patch_size}: choose a patch size that divides the image size"
        )
    if m.width % m.num_heads or m.width % 4:
        return (
            f"model.width={m.width} must be divisible by model.num_heads={m.num_heads} and by 4 "
            f"(2-D sin-cos position embedding)"
        )
    return None


def _time_ranges(c, world_size):
    for section, lo_key, hi_key in (
        ("time_sampler", "t_min", "t_max"),
        ("sample", "t_min", "t_max"),
        ("eval", "nll_t_min", "nll_t_max"),
    ):
        lo, hi = c[section][lo_key], c[section][hi_key]
        if lo is not None and hi is not None and not 0.0 <= lo < hi <= 1.0:
            return (
                f"{section}.{lo_key}={lo}, {section}.{hi_key}={hi}: need 0 <= {lo_key} < {hi_key} "
                f"<= 1"
            )
    return None


def _eval_sample_count(c, world_size):
    if c.train.eval_every and c.sample.num < 2:
        return (
            f"sample.num={c.sample.num} must be >= 2 when train.eval_every="
            f"{c.train.eval_every} (sample statistics need two samples)"
        )
    return None


def _consistency_ranges(c, world_size):
    t = c.train
    if not t.consistency_s_min < t.consistency_s_max:
        return (
            f"train.consistency_s_min={t.consistency_s_min} must be below "
            f"train.consistency_s_max={t.consistency_s_max}"
        )
    if t.consistency_s1 < t.consistency_s0:
        return (
            f"train.consistency_s1={t.consistency_s1} must be >= train.consistency_s0="
            f"{t.consistency_s0} (the discretisation doubles from s0 up to s1)"
        )
    return None


def _weight_decay_step(c, world_size):
    t = c.train
    if t.lr * t.weight_decay >= 1:
        return (
            f"train.weight_decay={t.weight_decay:g} x train.lr={t.lr:g} = "
            f"{t.lr * t.weight_decay:g} >= 1: AdamW's decay w <- w (1 - lr weight_decay) would "
            f"zero or flip every weight each step; use weight_decay < 1 / lr (typically 0-0.1)"
        )
    return None


def _churn_range(c, world_size):
    s = c.sample
    if s.s_tmin > s.s_tmax:
        return (
            f"sample.s_tmin={s.s_tmin} must be <= sample.s_tmax={s.s_tmax} (edm_sde churns where "
            f"the noise level is in [s_tmin, s_tmax]; an empty range would silently disable it)"
        )
    return None


CROSS_CHECKS = (
    _batch_divisible,
    _consistency_ranges,
    _churn_range,
    _weight_decay_step,
    _unet_downsampling,
    _unet_attention_heads,
    _dit_patches,
    _time_ranges,
    _eval_sample_count,
)


def validate(c, choices, world_size=1):
    """Raise ValueError (one line) for an unknown choice or an impossible value.

    `choices` maps dotted keys to their valid values (the registries' keys, passed in by main.py).
    Then every value is checked against its rule (VALUE_RULES, else generic_rule), then the
    relations between keys (CROSS_CHECKS). The first problem found is raised.
    """
    values = flatten(c)
    for key, valid in choices.items():
        if values[key] not in valid:
            raise ValueError(f"{key}={values[key]!r} is unknown; valid choices: {sorted(valid)}")
    for key, value in values.items():
        message = value_error(key, value)
        if message:
            raise ValueError(message)
    for check in CROSS_CHECKS:
        message = check(c, world_size)
        if message:
            raise ValueError(message)
