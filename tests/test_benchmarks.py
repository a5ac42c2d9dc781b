"""The benchmark scripts' code paths that a GPU session relies on, run small on the CPU, so that
a lent GPU's time is not lost to a crash in them."""

import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY_UNET, minimal_checkpoint, tiny_config

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
    """The attribution loops: EMA and / or gradient norm as no-ops, then the trainer as
    before."""
    import main
    import trainer as trainer_module
    import utils

    config = tiny_config("checkerboard", tmp_path, train__ema_decay=0.5)
    trainer = main.build_trainer(config, utils.setup_distributed())
    clip, update = trainer_module.clip_gradients, trainer.ema.update
    ema_before = [p.clone() for p in trainer.ema.model.parameters()]

    def ema_unchanged():
        pairs = zip(ema_before, trainer.ema.model.parameters(), strict=True)
        return all(torch.equal(before, now) for before, now in pairs)

    with throughput.variant(trainer, no_ema=True):
        loss, grad_norm, _, _ = trainer.train_step()
        assert float(grad_norm) > 0  # the norm still runs
        assert ema_unchanged()
    assert trainer.optimizer.grad_scale is not None  # the clipping divisor of that step
    with throughput.variant(trainer, no_norm=True):
        _, grad_norm, _, _ = trainer.train_step()
        assert float(grad_norm) == 0 and trainer.optimizer.grad_scale is None  # no clipping
        assert not ema_unchanged()
    with throughput.variant(trainer, separate_clip=True):  # clips the gradients themselves
        for p in trainer.params:
            p.grad = torch.full_like(p, 3.0)
        unclipped = trainer_module.clip_gradients(trainer.optimizer, trainer.params, 1.0)
        size = sum(p.numel() for p in trainer.params)
        assert float(unclipped) == pytest.approx(3.0 * size**0.5)
        clipped = torch.nn.utils.get_total_norm([p.grad for p in trainer.params])
        assert float(clipped) == pytest.approx(1.0, rel=1e-5)
        assert trainer.optimizer.grad_scale is None  # the step does not divide again
        trainer.optimizer.zero_grad(set_to_none=True)
        _, grad_norm, _, _ = trainer.train_step()
        assert float(grad_norm) > 0
    assert trainer_module.clip_gradients is clip and trainer.ema.update == update
    _, grad_norm, _, _ = trainer.train_step()
    assert float(grad_norm) > 0 and trainer.optimizer.grad_scale is not None
    assert "update" not in vars(trainer.ema)


# ---------------------------------------------------------------------------------------------
# Arguments: every mistake is one `error:` line (exit status 1) before any work, nothing written.
# ---------------------------------------------------------------------------------------------
def load_script(name):
    """benchmarks/<name>.py as module `bench_<name>` (benchmarks/objectives.py would otherwise
    be shadowed by the training objectives' objectives.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = {}


def script(name):
    if name not in SCRIPTS:
        SCRIPTS[name] = load_script(name)
    return SCRIPTS[name]


WORK = {  # script: (the functions that do its work, its entry point taking argv)
    "solvers": (["train"], "main_"),
    "recipes": (["digits_references", "train"], "main_"),
    "objectives": (["step_cost", "quality"], "main_"),
    "compare_checkpoints": (["compare"], "main"),
    "throughput": (["main_"], "parse_args"),
    "sync_check": (["check"], "main_cli"),
}


def tree(path):
    return sorted(
        os.path.relpath(os.path.join(folder, name), path)
        for folder, folders, files in os.walk(path)
        for name in folders + files
    )


def refused(monkeypatch, capsys, tmp_path, name, argv):
    """The stderr of `benchmarks/<name>.py ARGV` run in tmp_path, which must exit with status 1
    before any of its work (replaced by failures), print nothing on stdout and write nothing."""
    module = script(name)
    work, entry = WORK[name]

    def no_work(*args, **kwargs):
        raise AssertionError("the work started")

    for function in work:
        monkeypatch.setattr(module, function, no_work)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        getattr(module, entry)([str(arg).format(tmp=tmp_path) for arg in argv])
    out, err = capsys.readouterr()
    assert info.value.code == 1 and out == ""
    assert tree(tmp_path) == before
    return err


@pytest.fixture
def files(tmp_path):
    """tmp_path with a file `afile`, a run directory `run` whose newest "checkpoint" (by step,
    not by name) is a directory, a non-checkpoint `garbage.pt`, an empty directory `empty`, a
    work directory `wd` whose run directories bench_flow_unet / bench_objectives_meanflow
    exist as a file / a directory, and `pic/checkerboard_samples.png` as a directory."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt_9999999.pt").write_bytes(b"not read")  # the last by name
    (tmp_path / "run" / "ckpt_10000000.pt").mkdir()
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02}q\x00garbage")
    (tmp_path / "empty").mkdir()
    (tmp_path / "wd" / "bench_objectives_meanflow").mkdir(parents=True)
    (tmp_path / "wd" / "bench_flow_unet").write_text("x")
    (tmp_path / "pic" / "checkerboard_samples.png").mkdir(parents=True)
    return tmp_path


