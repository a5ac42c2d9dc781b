"""EMA, optimizer and schedules, logging helpers and atomic files against direct computations."""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import logging_utils
import utils
from ema import EMA
from optimizers import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    param_groups,
)


def test_ema_matches_closed_form_with_warmup():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * n)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v
    for k, v in ema.model.state_dict().items():
        torch.testing.assert_close(v, expected[k])
    assert ema.current_decay() == pytest.approx(30 / 39) and not any(
        p.requires_grad for p in ema.model.parameters()
    )
    restored = EMA(torch.nn.Linear(3, 2), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 29
    assert torch.equal(restored.model.weight, ema.model.weight)


def test_ema_copies_buffers():
    model = torch.nn.BatchNorm1d(4)
    ema = EMA(model, decay=0.99)
    model.running_mean.fill_(3.0)
    ema.update(model)
    assert torch.equal(ema.model.running_mean, torch.full((4,), 3.0))


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 2)
    )
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, norm weight + bias, linear bias
    optimizer = build_optimizer(model, 1e-3, 0.1)
    assert isinstance(optimizer, torch.optim.AdamW)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_schedules(schedule):
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, 1.0)
    scheduler = build_scheduler(
        optimizer, schedule, total_steps=20, warmup_steps=4, min_lr_ratio=0.1
    )
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    after = [lrs[4 + k] for k in range(16)]
    expected = {
        "constant": [1.0] * 16,
        "cosine": [0.1 + 0.9 * (1 + math.cos(math.pi * k / 16)) / 2 for k in range(16)],
        "linear": [1.0 - 0.9 * k / 16 for k in range(16)],
    }[schedule]
    assert after == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="train.lr_schedule='step' is unknown; valid choices"):
        build_scheduler(optimizer, "step", 10)


def test_clip_gradients_returns_norm_and_sets_the_step_divisor():
    model = torch.nn.Linear(3, 1, bias=False)
    optimizer = build_optimizer(model, 1e-3)
    model.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])
    norm = clip_gradients(optimizer, list(model.parameters()), 2.0)
    assert norm.item() == pytest.approx(5.0)
    assert optimizer.grad_scale.item() == pytest.approx((5.0 + 1e-6) / 2.0, rel=1e-7)
    model.weight.grad = torch.tensor([[0.3, 0.4, 0.0]])  # under the limit: divide by 1
    assert clip_gradients(optimizer, list(model.parameters()), 2.0).item() == pytest.approx(0.5)
    assert optimizer.grad_scale.item() == 1.0
    for off in (0.0, None):  # disable clipping
        assert clip_gradients(optimizer, list(model.parameters()), off).item() == pytest.approx(0.5)
        assert optimizer.grad_scale is None


