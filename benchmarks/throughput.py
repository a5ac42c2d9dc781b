"""Training throughput: the trainer's step against a bare step of the same network and batch.

    python benchmarks/throughput.py                     # CPU: digits U-Net and 2-D MLP, scaling
    python benchmarks/throughput.py --gpu               # CUDA: fp32 / bf16 / compile / ... table
    python benchmarks/throughput.py --presets digits --rounds 5 --steps-per-round 10

Overhead (CPU and GPU): `trainer` is `DiffusionTrainer.train` over a block of steps (data
loading, per-step noise, time sampling, prediction conversion, clipping, LR schedule, EMA,
non-finite checks, progress bar and periodic logging; no sampling or saving); `bare` is
forward + MSE + backward + AdamW step + zero_grad of an identical network on one fixed batch,
nothing else. Every round times one block of each, in forward order on even rounds and in
reverse on odd ones (so that drift within a round and the order cancel); the overhead is
trainer / bare - 1 of each block against the bare block of its round, reported as the median
over rounds with a 95 % bootstrap interval of that median. Each block is one `train()` call,
whose own start and end (about 0.3 ms on the CPU) count as overhead.

Parts (`--parts N`, 0 to skip): what the EMA update and the gradient norm with clipping cost,
and what clipping by a multiply of its own instead of in the optimizer's step would cost, from
N rounds of single steps interleaved (`part_rows`).

GPU (`--gpu`): for the cifar10 U-Net and a DiT-S/2 at batch 128,
bare steps in fp32 eager, bf16 autocast, torch.compile, channels-last and fused AdamW, with
images/s and peak memory per GPU and the ratio to fp32 eager; then the overhead tables of the
cifar10 trainer, on random images written in CIFAR-10's format (the GPU machine needs no data).

Scaling (CPU): bare step time and peak memory against batch size and U-Net width, and the
trainer's step with 2 gloo processes (torchrun) against 1 process at the same global batch.
Results go to stdout as Markdown tables; paste them into docs/benchmarks.md.
"""

import argparse
import contextlib
import copy
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402  (benchmarks/cli.py: argument validators)

import config as config_lib  # noqa: E402
import main  # noqa: E402
import optimizers  # noqa: E402
import trainer as trainer_module  # noqa: E402
import utils  # noqa: E402
from trainer import data_info_of  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Parts.
# ---------------------------------------------------------------------------------------------
def bench_config(preset, workdir, **overrides):
    """A preset that trains 'forever' without sampling, saving or evaluation."""
    c = config_lib.get_config(preset)
    c.workdir, c.logging.wandb = workdir, "disabled"
    c.train.steps = 10**9
    c.train.sample_every = c.train.eval_every = 0
    c.train.save_every = 10**9
    return config_lib.set_values(c, overrides)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareStep:
    """forward + MSE + backward + AdamW of `net` on one fixed batch (linear interpolant,
    velocity target): the least work any training loop must do per step."""

    def __init__(self, net, x0, y, lr, bf16=False, compile=False, channels_last=False, fused=None):
        self.net = net
        self.model = torch.compile(net) if compile else net
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=memory_format)
        generator = torch.Generator(x0.device).manual_seed(0)
        t = torch.rand(x0.shape[0], device=x0.device, generator=generator)
        x1 = torch.randn(x0.shape, device=x0.device, generator=generator)
        t_b = t.reshape(-1, *[1] * (x0.dim() - 1))
        self.x_t = ((1 - t_b) * x0 + t_b * x1).contiguous(memory_format=memory_format)
        self.target, self.t, self.y = x1 - x0, t, y
        self.bf16 = bf16
        if fused is None:
            self.optimizer = optimizers.build_optimizer(net, lr)
        else:
            impl = {"fused": True} if fused else {"foreach": True}
            self.optimizer = torch.optim.AdamW(net.parameters(), lr=lr, **impl)

    def __call__(self):
        with torch.autocast(self.x_t.device.type, torch.bfloat16, enabled=self.bf16):
            out = self.model(self.x_t, self.t, self.y)
        loss = (out.float() - self.target).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_block(fn, steps, device):
    sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - tic) / steps


