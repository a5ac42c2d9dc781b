"""Every bad input is one line naming the key (or file) and what is valid, before any work.

Most cases call config validation in-process (main.check_config: registry choices, value rules,
combinations); a few go through `python main.py` to check the whole contract: exit status
non-zero, exactly one `error:` line, no traceback, nothing written under the workdir.
"""

import inspect
import math
import os
import shutil

import pytest
from helpers import ROOT, TINY_UNET, run_main, run_main_forked, tiny_config
from PIL import Image

import config as config_lib
import main
import utils

NAN, INF = math.nan, math.inf


def with_value(preset, key, value):
    """get_config(preset) with the dotted `key` set to `value` (added when absent)."""
    c = config_lib.get_config(preset)
    section, _, field = key.rpartition(".")
    node = c[section] if section else c
    node[field] = value
    return c


def rejection(preset, key, value):
    """The ValueError message main.check_config gives for `key=value` (fails if accepted)."""
    c = with_value(preset, key, value)
    with pytest.raises(ValueError) as info:
        main.check_config(c, 1)
    return str(info.value)


NAME_RULE = "a non-empty directory name inside workdir: no '/', '\\', '..' or control characters"

# (preset, key, value, the one line it gives)
BAD_VALUES = [
    (
        "checkerboard",
        "data.name",
        "digits",
        "model.name=mlp takes points, but data.name=digits holds images: use model.name in "
        "['dit', 'unet']",
    ),
    (
        "digits",
        "data.name",
        "moons",
        "model.name=unet takes images, but data.name=moons holds points: use model.name in ['mlp']",
    ),
    (
        "digits_consistency",
        "train.consistency_s0",
        0,
        "train.consistency_s0=0 must be positive (an integer >= 1)",
    ),
    (
        "digits_consistency",
        "train.consistency_s1",
        5,
        "train.consistency_s1=5 must be >= train.consistency_s0=10 (the discretisation doubles "
        "from s0 up to s1)",
    ),
    (
        "digits_consistency",
        "train.consistency_s_max",
        0.001,
        "train.consistency_s_min=0.002 must be below train.consistency_s_max=0.001",
    ),
    (
        "digits",
        "prediction.min_snr_gamma",
        -1.0,
        "prediction.min_snr_gamma=-1.0 must be a finite number > 0",
    ),
    ("digits", "time_sampler.p_std", 0.0, "time_sampler.p_std=0.0 must be a finite number > 0"),
    (
        "digits",
        "train.meanflow_time_scale",
        0.0,
        "train.meanflow_time_scale=0.0 must be a finite number > 0",
    ),
    ("digits", "sample.s_churn", -1.0, "sample.s_churn=-1.0 must be a finite number >= 0"),
    (
        "digits",
        "sample.consistency_levels",
        (-1.0,),
        "sample.consistency_levels=(-1.0,) must be a tuple of positive noise levels, e.g. "
        "(80.0, 0.8), or ()",
    ),
    ("digits", "sample.num", 10**8 + 1, "sample.num=100000001 must be an integer in [1, 10**8]"),
    ("digits", "sample.rtol", 1e-300, "sample.rtol=1e-300 must be a finite number >= 1e-12"),
    (
        "digits",
        "sample.diffusion_scale",
        1e300,
        "sample.diffusion_scale=1e+300 must be a finite number in [0, 1e+06]",
    ),
    ("digits", "train.grad_clip", -1.0, "train.grad_clip=-1.0 must be a finite number >= 0"),
    ("digits", "train.grad_clip", NAN, "train.grad_clip=nan must be a finite number >= 0"),
    ("digits", "train.keep_ckpts", 0, "train.keep_ckpts=0 must be positive (an integer >= 1)"),
    ("digits", "train.ema_decay", 1.5, "train.ema_decay=1.5 must be a finite number in [0, 1]"),
    ("digits", "train.ema_decay", -0.1, "train.ema_decay=-0.1 must be a finite number in [0, 1]"),
    ("digits", "train.save_every", -5, "train.save_every=-5 must be positive (an integer >= 1)"),
    ("digits", "train.save_every", 0, "train.save_every=0 must be positive (an integer >= 1)"),
    ("digits", "train.log_every", 0, "train.log_every=0 must be positive (an integer >= 1)"),
    ("digits", "train.eval_every", -1, "train.eval_every=-1 must be an integer >= 0"),
    ("digits", "train.sample_every", -1, "train.sample_every=-1 must be an integer >= 0"),
    ("digits", "train.warmup_steps", -1, "train.warmup_steps=-1 must be an integer >= 0"),
    ("digits", "train.max_bad_steps", -1, "train.max_bad_steps=-1 must be an integer >= 0"),
    ("digits", "train.steps", 0, "train.steps=0 must be positive (an integer >= 1)"),
    ("digits", "train.grad_accum", 0, "train.grad_accum=0 must be positive (an integer >= 1)"),
    ("digits", "train.lr", NAN, "train.lr=nan must be a finite number > 0"),
    ("digits", "train.lr", INF, "train.lr=inf must be a finite number > 0"),
    ("digits", "train.lr", 0.0, "train.lr=0.0 must be a finite number > 0"),
    ("digits", "train.adam_eps", 0.0, "train.adam_eps=0.0 must be a finite number in (0, 1]"),
    ("digits", "train.weight_decay", -0.1, "train.weight_decay=-0.1 must be a finite number >= 0"),
    (
        "digits",
        "train.min_lr_ratio",
        2.0,
        "train.min_lr_ratio=2.0 must be a finite number in [0, 1]",
    ),
    (
        "digits",
        "train.betas",
        (0.9, 1.0),
        "train.betas=(0.9, 1.0) must be a pair (beta1, beta2), each a finite number in [0, 1)",
    ),
    (
        "digits",
        "train.betas",
        (0.9,),
        "train.betas=(0.9,) must be a pair (beta1, beta2), each a finite number in [0, 1)",
    ),
    ("digits", "data.num_workers", -2, "data.num_workers=-2 must be an integer >= 0"),
    ("digits", "train.adam_eps", 1e300, "train.adam_eps=1e+300 must be a finite number in (0, 1]"),
    (
        "digits",
        "train.meanflow_p",
        -3.0,
        "train.meanflow_p=-3.0 must be a finite number in [0, 10]",
    ),
    (
        "digits",
        "sample.guidance_interval",
        (0.3, 0.3),
        "sample.guidance_interval=(0.3, 0.3) must be a pair (lo, hi) with 0 <= lo < hi <= 1",
    ),
    (
        "digits",
        "train.weight_decay",
        1000.0,
        "train.weight_decay=1000 x train.lr=0.002 = 2 >= 1: AdamW's decay w <- w (1 - lr "
        "weight_decay) would zero or flip every weight each step; use weight_decay < 1 / lr "
        "(typically 0-0.1)",
    ),
    ("digits", "data.image_size", 0, "data.image_size=0 must be positive (an integer >= 1)"),
    ("moons", "data.num_points", 0, "data.num_points=0 must be positive (an integer >= 1)"),
    ("digits", "seed", -1, "seed=-1 must be an integer in [0, 2**63)"),
    ("digits", "seed", 2**63, "seed=9223372036854775808 must be an integer in [0, 2**63)"),
    ("digits", "sample.seed", -3, "sample.seed=-3 must be an integer in [0, 2**63)"),
    ("digits", "eval.seed", -3, "eval.seed=-3 must be an integer in [0, 2**63)"),
    (
        "digits",
        "sample.guidance_scale",
        NAN,
        "sample.guidance_scale=nan must be a finite number in [-100, 100]",
    ),
    (
        "digits",
        "sample.guidance_scale",
        INF,
        "sample.guidance_scale=inf must be a finite number in [-100, 100]",
    ),
    (
        "digits",
        "sample.s_tmin",
        2e9,
        "sample.s_tmin=2000000000.0 must be <= sample.s_tmax=1000000000.0 (edm_sde churns "
        "where the noise level is in [s_tmin, s_tmax]; an empty range would silently disable it)",
    ),
    (
        "moons",
        "sample.clip_x0",
        "static",
        "sample.clip_x0=static clips x0_hat to the image range [-1, 1], but data.name=moons "
        "holds 2-D points: set sample.clip_x0=none",
    ),
    (
        "digits",
        "sample.guidance_scale",
        1e30,
        "sample.guidance_scale=1e+30 must be a finite number in [-100, 100]",
    ),
    (
        "digits",
        "sample.guidance_interval",
        (0.8, 0.2),
        "sample.guidance_interval=(0.8, 0.2) must be a pair (lo, hi) with 0 <= lo < hi <= 1",
    ),
    (
        "digits",
        "sample.guidance_interval",
        (0.0, 1.5),
        "sample.guidance_interval=(0.0, 1.5) must be a pair (lo, hi) with 0 <= lo < hi <= 1",
    ),
    ("digits", "sample.rtol", 0.0, "sample.rtol=0.0 must be a finite number >= 1e-12"),
    ("digits", "sample.atol", -1e-5, "sample.atol=-1e-05 must be a finite number >= 1e-12"),
    ("digits", "sample.num", 0, "sample.num=0 must be an integer in [1, 10**8]"),
    ("digits", "sample.batch_size", 0, "sample.batch_size=0 must be positive (an integer >= 1)"),
    ("digits", "sample.steps", -1, "sample.steps=-1 must be positive (an integer >= 1)"),
    (
        "digits",
        "sample.diffusion_scale",
        -1.0,
        "sample.diffusion_scale=-1.0 must be a finite number in [0, 1e+06]",
    ),
    (
        "digits",
        "sample.clip_percentile",
        0.0,
        "sample.clip_percentile=0.0 must be a finite number in (0, 1]",
    ),
    (
        "digits",
        "sample.t_min",
        -0.5,
        "sample.t_min=-0.5 must be unset (None) or a finite number in [0, 1]",
    ),
    (
        "digits",
        "time_sampler.t_max",
        NAN,
        "time_sampler.t_max=nan must be unset (None) or a finite number in [0, 1]",
    ),
    ("digits", "time_sampler.std", 0.0, "time_sampler.std=0.0 must be a finite number > 0"),
    ("digits", "time_sampler.mean", INF, "time_sampler.mean=inf must be a finite number"),
    ("digits", "process.gamma_scale", 0.0, "process.gamma_scale=0.0 must be a finite number > 0"),
    (
        "digits",
        "model.class_dropout",
        1.0,
        "model.class_dropout=1.0 must be a finite number in [0, 1)",
    ),
    ("digits", "model.dropout", -0.1, "model.dropout=-0.1 must be a finite number in [0, 1)"),
    (
        "digits",
        "model.base_channels",
        0,
        "model.base_channels=0 must be positive (an integer >= 1)",
    ),
    (
        "digits",
        "model.num_res_blocks",
        0,
        "model.num_res_blocks=0 must be positive (an integer >= 1)",
    ),
    ("digits", "model.num_heads", 0, "model.num_heads=0 must be positive (an integer >= 1)"),
    (
        "digits",
        "model.channel_mults",
        (1, 0),
        "model.channel_mults=(1, 0) must be a non-empty tuple of positive integers, e.g. (1, 2, 2)",
    ),
    (
        "digits",
        "model.channel_mults",
        (),
        "model.channel_mults=() must be a non-empty tuple of positive integers, e.g. (1, 2, 2)",
    ),
    (
        "digits",
        "model.attn_resolutions",
        (-4,),
        "model.attn_resolutions=(-4,) must be a tuple of positive integers (feature-map sizes), "
        "e.g. (16,) or ()",
    ),
    ("moons", "model.hidden", 0, "model.hidden=0 must be positive (an integer >= 1)"),
    ("moons", "model.num_blocks", 0, "model.num_blocks=0 must be positive (an integer >= 1)"),
    (
        "digits",
        "eval.nll_num",
        -1,
        "eval.nll_num=-1 must be 0 (no likelihood) or an integer in [2, 10**8]",
    ),
    (
        "moons",
        "eval.nll_num",
        1,
        "eval.nll_num=1 must be 0 (no likelihood) or an integer in [2, 10**8]",
    ),
    ("digits", "eval.nll_steps", 0, "eval.nll_steps=0 must be positive (an integer >= 1)"),
    ("digits", "eval.num_probes", 0, "eval.num_probes=0 must be positive (an integer >= 1)"),
    ("digits", "name", "", f"name='' must be {NAME_RULE}"),
    ("digits", "name", "..", f"name='..' must be {NAME_RULE}"),
    ("digits", "name", ".", f"name='.' must be {NAME_RULE}"),
    ("digits", "name", "../escape", f"name='../escape' must be {NAME_RULE}"),
    ("digits", "name", "a/b", f"name='a/b' must be {NAME_RULE}"),
    ("digits", "name", "/abs", f"name='/abs' must be {NAME_RULE}"),
    ("digits", "name", "a\\b", f"name='a\\\\b' must be {NAME_RULE}"),
    ("digits", "name", "run\n2", f"name='run\\n2' must be {NAME_RULE}"),
    ("digits", "workdir", "", "workdir='' must be a non-empty directory path"),
    ("digits", "data.root", "", "data.root='' must be a non-empty directory path"),
]


