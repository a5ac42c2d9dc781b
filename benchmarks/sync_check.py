"""The training step makes no host sync: a few steps of each listed preset, on this machine's
device, after two warm-up steps (lazy state: optimizer moments, cached tensor lists).

    python benchmarks/sync_check.py                        # digits, checkerboard, meanflow, ...
    python benchmarks/sync_check.py --presets cifar10 --precision bf16

On CUDA, torch.cuda.set_sync_debug_mode("error") makes any synchronising call raise (including
device-to-host copies, which the CPU cannot see); everywhere, utils.HostSyncCounter records the
operators that would sync. Prints PASS / FAIL per preset; exit status 1 if any failed.
"""

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config as config_lib  # noqa: E402
import main  # noqa: E402
import utils  # noqa: E402

PRESETS = ["digits", "checkerboard", "digits_dit", "edm_digits", "digits_meanflow"]
PRESETS += ["digits_consistency"]


def check(preset, precision, steps):
    """None when `steps` training steps of `preset` made no host sync, else what synced."""
    with tempfile.TemporaryDirectory() as workdir:
        config = config_lib.get_config(preset)
        config.workdir, config.logging.wandb = workdir, "disabled"
        config.train.precision = precision
        config.data.num_points = min(config.data.num_points, 4096)
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
            return f"{err}".splitlines()[0]
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        return syncs.hits[:3] or None


def main_cli():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    failed = 0
    for preset in args.presets:
        problem = check(preset, args.precision, args.steps)
        print(f"{'FAIL' if problem else 'PASS'}  no host sync: {preset} {args.precision}", end="")
        print(f": {problem}" if problem else "", flush=True)
        failed += problem is not None
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main_cli()