def fixed_batch(trainer):
    x0, y = next(copy.deepcopy(trainer.loader))
    return x0, (y if trainer.num_classes else None)


# ---------------------------------------------------------------------------------------------
# Trainer overhead.
# ---------------------------------------------------------------------------------------------
BARE_STEP = "bare step (no trainer at all)"
PARTS = {  # name: the keyword arguments of `variant` for the trainer's step without the part
    BARE_STEP: None,
    "without the EMA update": {"no_ema": True},
    "without the gradient norm and clipping": {"no_norm": True},
    "without the EMA, the gradient norm and clipping": {"no_ema": True, "no_norm": True},
    "clipping as its own multiply (clip_grads_with_norm_), not in the optimizer's step": {
        "separate_clip": True
    },
}


def overhead(preset, rounds, steps_per_round, device_note, part_steps=0, **overrides):
    """(the overhead row, the part rows). Overhead: each round times one block of
    `steps_per_round` trainer steps (`DiffusionTrainer.train`) and one of bare steps, the order
    reversed on odd rounds; each trainer block is compared with the bare block of its round, so
    machine drift cancels: the median of those paired ratios, with a 95 % bootstrap interval of
    the median. Parts (`part_steps` > 0): see `part_rows`."""
    with tempfile.TemporaryDirectory() as workdir:
        config = bench_config(preset, workdir, **overrides)
        dist_info = utils.setup_distributed()
        trainer = main.build_trainer(config, dist_info)
        utils.seed_everything(0)
        bare_net = main.build_net(config, data_info_of(trainer.dataset)).to(dist_info.device)
        bare_net.load_state_dict(trainer.net.state_dict())
        x0, y = fixed_batch(trainer)
        bare = BareStep(bare_net, x0, y, config.train.lr)

        def trainer_block():  # the progress bar is drawn, as in training, into /dev/null
            with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
                trainer.train(logger_factory(trainer), until=trainer.step + steps_per_round)

        blocks = {"bare": (bare, steps_per_round), "trainer": (trainer_block, 1)}
        times = interleaved(blocks, rounds, dist_info.device, warmup=2)
        bare_steps = times["bare"]  # seconds per step
        trainer_steps = [t / steps_per_round for t in times["trainer"]]
        bare_s, step_s = statistics.median(bare_steps), statistics.median(trainer_steps)
        ratios = [t / b - 1 for t, b in zip(trainer_steps, bare_steps, strict=True)]
        mid, (low, high) = statistics.median(ratios), median_interval(ratios)
        n_params = sum(p.numel() for p in trainer.net.parameters())
        name = f"{preset} ({config.model.name}, {n_params / 1e6:.2f}M)"
        batch = config.train.batch_size
        row = (
            f"| {name} | {batch} | {bare_s * 1e3:.2f} | {step_s * 1e3:.2f} | {100 * mid:+.1f} % "
            f"({100 * low:+.1f} to {100 * high:+.1f}) | {batch / step_s:.0f} | {device_note} |"
        )
        parts = part_rows(name, trainer, bare, part_steps, dist_info.device) if part_steps else []
        return row, parts


def part_rows(name, trainer, bare, steps, device):
    """What each part of PARTS costs: single steps of the trainer (`train_step`), of the trainer
    without the part, and bare, interleaved step by step (`steps` rounds, order reversed on odd
    ones); per part, the median of (trainer step - that step) over the rounds with a 95 %
    bootstrap interval, in ms and in % of the bare step. Pairing single steps resolves tenths
    of a millisecond that the blocks of the overhead row cannot; the loop around the step
    (logging, progress bar) is not in these rows."""

    def step_of(options):
        def step():
            with variant(trainer, **options):
                trainer.train_step()

        return step

    fns = {"trainer": (trainer.train_step, 1)}
    fns.update({part: (bare if o is None else step_of(o), 1) for part, o in PARTS.items()})
    times = interleaved(fns, steps, device, warmup=5)
    bare_s = statistics.median(times[BARE_STEP])
    rows = []
    for part in PARTS:
        saved = [t - p for t, p in zip(times["trainer"], times[part], strict=True)]
        mid, (low, high) = statistics.median(saved), median_interval(saved)
        rows.append(
            f"| {name} | {part} | {statistics.median(times[part]) * 1e3:.2f} | "
            f"{mid * 1e3:+.2f} ({low * 1e3:+.2f} to {high * 1e3:+.2f}) | "
            f"{100 * mid / bare_s:+.1f} % |"
        )
    return rows