@pytest.mark.parametrize("preset,key,value,expected", BAD_VALUES)
def test_bad_value_is_one_line_naming_key_value_and_rule(preset, key, value, expected):
    message = rejection(preset, key, value)
    assert message == expected
    assert "\n" not in message


# Values that look odd but are valid: the rules must not be stricter than the code needs.
EDGE_VALUES = [
    ("sample.num", 10**8),
    ("sample.consistency_levels", ()),
    ("sample.s_noise", 0.0),
    ("train.grad_clip", 0.0),  # 0 disables clipping
    ("train.ema_decay", 0.0),
    ("train.ema_decay", 1.0),
    ("train.sample_every", 0),
    ("train.eval_every", 0),
    ("train.warmup_steps", 0),
    ("train.max_bad_steps", 0),
    ("train.min_lr_ratio", 1.0),
    ("model.class_dropout", 0.0),
    ("seed", 2**63 - 1),
    ("sample.guidance_scale", -2.0),
    ("sample.guidance_interval", (0.3, 0.31)),
    ("sample.diffusion_scale", 0.0),
    ("sample.clip_percentile", 1.0),
    ("eval.nll_num", 0),
    ("name", "run-1.v2_final"),
    ("workdir", "/tmp/some where/runs"),
]


@pytest.mark.parametrize("key,value", EDGE_VALUES)
def test_edge_values_are_accepted(key, value):
    main.check_config(with_value("digits", key, value), 1)


