"""Training end to end: exact resume, accumulation, checkpoints, metrics, presets on tiny files."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import tiny_config
from PIL import Image
from test_data import fail_download, write_cifar, write_mnist, write_png

import data_utils
import main
import trainer as trainer_lib
import utils
from logging_utils import read_metrics
from trainer import TrainingDiverged, data_info_of, find_latest_checkpoint

SINGLE = utils.DistInfo()


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_states_equal(a, b):
    """Bit-identical model, EMA, optimizer and scheduler state."""
    for key in ("model",):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name
    for name in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][name], b["ema"]["model"][name]), name
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for index in opt_a:
        for field in opt_a[index]:
            assert torch.equal(opt_a[index][field], opt_b[index][field]), (index, field)
    assert a["scheduler"] == b["scheduler"]
    assert a["step"] == b["step"] and a["loader"] == b["loader"]


@pytest.mark.parametrize(
    "preset, extra",
    [("digits", {}), ("checkerboard", {}), ("digits", {"data__num_workers": 1})],
    ids=["digits", "checkerboard", "digits-loader-worker"],
)
def test_resume_is_bit_identical(tmp_path, preset, extra):
    """2N steps in one go == N steps, stop, resume for N more (dropout on, cosine LR); with a
    loader worker, the resume starts its DataLoader mid-epoch."""
    kwargs = dict(
        **extra,
        train__steps=6,
        train__save_every=3,
        model__dropout=0.2,
        train__lr_schedule="cosine",
        time_sampler__name="stratified",
    )
    whole = main.train(tiny_config(preset, tmp_path / "a", **kwargs), {}, SINGLE)
    assert whole.step == 6
    first = main.train(tiny_config(preset, tmp_path / "b", **kwargs), {}, SINGLE, until=3)
    assert first.step == 3
    resumed = main.train(tiny_config(preset, tmp_path / "b", **kwargs), {}, SINGLE)
    assert resumed.step == 6
    a = load(find_latest_checkpoint(whole.run_dir))
    b = load(find_latest_checkpoint(resumed.run_dir))
    assert_states_equal(a, b)
    # the metrics file of the resumed run has each step once, and the same losses
    steps = [r["step"] for r in read_metrics(resumed.run_dir)]
    assert steps == list(range(1, 7))
    losses_a = [r["loss"] for r in read_metrics(whole.run_dir)]
    losses_b = [r["loss"] for r in read_metrics(resumed.run_dir)]
    assert losses_a == losses_b


def test_a_resume_inside_a_log_window_logs_the_same_means(tmp_path):
    """A checkpoint in the middle of a log window (save_every=3, log_every=4) keeps the window's
    sums, so the resumed run logs at step 4 the mean over steps 1-4, as the uninterrupted run
    does, not over step 4 alone."""
    kwargs = dict(train__steps=8, train__save_every=3, train__log_every=4)
    whole = main.train(tiny_config("checkerboard", tmp_path / "a", **kwargs), {}, SINGLE)
    main.train(tiny_config("checkerboard", tmp_path / "b", **kwargs), {}, SINGLE, until=3)
    resumed = main.train(tiny_config("checkerboard", tmp_path / "b", **kwargs), {}, SINGLE)
    assert resumed.step == 8
    logged = [read_metrics(run.run_dir) for run in (whole, resumed)]
    assert [r["step"] for r in logged[0]] == [r["step"] for r in logged[1]] == [4, 8]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in logged[0]] == [r[key] for r in logged[1]], key


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """grad_accum=4 micro-batches of 4 == one batch of 16 (same data, t, noise, label drops)."""
    kw = dict(train__steps=3, train__grad_clip=0.0, train__adam_eps=1e-4)  # see test_ddp.py
    full = main.train(tiny_config("digits", tmp_path / "a", **kw), {}, SINGLE)
    accum = main.train(tiny_config("digits", tmp_path / "b", train__grad_accum=4, **kw), {}, SINGLE)
    for (name, p), q in zip(
        full.net.state_dict().items(), accum.net.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    utils.seed_everything(full.config.seed)
    init = main.build_net(full.config, data_info_of(full.dataset)).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in full.net.state_dict().items())


def test_train_step_clips_its_update_as_torch_clip_grad_norm_does(tmp_path, monkeypatch):
    """One step with train.grad_clip=1e-3 (far under the gradient norm) moves the weights as an
    unclipped step whose gradients torch's clip_grad_norm_ scaled first, and not as the same
    step without clipping (Adam is nearly scale-free, but not at gradients near its eps)."""

    def step(name, grad_clip):
        config = tiny_config("checkerboard", tmp_path / name, train__grad_clip=grad_clip)
        config.train.adam_eps = 1e-3  # so that the clipped gradients' scale shows in the update
        trainer = main.build_trainer(config, SINGLE)
        _, grad_norm, skipped, _ = trainer.train_step()
        trainer.run_lock.release()
        assert float(grad_norm) > 1e-2 and float(skipped) == 0
        return trainer.params

    ours, unclipped = step("ours", 1e-3), step("unclipped", 0.0)

    def torch_clip_then_plain_step(optimizer, params, max_norm):
        optimizer.grad_scale = None
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    monkeypatch.setattr(trainer_lib, "clip_gradients", torch_clip_then_plain_step)
    reference = step("reference", 1e-3)
    for p, q in zip(ours, reference, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    pairs = zip(ours, unclipped, strict=True)
    assert max((p - r).abs().max().item() for p, r in pairs) > 1e-4


def test_checkpoint_contents_pruning_and_nan_refusal(tmp_path):
    config = tiny_config(
        "digits", tmp_path, train__steps=6, train__save_every=1, train__keep_ckpts=2
    )
    trainer = main.train(config, {}, SINGLE)
    ckpts = sorted(os.listdir(trainer.run_dir))
    assert [f for f in ckpts if f.startswith("ckpt_")] == ["ckpt_0000005.pt", "ckpt_0000006.pt"]
    assert not [f for f in ckpts if f.startswith(".tmp")]
    state = load(os.path.join(trainer.run_dir, "ckpt_0000006.pt"))
    for key in (
        "model",
        "ema",
        "optimizer",
        "scheduler",
        "step",
        "config",
        "rng",
        "loader",
        "run_id",
        "data_info",
        "world_size",
    ):
        assert key in state, key
    assert json.loads(state["config"])["train"]["steps"] == 6 and len(state["rng"]) == 1
    assert state["healthy"] is True and state["skipped_steps"] == 0
    saved_config = json.load(open(os.path.join(trainer.run_dir, "config.json")))
    assert saved_config["time_sampler"]["t_min"] == 0.0  # resolved, not null
    before = open(os.path.join(trainer.run_dir, "ckpt_0000006.pt"), "rb").read()
    with torch.no_grad():
        next(trainer.net.parameters())[0] = float("nan")
    trainer.step = 7
    with pytest.raises(TrainingDiverged, match="non-finite weights at step 7"):
        trainer.save()
    with torch.no_grad():  # finite weights, a non-finite EMA: refused too
        next(trainer.net.parameters())[0] = 0.0
        next(trainer.ema.model.parameters())[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="non-finite weights at step 7"):
        trainer.save()
    assert not os.path.exists(os.path.join(trainer.run_dir, "ckpt_0000007.pt"))
    assert open(os.path.join(trainer.run_dir, "ckpt_0000006.pt"), "rb").read() == before


def test_metrics_and_sample_grid(tmp_path):
    config = tiny_config(
        "digits", tmp_path, train__steps=4, train__log_every=2, train__sample_every=2
    )
    trainer = main.train(config, {}, SINGLE)
    records = read_metrics(trainer.run_dir)
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {"loss", "grad_norm", "lr", "steps_per_sec", "samples_per_sec"} <= r.keys()
        assert np.isfinite(r["loss"]) and r["loss"] > 0
    peaks = [r["peak_memory_mib"] for r in records]  # this process's peak RSS on the CPU
    assert 0 < peaks[0] <= peaks[1] <= utils.peak_memory_mib("cpu")
    grid = Image.open(os.path.join(trainer.run_dir, "samples_0000004.png"))
    # 12 samples, 10 per row (one class per column), 8x8 upscaled 8x, 1 px padding
    assert grid.size == (10 * 68 + 4, 2 * 68 + 4)


def test_loss_decreases_on_checkerboard(tmp_path):
    config = tiny_config(
        "checkerboard",
        tmp_path,
        train__steps=150,
        train__batch_size=256,
        train__log_every=50,
        train__save_every=150,
        data__num_points=4096,
        train__lr=3e-3,
    )
    trainer = main.train(config, {}, SINGLE)
    losses = [r["loss"] for r in read_metrics(trainer.run_dir)]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.fixture
def tiny_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data_utils, "_download", fail_download)  # never touch the network
    root = tmp_path / "data"
    write_mnist(root, n=20)
    write_cifar(root, n=4)
    for i in range(6):
        write_png(root / "images" / f"class{i % 2}" / f"{i}.png", (20 + i, 24), (40 * i, 80, 160))
    return root


@pytest.mark.parametrize(
    "preset,extra",
    [
        ("mnist", {}),
        ("mnist", {"data__image_size": 32, "model__channel_mults": (1, 2, 2)}),
        ("cifar10", {"data__num_workers": 0}),
        ("imagefolder", {"data__image_size": 16}),
        ("moons", {}),
        ("gaussians8", {}),
    ],
)
def test_presets_train_on_tiny_files(tmp_path, tiny_files, preset, extra):
    config = tiny_config(
        preset,
        tmp_path / "ckpts",
        data__root=str(tiny_files),
        data__path=str(tiny_files / "images"),
        train__steps=2,
        train__sample_every=2,
        train__batch_size=4,
        sample__num=4,
        **extra,
    )
    trainer = main.train(config, {}, SINGLE)
    assert trainer.step == 2
    assert os.path.exists(os.path.join(trainer.run_dir, "ckpt_0000002.pt"))
    assert Image.open(os.path.join(trainer.run_dir, "samples_0000002.png")).size[0] > 0
    shapes = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "imagefolder": (3, 16, 16)}
    expected = shapes.get(preset, (2,))
    if preset == "mnist" and extra:
        expected = (1, 32, 32)
    assert tuple(trainer.dataset.shape) == expected


def test_eval_every_logs_metrics(tmp_path):
    config = tiny_config(
        "checkerboard",
        tmp_path,
        train__steps=2,
        train__eval_every=2,
        sample__num=64,
        eval__nll_num=16,
        eval__nll_steps=2,
    )
    trainer = main.train(config, {}, SINGLE)
    evals = [r for r in read_metrics(trainer.run_dir) if "eval/sliced_wasserstein" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert evals[0]["eval/nll_num"] == 16 and np.isfinite(evals[0]["eval/nll_nats_per_dim"])
    assert len(trainer.eval_dataset) >= 16 and trainer.eval_dataset is not trainer.dataset


def test_dit_with_power_ema_snapshots_posthoc_and_sampling(tmp_path):
    """model.name=dit with train.ema=power trains, writes EMA snapshots and a loss curve; the
    post-hoc script turns them into a checkpoint that the sample mode reads."""
    import sys

    from helpers import ROOT, run_main

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import posthoc_ema

    config = tiny_config(
        "digits_dit",
        tmp_path,
        train__steps=6,
        train__save_every=6,
        train__sample_every=3,
        train__ema="power",
        train__ema_snapshot_every=2,
        model__width=16,
        model__depth=1,
        model__num_heads=2,
    )
    trainer = main.train(config, {}, SINGLE)
    snapshots = sorted(os.listdir(os.path.join(trainer.run_dir, "ema_snapshots")))
    assert snapshots == ["ema_0000002.pt", "ema_0000004.pt", "ema_0000006.pt"]
    with Image.open(os.path.join(trainer.run_dir, "loss.png")) as image:
        assert image.size[0] > 100
    ckpt = find_latest_checkpoint(trainer.run_dir)
    out = str(tmp_path / "posthoc" / "ckpt.pt")
    assert posthoc_ema.main(["--ckpt", ckpt, "--sigma_rel", "0.08", "--out", out]) == 0
    result = run_main(
        "--mode=sample",
        f"--ckpt={out}",
        f"--out={tmp_path / 'samples'}",
        "--config.sample.num=4",
        "--config.sample.steps=2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        assert f["samples"].shape == (4, 8, 8, 1)
    result = run_main("--mode=info", f"--ckpt={out}")
    record = json.loads(result.stdout)["posthoc_ema"]
    assert record["sigma_rel"] == 0.08 and record["step"] == 6
    assert 0 <= record["relative_profile_error"] < 0.5


def test_degenerate_samples_are_reported_in_one_line():
    from trainer import degenerate_samples_message

    healthy = torch.randn(8, 1, 4, 4)
    assert degenerate_samples_message(healthy, "eps", "vp_cosine") is None
    broken = healthy.clone()
    broken[3, 0, 1, 1] = float("nan")
    broken[5] = float("inf")
    message = degenerate_samples_message(broken, "eps", "vp_cosine")
    assert "2 of 8 samples hold NaN or inf" in message and "'vp_cosine'" in message
    assert "\n" not in message
    collapsed = torch.full((8, 1, 4, 4), 0.25)
    assert "collapsed" in degenerate_samples_message(collapsed, "velocity", "linear")
    assert degenerate_samples_message(collapsed[:1], "velocity", "linear") is None


@pytest.mark.parametrize("preset", ["digits_meanflow", "digits_consistency"])
def test_few_step_objectives_train_resume_and_sample(tmp_path, preset):
    """meanflow / consistency presets train through the trainer (resuming exactly), and the
    sample mode makes one-step samples with NFE 1."""
    from helpers import run_main

    kwargs = dict(train__steps=4, train__save_every=2)
    whole = main.train(tiny_config(preset, tmp_path / "a", **kwargs), {}, SINGLE)
    main.train(tiny_config(preset, tmp_path / "b", **kwargs), {}, SINGLE, until=2)
    resumed = main.train(tiny_config(preset, tmp_path / "b", **kwargs), {}, SINGLE)
    for (name, p), q in zip(
        whole.net.state_dict().items(), resumed.net.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    losses = [r["loss"] for r in read_metrics(whole.run_dir)]
    assert len(losses) == 4 and all(np.isfinite(losses))
    result = run_main(
        "--mode=sample",
        f"--ckpt={whole.run_dir}",
        f"--out={tmp_path / 'out'}",
        "--config.sample.num=6",
        "--config.sample.steps=1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "few_step, 1 steps, NFE 1" in result.stdout
    with np.load(tmp_path / "out" / "samples.npz") as f:
        assert f["samples"].shape == (6, 8, 8, 1)


class StopAt:
    """A stop request (utils.StopRequest's interface) that arrives during step `step`."""

    def __init__(self, trainer_ref, step):
        self.trainer_ref, self.step, self.reason = trainer_ref, step, None

    def requested(self, watch_parent=False):
        if self.trainer_ref[0].step + 1 >= self.step:
            self.reason = "SIGTERM"
        return self.reason is not None


def test_ema_snapshots_of_an_abandoned_trajectory_are_set_aside_and_never_lost(tmp_path, capsys):
    """Snapshots written after the checkpoint a run resumes from (a crash came before the next
    checkpoint) are renamed *.abandoned, never mixed with the resumed run's (which rewrites
    them identically here) nor used by post-hoc reconstruction from that checkpoint; a stop
    signal at a snapshot step writes the snapshot before stopping, since the resume does not
    redo that step."""
    import sys

    from helpers import ROOT

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import posthoc_ema

    kwargs = dict(train__steps=6, train__save_every=3, train__ema="power")
    kwargs.update(train__ema_snapshot_every=2)
    trainer = main.train(tiny_config("checkerboard", tmp_path, **kwargs), {}, SINGLE)
    folder = os.path.join(trainer.run_dir, "ema_snapshots")
    written = {n: load(os.path.join(folder, n)) for n in os.listdir(folder)}
    assert sorted(written) == ["ema_0000002.pt", "ema_0000004.pt", "ema_0000006.pt"]
    os.remove(os.path.join(trainer.run_dir, "ckpt_0000006.pt"))  # the crash before it
    out = str(tmp_path / "posthoc.pt")
    posthoc_ema.main(["--ckpt", trainer.run_dir, "--sigma_rel", "0.1", "--out", out])
    printed = capsys.readouterr().out
    assert "note: leaving out 2 snapshot(s) after step 3 of the base checkpoint" in printed
    assert load(out)["posthoc_ema"]["step"] == 2
    resumed = main.train(tiny_config("checkerboard", tmp_path, **kwargs), {}, SINGLE)
    assert "set aside 2 EMA snapshot(s) written after step 3" in capsys.readouterr().out
    assert resumed.step == 6 and sorted(os.listdir(folder)) == [
        "ema_0000002.pt",
        "ema_0000004.pt",
        "ema_0000004.pt.abandoned",
        "ema_0000006.pt",
        "ema_0000006.pt.abandoned",
    ]
    for name in ("ema_0000004.pt", "ema_0000006.pt"):  # the same trajectory, rewritten
        again, before = load(os.path.join(folder, name)), written[name]
        for a, b in zip(again["profiles"], before["profiles"], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)
    stopped_dir = tmp_path / "stopped"
    config = tiny_config("checkerboard", stopped_dir, **kwargs)
    holder = []
    original = main.DiffusionTrainer.train

    def train_with_stop(self, logger_factory, until=None, stop=None):
        holder.append(self)
        return original(self, logger_factory, until, StopAt(holder, 4))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(main.DiffusionTrainer, "train", train_with_stop)
        stopped = main.train(config, {}, SINGLE)
    assert stopped.step == 4 and stopped.stopped is not None
    assert sorted(os.listdir(os.path.join(stopped.run_dir, "ema_snapshots"))) == [
        "ema_0000002.pt",
        "ema_0000004.pt",
    ]