def interleaved(fns, rounds, device, warmup):
    """{name: [seconds per call of fn (the mean of `repeats` calls), per round]} for `fns`
    {name: (fn, repeats)}: every round calls each in turn, forward on even rounds and in
    reverse on odd ones, so that drift within a round and the order cancel."""
    names = list(fns)
    for _ in range(warmup):
        for fn, repeats in fns.values():
            time_block(fn, repeats, device)
    times = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            fn, repeats = fns[name]
            times[name].append(time_block(fn, repeats, device))
    return times


def median_interval(values, level=0.95, resamples=2000, seed=0):
    """(low, high): the percentile bootstrap interval at `level` of the median of `values`
    (resampled with replacement `resamples` times, seeded)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    draws = rng.choice(values, size=(resamples, len(values)), replace=True)
    medians = np.median(draws, axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(low), float(high)


@contextlib.contextmanager
def variant(trainer, no_ema=False, no_norm=False, separate_clip=False):
    """The trainer with no EMA update (`no_ema`), no gradient norm hence no clipping
    (`no_norm`), or clipping by torch's clip_grad_norm_ (a multiply of every gradient, always
    run) before an unscaled optimizer step instead of in the step (`separate_clip`):
    what each part costs, for this benchmark only."""
    clip = trainer_module.clip_gradients
    zero = torch.zeros((), device=trainer.device)
    if no_ema:
        trainer.ema.update = lambda *args, **kwargs: None
    if no_norm:  # and drop the previous step's divisor: the optimizer step clips nothing
        trainer_module.clip_gradients = lambda *args, **kwargs: zero
        trainer.optimizer.grad_scale = None
    if separate_clip:

        def clip_then_step_unscaled(optimizer, params, max_norm):
            optimizer.grad_scale = None
            return torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf, foreach=True)

        trainer_module.clip_gradients = clip_then_step_unscaled
    try:
        yield
    finally:
        if no_ema:
            del trainer.ema.update  # the instance attribute: the method shows through again
        trainer_module.clip_gradients = clip


def logger_factory(trainer):
    import logging_utils

    return lambda run_id: logging_utils.MetricsLogger(trainer.run_dir, False)


# ---------------------------------------------------------------------------------------------
# GPU variants.
# ---------------------------------------------------------------------------------------------
GPU_VARIANTS = {
    "fp32 eager": {},
    "bf16 autocast": {"bf16": True},
    "fp32 + compile": {"compile": True},
    "bf16 + compile": {"bf16": True, "compile": True},
    "bf16 + channels-last": {"bf16": True, "channels_last": True},
    "fp32 + foreach AdamW (not fused)": {"fused": False},
    "bf16 + compile + channels-last + fused AdamW": {
        "bf16": True,
        "compile": True,
        "channels_last": True,
        "fused": True,
    },
}


def gpu_table(preset, batch, steps, overrides, device="cuda", variants=None):
    """Rows of bare-step time, images/s and peak memory per variant of GPU_VARIANTS (all, or the
    names in `variants`), with the ratio to the first. On a CPU `device` (a dry run of the
    code path) the peak is the process's resident memory."""
    device = torch.device(device)
    config = bench_config(preset, "unused", **overrides)
    info = {"shape": [3, 32, 32], "num_classes": 0, "kind": "image"}
    cuda = device.type == "cuda"
    rows, base = [], None
    for name, options in GPU_VARIANTS.items():
        if variants is not None and name not in variants:
            continue
        if options.get("channels_last") and config.model.name != "unet":
            continue
        utils.seed_everything(0)
        net = main.build_net(config, info).to(device)
        x0 = torch.randn(batch, *info["shape"], device=device).clamp(-1, 1)
        step = BareStep(net, x0, None, config.train.lr, **options)
        time_block(step, 3 if options.get("compile") else 1, device)  # compile / warm up
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds = statistics.median(time_block(step, steps, device) for _ in range(3))
        peak = utils.peak_memory_mib(device) / 1024  # GiB
        base = base or seconds
        rows.append(
            f"| {preset} {config.model.name}, {name} | {batch} | {seconds * 1e3:.1f} | "
            f"{batch / seconds:.0f} | {peak:.2f} | {base / seconds:.2f}x |"
        )
        del step, net
        if cuda:
            torch.cuda.empty_cache()
    return rows


