"""Flow matching against EDM's recipe on the digits, with the U-Net and the DiT, at one budget.

    python benchmarks/recipes.py [--steps 1000] [--num 1000]

Trains four runs of the same number of steps and batch (each resumed if its run directory
ckpts/bench_<run>/ is there): `digits` (linear process, velocity -> velocity, U-Net),
`edm_digits` (VE process, EDM preconditioning of an x0 network, EDM loss weight, log-normal
noise levels), and the same two with the CPU-sized DiT of `digits_dit`. Then, with the EMA
weights, draws `--num` per-sample-seeded samples at about 5, 9 and 17 network evaluations
(flow: Heun with 2, 4, 8 steps + the final x0 step; EDM: its Heun sampler with 3, 5, 9 grid
points, the last step to sigma = 0 being Euler) and prints the Frechet distance of the
in-project digits classifier's features against the training set (lower is better; the
distance between two halves of the data set is printed as the noise floor).
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def train(name, preset, overrides, steps, workdir):
    """Train (or resume) ckpts-style run `bench_<name>` of `preset` under `workdir` for `steps`
    steps (None: the preset's), with `overrides` {"section.field": value}, sampling only at the
    end; returns (trainer, wall-clock seconds)."""
    c = config_lib.get_config(preset)
    c.name, c.workdir, c.logging.wandb = f"bench_{name}", workdir, "disabled"
    config_lib.set_values(c, overrides)
    c.train.steps = steps or c.train.steps
    c.train.sample_every = c.train.steps
    tic = time.time()
    trainer = main.train(c, {}, utils.DistInfo())
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


def main_(args):
    torch.manual_seed(0)
    extractor, reference, floor = digits_references()
    lines = [
        f"| run | params | train s | FD @ NFE {' / '.join(['~5', '~9', '~17'])} |",
        "| --- | --- | --- | --- |",
    ]
    for name, (preset, overrides, family) in RUNS.items():
        trainer, seconds = train(name, preset, overrides, args.steps, args.workdir)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--workdir", default="ckpts")
    main_(parser.parse_args())
