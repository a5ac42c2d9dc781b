"""No host syncs in the training step: proven on the CPU with utils.HostSyncCounter, which sees
every operator that would make the host wait for a GPU (`.item()`, a 0-dim tensor read as a
number, data-dependent shapes)."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, tiny_config

import main
import utils
from ema import lerp_by_device_scalar, lerp_towards

CASES = {
    "digits (flow, U-Net)": ("digits", {}),
    "checkerboard (MLP, 2-D data)": ("checkerboard", {}),
    "gaussians8_to_moons (toy base drawn on the CPU)": ("gaussians8_to_moons", {}),
    "digits with horizontal flips": ("digits", {"data.flip": True}),
    "dit": ("digits_dit", {}),
    "edm preconditioning": ("edm_digits", {}),
    "stochastic interpolant (learns z)": (
        "digits",
        {"process.gamma": "sqrt", "sample.denoise_final": False},
    ),
    "vp_cosine, eps target, logit-normal t": (
        "digits",
        {
            "process.name": "vp_cosine",
            "prediction.target": "eps",
            "prediction.model_output": "eps",
            "time_sampler.name": "logit_normal",
            "time_sampler.t_max": 0.99,
        },
    ),
    "stratified t, min-snr weight": (
        "digits",
        {
            "time_sampler.name": "stratified",
            "process.name": "vp_linear",
            "prediction.loss_weight": "min_snr",
            "time_sampler.t_max": 0.99,
        },
    ),
    "meanflow": ("digits_meanflow", {}),
    "consistency": ("digits_consistency", {}),
    "power EMA, grad accumulation": ("digits", {"train.ema": "power", "train.grad_accum": 2}),
    "trig, no clipping, weight decay": (
        "digits",
        {"process.name": "trig", "train.grad_clip": 0.0, "train.weight_decay": 0.01},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_train_step_makes_no_host_sync(tmp_path, name):
    preset, overrides = CASES[name]
    config = tiny_config(preset, tmp_path, **overrides)
    trainer = main.build_trainer(config, utils.setup_distributed())
    trainer.train_step()  # first step: lazy state (optimizer moments, cached tensor lists)
    with utils.HostSyncCounter() as syncs:
        for _ in range(2):
            loss, grad_norm, skipped, stop = trainer.train_step()
    assert syncs.hits == []
    assert torch.isfinite(loss) and skipped.item() == 0  # the steps did train


def test_training_loop_reads_the_host_only_at_poll_and_log_steps(tmp_path):
    """With poll and log windows of 5 steps (as on a GPU), every host read of `train` happens
    at its start or at a step divisible by 5; none in the 4 steps between."""
    config = tiny_config("digits", tmp_path, train__steps=100, train__log_every=5)
    config.train.save_every = 10**6
    trainer = main.build_trainer(config, utils.setup_distributed())
    trainer.poll_every = 5  # as on a GPU
    trainer.train_step()
    logs = []

    class Logger:
        run_id = None

        def log(self, step, metrics):
            logs.append(step)

        def close(self):
            pass

    with utils.HostSyncCounter(where=lambda: trainer.step) as syncs:
        trainer.train(lambda run_id: Logger(), until=15)
    steps = sorted({step for _, step, _ in syncs.hits})
    assert steps and all(step == 1 or step % 5 == 0 for step in steps), syncs.hits
    assert logs == [5, 10, 15]


def test_the_counter_sees_every_kind_of_sync():
    """The detector itself: each of these makes a GPU host wait, and each is recorded; plain
    integer indexing and arithmetic are not."""
    x = torch.randn(6)
    with utils.HostSyncCounter() as syncs:
        x.sum().item()
        bool(x.sum() > 0)
        x[x > 0]
        x.nonzero()
        torch.unique(x)
        torch._foreach_lerp_([x.clone()], [x], torch.tensor(0.5))  # the Scalar overload
        torch.repeat_interleave(x, torch.tensor([1, 2, 1, 1, 1, 1]))
    names = [name for name, _, _ in syncs.hits]
    assert names.count("_local_scalar_dense") == 3
    assert {"index", "nonzero", "repeat_interleave"} <= set(names)
    assert any("unique" in n for n in names)
    with utils.HostSyncCounter() as syncs:
        x[torch.tensor([0, 2])] * 2 + x.mean()
        torch.repeat_interleave(x, torch.tensor([1, 2, 1, 1, 1, 1]), output_size=7)
    assert syncs.hits == []


def test_ema_with_a_device_weight_matches_the_float_weight_without_a_sync():
    """lerp_towards with a 0-dim tensor weight (the trainer's, scaled by the skip flag) gives the
    float weight's result, through the list overload: no .item()."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[1].running_mean.normal_()
    by_float = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    by_tensor = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    by_tensor.load_state_dict(by_float.state_dict())
    lerp_towards(by_float, model, 0.3)
    keep = torch.ones(())
    with utils.HostSyncCounter() as syncs:
        lerp_towards(by_tensor, model, 0.3 * keep, keep)
    assert syncs.hits == []
    for a, b in zip(by_float.state_dict().values(), by_tensor.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The CUDA path (three fused kernels instead of lerp), run here on CPU tensors.
    averages = [torch.zeros(3, 4), torch.ones(5)]
    targets = [torch.randn(3, 4), torch.randn(5)]
    expected = [a.lerp(t, 0.3) for a, t in zip(averages, targets, strict=True)]
    with utils.HostSyncCounter() as syncs:
        lerp_by_device_scalar(averages, targets, torch.tensor(0.3))
    assert syncs.hits == []
    for got, want in zip(averages, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    before = {k: v.clone() for k, v in by_tensor.state_dict().items()}
    lerp_towards(by_tensor, model, 0.3 * torch.zeros(()), torch.zeros(()))  # a skipped step
    for key, value in by_tensor.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_sync_check_script_passes_on_this_device():
    """benchmarks/sync_check.py (run by gpu_check.sh on CUDA) passes here, one line per preset."""
    script = os.path.join(ROOT, "benchmarks", "sync_check.py")
    result = subprocess.run(
        [sys.executable, script, "--checks", "digits, flips", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("PASS  no host sync: digits, flips fp32")
