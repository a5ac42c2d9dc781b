"""Few-step generation: MeanFlow and consistency training against flow matching on the digits.

    python benchmarks/objectives.py                    # step cost, then train + FD table
    python benchmarks/objectives.py --cost-only        # only the step-cost table (about 1 min)
    python benchmarks/objectives.py --runs meanflow --set train.steps=3000 train.lr=1e-3

Step cost: the trainer's step (`DiffusionTrainer.train` over blocks of steps, as in
benchmarks/throughput.py) for the `digits`, `digits_meanflow` and `digits_consistency` presets,
built side by side in one process and timed in alternating blocks (ABCABC...); the median time
per step and its ratio to flow's are printed.

Quality: each preset is trained with its own settings (steps, batch, learning rate) in a fresh
run directory under --workdir, timed by wall clock. Then, with the EMA weights, `--num`
per-sample-seeded class-conditional samples are drawn and the Frechet distance of the
in-project digits classifier's features against the training set is printed (lower is better;
the distance between two halves of the data set is the noise floor): few_step with 1, 2 and 4
jumps for the few-step models; Euler with 1, 2, 4, 8 steps and the midpoint rule with 1, 2, 4
steps (2, 4, 8 NFE) for the flow model, so every NFE has its flow reference. `--set KEY=VALUE`
overrides config fields of every run trained (values parsed as Python literals).
"""

import argparse
import ast
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import recipes  # noqa: E402  (benchmarks/recipes.py: feature extractor, reference statistics)
import throughput  # noqa: E402  (benchmarks/throughput.py: bench_config, time_block)

import main  # noqa: E402
import utils  # noqa: E402

PRESETS = {"flow": "digits", "meanflow": "digits_meanflow", "consistency": "digits_consistency"}
SAMPLERS = {  # name -> list of (label, sampler overrides)
    "flow": [(f"euler {n}", dict(solver="euler", steps=n)) for n in (1, 2, 4, 8)]
    + [(f"midpoint {n}", dict(solver="midpoint", steps=n)) for n in (1, 2, 4)],
    "meanflow": [(f"few_step {n}", dict(solver="few_step", steps=n)) for n in (1, 2, 4)],
    "consistency": [(f"few_step {n}", dict(solver="few_step", steps=n)) for n in (1, 2, 4)],
}


def step_cost(rounds, steps_per_round):
    """Median seconds per trainer step of each preset, timed in alternating blocks."""
    seconds = {}
    with tempfile.TemporaryDirectory() as workdir:
        dist_info = utils.setup_distributed()
        trainers = {}
        for name, preset in PRESETS.items():
            trainer = main.build_trainer(throughput.bench_config(preset, workdir), dist_info)
            trainers[name] = trainer
            seconds[name] = []

        def block(trainer):
            logger = throughput.logger_factory(trainer)
            return lambda: trainer.train(logger, until=trainer.step + steps_per_round)

        for trainer in trainers.values():  # warm up
            throughput.time_block(block(trainer), 1, dist_info.device)
        for _ in range(rounds):
            for name, trainer in trainers.items():
                elapsed = throughput.time_block(block(trainer), 1, dist_info.device)
                seconds[name].append(elapsed / steps_per_round)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    lines = ["| objective (preset) | ms / step | ratio to flow |", "| --- | --- | --- |"]
    for name, preset in PRESETS.items():
        lines.append(
            f"| {name} ({preset}) | {median[name] * 1e3:.1f} | "
            f"{median[name] / median['flow']:.2f}x |"
        )
    return lines


def parse_override(text):
    """KEY=VALUE -> (KEY, VALUE as a Python literal, else the string)."""
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def quality(runs, num, workdir, overrides):
    extractor, reference, floor = recipes.digits_references()
    lines = ["| model | preset steps | train s | sampler | NFE | FD |", "| --- " * 6 + "|"]
    for name in runs:
        trainer, seconds = recipes.train(
            f"objectives_{name}", PRESETS[name], overrides, None, workdir
        )
        for label, sampler in SAMPLERS[name]:
            x, _, nfe = trainer.generate(num, **sampler)
            fd = recipes.frechet(extractor, x, reference)
            lines.append(
                f"| {name} | {trainer.config.train.steps} | {seconds:.0f} | {label} | {nfe} | "
                f"{fd:.2f} |"
            )
            print(lines[-1], flush=True)
    lines.append(f"| two halves of the data (noise floor) | - | - | - | - | {floor:.2f} |")
    return lines


def main_(args):
    torch.manual_seed(0)
    print("\n".join(step_cost(args.rounds, args.steps_per_round)), flush=True)
    if args.cost_only:
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_objectives_", dir="ckpts")
    for name in args.runs:
        run_dir = os.path.join(workdir, f"bench_objectives_{name}")
        if os.path.exists(run_dir):
            sys.exit(f"error: {run_dir} exists; the training time needs a fresh run (remove it)")
    print(f"run directories under {workdir}", flush=True)
    overrides = dict(parse_override(text) for text in args.set)
    print("\n".join(quality(args.runs, args.num, workdir, overrides)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--cost-only", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", default=None, help="default: a new ckpts/bench_objectives_*")
    main_(parser.parse_args())
