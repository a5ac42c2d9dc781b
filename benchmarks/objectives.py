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

Every argument, every --set key and value, and the run directories (which must not exist: the
training time needs fresh runs) are checked before any work; --runs, --num, --set and --workdir
are refused with --cost-only, which trains nothing.
"""

import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cli  # noqa: E402  (benchmarks/cli.py: argument validators)
import recipes  # noqa: E402  (benchmarks/recipes.py: feature extractor, reference statistics)
import throughput  # noqa: E402  (benchmarks/throughput.py: bench_config, time_block)

import config as config_lib  # noqa: E402
import main  # noqa: E402
import utils  # noqa: E402

DEFAULT_PARENT = "ckpts"  # where a new --workdir is made when none is given
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


def quality(configs, num):
    """The FD table of the runs `configs` {name: config}, trained one after the other."""
    extractor, reference, floor = recipes.digits_references()
    lines = ["| model | preset steps | train s | sampler | NFE | FD |", "| --- " * 6 + "|"]
    for name, config in configs.items():
        trainer, seconds = recipes.train(config)
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


# The flags that only the training part uses, with their defaults.
TRAINING_FLAGS = {"runs": list(PRESETS), "num": 1000, "set": [], "workdir": None}


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", choices=list(PRESETS), help="default: all")
    parser.add_argument(
        "--num", type=cli.int_in(2, config_lib.MAX_SAMPLES), help="samples per FD (default 1000)"
    )
    parser.add_argument("--rounds", type=cli.int_in(1), default=7)
    parser.add_argument("--steps-per-round", type=cli.int_in(1), default=10)
    parser.add_argument("--cost-only", action="store_true")
    parser.add_argument("--set", nargs="+", type=cli.key_value, metavar="KEY=VALUE")
    parser.add_argument(
        "--workdir", type=cli.directory, help="default: a new ckpts/bench_objectives_*"
    )
    args = parser.parse_args(argv)
    for key, default in TRAINING_FLAGS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
        elif args.cost_only:
            cli.fail(f"--{key} is not used by --cost-only, which trains nothing: drop it")
    return args


def checked_runs(args):
    """{name: config} of the runs to train after every check that needs no work: the --set keys
    and values, and fresh run directories under --workdir (or a usable ckpts/, under which a new
    folder is made once every check passed). Exits with one `error:` line on a problem."""
    overrides = dict(args.set)
    workdir = args.workdir or DEFAULT_PARENT
    configs = {}
    for name in args.runs:
        source = f"--set (run {name}, preset {PRESETS[name]})" if overrides else None
        configs[name] = recipes.checked_config(
            f"objectives_{name}", PRESETS[name], overrides, None, workdir, source
        )
    if args.workdir is None:
        cli.check_directory(DEFAULT_PARENT, f"the default parent of --workdir, {DEFAULT_PARENT}")
        return configs
    for config in configs.values():
        run_dir = recipes.run_directory(config)
        if os.path.exists(run_dir):
            cli.fail(
                f"{run_dir} exists; the training time needs a fresh run (remove it or give "
                f"another --workdir)"
            )
    return configs


def main_(argv=None):
    args = parse_args(argv)
    configs = {} if args.cost_only else checked_runs(args)
    if configs and args.workdir is None:
        os.makedirs(DEFAULT_PARENT, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="bench_objectives_", dir=DEFAULT_PARENT)
        for config in configs.values():
            config.workdir = workdir
    if configs:
        print(f"run directories under {configs[args.runs[0]].workdir}", flush=True)
    torch.manual_seed(0)
    print("\n".join(step_cost(args.rounds, args.steps_per_round)), flush=True)
    if configs:
        print("\n".join(quality(configs, args.num)))


if __name__ == "__main__":
    main_()
