"""Sample quality against NFE for every solver on the checkerboard, and the likelihood.

    python benchmarks/solvers.py [--steps 5000] [--workdir ckpts] [--out DIR]

Trains the `checkerboard` preset once into <workdir>/bench_checkerboard/ (resumed if it is
there), then, with the EMA weights, draws the same 4096 per-sample-seeded base points for every
sampler and reports the sliced Wasserstein distance (SW) and MMD against fresh data, the NFE, and
the NLL of 2048 test points through the probability-flow ODE. The SW/MMD between two independent
data samples of the same size is printed as the noise floor.

The two Markdown sections go to stdout: paste them into docs/benchmarks.md (nothing under docs/
is written). The picture of the samples from noise to data is written to
`<out>/checkerboard_samples.png` (default: the run directory); copy it to docs/ beside them.
Every argument, the config and the output folder are checked before any work.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402  (benchmarks/cli.py: argument validators)

import config as config_lib  # noqa: E402
import data_utils  # noqa: E402
import evaluation  # noqa: E402
import main  # noqa: E402
import sampling  # noqa: E402
import utils  # noqa: E402
from logging_utils import save_scatter_snapshots  # noqa: E402

NUM = 4096
PICTURE = "checkerboard_samples.png"
ODE_RUNS = [(s, n) for s in ("euler", "heun", "midpoint", "rk4") for n in (8, 16, 32, 64, 128)]
ODE_RUNS = [
    (s, n // sampling.NFE_PER_STEP[s]) for s, n in ODE_RUNS if n >= sampling.NFE_PER_STEP[s]
]
ADAPTIVE_RUNS = [1e-2, 1e-3, 1e-4, 1e-5]
SDE_RUNS = [("euler_maruyama", 1.0, n) for n in (32, 64, 128, 256)]
SDE_RUNS += [("heun_sde", 1.0, n) for n in (16, 32, 64, 128)]
SDE_RUNS += [("euler_maruyama", scale, 128) for scale in (0.25, 4.0)]
# EDM's sampler (Algorithm 2) on its grid from s(t_max) = 999 to 0: (steps, S_churn)
EDM_RUNS = [(steps, churn) for steps in (4, 8, 16, 32) for churn in (0.0, 10.0)]


def train_config(steps, workdir):
    """The `checkerboard` preset as run `bench_checkerboard` under `workdir` for `steps` steps."""
    c = config_lib.get_config("checkerboard")
    c.name, c.workdir, c.logging.wandb = "bench_checkerboard", workdir, "disabled"
    c.train.steps = steps
    return c


def train(config):
    """The trained trainer; a refusal of main.train's (a live run holds the run directory, its
    checkpoint does not fit the config) is one `error:` line."""
    try:
        return main.train(config, {}, utils.DistInfo())
    except ValueError as e:
        cli.fail(e)


def quality(x, reference):
    return (evaluation.sliced_wasserstein(x, reference, seed=0), evaluation.mmd_rbf(x, reference))


def row(name, nfe, x, reference, seconds):
    sw, mmd = quality(x, reference)
    return f"| {name} | {nfe} | {sw:.4f} | {mmd:.5f} | {seconds:.1f} |"


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=cli.int_in(1), default=5000, help="training steps")
    parser.add_argument("--workdir", type=cli.directory, default="ckpts")
    parser.add_argument(
        "--out",
        type=cli.directory,
        default=None,
        help=f"folder for {PICTURE} (created if absent); default: the run directory",
    )
    return parser.parse_args(argv)


def checked_plan(args):
    """(config, picture path) after every check that needs no training: the config, the run
    directory and the picture's folder. Exits with one `error:` line on a problem."""
    config = train_config(args.steps, args.workdir)
    try:
        main.check_config(config, 1)
    except ValueError as e:
        cli.fail(e)
    run_dir = os.path.join(config.workdir, config.name)
    cli.check_directory(run_dir, f"the run directory {run_dir}")
    out = args.out or run_dir
    picture = os.path.join(out, PICTURE)
    if os.path.isdir(picture):
        where = f"--out={args.out}" if args.out else "the run directory"
        cli.fail(f"{picture} is a directory: {PICTURE} cannot be written in {where}")
    return config, picture


