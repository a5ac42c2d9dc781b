"""The benchmark scripts' code paths that a GPU session relies on, run small on the CPU, so that
a lent GPU's time is not lost to a crash in them."""

import os
import sys

from helpers import ROOT, TINY_UNET

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


def test_synthetic_cifar10_is_read_by_the_loader_and_drives_the_overhead_rows(tmp_path):
    root = throughput.write_synthetic_cifar10(str(tmp_path), per_batch=16)
    train = data_utils.build_cifar10(root, train=True)
    test = data_utils.build_cifar10(root, train=False)
    assert (len(train), len(test)) == (80, 16)
    x, y = train[3]
    assert x.shape == (3, 32, 32) and -1 <= x.min() < x.max() <= 1 and 0 <= int(y) < 10
    overrides = {**TINY, "data.root": root, "data.num_workers": 0, "train.batch_size": 4}
    rows = throughput.overhead("cifar10", 2, 1, "cpu", **overrides).splitlines()
    assert [cells(row)[1] for row in rows] == [
        "trainer",
        "trainer, EMA and gradient norm as no-ops",
    ]
    for row in rows:
        bare_ms, loop_ms = float(cells(row)[3]), float(cells(row)[4])
        assert bare_ms > 0 and loop_ms > 0 and cells(row)[2] == "4"