def test_every_float_field_rejects_nan_and_inf():
    """Every float field of every preset, whether or not it has its own rule."""
    for preset in config_lib.PRESETS:
        for key, value in config_lib.flatten(config_lib.get_config(preset)).items():
            if not isinstance(value, float):
                continue
            for bad in (NAN, INF, -INF):
                message = rejection(preset, key, bad)
                assert message.startswith(f"{key}={bad!r} must be "), message


def test_keys_without_a_rule_get_generic_rules():
    """Keys other people add later: floats must be finite, sizes and counts positive; keys of
    the table that a preset does not define yet are checked once they exist."""
    assert rejection("digits", "prediction.new_scale", NAN) == (
        "prediction.new_scale=nan must be a finite number"
    )
    assert rejection("digits", "model.num_experts", 0) == (
        "model.num_experts=0 must be positive (an integer >= 1)"
    )
    assert rejection("digits", "model.embed_dim", -8) == (
        "model.embed_dim=-8 must be positive (an integer >= 1)"
    )
    assert rejection("digits", "train.extra_betas", (0.5, INF)) == (
        "train.extra_betas=(0.5, inf) must be a tuple of finite numbers"
    )
    assert rejection("digits", "model.patch_size", 0) == (
        "model.patch_size=0 must be positive (an integer >= 1)"
    )
    assert rejection("digits", "prediction.sigma_data", 0.0) == (
        "prediction.sigma_data=0.0 must be a finite number > 0"
    )
    assert rejection("digits", "train.ema_stds", (0.05, -0.1)) == (
        "train.ema_stds=(0.05, -0.1) must be a non-empty tuple of relative stds in "
        "(0, 0.2887), e.g. (0.05, 0.10)"
    )
    assert rejection("digits", "train.ema_stds", (0.05, 0.3)).startswith("train.ema_stds=")
    main.check_config(with_value("digits", "model.patch_size", 2), 1)
    main.check_config(with_value("digits", "model.some_flag_count", 0), 1)  # not a size name