INT_1 = "must be an integer >= 1, got"
NUM = "must be an integer in [2, 100000000], got"
A_FILE = "{tmp}/afile' is a file; give a directory (created if absent)"


@pytest.mark.parametrize(
    "name,argv,expected",
    [
        ("solvers", ["--steps", "0"], f"--steps: {INT_1} '0'"),
        ("solvers", ["--steps=-3"], f"--steps: {INT_1} '-3'"),
        ("solvers", ["--steps", "1e3"], f"--steps: {INT_1} '1e3'"),
        ("solvers", ["--workdir", "{tmp}/afile"], f"--workdir: '{A_FILE}"),
        (
            "solvers",
            ["--workdir", "{tmp}/afile/sub"],
            "--workdir: '{tmp}/afile/sub' is inside "
            "the file {tmp}/afile; give a directory (created if absent)",
        ),
        ("solvers", ["--workdir", "{tmp}", "--out", "{tmp}/afile"], f"--out: '{A_FILE}"),
        (
            "solvers",
            ["--workdir", "{tmp}", "--out", "{tmp}/pic"],
            "{tmp}/pic/checkerboard_samples.png is a directory: checkerboard_samples.png cannot "
            "be written in --out={tmp}/pic",
        ),
        ("recipes", ["--steps", "-1"], f"--steps: {INT_1} '-1'"),
        ("recipes", ["--steps", "0"], f"--steps: {INT_1} '0'"),
        ("recipes", ["--steps", "1", "--num", "0"], f"--num: {NUM} '0'"),
        ("recipes", ["--num", "1"], f"--num: {NUM} '1'"),
        (
            "recipes",
            ["--workdir", "{tmp}/wd"],
            "the run directory {tmp}/wd/bench_flow_unet is a "
            "file; give a directory (created if absent)",
        ),
        ("objectives", ["--rounds", "0"], f"--rounds: {INT_1} '0'"),
        ("objectives", ["--steps-per-round", "0"], f"--steps-per-round: {INT_1} '0'"),
        ("objectives", ["--num", "1"], f"--num: {NUM} '1'"),
        (
            "objectives",
            ["--set", "train.lr"],
            "--set: expected KEY=VALUE (e.g. train.lr=1e-3), got 'train.lr'",
        ),
        (
            "objectives",
            ["--set", "nosuch.key=1"],
            "--set (run flow, preset digits): config key 'nosuch.key' does not exist; valid keys "
            "under <top level>: ['data', 'eval', 'logging', 'model', 'name', 'prediction', "
            "'process', 'sample', 'seed', 'time_sampler', 'train', 'workdir']",
        ),
        (
            "objectives",
            ["--runs", "meanflow", "--set", "train.steps=-1"],
            "--set (run meanflow, "
            "preset digits_meanflow): train.steps=-1 must be positive (an integer >= 1)",
        ),
        (
            "objectives",
            ["--cost-only", "--set", "train.lr=1"],
            "--set is not used by --cost-only, which trains nothing: drop it",
        ),
        ("objectives", ["--workdir", "{tmp}/afile"], f"--workdir: '{A_FILE}"),
        (
            "objectives",
            ["--workdir", "{tmp}/wd"],
            "{tmp}/wd/bench_objectives_meanflow exists; the "
            "training time needs a fresh run (remove it or give another --workdir)",
        ),
        (
            "compare_checkpoints",
            ["{tmp}/garbage.pt", "{tmp}/run"],
            "RUN_A: {tmp}/garbage.pt is "
            "not a readable checkpoint (not a file torch can load safely, never loaded)",
        ),
        (
            "compare_checkpoints",
            ["{tmp}/run", "{tmp}/run"],
            "RUN_A: {tmp}/run/ckpt_10000000.pt is a directory, not a checkpoint file",
        ),
        (
            "compare_checkpoints",
            ["{tmp}/garbage.pt", "{tmp}/typo"],
            "RUN_B={tmp}/typo: no such file or directory",
        ),
        (
            "compare_checkpoints",
            ["{tmp}/empty", "{tmp}/run"],
            "RUN_A={tmp}/empty: no ckpt_*.pt in this directory",
        ),
        ("compare_checkpoints", ["{tmp}/run"], "the following arguments are required: RUN_B"),
        ("throughput", ["--rounds", "0"], f"--rounds: {INT_1} '0'"),
        ("throughput", ["--steps-per-round", "0"], f"--steps-per-round: {INT_1} '0'"),
        ("throughput", ["--parts", "-1"], "--parts: must be an integer >= 0, got '-1'"),
        (
            "throughput",
            ["--batch", "8"],
            "--batch is only used with --gpu (the CPU tables use each preset's batch)",
        ),
        ("sync_check", ["--steps", "0"], f"--steps: {INT_1} '0'"),
    ],
)
def test_a_bad_argument_is_one_line_before_any_work(
    monkeypatch, capsys, files, name, argv, expected
):
    err = refused(monkeypatch, capsys, files, name, argv)
    assert err == f"error: {expected.format(tmp=files)}\n"


