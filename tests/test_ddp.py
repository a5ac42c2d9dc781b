"""Two CPU processes under torchrun (gloo) against one process with the same global batch."""

import os

import torch
from helpers import ROOT, run_torchrun

WORKER = os.path.join(ROOT, "tests", "ddp_worker.py")
# Adam's eps is raised so that parameters whose gradient is ~0 (behind zero-initialised layers)
# do not turn float summation-order noise into +-lr updates (g / sqrt(v) with g, v ~ 0).
ARGS = [
    "train.steps=3",
    "train.batch_size=16",
    "train.grad_clip=0.5",
    "model.dropout=0.0",
    "train.adam_eps=1e-4",
]


def launch(nproc, workdir, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    run_torchrun(nproc, WORKER, workdir, out_dir, *ARGS)
    return [
        torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(nproc)
    ]


def test_two_ranks_match_each_other_and_a_single_process(tmp_path):
    two = launch(2, tmp_path / "ckpt2", tmp_path / "out2")
    (one,) = launch(1, tmp_path / "ckpt1", tmp_path / "out1")
    for name, value in two[0]["params"].items():
        assert torch.equal(value, two[1]["params"][name]), f"ranks differ in {name}"
        torch.testing.assert_close(value, one["params"][name], rtol=1e-5, atol=1e-6, msg=name)
    for name, value in two[0]["ema"].items():
        torch.testing.assert_close(value, one["ema"][name], rtol=1e-4, atol=1e-5, msg=name)
    # sampling is sharded over ranks and gathered; per-sample seeds make it world-size invariant
    torch.testing.assert_close(two[0]["samples"], two[1]["samples"], rtol=0, atol=0)
    torch.testing.assert_close(two[0]["samples"], one["samples"], rtol=1e-4, atol=1e-4)
    # only rank 0 wrote the run directory, and the checkpoint records the world size
    state = torch.load(
        os.path.join(tmp_path / "ckpt2", "digits", "ckpt_0000003.pt"), weights_only=True
    )
    assert state["world_size"] == 2 and len(state["rng"]) == 2