def test_relations_between_keys():
    message = rejection("digits", "model.num_heads", 3)
    assert message == (
        "model.num_heads=3 must divide the channels of every attention layer [64] "
        "(model.base_channels x model.channel_mults)"
    )
    c = with_value("digits", "train.eval_every", 10)
    c.sample.num = 1
    with pytest.raises(ValueError, match=r"^sample.num=1 must be >= 2 when train.eval_every=10"):
        main.check_config(c, 1)
    c = with_value("digits", "time_sampler.t_min", 0.6)
    c.time_sampler.t_max = 0.4
    with pytest.raises(ValueError, match="need 0 <= t_min < t_max <= 1"):
        main.check_config(c, 1)
    c = with_value("digits_meanflow", "train.batch_size", 4)  # 0.25 x 2 rows per rank: none
    with pytest.raises(
        ValueError,
        match=r"^train.meanflow_ratio=0.25 gives no sample with r != t "
        r"in a micro-batch of 2 .* \(above 0.25 for one",
    ):
        main.check_config(c, 2)
    main.check_config(c, 1)  # 0.25 x 4 = 1 row: fine


@pytest.mark.skipif(
    "check_feature_extractor" not in inspect.getsource(main),
    reason="main.check_config does not call evaluation.check_feature_extractor yet",
)
def test_eval_every_with_an_impossible_extractor_fails_at_start():
    c = with_value("imagefolder", "train.eval_every", 5)
    c.data.path = "anything"  # not read: the check comes first
    with pytest.raises(ValueError) as info:
        main.check_config(c, 1)
    message = str(info.value)
    assert message.startswith("eval.feature_extractor=classifier has no classifier for ")
    assert "data.name=imagefolder" in message and "\n" not in message


