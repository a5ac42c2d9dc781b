"""Flow matching against EDM's recipe on the digits, with the U-Net and the DiT, at one budget.

    python benchmarks/recipes.py [--steps 1000] [--num 1000] [--workdir ckpts]

Trains four runs of `--steps` steps (an integer >= 1, default 1000) at the same batch (each
resumed if its run directory <workdir>/bench_<run>/ is there): `digits` (linear process,
velocity -> velocity, U-Net), `edm_digits` (VE process, EDM preconditioning of an x0 network,
EDM loss weight, log-normal noise levels), and the same two with the CPU-sized DiT of
`digits_dit`. Then, with the EMA weights, draws `--num` (>= 2) per-sample-seeded samples at
about 5, 9 and 17 network evaluations (flow: Heun with 2, 4, 8 steps + the final x0 step; EDM:
its Heun sampler with 3, 5, 9 grid points, the last step to sigma = 0 being Euler) and prints
the Frechet distance of the in-project digits classifier's features against the training set
(lower is better; the distance between two halves of the data set is printed as the noise
floor). Every argument and the four configs and run directories are checked before any work.
"""

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402  (benchmarks/cli.py: argument validators)

import config as config_lib  # noqa: E402
import data_utils  # noqa: E402
import evaluation  # noqa: E402
import main  # noqa: E402
import utils  # noqa: E402

DIT = {"model.name": "dit", "model.patch_size": 2, "model.width": 128, "model.depth": 4}
RUNS = {  # name: (preset, overrides, sampler settings per budget)
    "flow_unet": ("digits", {}, "flow"),
    "edm_unet": ("edm_digits", {}, "edm"),
    "flow_dit": ("digits", DIT, "flow"),
    "edm_dit": ("edm_digits", DIT, "edm"),
}
SAMPLERS = {
    "flow": [dict(solver="heun", steps=n, denoise_final=True) for n in (2, 4, 8)],
    "edm": [dict(solver="edm_sde", steps=n) for n in (3, 5, 9)],
}


def run_config(name, preset, overrides, steps, workdir):
    """The config of run `bench_<name>` of `preset` under `workdir` for `steps` steps (None: the
    preset's), with `overrides` {"section.field": value}, sampling only at the end. An unknown
    key raises ValueError (one line)."""
    c = config_lib.get_config(preset)
    c.name, c.workdir, c.logging.wandb = f"bench_{name}", workdir, "disabled"
    config_lib.set_values(c, overrides)
    if steps is not None:
        c.train.steps = steps
    bad_steps = config_lib.value_error("train.steps", c.train.steps)
    if bad_steps:  # before train.sample_every is derived from it
        raise ValueError(bad_steps)
    c.train.sample_every = c.train.steps
    return c


def checked_config(name, preset, overrides, steps, workdir, source=None):
    """run_config after every check of its keys and values that needs no data or training;
    exits with one `error:` line on a problem (after `source: `, what gave the overrides)."""
    try:
        c = run_config(name, preset, overrides, steps, workdir)
        main.check_config(c, 1)
    except ValueError as e:
        cli.fail(f"{source}: {e}" if source else e)
    return c


def run_directory(config):
    """The run directory of `config`, after checking that it is (or can be made) a directory
    in which files can be made; exits with one `error:` line if not."""
    run_dir = os.path.join(config.workdir, config.name)
    cli.check_directory(run_dir, f"the run directory {run_dir}")
    return run_dir


def train(config):
    """Train (or resume) the run of `config`; returns (trainer, wall-clock seconds). A refusal of
    main.train's (a live run holds the directory, its checkpoint does not fit) is one line."""
    tic = time.time()
    try:
        trainer = main.train(config, {}, utils.DistInfo())
    except ValueError as e:
        cli.fail(e)
    return trainer, time.time() - tic


def frechet(extractor, x, reference_stats):
    features = evaluation.compute_features(extractor, x).numpy()
    return evaluation.frechet_distance(*evaluation.feature_statistics(features), *reference_stats)


def digits_references():
    """(classifier feature extractor, training-set feature statistics, noise floor): the FD
    between two random halves of the data set."""
    extractor = evaluation.build_feature_extractor("classifier", "digits", "data", "cpu", 8)
    reference = evaluation.reference_statistics("digits", "classifier", extractor, "data", 8, None)
    data = data_utils.build_dataset("digits", "data", True, image_size=8)
    order = np.random.default_rng(0).permutation(len(data)).tolist()
    half = len(data) // 2
    first_half, second_half = (data.__getitems__(part)[0] for part in (order[:half], order[half:]))
    first_features = evaluation.compute_features(extractor, first_half).numpy()
    first = evaluation.feature_statistics(first_features)
    return extractor, reference, frechet(extractor, second_half, first)


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=cli.int_in(1), default=1000, help="training steps per run")
    parser.add_argument(
        "--num", type=cli.int_in(2, config_lib.MAX_SAMPLES), default=1000, help="samples per FD"
    )
    parser.add_argument("--workdir", type=cli.directory, default="ckpts")
    return parser.parse_args(argv)


def main_(argv=None):
    args = parse_args(argv)
    configs = {
        name: checked_config(name, preset, overrides, args.steps, args.workdir)
        for name, (preset, overrides, _) in RUNS.items()
    }
    for config in configs.values():
        run_directory(config)
    torch.manual_seed(0)
    extractor, reference, floor = digits_references()
    lines = [
        f"| run | params | train s | FD @ NFE {' / '.join(['~5', '~9', '~17'])} |",
        "| --- | --- | --- | --- |",
    ]
    for name, (_, _, family) in RUNS.items():
        trainer, seconds = train(configs[name])
        params = sum(p.numel() for p in trainer.net.parameters())
        cells = []
        for sampler in SAMPLERS[family]:
            x, _, nfe = trainer.generate(args.num, **sampler)
            cells.append(f"{frechet(extractor, x, reference):.2f} ({nfe})")
            print(name, sampler, nfe, cells[-1], flush=True)
        lines.append(f"| {name} | {params / 1e6:.2f}M | {seconds:.0f} | {' / '.join(cells)} |")
    lines.append(f"| two halves of the data (noise floor) | - | - | {floor:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main_()