@pytest.mark.parametrize(  # ||g||; 1 - 2e-7 is under max_norm = 1 but c = 1 / (||g|| + 1e-6) < 1
    "scale", [0.01, 1.0 - 1.5e-6, 1.0 - 2e-7, 1.0, 100.0, math.nan]
)
def test_clipping_in_the_fused_step_equals_torch_clip_then_step(scale):
    """Fused AdamW with clip_gradients' divisor steps as if torch's clip_grads_with_norm_ had
    multiplied the gradients by c first: the same weights and clipped gradients to float32
    rounding (g / (1 / c) against g * c), on both sides of the limit and at it, over steps
    whose norms differ. A nan norm gives a nan divisor, and with found_inf set (the trainer's
    skip) the step changes nothing."""
    torch.manual_seed(0)
    grads = [torch.randn(40, 30), torch.randn(30), torch.randn(1)]
    total = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))
    weights = [torch.randn_like(g) for g in grads]

    def parameters():
        return [torch.nn.Parameter(w.clone()) for w in weights]

    reference, ours = parameters(), parameters()
    reference_step = build_optimizer(torch.nn.ParameterList(reference), 1e-2)
    our_step = build_optimizer(torch.nn.ParameterList(ours), 1e-2)
    for factor in (1.0, 0.3, 3.0):  # the norm changes from step to step
        for params in (reference, ours):
            for p, g in zip(params, grads, strict=True):
                p.grad = (g / total * scale * factor).float()
        norm = torch.nn.utils.get_total_norm([p.grad for p in reference])
        torch.nn.utils.clip_grads_with_norm_(reference, 1.0, norm, foreach=True)
        our_norm = clip_gradients(our_step, ours, 1.0)
        torch.testing.assert_close(our_norm, norm, equal_nan=True)
        if math.isnan(scale):
            assert our_step.grad_scale.isnan()
            our_step.found_inf = torch.ones(())
            our_step.step()
            assert all(torch.equal(p, w) for p, w in zip(ours, weights, strict=True))
            return
        reference_step.step()
        our_step.step()
        for p, q in zip(ours, reference, strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-7, atol=0)
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_clip_gradients_norm_matches_float64_and_flags_overflow_and_non_finite():
    """The norm clip_gradients returns equals a float64 computation over gradients of any
    layout, is 0 for no gradients, and is inf / nan for overflowing or non-finite entries (so
    that the trainer's guard skips such a step)."""
    torch.manual_seed(0)
    grads = [torch.randn(512, 256), torch.randn(7), torch.randn(3, 4, 5).transpose(0, 2)]
    expected = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))

    def norm_of(grads):  # plus a parameter without a gradient, which does not count
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        params.append(torch.nn.Parameter(torch.ones(3)))
        return clip_gradients(build_optimizer(torch.nn.ParameterList(params), 1e-3), params, 1.0)

    norm = norm_of(grads)
    assert norm.dtype == torch.float32 and norm.shape == ()
    assert norm.item() == pytest.approx(expected, rel=1e-6)
    assert norm_of([]).item() == 0.0
    assert norm_of([torch.tensor([1e20, 1.0])]).item() == math.inf  # square overflows
    assert math.isnan(norm_of([torch.tensor([float("nan"), 1.0])]).item())
    assert norm_of([torch.ones(2), torch.tensor([-math.inf])]).item() == math.inf


@pytest.mark.parametrize("max_norm", [0.5, 0.0])
def test_clip_gradients_then_fused_adamw_equals_torch_clip_then_foreach_adamw(max_norm):
    """build_optimizer's fused AdamW with clip_gradients' divisor gives the same weights as torch's
    clip_grad_norm_ and a plain (foreach) AdamW with the same groups, over steps with and
    without clipping (the gradient norm crosses max_norm)."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    reference = copy.deepcopy(ours)
    fused = build_optimizer(ours, 1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(param_groups(reference, 0.1), lr=1e-2, foreach=True)
    norms = []
    for scale in (10.0, 0.1, 10.0, 1.0):
        x = torch.randn(16, 5) * scale
        (ours(x) ** 2).mean().backward()
        norms.append(clip_gradients(fused, list(ours.parameters()), max_norm).item())
        (reference(x) ** 2).mean().backward()
        torch_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm or math.inf)
        assert norms[-1] == pytest.approx(torch_norm.item(), rel=1e-6)
        for optimizer in (fused, plain):
            optimizer.step()
            optimizer.zero_grad()
    assert max(norms) > 0.5 > min(norms)  # both regimes were exercised
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 1), 10 * i, np.uint8) for i in range(5)])
    grid = logging_utils.image_grid(images, nrow=3, padding=1, upscale=2)
    assert grid.shape == (2 * (4 + 1) + 1, 3 * (6 + 1) + 1, 1)
    assert (grid[1:5, 1:7] == 0).all() and (grid[1:5, 8:14] == 10).all()
    assert (grid[6:10, 1:7] == 30).all() and (grid[6:10, 15:21] == 255).all()  # empty slot


def test_save_image_grid_and_scatter(tmp_path):
    path = logging_utils.save_image_grid(np.zeros((4, 8, 8, 3), np.uint8), tmp_path / "g.png")
    assert Image.open(path).size == (2 * 9 + 1, 2 * 9 + 1)
    points = np.random.default_rng(0).normal(size=(500, 2))
    path = logging_utils.save_scatter(points, str(tmp_path / "s.png"), reference=points)
    assert Image.open(path).size == (500, 500)


def test_a_scatter_of_diverged_samples_draws_the_finite_ones(tmp_path):
    """NaN / inf points (a diverged sampler) are left out of the plot and out of its limits,
    instead of matplotlib's 'Axis limits cannot be NaN or Inf'; none finite gives limit 1."""
    points = np.random.default_rng(0).normal(size=(500, 2))
    broken = points.copy()
    broken[:10, 0], broken[10:20, 1] = np.nan, np.inf
    assert logging_utils.plot_limit(broken, 1.1) == logging_utils.plot_limit(points[20:], 1.1)
    assert logging_utils.plot_limit(np.full((4, 2), np.nan), 1.1) == 1.0
    for data in (broken, np.full((4, 2), np.nan)):
        path = logging_utils.save_scatter(data, str(tmp_path / "s.png"), reference=points)
        assert Image.open(path).size == (500, 500)
        path = logging_utils.save_scatter_snapshots(
            [(1.0, points), (0.0, data)], tmp_path / "t.png"
        )
        assert Image.open(path).size[0] > 0