# --------------------------------------------------------------------------------------------
# Through the command line: one `error:` line, non-zero exit, no traceback, nothing written.
# --------------------------------------------------------------------------------------------


def assert_one_line_error(result, expected, workdir):
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1
    assert output == [f"error: {expected}"], result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not os.listdir(workdir)  # nothing was written


BAD_FLAGS = [
    ("--config.train.grad_clip=-1", "train.grad_clip=-1.0 must be a finite number >= 0"),
    ("--config.train.keep_ckpts=0", "train.keep_ckpts=0 must be positive (an integer >= 1)"),
    ("--config.name=../escape", f"name='../escape' must be {NAME_RULE}"),
    ("--config.train.lr=nan", "train.lr=nan must be a finite number > 0"),
]


def test_bad_flags_through_main(tmp_path):
    """The BAD_FLAGS through main.py's command line, in forks of one process (run_main_forked)."""
    workdirs, cases = [], []
    for k, (flag, _) in enumerate(BAD_FLAGS):
        workdirs.append(tmp_path / f"runs{k}")
        workdirs[-1].mkdir()
        args = [flag, f"--config.workdir={workdirs[-1]}", "--config.logging.wandb=disabled"]
        cases.append(args + ["--config.train.steps=2", "--config.train.sample_every=0"])
    results = run_main_forked(cases, str(tmp_path / "out"))
    for result, (_, expected), workdir in zip(results, BAD_FLAGS, workdirs, strict=True):
        assert_one_line_error(result, expected, workdir)


