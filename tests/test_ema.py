"""Power-function EMA and post-hoc EMA (ema.py, scripts/posthoc_ema.py) against direct
computations: gamma from sigma_rel (roots of the cubic), the closed-form weights (product of the
recursion's betas), the update (weighted average of the parameter history), the profiles' inner
products (numerical integration), and reconstructions from snapshot files."""

import copy
import math
import os
import sys

import numpy as np
import pytest
import torch

import ema
import utils

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import posthoc_ema  # noqa: E402


def flat(module):
    return torch.nn.utils.parameters_to_vector(module.parameters()).double()


def set_flat(module, vector):
    torch.nn.utils.vector_to_parameters(vector.float(), module.parameters())


# ---------------------------------------------------------------------------------------------
# gamma, weights, update
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.075, 0.10, 0.2, 0.28])
def test_gamma_is_the_largest_root_of_the_cubic(sigma_rel):
    """sigma_rel^2 (g+2)^2 (g+3) = g+1, i.e. s g^3 + 7 s g^2 + (16 s - 1) g + 12 s - 1 = 0."""
    s = sigma_rel**2
    roots = np.roots([s, 7 * s, 16 * s - 1, 12 * s - 1])
    largest = max(r.real for r in roots if abs(r.imag) < 1e-9)
    assert ema.gamma_of_sigma_rel(sigma_rel) == pytest.approx(largest, rel=1e-9)


def test_gamma_of_edm2_profiles():
    assert ema.gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)
    assert ema.gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.29, 1.0])
def test_sigma_rel_out_of_range_raises(sigma_rel):
    with pytest.raises(ValueError, match=rf"relative std {sigma_rel} must be in \(0, 0.2887\)"):
        ema.gamma_of_sigma_rel(sigma_rel)


def test_closed_form_weights_are_the_recursion_products():
    """w_k = (1 - beta_k) prod_{j > k} beta_j with beta_j = (1 - 1/j)^(gamma+1)."""
    gamma, steps = 6.94, 30
    betas = [(1 - 1 / j) ** (gamma + 1) for j in range(1, steps + 1)]
    direct = [(1 - betas[k - 1]) * math.prod(betas[k:]) for k in range(1, steps + 1)]
    weights = ema.power_weights(steps, gamma)
    assert weights.tolist() == pytest.approx(direct, rel=1e-10, abs=1e-15)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_power_ema_update_is_the_weighted_average_of_the_history():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    power = ema.PowerEMA(net, stds=(0.05, 0.10, 0.2))
    history = []
    for _ in range(40):
        set_flat(net, flat(net) + 0.1 * torch.randn(15, dtype=torch.float64))
        history.append(flat(net))
        power.update(net)
    history = torch.stack(history)
    assert power.model is power.profiles[0] and power.num_updates == 40
    for profile, gamma in zip(power.profiles, power.gammas, strict=True):
        direct = ema.power_weights(40, gamma) @ history  # the initial weights have weight 0
        torch.testing.assert_close(flat(profile), direct, rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in power.model.parameters())


