"""Configuration: `get_config(preset)` returns an ml_collections.ConfigDict.

Pick a preset with `--config=config.py:PRESET` and override any field with
`--config.KEY=VALUE` (nested keys with dots), e.g. `--config.train.steps=1000`.
Edit the presets below to start a project. This file knows nothing of torch: the valid choices
for registry fields come from the modules that own the registries (see `validate`).
"""

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
    c.model.name = "unet"  # unet | mlp
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

    c.time_sampler = ConfigDict()
    c.time_sampler.name = "uniform"  # uniform | logit_normal | stratified
    # Training time range. Unset: [0, 1] trimmed by 1e-3 at an end where the chosen prediction
    # pairing is singular for the process (the resolved values are saved with the run).
    c.time_sampler.t_min = config_dict.placeholder(float)
    c.time_sampler.t_max = config_dict.placeholder(float)
    c.time_sampler.mean = 0.0  # logit_normal location m
    c.time_sampler.std = 1.0  # logit_normal scale s

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
    c.train.ema_decay = 0.9999
    c.train.precision = "fp32"  # fp32 | bf16 (autocast on CUDA)
    c.train.compile = False  # torch.compile the network
    c.train.log_every = 100
    c.train.sample_every = 5000  # sample grid into the run directory; 0 disables
    c.train.save_every = 5000  # checkpoint; the last step is always saved
    c.train.keep_ckpts = 2  # newest checkpoints kept in the run directory
    c.train.eval_every = 0  # run the evaluation (see `eval`) every N steps; 0 disables
    c.train.ot_pairing = False  # minibatch optimal-transport pairing of x0 and x1 (OT-CFM)

    c.sample = ConfigDict()
    c.sample.solver = "heun"  # ODE: euler | heun | midpoint | rk4 | dopri5; SDE: euler_maruyama
    c.sample.steps = 50  # | heun_sde. Steps of the grid (dopri5: reporting points only)
    c.sample.grid = "uniform"  # uniform | edm (rho = 7 in sigma / alpha) | logsnr
    c.sample.diffusion = "sigma"  # SDE eps(t): process | constant | sigma | decreasing
    c.sample.diffusion_scale = 1.0
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
    c.eval.divergence = "auto"  # exact | hutchinson | auto (exact up to 64 dimensions)
    c.eval.num_probes = 1  # Hutchinson probes per sample
    c.eval.seed = 0

    c.logging = ConfigDict()
    c.logging.wandb = "auto"  # auto (online with credentials, else offline) | online | offline
    c.logging.project = "interpolants"  # | disabled
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


PRESETS = {
    f.__name__: f
    for f in (
        digits,
        checkerboard,
        moons,
        gaussians8,
        gaussians8_to_moons,
        mnist,
        cifar10,
        imagefolder,
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
# Validation: every problem is one line naming the key and the valid choices.
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


def validate(c, choices, world_size=1):
    """Raise ValueError (one line) for an unknown choice or an impossible value.

    `choices` maps dotted keys to their valid values (the registries' keys, passed in by main.py).
    """
    values = flatten(c)
    for key, valid in choices.items():
        if values[key] not in valid:
            raise ValueError(f"{key}={values[key]!r} is unknown; valid choices: {sorted(valid)}")
    t = c.train
    per_step = world_size * t.grad_accum
    if t.batch_size % per_step:
        raise ValueError(
            f"train.batch_size={t.batch_size} is not divisible by world size {world_size} x "
            f"train.grad_accum {t.grad_accum}: choose a multiple of {per_step}"
        )
    positive = [
        "train.steps",
        "train.batch_size",
        "train.grad_accum",
        "train.lr",
        "train.log_every",
        "sample.steps",
        "sample.num",
        "sample.batch_size",
    ]
    for key in positive:
        if not values[key] > 0:
            raise ValueError(f"{key}={values[key]!r} must be positive")
    if c.model.name == "unet":
        downsamplings = len(c.model.channel_mults) - 1
        if c.data.image_size % 2**downsamplings:
            raise ValueError(
                f"data.image_size={c.data.image_size} cannot be halved {downsamplings} times by "
                f"model.channel_mults={tuple(c.model.channel_mults)}: use an image size divisible "
                f"by {2**downsamplings} or fewer channel_mults"
            )
    for section in ("time_sampler", "sample"):
        lo, hi = c[section].t_min, c[section].t_max
        if lo is not None and hi is not None and not 0.0 <= lo < hi <= 1.0:
            raise ValueError(
                f"{section}.t_min={lo}, {section}.t_max={hi}: need 0 <= t_min < t_max <= 1"
            )
    if not 0.0 <= c.model.class_dropout < 1.0:
        raise ValueError(f"model.class_dropout={c.model.class_dropout} must be in [0, 1)")