def test_corrupt_image_through_main_names_the_file(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(images / "good.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    workdir = tmp_path / "runs"
    workdir.mkdir()
    tiny = [f"--config.{k}={v}".replace(" ", "") for k, v in TINY_UNET.items()]
    result = run_main(
        "--config=config.py:imagefolder",
        f"--config.data.path={images}",
        "--config.data.image_size=8",
        "--config.data.num_workers=0",
        "--config.train.steps=2",  # short if the broken image were accepted
        "--config.train.sample_every=0",
        *tiny,
        f"--config.workdir={workdir}",
        "--config.logging.wandb=disabled",
    )
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(output) == 1, output
    broken = images / "broken.png"
    assert output[0].startswith(f"error: imagefolder: cannot read image {broken} (")
    assert os.listdir(workdir) == []  # the data is read before the run directory is made


def test_set_values_sets_dotted_keys_and_rejects_unknown_ones():
    c = config_lib.get_config("digits")
    config_lib.set_values(c, {"train.lr": 0.5, "model.channel_mults": (1,), "seed": 3})
    assert (c.train.lr, c.model.channel_mults, c.seed) == (0.5, (1,), 3)
    with pytest.raises(ValueError, match="config key 'train.lrr' does not exist; valid keys"):
        config_lib.set_values(c, {"train.lrr": 1.0})


def test_a_batch_larger_than_the_data_names_the_settings(tmp_path):
    config = tiny_config("checkerboard", tmp_path, data__num_points=8, train__batch_size=16)
    with pytest.raises(ValueError) as info:
        main.build_trainer(config, utils.DistInfo())
    assert str(info.value) == (
        "a micro-batch of 16 (train.batch_size / train.grad_accum / processes) x 1 process(es) "
        "exceeds the dataset size 8: lower train.batch_size or use more data (data.num_points "
        "for 2-D sets)"
    )
    assert not tmp_path.joinpath(config.name).exists()  # found before the run directory is made


def test_a_users_own_config_file_gets_the_same_one_line_checks(tmp_path):
    """--config=my_config.py:PRESET (a copy of config.py, as users make): an unknown key, an
    unknown preset and a file without get_config are one line each, not a traceback."""
    own = tmp_path / "my_config.py"
    shutil.copy(os.path.join(ROOT, "config.py"), own)
    (tmp_path / "empty.py").write_text("x = 1\n")
    cases = [
        ([f"--config={own}:moons", "--config.train.stepz=3"], "error: config key 'train.stepz'"),
        ([f"--config={own}:nope"], f"error: --config={own}:nope: {own} gave no config "),
        (
            [f"--config={tmp_path / 'empty.py'}"],
            f"error: --config={tmp_path / 'empty.py'}: {tmp_path / 'empty.py'} defines no "
            f"get_config() function",
        ),
    ]
    for args, start in cases:
        result = run_main(*args, f"--config.workdir={tmp_path / 'runs'}")
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(start), lines
    assert not (tmp_path / "runs").exists()


def test_a_stored_config_value_of_a_type_config_py_no_longer_has_is_one_line():
    """A checkpoint written before config.py changed a field's type (1.0 -> 1): a whole-number
    float is read as the int, anything else is one line naming the key (it was a TypeError
    traceback in sample, eval and info)."""
    assert config_lib.with_defaults({"train": {"steps": 1000.0}}).train.steps == 1000
    assert isinstance(config_lib.with_defaults({"train": {"steps": 1000.0}}).train.steps, int)
    with pytest.raises(ValueError) as info:
        config_lib.with_defaults({"train": {"steps": 10.5}})
    assert str(info.value) == (
        "the stored config's train.steps=10.5 has type float, but config.py now declares int: "
        "undo that edit of config.py to read checkpoints written before it"
    )
    with pytest.raises(ValueError, match="t_min='abc' has type str, but config.py now declares"):
        config_lib.with_defaults({"sample": {"t_min": "abc"}})  # a placeholder: float, not None
    with pytest.raises(ValueError, match=" now declares float: "):
        config_lib.with_defaults({"sample": {"t_min": "abc"}})