# The networks of the GPU table: (preset, overrides) -> the cifar10 U-Net and DiT-S/2.
DIT_S2 = {"model.name": "dit", "model.patch_size": 2, "model.width": 384}
GPU_NETWORKS = [("cifar10", {}), ("cifar10", {**DIT_S2, "model.depth": 12, "model.num_heads": 6})]


def gpu_report(
    networks, batch, steps, rounds, device="cuda", variants=None, data_per_batch=10000, parts=0
):
    """Print the variant table of every (preset, overrides) in `networks`, then the overhead
    tables of the first one on random images in CIFAR-10's format (the GPU machine has no
    dataset; `data_per_batch` 10000 is the real size, so epochs end as rarely as on the real
    data)."""
    header = "| network, variant | batch | ms / step | images / s | peak GiB | vs fp32 eager |"
    print(header + "\n| --- | --- | --- | --- | --- | --- |")
    for preset, overrides in networks:
        for row in gpu_table(preset, batch, steps, overrides, device, variants):
            print(row, flush=True)
    preset, overrides = networks[0]
    with tempfile.TemporaryDirectory() as data_root:
        write_synthetic_cifar10(data_root, per_batch=data_per_batch)
        overrides = {**overrides, "data.root": data_root, "train.batch_size": batch}
        device_note = torch.device(device).type
        print_overhead([overhead(preset, rounds, steps, device_note, parts, **overrides)])