@pytest.mark.parametrize("kind", ["classic", "power"])
def test_skipped_step_leaves_the_average_unchanged(kind):
    """keep = 0 (a 0-dim tensor, as the trainer passes on a non-finite step): no change to
    weights or buffers, but the time advances; keep = 1 is the plain update."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = ema.build_ema(kind, net, decay=0.9, stds=(0.05, 0.10))
    reference = ema.build_ema(kind, net, decay=0.9, stds=(0.05, 0.10))
    before = copy.deepcopy(average.model.state_dict())
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(3.0)
    average.update(net, keep=torch.tensor(0.0))
    assert average.num_updates == 1
    for name, value in average.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    average.update(net, keep=torch.tensor(1.0))
    reference.num_updates = 1
    reference.update(net)
    for name, value in average.model.state_dict().items():
        assert torch.equal(value, reference.model.state_dict()[name]), name
    assert torch.equal(average.model[1].running_mean, torch.full((2,), 3.0))


def test_power_ema_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    power = ema.build_ema("power", net, stds=(0.05, 0.10))
    for _ in range(5):
        set_flat(net, flat(net) + 1.0)
        power.update(net)
    torch.save(power.state_dict(), tmp_path / "ema.pt")
    state = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert state["model"].keys() == state["profiles"][0].keys()  # "model" is profile 0
    restored = ema.PowerEMA(torch.nn.Linear(3, 2), stds=(0.05, 0.10))
    restored.load_state_dict(state)
    assert restored.num_updates == 5
    for a, b in zip(restored.profiles, power.profiles, strict=True):
        assert torch.equal(flat(a), flat(b))
    with pytest.raises(ValueError, match=r"train.ema_stds=\(0.05, 0.2\) but the checkpoint"):
        ema.PowerEMA(torch.nn.Linear(3, 2), stds=(0.05, 0.2)).load_state_dict(state)
    classic = ema.build_ema("classic", net, decay=0.9).state_dict()
    with pytest.raises(ValueError, match="holds a classic EMA"):
        restored.load_state_dict(classic)


def test_build_ema_registry():
    net = torch.nn.Linear(2, 2)
    classic = ema.build_ema("classic", net, decay=0.5)
    assert type(classic) is ema.EMA and classic.decay == 0.5
    assert isinstance(ema.build_ema("power", net, stds=(0.1,)), ema.PowerEMA)
    with pytest.raises(ValueError, match=r"unknown EMA kind 'karras'; .*\['classic', 'power'\]"):
        ema.build_ema("karras", net)


# ---------------------------------------------------------------------------------------------
# snapshots and post-hoc reconstruction
# ---------------------------------------------------------------------------------------------
STEPS, EVERY = 600, 50


def train_with_snapshots(run_dir, with_buffer=False):
    """A drifting random walk of the weights (momentum, like an optimizer's trajectory), a power
    EMA with snapshots every EVERY steps; returns (net, ema, history (STEPS, P) float64)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 5)] + ([torch.nn.BatchNorm1d(5)] if with_buffer else [])
    net = torch.nn.Sequential(*layers)
    power = ema.PowerEMA(net, stds=(0.05, 0.10))
    velocity = torch.zeros(sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    history = []
    for step in range(1, STEPS + 1):
        velocity = 0.99 * velocity + 0.1 * torch.randn_like(velocity)
        set_flat(net, flat(net) + 0.01 * velocity)
        if with_buffer:
            net[1].running_mean.fill_(float(step))
            net[1].num_batches_tracked.fill_(step)
        history.append(flat(net))
        power.update(net)
        path = ema.save_snapshot_if_due(power, run_dir, EVERY, utils.atomic_torch_save)
        assert (path is not None) == (step % EVERY == 0)
    return net, power, torch.stack(history)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    net, power, history = train_with_snapshots(run_dir)
    return run_dir, net, power, history


def snapshot_paths(run_dir):
    return ema.list_snapshots(os.path.join(run_dir, ema.SNAPSHOT_DIR))


def reconstruct(run_dir, sigma_rel, net_like):
    state, info = ema.posthoc_state_dict(snapshot_paths(run_dir), sigma_rel)
    net_like.load_state_dict(state)
    return flat(net_like), info


def test_snapshot_files(trained):
    run_dir, _, power, _ = trained
    paths = snapshot_paths(run_dir)
    assert [os.path.basename(p) for p in paths] == [
        f"ema_{s:07d}.pt" for s in range(EVERY, STEPS + 1, EVERY)
    ]
    names = sorted(os.listdir(os.path.join(run_dir, ema.SNAPSHOT_DIR)))
    assert names == [os.path.basename(p) for p in paths]  # no temporary files left
    last = torch.load(paths[-1], weights_only=True)
    assert last["step"] == STEPS and last["stds"] == [0.05, 0.10]
    assert last["gammas"] == pytest.approx(power.gammas)
    for saved, profile in zip(last["profiles"], power.profiles, strict=True):
        for name, value in profile.state_dict().items():
            assert torch.equal(saved[name], value)
    assert (
        ema.save_snapshot_if_due(
            ema.EMA(torch.nn.Linear(2, 2)), run_dir, 1, utils.atomic_torch_save
        )
        is None
    )


def test_inner_products_match_numerical_integration():
    """<p_a, p_b> with p(tau) = (g+1) tau^g / t^(g+1) on (0, t], by the trapezoid rule."""
    tau = torch.linspace(0, 1000, 2_000_001, dtype=torch.float64)

    def profile(t, g):
        return torch.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), torch.zeros_like(tau))

    for (t_a, g_a), (t_b, g_b) in [((1000, 6.94), (700, 16.97)), ((400, 3.0), (400, 6.94))]:
        numeric = torch.trapezoid(profile(t_a, g_a) * profile(t_b, g_b), tau).item()
        closed = ema.profile_inner_products(t_a, g_a, t_b, g_b).item()
        assert closed == pytest.approx(numeric, rel=1e-4)


def test_coefficients_of_a_tracked_profile_select_it():
    steps, gammas = [100, 200, 100, 200], [6.94, 6.94, 16.97, 16.97]
    x, error = ema.solve_posthoc_coefficients(steps, gammas, 200, 16.97)
    assert x.tolist() == pytest.approx([0, 0, 0, 1], abs=1e-6)
    assert error < 1e-6


