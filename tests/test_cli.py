"""The command-line contract: flags, one-line errors before any work, sample and info modes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, run_main, run_main_forked, tiny_config
from PIL import Image

import config as config_lib
import main
import utils
from main import registry_choices


def last_line(text):
    return text.strip().splitlines()[-1]


BAD_FLAGS = [
    (
        ["--config.train.stepz=3"],
        "config key 'train.stepz' does not exist; valid keys under train: [",
    ),
    (["--config=config.py:nope"], "config preset 'nope' is unknown; valid choices: ["),
    (["--config.process.name=bogus"], "process.name='bogus' is unknown; valid choices: ["),
    (["--config.sample.solver=rk9"], "sample.solver='rk9' is unknown; valid choices: ["),
    (
        ["--config.data.image_size=12", "--config.model.channel_mults=(1,2,2,2)"],
        "data.image_size=12 cannot be halved 3 times",
    ),
    (
        ["--config.prediction.model_output=eps", "--config.time_sampler.t_max=1.0"],
        "singular at t=1",
    ),
    (["--config.train.steps=abc"], "--config.train.steps=abc: invalid literal for int()"),
    (["--config=nope.py:digits"], "--config=nope.py:digits: no such config file; use"),
    (["--ckpt=ckpts/old"], "pass --config.train.init_from=ckpts/old"),
    (["--mode=sample", "--ckpt=x", "--out=README.md"], "--out=README.md is a file"),
    (["--mode=sample", "--ckpt=x", "--out="], "--out= is empty: give a directory"),
    (
        ["--mode=info", "--ckpt=x", "--config.sample.solver=nope", "--config.train.lr=1"],
        "--mode=info prints the checkpoint as saved and takes no --config.* flag: drop "
        "--config.sample.solver (and 3 more)",
    ),
    (
        ["--config=config.py:digits", "--config=config.py:moons"],
        "--config is given 2 times (['config.py:digits', 'config.py:moons']): pass one preset",
    ),
    (
        ["--config=config.py:digits", "train"],
        "unexpected argument(s) ['train']: every option is a flag, e.g. --mode=sample",
    ),
]


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
    """(workdir, result) of every BAD_FLAGS case, each with its own empty workdir."""
    base = tmp_path_factory.mktemp("bad_flags")
    workdirs = [base / f"work{i}" for i in range(len(BAD_FLAGS))]
    for workdir in workdirs:
        workdir.mkdir()
    cases = [
        [*args, f"--config.workdir={workdir}", "--config.logging.wandb=disabled"]
        for (args, _), workdir in zip(BAD_FLAGS, workdirs, strict=True)
    ]
    return list(zip(workdirs, run_main_forked(cases, str(base / "out")), strict=True))


@pytest.mark.parametrize("index", range(len(BAD_FLAGS)), ids=lambda i: BAD_FLAGS[i][1][:40])
def test_bad_flags_fail_with_one_line_before_work(bad_flag_runs, index):
    workdir, result = bad_flag_runs[index]
    expected = BAD_FLAGS[index][1]
    assert result.returncode == 1
    assert expected in last_line(result.stderr), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not os.listdir(workdir)  # nothing was written


def test_output_dirs_where_no_file_can_be_made_are_refused(tmp_path):
    """utils.check_output_dir (--out, sample mode's default): nothing is created."""
    readme = os.path.join(ROOT, "README.md")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = [
        (readme, "--out is a file; give a directory (created if absent)"),
        (f"{readme}/sub", f"--out is inside the file {readme}; give a directory"),
        ("/proc/x", "--out: cannot create files in /proc ("),
        (str(tmp_path / "dangling" / "x"), f"--out: {tmp_path / 'dangling'} is a symbolic link to"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError) as info:
            utils.check_output_dir(path, "--out")
        assert str(info.value).startswith(message), info.value
    utils.check_output_dir(str(tmp_path / "new" / "deeper"), "--out")
    assert os.listdir(tmp_path) == ["dangling"]


@pytest.mark.parametrize(
    "preset,changes,message",
    [
        ("moons", {}, "sample.guidance_scale=2 needs a class-conditional model, and this one is"),
        ("digits", {"model__class_dropout": 0.0}, "sample.guidance_scale=2 needs a model trained "),
    ],
)
def test_guidance_without_a_trained_null_class_is_refused_before_the_run_dir(
    tmp_path, preset, changes, message
):
    config = tiny_config(preset, tmp_path, sample__guidance_scale=2.0, **changes)
    with pytest.raises(ValueError, match=message):
        main.build_trainer(config, utils.DistInfo())
    assert not os.listdir(tmp_path)


def test_validate_rejects_impossible_values():
    choices = registry_choices()
    c = config_lib.get_config("digits")
    config_lib.validate(c, choices, world_size=1)
    with pytest.raises(ValueError, match="train.batch_size=64 is not divisible by world size 3"):
        config_lib.validate(c, choices, world_size=3)
    c.train.grad_accum = 3
    with pytest.raises(ValueError, match="multiple of 3"):
        config_lib.validate(c, choices, world_size=1)
    c = config_lib.get_config("digits")
    c.sample.num = 0
    with pytest.raises(ValueError, match=r"sample.num=0 must be an integer in \[1, 10\*\*8\]"):
        config_lib.validate(c, choices)
    c = config_lib.get_config("digits")
    c.time_sampler.t_min, c.time_sampler.t_max = 0.5, 0.2
    with pytest.raises(ValueError, match="need 0 <= t_min < t_max <= 1"):
        config_lib.validate(c, choices)


def test_unset_time_ranges_are_resolved_per_pairing():
    c = config_lib.get_config("digits")
    main.check_config(c, 1)
    assert (c.time_sampler.t_min, c.time_sampler.t_max) == (0.0, 1.0)
    assert (c.sample.t_min, c.sample.t_max) == (0.0, 1.0)
    c = config_lib.get_config("digits")
    c.process.name, c.prediction.model_output, c.prediction.target = "vp_cosine", "eps", "eps"
    c.sample.solver = "euler_maruyama"
    main.check_config(c, 1)
    assert (c.time_sampler.t_min, c.time_sampler.t_max) == (1e-3, 1.0)  # eps -> eps: fine at 1
    # the sampler's velocity needs x0_hat = (x - sigma eps_hat) / alpha, and alpha(1) = 0
    assert (c.sample.t_min, c.sample.t_max) == (1e-3, 1.0 - 1e-3)


def test_every_preset_validates():
    for preset in config_lib.PRESETS:
        c = config_lib.get_config(preset)
        assert c.name == preset
        main.check_config(c, 1)
        for key in (
            "name",
            "seed",
            "data.name",
            "train.steps",
            "train.batch_size",
            "train.save_every",
            "process.name",
            "prediction.model_output",
            "prediction.target",
            "time_sampler.name",
            "sample.solver",
            "sample.steps",
            "sample.num",
            "sample.batch_size",
            "sample.seed",
        ):
            assert key in config_lib.flatten(c), (preset, key)


def test_sample_and_info_modes(tmp_path):
    config = tiny_config("digits", tmp_path, train__steps=2)
    trainer = main.train(config, {}, utils.DistInfo())
    out = tmp_path / "out"
    sampled, info, missing, train_flag = run_main_forked(
        [
            [
                "--mode=sample",
                f"--ckpt={trainer.run_dir}",
                f"--out={out}",
                "--config.sample.num=13",
                "--config.sample.steps=2",
                "--config.sample.solver=euler_maruyama",
                "--config.sample.batch_size=5",
            ],
            ["--mode=info", f"--ckpt={trainer.run_dir}"],
            ["--mode=sample", f"--ckpt={tmp_path / 'missing'}"],
            ["--mode=sample", f"--ckpt={trainer.run_dir}", "--config.train.lr=1.0"],
        ],
        str(tmp_path / "runs"),
    )
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert "NFE 3" in last_line(sampled.stdout)  # 2 SDE steps + the final denoising step
    with np.load(out / "samples.npz") as f:
        samples, labels = f["samples"], f["labels"]
    assert samples.shape == (13, 8, 8, 1) and samples.dtype == np.uint8
    assert (labels == np.arange(13) % 10).all()
    assert Image.open(out / "grid.png").size == (10 * 68 + 4, 2 * 68 + 4)
    assert info.returncode == 0, info.stderr[-2000:]
    summary = json.loads(info.stdout[info.stdout.index("{") :])
    assert summary["step"] == 2 and summary["data"]["shape"] == [1, 8, 8]
    assert summary["parameters"] == sum(p.numel() for p in trainer.net.parameters())
    assert "loss" in summary["last_metrics"]
    assert missing.returncode == 1 and "no such file" in last_line(missing.stderr)
    assert train_flag.returncode == 1 and last_line(train_flag.stderr) == (
        "error: --config.train.lr: only --config.sample.*, eval.*, logging.* and data.root, "
        "data.path, data.num_workers overrides apply to a checkpoint"
    )
    state = main.load_checkpoint(trainer.run_dir)[0]  # the data moved: evaluate it there
    assert main.checkpoint_config(state, {"data.root": "/elsewhere"}).data.root == "/elsewhere"


def test_points_sample_mode_writes_scatter(tmp_path, capsys):
    config = tiny_config("moons", tmp_path, train__steps=2, sample__rtol=0.01)
    trainer = main.train(config, {"sample.rtol": 0.01}, utils.DistInfo())  # as if by a flag
    assert capsys.readouterr().err.splitlines()[0] == (
        "warning: --config.sample.rtol=0.01 has no effect: sample.solver=heun ignores it (used "
        "by: dopri5)"
    )
    with pytest.raises(ValueError, match="sample.guidance_scale=2 needs a class-conditional"):
        main.load_for_sampling(
            {"sample.guidance_scale": 2.0}, utils.DistInfo(), trainer.run_dir, False
        )
    with pytest.raises(ValueError, match="sample.guidance_scale=1.5 needs a class-conditional"):
        main.load_model(trainer.run_dir).sample(4, guidance_scale=1.5)
    default_out = os.path.join(trainer.run_dir, "samples")
    assert not os.path.exists(default_out)
    open(default_out, "w").close()  # where the samples would go without --out: a file
    path = main.load_checkpoint(trainer.run_dir)[1]
    out = tmp_path / "out"
    sampled, other, blocked, unused, used = run_main_forked(
        [
            ["--mode=sample", f"--ckpt={path}", f"--out={out}", "--config.sample.num=50",
             "--config.sample.steps=2"],
            ["--mode=info", "--config=config.py:checkerboard", f"--ckpt={path}"],
            ["--mode=sample", f"--ckpt={trainer.run_dir}", "--config.sample.num=5"],
            ["--mode=sample", f"--ckpt={path}", f"--out={out}2", "--config.sample.num=4",
             "--config.sample.steps=1", "--config.sample.solver=euler",
             "--config.sample.s_churn=5", "--config.sample.diffusion_scale=2",
             "--config.sample.guidance_interval=(0.1,0.5)"],
            ["--mode=sample", f"--ckpt={path}", f"--out={out}3", "--config.sample.num=4",
             "--config.sample.steps=2", "--config.sample.solver=edm_sde",
             "--config.sample.s_churn=5", "--config.sample.s_noise=1.01"],
        ],
        str(tmp_path / "runs"),
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    with np.load(out / "samples.npz") as f:
        assert f["samples"].shape == (50, 2) and "labels" not in f
    assert Image.open(out / "scatter.png").size[0] > 100
    assert other.returncode == 0 and other.stderr == (
        f"warning: --config=config.py:checkerboard has data.name=checkerboard, but {path} was "
        f"trained with data.name=moons; the checkpoint's own config is used\n"
    )
    assert json.loads(other.stdout)["data"]["name"] == "moons"
    # sampler flags the chosen solver does not read: a warning each, then the samples
    assert unused.returncode == 0 and unused.stderr.splitlines() == [
        "warning: --config.sample.s_churn=5.0 has no effect: sample.solver=euler ignores it "
        "(used by: edm_sde)",
        "warning: --config.sample.diffusion_scale=2.0 has no effect: sample.solver=euler "
        "ignores it (used by: euler_maruyama, heun_sde)",
        "warning: --config.sample.guidance_interval=(0.1, 0.5) has no effect: "
        "sample.guidance_scale=1 (no guidance)",
    ]
    assert (tmp_path / "out2" / "samples.npz").exists()
    assert used.returncode == 0 and used.stderr == "", used.stderr  # the preset's keys: silent
    assert blocked.returncode == 1 and blocked.stderr == (
        f"error: the default output directory {default_out} (set --out=DIR) is a file; give a "
        f"directory (created if absent)\n"
    )


def test_help_lists_every_mode_and_preset():
    result = run_main("--help")
    assert result.returncode == 0
    assert "--mode=train|sample|eval|info" in result.stdout
    for preset in config_lib.PRESETS:
        assert preset in result.stdout
    assert "config.py" in result.stdout


def test_python_api_loads_a_checkpoint_and_samples(tmp_path, capsys):
    """The README's notebook snippet: main.load_model + model.sample, no command line."""
    trainer = main.train(tiny_config("digits", tmp_path, train__steps=2), {}, utils.DistInfo())
    model = main.load_model(trainer.run_dir)
    images, labels, nfe = model.sample(12, solver="euler", steps=3)
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
    assert (labels == np.arange(12) % 10).all() and nfe == 3 + 1  # + the final denoising step
    again, _, _ = model.sample(12, solver="euler", steps=3)
    assert np.array_equal(images, again)  # per-sample seeds: the same samples every time
    sde, _, nfe = model.sample(4, solver="euler_maruyama", steps=2)
    assert sde.shape == (4, 8, 8, 1) and nfe == 3
    with pytest.raises(ValueError, match="sample.solver"):
        model.sample(2, solver="nope")
    for call, message in [
        (lambda: model.sample(0), r"sample.num=0 must be an integer in \[1, 10\*\*8\]"),
        (lambda: model.sample(2.5), "sample.num=2.5 must be of type int, not float"),
        (lambda: model.sample(2, steps="5"), "sample.steps='5' must be of type int, not str"),
        (lambda: model.sample(2, use_ema=False), r"the weights are chosen by load_model\("),
        (lambda: main.load_model(trainer.run_dir, device="tpu"), "device='tpu' is not a torch"),
        (lambda: main.load_model(trainer.run_dir, device="meta"), "device='meta' is not availa"),
        (lambda: main.load_model(""), "ckpt= is empty: give a checkpoint file or a run dir"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
    assert model.sample(np.int64(2), solver="euler", steps=1)[0].shape == (2, 8, 8, 1)
    capsys.readouterr()
    model.sample(2, solver="heun", steps=1, rtol=1e-3, clip_percentile=0.9)
    assert capsys.readouterr().err.splitlines() == [
        "warning: sample(rtol=0.001) has no effect: sample.solver=heun ignores it (used by: "
        "dopri5)",
        "warning: sample(clip_percentile=0.9) has no effect: sample.clip_x0=none (the "
        "percentile is used by clip_x0=dynamic only)",
    ]
    raw = main.load_model(trainer.run_dir, use_ema=False).sample(12, solver="euler", steps=3)[0]
    assert not np.array_equal(raw, images)  # the raw weights, not the EMA's


def test_main_runs_from_another_directory(tmp_path):
    """The default config file is found next to main.py, whatever the working directory."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), "--config.train.stepz=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: config key 'train.stepz' does not exist")


@pytest.mark.parametrize(
    "variable, value, valid",
    [
        ("NPROC", "abc", "[1, 1024]"),
        ("NPROC", "0", "[1, 1024]"),
        ("NNODES", "-1", "[1, 100000]"),
        ("NODE_RANK", "1", "[0, 0]"),  # one node: only rank 0
        ("MASTER_PORT", "70000", "[1, 65535]"),
        ("SHUTDOWN_TIMEOUT", "1.5", "[0, 86400]"),
    ],
)
def test_run_sh_checks_its_launch_variables_first(variable, value, valid):
    result = subprocess.run(
        ["sh", "run.sh", "--mode=info", "--ckpt=x"],
        cwd=ROOT,
        env={**os.environ, variable: value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: {variable}={value} must be a whole number in {valid}\n"


OOM_SCRIPT = """
import sys
from absl import app
import main
def sample(*args):
    raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                       "25600000000 bytes.\\nmore")
main.MODE_FNS["sample"] = sample
main.check_argv(sys.argv)
main.define_flags()
app.run(main.main, flags_parser=main.parse_flags)
"""


def test_running_out_of_memory_is_one_line_saying_what_to_lower():
    """Also on a rank other than 0 (RANK=1), which other errors leave to rank 0: memory runs out
    on one rank, and rank 0 would only see a peer vanish."""
    result = subprocess.run(
        [sys.executable, "-c", OOM_SCRIPT, "--mode=sample", "--ckpt=x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "RANK": "1"},
    )
    assert result.returncode == 1
    assert result.stderr == (
        "error: out of memory in --mode=sample (DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 25600000000 bytes.): lower sample.batch_size or sample.num\n"
    )
    assert main.is_out_of_memory(MemoryError()) and not main.is_out_of_memory(RuntimeError("x"))
    assert main.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
