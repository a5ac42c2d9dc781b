"""The benchmark scripts' code paths that a GPU session relies on, run small on the CPU, so that
a lent GPU's time is not lost to a crash in them."""

import os
import re
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY_UNET, tiny_config

import data_utils

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import throughput  # noqa: E402

TINY = dict(TINY_UNET)


def cells(row):
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_gpu_variant_table_runs_on_the_cpu():
    variants = ["fp32 eager", "bf16 autocast", "bf16 + channels-last"]
    variants += ["fp32 + foreach AdamW (not fused)"]
    rows = throughput.gpu_table("cifar10", 2, 1, TINY, device="cpu", variants=variants)
    assert [cells(row)[0] for row in rows] == [f"cifar10 unet, {name}" for name in variants]
    first = cells(rows[0])
    assert first[1] == "2" and float(first[2]) > 0 and first[5] == "1.00x"
    assert all(float(cells(row)[4]) > 0 for row in rows)  # peak memory, GiB


def test_synthetic_cifar10_is_read_by_the_loader_and_drives_the_overhead_tables(tmp_path):
    root = throughput.write_synthetic_cifar10(str(tmp_path), per_batch=16)
    train = data_utils.build_cifar10(root, train=True)
    test = data_utils.build_cifar10(root, train=False)
    assert (len(train), len(test)) == (80, 16)
    x, y = train[3]
    assert x.shape == (3, 32, 32) and -1 <= x.min() < x.max() <= 1 and 0 <= int(y) < 10
    overrides = {**TINY, "data.root": root, "data.num_workers": 0, "train.batch_size": 4}
    row, parts = throughput.overhead("cifar10", 2, 1, "cpu", part_steps=3, **overrides)
    bare_ms, trainer_ms = float(cells(row)[2]), float(cells(row)[3])
    assert cells(row)[0].startswith("cifar10 (unet,") and cells(row)[1] == "4"
    assert bare_ms > 0 and trainer_ms > 0
    median, low, high = re.fullmatch(
        r"([+-][\d.]+) % \(([+-][\d.]+) to ([+-][\d.]+)\)", cells(row)[4]
    ).groups()
    assert float(low) <= float(median) <= float(high)
    assert [cells(part)[1] for part in parts] == list(throughput.PARTS)
    for part in parts:
        median, low, high = re.fullmatch(
            r"([+-][\d.]+) \(([+-][\d.]+) to ([+-][\d.]+)\)", cells(part)[3]
        ).groups()
        assert float(low) <= float(median) <= float(high) and float(cells(part)[2]) > 0
        assert cells(part)[4].endswith(" %")


def test_gpu_report_prints_both_networks_and_the_overhead_tables(capsys):
    """The whole `--gpu` report, small and on the CPU: a U-Net and a DiT variant table, then the
    trainer's overhead and parts tables on synthetic CIFAR-10 at the report's batch."""
    tiny_dit = {"model.name": "dit", "model.patch_size": 4, "model.width": 32}
    tiny_dit.update({"model.depth": 1, "model.num_heads": 2})
    networks = [("cifar10", {**TINY, "data.num_workers": 0}), ("cifar10", tiny_dit)]
    variants = ["fp32 eager", "bf16 autocast"]
    throughput.gpu_report(networks, 2, 1, 1, "cpu", variants, data_per_batch=4, parts=2)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cifar10")]
    assert [cells(row)[0] for row in table[:4]] == [
        "cifar10 unet, fp32 eager",
        "cifar10 unet, bf16 autocast",
        "cifar10 dit, fp32 eager",
        "cifar10 dit, bf16 autocast",
    ]
    assert all(cells(row)[1] == "2" for row in table[:4])  # batch
    overhead_row, parts = table[4], table[5:]
    assert cells(overhead_row)[0].startswith("cifar10 (unet,")
    assert cells(overhead_row)[1] == "2"  # the report's batch
    assert [cells(row)[1] for row in parts] == list(throughput.PARTS)


def test_median_interval_is_the_bootstrap_percentile_interval_of_the_median():
    values = [0.05, -0.02, 0.11, 0.03, 0.07, 0.01, 0.04, 0.09, -0.01, 0.06]
    low, high = throughput.median_interval(values, level=0.9, resamples=500, seed=3)
    draws = np.random.default_rng(3).choice(values, size=(500, len(values)), replace=True)
    expected = np.percentile(np.median(draws, axis=1), [5, 95])
    assert (low, high) == (float(expected[0]), float(expected[1]))
    assert min(values) <= low <= np.median(values) <= high <= max(values)
    assert throughput.median_interval([0.2]) == (0.2, 0.2)


def test_variant_replaces_only_the_named_parts_and_restores_them(tmp_path):
    """The attribution loops: EMA and / or gradient norm as no-ops, torch's norm in place of
    optimizers.global_norm, then the trainer as before."""
    import main
    import optimizers
    import trainer as trainer_module
    import utils

    config = tiny_config("checkerboard", tmp_path, train__ema_decay=0.5)
    trainer = main.build_trainer(config, utils.setup_distributed())
    clip, norm, update = trainer_module.clip_gradients, optimizers.global_norm, trainer.ema.update
    ema_before = [p.clone() for p in trainer.ema.model.parameters()]

    def ema_unchanged():
        pairs = zip(ema_before, trainer.ema.model.parameters(), strict=True)
        return all(torch.equal(before, now) for before, now in pairs)

    with throughput.variant(trainer, no_ema=True):
        loss, grad_norm, _, _ = trainer.train_step()
        assert float(grad_norm) > 0  # the norm still runs
        assert ema_unchanged()
    with throughput.variant(trainer, no_norm=True):
        _, grad_norm, _, _ = trainer.train_step()
        assert float(grad_norm) == 0
        assert not ema_unchanged()
    with throughput.variant(trainer, torch_norm=True):
        assert optimizers.global_norm is not norm
        grads = [torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])]
        assert float(optimizers.global_norm(grads)) == pytest.approx(13.0)
        _, grad_norm, _, _ = trainer.train_step()
        assert float(grad_norm) > 0
    assert trainer_module.clip_gradients is clip and trainer.ema.update == update
    assert optimizers.global_norm is norm
    assert "update" not in vars(trainer.ema)