def test_objectives_checks_every_run_then_makes_a_new_workdir_and_applies_set(
    monkeypatch, capsys, tmp_path
):
    """Valid arguments reach the work: the step cost with --rounds / --steps-per-round, then the
    runs' configs with --set applied, under a new folder of ckpts/ made after the checks."""
    module = script("objectives")
    calls = {}

    def recorder(name):
        def record(*args):
            calls[name] = args
            return [f"| {name} |"]

        return record

    monkeypatch.setattr(module, "step_cost", recorder("cost"))
    monkeypatch.setattr(module, "quality", recorder("quality"))
    monkeypatch.chdir(tmp_path)
    module.main_(
        ["--rounds", "2", "--steps-per-round", "3", "--runs", "meanflow", "flow"]
        + ["--num", "5", "--set", "train.lr=1e-3", "model.dropout=0.0"]
    )
    configs, num = calls["quality"]
    assert calls["cost"] == (2, 3) and num == 5 and list(configs) == ["meanflow", "flow"]
    (workdir,) = os.listdir(tmp_path / "ckpts")
    assert (
        workdir.startswith("bench_objectives_") and os.listdir(tmp_path / "ckpts" / workdir) == []
    )
    for name, config in configs.items():
        assert config.workdir == os.path.join("ckpts", workdir)
        assert config.name == f"bench_objectives_{name}"
        assert (config.train.lr, config.model.dropout) == (1e-3, 0.0)
    assert capsys.readouterr().out.splitlines()[0] == f"run directories under ckpts/{workdir}"


def test_recipes_runs_use_the_given_steps_or_the_presets():
    recipes = script("recipes")
    given = recipes.run_config("x", "edm_digits", {"model.depth": 3}, 7, "wd")
    preset = recipes.run_config("x", "digits_meanflow", {}, None, "wd")
    assert (given.train.steps, given.train.sample_every, given.model.depth) == (7, 7, 3)
    assert (given.name, given.workdir) == ("bench_x", "wd")
    assert preset.train.steps == preset.train.sample_every == 4000  # digits_meanflow's own


class FakeTrainer:
    """What solvers.py uses of a trainer, with checkerboard points as every sample."""

    ema, process = type("EMA", (), {"model": None})(), None

    def generate(self, num, trajectory=None, **sampler):
        x = data_utils.sample_toy("checkerboard", num, torch.Generator().manual_seed(1))
        if trajectory is not None:
            trajectory += [(1 - i / 32, x) for i in range(33)]
        return x, None, sampler["steps"]