def main_(argv=None):
    args = parse_args(argv)
    config, picture = checked_plan(args)
    tic = time.time()
    trainer = train(config)
    train_seconds = time.time() - tic
    reference = data_utils.sample_toy("checkerboard", NUM, torch.Generator().manual_seed(123))
    floor = data_utils.sample_toy("checkerboard", NUM, torch.Generator().manual_seed(456))
    lines = [
        "| sampler | NFE | sliced W2 | MMD | seconds |",
        "| --- | --- | --- | --- | --- |",
        f"| two independent data samples (noise floor) | - | "
        f"{quality(floor, reference)[0]:.4f} | {quality(floor, reference)[1]:.5f} | - |",
    ]
    for solver, steps in ODE_RUNS:
        tic = time.time()
        x, _, nfe = trainer.generate(NUM, solver=solver, steps=steps, denoise_final=False)
        lines.append(row(f"{solver}, {steps} steps", nfe, x, reference, time.time() - tic))
    for rtol in ADAPTIVE_RUNS:
        tic = time.time()
        x, _, nfe = trainer.generate(
            NUM, solver="dopri5", steps=1, rtol=rtol, atol=rtol, denoise_final=False
        )
        lines.append(row(f"dopri5, rtol = atol = {rtol:g}", nfe, x, reference, time.time() - tic))
    for solver, scale, steps in SDE_RUNS:
        tic = time.time()
        x, _, nfe = trainer.generate(
            NUM,
            solver=solver,
            steps=steps,
            diffusion="sigma",
            diffusion_scale=scale,
            t_min=1e-3,
            t_max=1.0,
            denoise_final=True,
        )
        name = f"{solver}, eps = {scale:g} sigma, {steps} steps"
        lines.append(row(name, nfe, x, reference, time.time() - tic))
    for steps, churn in EDM_RUNS:
        tic = time.time()
        x, _, nfe = trainer.generate(
            NUM,
            solver="edm_sde",
            steps=steps,
            grid="edm",
            t_min=0.0,
            t_max=1 - 1e-3,
            s_churn=churn,
            denoise_final=False,
        )
        name = f"edm_sde, S_churn = {churn:g}, {steps} steps (edm grid)"
        lines.append(row(name, nfe, x, reference, time.time() - tic))
    test = data_utils.sample_toy("checkerboard", 2048, torch.Generator().manual_seed(789))
    nll_lines = [
        "| likelihood solver | NFE | NLL (nats/dim) | std. error |",
        "| --- | --- | --- | --- |",
    ]
    for solver, steps in (("rk4", 16), ("rk4", 64), ("dopri5", 1)):
        log_p, nfe = sampling.log_likelihood(
            trainer.ema.model,
            trainer.process,
            "velocity",
            test,
            solver=solver,
            steps=steps,
            rtol=1e-5,
            atol=1e-5,
        )
        nll = -log_p / 2
        nll_lines.append(
            f"| {solver}{'' if solver == 'dopri5' else f', {steps} steps'} | {nfe} | "
            f"{nll.mean():.4f} | {nll.std() / len(nll) ** 0.5:.4f} |"
        )
    # The true density is uniform on 8 unit squares scaled by 1 / 0.45: area 8 / 0.45^2.
    true_nll = torch.log(torch.tensor(8 / 0.45**2)).item() / 2
    os.makedirs(os.path.dirname(picture) or ".", exist_ok=True)
    trajectory = []
    trainer.generate(NUM, solver="heun", steps=32, denoise_final=False, trajectory=trajectory)
    picks = [trajectory[i] for i in (0, 8, 16, 24, 32)]
    save_scatter_snapshots([(t, x.numpy()) for t, x in picks], picture)
    command = f"python benchmarks/solvers.py --steps {args.steps}"
    report = "\n".join(
        [
            "## Checkerboard: sample quality against NFE",
            "",
            f"Produced by `{command}` on a 2-core CPU (training: {train_seconds:.0f} s, "
            f"{args.steps} steps of the `checkerboard` preset: linear process, velocity target, "
            "residual MLP, EMA weights). Every row uses the same 4096 per-sample-seeded base "
            "points; SW and MMD are measured against 4096 fresh data points. ODE rows have no "
            "final denoising step; SDE rows start at t = 1, stop at t = 1e-3 and end with the x0 "
            "estimate (one extra NFE). edm_sde rows are EDM's Algorithm 2 (Heun in the noise "
            "level s = sigma / alpha with churn S_churn, from t = 0.999 (s = 999) down to s = 0, "
            "the last step without correction: 2 steps - 1 NFE). The SDE draws its own noise per "
            "sample, so its rows are "
            "single draws: differences in SW below about 0.01 are within sampling noise.",
            "",
            *lines,
            "",
            f"![samples from noise to data, heun 32 steps]({PICTURE})",
            "",
            "## Checkerboard: negative log-likelihood",
            "",
            "2048 fresh test points, exact divergence, base N(0, I) at t = 1. The true density is "
            f"uniform on an area of 8 / 0.45^2, i.e. {true_nll:.4f} nats per dimension (a lower "
            "bound no model can beat on average).",
            "",
            *nll_lines,
            "",
        ]
    )
    print("Paste the two sections below into docs/benchmarks.md.\n")
    print(report)
    print(f"picture: {picture} (copy it to docs/{PICTURE} beside docs/benchmarks.md)")


if __name__ == "__main__":
    main_()