def test_metrics_logger_writes_jsonl(tmp_path):
    logger = logging_utils.MetricsLogger(str(tmp_path), enabled=True)
    logger.log(3, {"loss": 0.5})
    logger.log(4, {"loss": 0.25})
    records = logging_utils.read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in records] == [(3, 0.5), (4, 0.25)]
    silent = logging_utils.MetricsLogger(str(tmp_path / "other"), enabled=False)
    silent.log(1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "other")


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    mode, reason = logging_utils.resolve_wandb_mode("auto")
    assert mode == "offline" and "no credentials" in reason
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert logging_utils.resolve_wandb_mode("auto")[0] == "online"
    assert logging_utils.resolve_wandb_mode("disabled")[0] == "disabled"
    with pytest.raises(ValueError, match="valid choices"):
        logging_utils.resolve_wandb_mode("loud")


def test_wandb_offline_run_is_written_quietly(tmp_path, capfd):
    logger = logging_utils.MetricsLogger(str(tmp_path), True, "offline", "test", "t", {"a": 1})
    logger.log(1, {"loss": 1.0})
    run_id = logger.run_id
    logger.close()
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and runs[0].endswith(run_id)
    out, err = capfd.readouterr()
    assert "wandb" not in (out + err).lower(), out + err  # no banner, no run summary


def test_loss_curve_plots_finite_values(tmp_path):
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 20)]
    records.append({"step": 20, "loss": float("nan")})
    records.append({"step": 21, "eval/fd": 3.0})  # a record without a loss
    path = logging_utils.save_loss_curve(records, str(tmp_path / "loss.png"))
    with Image.open(path) as image:
        assert image.size == (600, 400)
    assert os.listdir(tmp_path) == ["loss.png"]
    assert logging_utils.save_loss_curve([{"step": 1, "loss": float("inf")}], "x.png") is None


def test_atomic_writes_leave_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    utils.atomic_write_json({"a": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        utils.atomic_torch_save({"bad": Boom()}, path)
    assert json.load(open(path)) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_mix_seed_distinct_low_bits():
    low = {utils.mix_seed(s, i) & 0xFFFFFFFF for s in range(4) for i in range(1000)}
    assert len(low) == 4000
    assert utils.mix_seed(1, 2) == utils.mix_seed(1, 2) != utils.mix_seed(2, 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's VmHWM")
def test_peak_memory_mib_is_the_process_peak_rss():
    """On the CPU, the peak resident memory: it agrees with Linux's own high-water mark (VmHWM
    in /proc/self/status) and grows by at least the size of a large tensor written in full."""

    def high_water_mark_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
        raise AssertionError("no VmHWM line")

    before = utils.peak_memory_mib("cpu")
    big = torch.ones(int(before * 2**20 / 4) + 64 * 2**18)  # more than the peak so far + 64 MiB
    after = utils.peak_memory_mib("cpu")
    assert after - before >= 64 and after >= big.numel() * 4 / 2**20
    assert after == pytest.approx(high_water_mark_mib(), abs=4.0)
    assert utils.peak_memory_mib("meta") is None