@pytest.mark.parametrize("out", [None, "pictures"])
def test_solvers_prints_its_tables_and_never_writes_docs(monkeypatch, capsys, tmp_path, out):
    """The Markdown sections go to stdout; the picture to --out (default: the run directory);
    docs/benchmarks.md, which holds other sections too, is never touched."""
    solvers = script("solvers")
    monkeypatch.setattr(solvers, "NUM", 64)
    monkeypatch.setattr(solvers, "train", lambda config: FakeTrainer())
    nll = (-2 * torch.ones(16), 7)  # log p of 16 points in nats (2 dims), NFE
    monkeypatch.setattr(solvers.sampling, "log_likelihood", lambda *a, **k: nll)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text("# Benchmarks\n\nother sections\n")
    monkeypatch.chdir(tmp_path)
    solvers.main_(["--steps", "3"] + (["--out", out] if out else []))
    assert (tmp_path / "docs" / "benchmarks.md").read_text() == "# Benchmarks\n\nother sections\n"
    assert os.listdir(tmp_path / "docs") == ["benchmarks.md"]
    picture = os.path.join(out or "ckpts/bench_checkerboard", "checkerboard_samples.png")
    with open(tmp_path / picture, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Paste the two sections below into docs/benchmarks.md."
    assert lines[-1] == (
        f"picture: {picture} (copy it to docs/checkerboard_samples.png beside docs/benchmarks.md)"
    )
    assert "# Benchmarks" not in lines
    sections = [line for line in lines if line.startswith("## ")]
    assert sections == [
        "## Checkerboard: sample quality against NFE",
        "## Checkerboard: negative log-likelihood",
    ]
    assert "| rk4, 64 steps | 7 | 1.0000 | 0.0000 |" in lines  # NLL = -log p / 2, std. error 0
    runs = len(solvers.ODE_RUNS + solvers.ADAPTIVE_RUNS + solvers.SDE_RUNS + solvers.EDM_RUNS)
    assert sum(line.startswith("| ") for line in lines) == 2 + 1 + runs + 2 + 3


def fake_checkpoint(path, step, weight):
    """A file that checkpoints.load accepts: every required key, one weight."""
    torch.save(minimal_checkpoint({"w": torch.tensor([weight])}, step, 2), path)
    return str(path)


def test_compare_checkpoints_takes_the_newest_by_step_and_compares_every_tensor(tmp_path, capsys):
    compare = script("compare_checkpoints")
    (tmp_path / "run").mkdir()
    fake_checkpoint(tmp_path / "run" / "ckpt_9999999.pt", 9999999, 0.0)
    newest = fake_checkpoint(tmp_path / "run" / "ckpt_10000000.pt", 10000000, 1.0)
    other = fake_checkpoint(tmp_path / "other.pt", 10000000, 1.5)
    for argv, code, line in [
        ([str(tmp_path / "run"), newest], 0, "steps 10000000 / 10000000; largest difference 0"),
        ([str(tmp_path / "run"), other], 1, "steps 10000000 / 10000000; largest difference 0.5"),
    ]:
        with pytest.raises(SystemExit) as info:
            compare.main(argv)
        assert info.value.code == code
        assert capsys.readouterr().out.startswith(f"2 tensors and 6 values compared; {line}")


def test_compare_checkpoints_compares_every_value_not_only_tensors(tmp_path, capsys):
    """Two checkpoints with equal tensors differ when the loader position, the EMA's update
    count or the config differ (a resume that skipped data would pass a tensor-only check);
    the logger id, the run's name and the speed of its last log line may differ."""
    compare = script("compare_checkpoints")
    base = torch.load(fake_checkpoint(tmp_path / "a.pt", 4, 1.0), weights_only=True)
    base.update(loader={"epoch": 0, "batch": 4}, config=json.dumps({"name": "a", "seed": 0}))
    base["ema"]["num_updates"] = 4
    base["metrics"] = {"loss": 0.5, "steps_per_sec": 10.0}
    torch.save(base, tmp_path / "a.pt")
    same = {  # name: changes that train the same
        "run_id": lambda s: s.update(run_id="other"),
        "name": lambda s: s.update(config=json.dumps({"name": "b", "seed": 0})),
        "speed": lambda s: s["metrics"].update(steps_per_sec=99.0),
    }
    different = {  # name: (change, the line that reports it)
        "loader": (lambda s: s["loader"].update(batch=5), "loader.batch: 4 / 5"),
        "EMA count": (lambda s: s["ema"].update(num_updates=9), "ema.num_updates: 4 / 9"),
        "config": (
            lambda s: s.update(config=json.dumps({"name": "a", "seed": 1})),
            "config.seed: 0 / 1",
        ),
        "loss": (lambda s: s["metrics"].update(loss=0.25), "metrics.loss: 0.5 / 0.25"),
    }
    cases = [(change, 0, None) for change in same.values()]
    cases += [(change, 1, line) for change, line in different.values()]
    for change, code, line in cases:
        state = torch.load(tmp_path / "a.pt", weights_only=True)
        change(state)
        torch.save(state, tmp_path / "b.pt")
        with pytest.raises(SystemExit) as info:
            compare.main([str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
        out = capsys.readouterr().out
        assert info.value.code == code, out
        assert "largest difference 0" in out
        assert (line in out.splitlines()) if line else len(out.splitlines()) == 1, out


def test_compare_checkpoints_help_exits_0_and_a_mistake_is_one_line(tmp_path):
    import subprocess

    command = [sys.executable, os.path.join(ROOT, "benchmarks", "compare_checkpoints.py")]
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: compare_checkpoints.py")
    missing = subprocess.run(
        [*command, str(tmp_path / "typo"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == f"error: RUN_A={tmp_path / 'typo'}: no such file or directory\n"