@pytest.mark.parametrize("index", [0, 1])
def test_reconstructing_a_tracked_profile_reproduces_it(trained, index):
    run_dir, net, power, _ = trained
    sigma_rel = power.stds[index]
    rebuilt, info = reconstruct(run_dir, sigma_rel, net)
    tracked = flat(power.profiles[index])
    assert info["step"] == STEPS and info["num_profiles"] == 2 * STEPS // EVERY
    assert info["relative_profile_error"] < 1e-4
    torch.testing.assert_close(rebuilt, tracked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sigma_rel", [0.075, 0.13])
def test_reconstructing_another_profile_beats_the_tracked_ones(trained, sigma_rel):
    run_dir, net, power, history = trained
    rebuilt, _ = reconstruct(run_dir, sigma_rel, net)
    direct = ema.power_weights(STEPS, ema.gamma_of_sigma_rel(sigma_rel)) @ history
    error = (rebuilt - direct).norm()
    tracked_errors = [(flat(p) - direct).norm() for p in power.profiles]
    assert error < 0.1 * min(tracked_errors)


def test_buffers_come_from_the_newest_snapshot(tmp_path):
    net, power, _ = train_with_snapshots(str(tmp_path), with_buffer=True)
    state, _ = ema.posthoc_state_dict(snapshot_paths(str(tmp_path)), 0.08)
    assert torch.equal(state["1.running_mean"], torch.full((5,), float(STEPS)))
    assert state["1.num_batches_tracked"].dtype == torch.long
    assert state["1.num_batches_tracked"].item() == STEPS


def test_bad_snapshot_file_is_one_line_error(tmp_path):
    bad = tmp_path / "ema_0000001.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"ema_0000001.pt is not an EMA snapshot"):
        ema.posthoc_state_dict([str(bad)], 0.1)


# ---------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------
def base_checkpoint(net, path):
    state = {"step": STEPS, "model": net.state_dict(), "ema": {"model": net.state_dict()}}
    torch.save(state, path)


def test_script_writes_a_checkpoint_with_the_reconstructed_ema(trained, tmp_path, capsys):
    run_dir, net, power, history = trained
    ckpt = os.path.join(run_dir, "ckpt_0000600.pt")
    base_checkpoint(net, ckpt)
    out = str(tmp_path / "posthoc" / "ckpt_0000600.pt")
    assert posthoc_ema.main(["--ckpt", ckpt, "--sigma_rel", "0.10", "--out", out]) == 0
    assert "relative profile error" in capsys.readouterr().out
    written = torch.load(out, weights_only=True)
    assert written["step"] == STEPS and torch.equal(written["model"]["0.weight"], net[0].weight)
    net_like = torch.nn.Sequential(torch.nn.Linear(6, 5))
    net_like.load_state_dict(written["ema"]["model"])
    torch.testing.assert_close(flat(net_like), flat(power.profiles[1]), rtol=0, atol=1e-5)
    assert written["posthoc_ema"]["sigma_rel"] == 0.10


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sigma_rel", "0.5"], "relative std 0.5 must be in"),
        (["--snapshots", "nowhere"], "--snapshots: nowhere is neither"),
        (["--out", "RUN/ckpt_0000700.pt"], "would be taken as the run's newest checkpoint"),
        (["--ckpt", "RUN/ema_snapshots/ema_0000050.pt"], "has no EMA weights (key ema.model)"),
        (["--ckpt", "TMP/other.pt"], "the snapshots hold a different network"),
        (["--ckpt", "TMP/missing.pt"], "missing.pt is not a readable checkpoint"),
    ],
)
def test_script_errors_are_one_line(trained, tmp_path, capsys, args, message):
    run_dir, net, _, _ = trained
    ckpt = os.path.join(run_dir, "ckpt_0000600.pt")
    base_checkpoint(net, ckpt)
    base_checkpoint(torch.nn.Sequential(torch.nn.Linear(6, 4)), tmp_path / "other.pt")
    options = {
        "--ckpt": ckpt,
        "--sigma_rel": "0.1",
        "--out": str(tmp_path / "out.pt"),
        "--snapshots": os.path.join(run_dir, ema.SNAPSHOT_DIR),
    }
    options.update(dict(zip(args[::2], args[1::2], strict=True)))
    argv = []
    for key, value in options.items():
        argv += [key, value.replace("RUN", run_dir).replace("TMP", str(tmp_path))]
    assert posthoc_ema.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    assert not os.path.exists(tmp_path / "out.pt")
