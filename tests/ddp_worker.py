"""Trains a tiny config and saves this rank's parameters: run under torchrun by test_ddp.py.

python tests/ddp_worker.py WORKDIR OUT_DIR [KEY=VALUE ...]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import tiny_config  # noqa: E402

import main  # noqa: E402
import utils  # noqa: E402


def run(workdir, out_dir, overrides):
    dist_info = utils.setup_distributed()
    config = tiny_config("digits", workdir, **overrides)
    trainer = main.train(config, {}, dist_info)
    params = {k: v.detach().cpu() for k, v in trainer.net.state_dict().items()}
    ema = {k: v.detach().cpu() for k, v in trainer.ema.model.state_dict().items()}
    x, labels, nfe = trainer.generate(6)
    torch.save(
        {"params": params, "ema": ema, "samples": x.cpu()},
        os.path.join(out_dir, f"rank{dist_info.rank}.pt"),
    )
    utils.cleanup_distributed()


if __name__ == "__main__":
    workdir, out_dir, *pairs = sys.argv[1:]
    overrides = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        overrides[key.replace(".", "__")] = eval(value)  # test-only: literals like 3 or (1, 2)
    run(workdir, out_dir, overrides)