def write_synthetic_cifar10(root, per_batch=512, seed=0):
    """Random images in CIFAR-10's python-batch format under root/cifar-10-batches-py/ (the five
    training batches and the test batch), so that the `cifar10` preset's trainer runs on a
    machine without the dataset: timing does not depend on the pixel values."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    return root


# ---------------------------------------------------------------------------------------------
# CPU scaling.
# ---------------------------------------------------------------------------------------------
def bare_seconds(config, batch, steps):
    info = {"shape": [1, 8, 8], "num_classes": 10, "kind": "image"}
    utils.seed_everything(0)
    net = main.build_net(config, info)
    x0 = torch.rand(batch, 1, 8, 8) * 2 - 1
    y = torch.randint(0, 10, (batch,))
    step = BareStep(net, x0, y, 1e-4)
    time_block(step, 2, torch.device("cpu"))
    n_params = sum(p.numel() for p in net.parameters())
    return statistics.median(
        time_block(step, steps, torch.device("cpu")) for _ in range(3)
    ), n_params


def scaling_rows(steps):
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for batch in (16, 64, 256):
            config = bench_config("digits", workdir)
            seconds, n = bare_seconds(config, batch, steps)
            rows.append(
                f"| digits U-Net, 32 ch ({n / 1e6:.2f}M) | {batch} | {seconds * 1e3:.1f} | "
                f"{batch / seconds:.0f} |"
            )
        for channels in (16, 64):
            config = bench_config("digits", workdir, **{"model.base_channels": channels})
            seconds, n = bare_seconds(config, 64, steps)
            rows.append(
                f"| digits U-Net, {channels} ch ({n / 1e6:.2f}M) | 64 | {seconds * 1e3:.1f} | "
                f"{64 / seconds:.0f} |"
            )
    return rows


def ddp_rows(preset, batch, steps):
    """Trainer step time with 1 and 2 gloo processes (torchrun) at the same global batch."""
    rows = []
    for nproc in (1, 2):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            os.path.abspath(__file__),
            "--ddp-worker",
            "--presets",
            preset,
            "--batch",
            str(batch),
            "--steps-per-round",
            str(steps),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // nproc))}
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        line = [x for x in result.stdout.splitlines() if x.startswith("DDP_STEP_S=")]
        if not line:
            message = f"torchrun with {nproc} processes failed:\n{result.stderr[-3000:]}"
            raise RuntimeError(message)
        seconds = float(line[-1].split("=")[1])
        rows.append(
            f"| {preset} | {nproc} | {batch} | {seconds * 1e3:.1f} | {batch / seconds:.0f} |"
        )
    return rows


def ddp_worker(preset, batch, steps):
    with tempfile.TemporaryDirectory() as workdir:
        config = bench_config(preset, workdir, **{"train.batch_size": batch})
        dist_info = utils.setup_distributed()
        config.name = f"bench_{dist_info.rank}"  # every rank builds (rank 0 saves nothing)
        trainer = main.build_trainer(config, dist_info)
        trainer.train(logger_factory(trainer), until=2)
        utils.barrier()
        tic = time.perf_counter()
        trainer.train(logger_factory(trainer), until=2 + steps)
        utils.barrier()
        seconds = (time.perf_counter() - tic) / steps
        if dist_info.is_main:
            print(f"DDP_STEP_S={seconds}")
        utils.cleanup_distributed()


# ---------------------------------------------------------------------------------------------
OVERHEAD_HEADER = (
    "| preset | batch | bare ms / step | trainer ms / step | overhead (95 % interval) "
    "| samples / s | device |\n"
    "| --- | --- | --- | --- | --- | --- | --- |"
)
PARTS_HEADER = (
    "| preset | step | ms / step | trainer step minus this step, ms (95 % interval) "
    "| in % of the bare step |\n"
    "| --- | --- | --- | --- | --- |"
)


def print_overhead(results):
    """The overhead table, then the parts table, of `results` [(row, part rows)]."""
    print("\n" + OVERHEAD_HEADER)
    for row, _ in results:
        print(row)
    if any(parts for _, parts in results):
        print("\n" + PARTS_HEADER)
        for _, parts in results:
            print("\n".join(parts))
    sys.stdout.flush()


def main_(args):
    torch.manual_seed(0)
    if args.ddp_worker:
        return ddp_worker(args.presets[0], args.batch, args.steps_per_round)
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("error: --gpu needs CUDA")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
        batch = args.batch or 128
        return gpu_report(GPU_NETWORKS, batch, args.steps_per_round, args.rounds, parts=args.parts)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print_overhead(
        [
            overhead(preset, args.rounds, args.steps_per_round, "cpu", args.parts)
            for preset in args.presets
        ]
    )
    if args.no_scaling:
        return None
    print("\n| network | batch | bare ms / step | samples / s |\n| --- | --- | --- | --- |")
    for row in scaling_rows(args.steps_per_round):
        print(row, flush=True)
    print(f"\npeak resident memory of this process: {utils.peak_memory_mib('cpu'):.0f} MiB")
    print("\n| preset | processes | global batch | trainer ms / step | samples / s |")
    print("| --- | --- | --- | --- | --- |")
    for row in ddp_rows("digits", 64, args.steps_per_round):
        print(row, flush=True)
    return None


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["digits", "checkerboard"],
        choices=sorted(config_lib.PRESETS),
    )
    parser.add_argument("--rounds", type=cli.int_in(1), default=20)
    parser.add_argument("--steps-per-round", type=cli.int_in(1), default=20)
    parser.add_argument(
        "--parts", type=cli.int_in(0), default=200, help="step pairs of the parts table (0: none)"
    )
    parser.add_argument("--batch", type=cli.int_in(0), default=0, help="the --gpu batch (0: 128)")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch and not (args.gpu or args.ddp_worker):
        cli.fail("--batch is only used with --gpu (the CPU tables use each preset's batch)")
    return args


if __name__ == "__main__":
    main_(parse_args())
