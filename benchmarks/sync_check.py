"""The training step makes no host sync: a few steps of each check (a preset with overrides) on
this machine's device, after two warm-up steps (lazy state: optimizer moments, cached tensors).

    python benchmarks/sync_check.py                        # every entry of CHECKS, fp32
    python benchmarks/sync_check.py --checks digits_meanflow --precision bf16

On CUDA, torch.cuda.set_sync_debug_mode("error") makes any synchronising call raise, including
blocking copies between host and device, which the CPU cannot see; everywhere,
utils.HostSyncCounter records the operators that would sync. train.ot_pairing syncs by design
(scipy's assignment runs on the host) and is not checked. Prints PASS / FAIL per check; exit
status 1 if any failed.
"""

import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402  (benchmarks/ is this script's folder)
from throughput import bench_config  # noqa: E402

import main  # noqa: E402
import utils  # noqa: E402

# name -> (preset, overrides): every network, objective, a toy base drawn on the CPU, flips.
CHECKS = {
    "digits": ("digits", {}),
    "digits, flips": ("digits", {"data.flip": True}),
    "checkerboard": ("checkerboard", {}),
    "gaussians8_to_moons": ("gaussians8_to_moons", {}),
    "digits_dit": ("digits_dit", {}),
    "edm_digits": ("edm_digits", {}),
    "digits_meanflow": ("digits_meanflow", {}),
    "digits_consistency": ("digits_consistency", {}),
}


def check(name, precision, steps):
    """None when `steps` training steps of CHECKS[name] made no host sync, else what synced."""
    preset, overrides = CHECKS[name]
    with tempfile.TemporaryDirectory() as workdir:
        overrides = {"train.precision": precision, "data.num_points": 4096, **overrides}
        config = bench_config(preset, workdir, **overrides)
        trainer = main.build_trainer(config, utils.setup_distributed())
        for _ in range(2):
            trainer.train_step()
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with utils.HostSyncCounter() as syncs:
                for _ in range(steps):
                    trainer.train_step()
        except RuntimeError as err:  # raised by the CUDA sync debug mode
            return (str(err).strip().splitlines() or [type(err).__name__])[0]
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        return syncs.hits[:3] or None


def main_cli(argv=None):
    parser = cli.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=cli.int_in(1), default=3, help="checked steps per check")
    args = parser.parse_args(argv)
    failed = 0
    for name in args.checks:
        problem = check(name, args.precision, args.steps)
        print(f"{'FAIL' if problem else 'PASS'}  no host sync: {name} {args.precision}", end="")
        print(f": {problem}" if problem else "", flush=True)
        failed += problem is not None
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main_cli()
