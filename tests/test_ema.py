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
from helpers import minimal_checkpoint

import checkpoints
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
def write_checkpoint(path, out_features=5, step=STEPS):
    """A checkpoint that checkpoints.load accepts, of a net shaped like the trained one."""
    torch.manual_seed(1)
    weights = torch.nn.Sequential(torch.nn.Linear(6, out_features)).state_dict()
    state = minimal_checkpoint(weights, step, 6)
    utils.atomic_torch_save(state, str(path))
    return state


@pytest.fixture(scope="module")
def run_dir(trained):
    """The trained run with a checkpoint at its last step beside its snapshots."""
    write_checkpoint(os.path.join(trained[0], "ckpt_0000600.pt"))
    return trained[0]


def files_under(*folders):
    """{path: (size, mtime)} of every file and folder below `folders`: to see that nothing was
    written."""
    found = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            for name in dirs + names:
                path = os.path.join(root, name)
                found[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return found


def call(argv, capsys):
    """(exit status, stdout, stderr) of the script's main."""
    code = posthoc_ema.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def fit_error(run_dir, sigma_rel, step):
    entries = ema.read_snapshot_profiles(snapshot_paths(run_dir))
    steps, gammas = [e[2] for e in entries], [e[3] for e in entries]
    return ema.solve_posthoc_coefficients(steps, gammas, step, ema.gamma_of_sigma_rel(sigma_rel))


@pytest.mark.parametrize("ckpt_arg", ["RUN", "RUN/ckpt_0000600.pt"])
def test_script_writes_a_checkpoint_with_the_reconstructed_ema(
    run_dir, trained, tmp_path, capsys, ckpt_arg
):
    """--ckpt is a run directory (README's command) or a checkpoint file in it."""
    _, _, power, _ = trained
    ckpt = ckpt_arg.replace("RUN", run_dir)
    out = tmp_path / "posthoc" / "ckpt.pt"
    code, stdout, err = call(["--ckpt", ckpt, "--sigma_rel", "0.10", "--out", out], capsys)
    assert (code, err) == (0, "")
    written = checkpoints.load(str(out))  # a valid checkpoint
    error = written["posthoc_ema"]["relative_profile_error"]
    assert stdout == (
        f"wrote {out}: EMA sigma_rel=0.1 (gamma {ema.gamma_of_sigma_rel(0.1):.3f}) at step 600 "
        f"from 24 snapshot profiles in 12 files, relative profile error {error:.2e}; base "
        f"checkpoint {os.path.join(run_dir, 'ckpt_0000600.pt')} (step 600)\n"
    )
    base = torch.load(os.path.join(run_dir, "ckpt_0000600.pt"), weights_only=True)
    assert written["step"] == STEPS and torch.equal(
        written["model"]["0.weight"], base["model"]["0.weight"]
    )
    net_like = torch.nn.Sequential(torch.nn.Linear(6, 5))
    net_like.load_state_dict(written["ema"]["model"])
    torch.testing.assert_close(flat(net_like), flat(power.profiles[1]), rtol=0, atol=1e-5)
    assert written["posthoc_ema"]["sigma_rel"] == 0.10 and error < 1e-4
    assert sorted(os.listdir(tmp_path / "posthoc")) == ["ckpt.pt"]  # no temporary file left


def test_script_reconstructs_at_an_earlier_step(run_dir, tmp_path, capsys):
    """--step 300: the tracked profile of sigma_rel 0.10 at step 300, as its snapshot holds it."""
    out = tmp_path / "at300.pt"
    argv = ["--ckpt", run_dir, "--sigma_rel", "0.10", "--out", out, "--step", "300"]
    assert call(argv, capsys)[:1] == (0,)
    snapshot = torch.load(ema.snapshot_path(run_dir, 300), weights_only=True)
    written = torch.load(out, weights_only=True)
    assert written["posthoc_ema"]["step"] == 300
    for name, value in snapshot["profiles"][1].items():
        torch.testing.assert_close(written["ema"]["model"][name], value, rtol=0, atol=1e-5)


def test_script_refuses_a_step_after_the_newest_snapshot(run_dir, tmp_path, capsys):
    """It used to write all-zero EMA weights (a profile the snapshots do not reach)."""
    before = files_under(run_dir, tmp_path)
    ckpt = os.path.join(run_dir, "ckpt_0000600.pt")
    argv = ["--ckpt", ckpt, "--sigma_rel", "0.08", "--out", tmp_path / "o.pt", "--step", "601"]
    assert call(argv, capsys) == (
        1,
        "",
        "error: --step 601 is after the newest snapshot (step 600): the EMA can only be "
        "reconstructed at steps up to 600\n",
    )
    assert files_under(run_dir, tmp_path) == before


def test_script_refuses_a_fit_the_snapshots_cannot_make(run_dir, tmp_path, capsys):
    """Step 10 lies before the first snapshot (50): no combination of the profiles is close."""
    _, error = fit_error(run_dir, 0.08, 10)
    assert error > 0.5
    before = files_under(run_dir, tmp_path)
    ckpt = os.path.join(run_dir, "ckpt_0000600.pt")
    argv = ["--ckpt", ckpt, "--sigma_rel", "0.08", "--out", tmp_path / "o.pt", "--step", "10"]
    assert call(argv, capsys) == (
        1,
        "",
        f"error: --sigma_rel 0.08 at step 10: the snapshots fit its profile with relative error "
        f"{error:.2f} > 0.5, so the result would not be that EMA: choose a --step the snapshots "
        "cover, or train with more snapshots (--config.train.ema_snapshot_every) and relative "
        "stds around it (--config.train.ema_stds)\n",
    )
    assert files_under(run_dir, tmp_path) == before


def test_script_refuses_a_run_without_snapshots(tmp_path, capsys):
    """A classic-EMA run, or a power one without train.ema_snapshot_every."""
    run = tmp_path / "classic"
    write_checkpoint(run / "ckpt_0000600.pt")
    before = files_under(tmp_path)
    code, out, err = call(
        ["--ckpt", run, "--sigma_rel", "0.08", "--out", tmp_path / "o.pt"], capsys
    )
    assert (code, out) == (1, "")
    assert err == (
        f"error: --ckpt {run}: no EMA snapshots (ema_<step>.pt) in {run / 'ema_snapshots'}: "
        "post-hoc EMA needs a run trained with --config.train.ema=power "
        "--config.train.ema_snapshot_every=N (or name snapshot folders or files with "
        "--snapshots)\n"
    )
    assert files_under(tmp_path) == before


NOT_A_FILE = "is not a file name: name the checkpoint file to write, e.g. posthoc/ckpt.pt"
LIKE_A_CKPT = (
    "a file named ckpt_<step>.pt would be taken as a run's newest checkpoint: choose another "
    "name, e.g. posthoc/ckpt.pt"
)
LIKE_A_SNAPSHOT = (
    "a file named ema_<step>.pt or in an ema_snapshots folder would be read as an EMA snapshot: "
    "write it elsewhere, e.g. posthoc/ckpt.pt"
)
OUT_ERRORS = [
    ("TMP", f"--out 'TMP' {NOT_A_FILE}"),
    ("", f"--out '' {NOT_A_FILE}"),
    ("TMP/new/", f"--out 'TMP/new/' {NOT_A_FILE}"),
    ("TMP/new/.", f"--out 'TMP/new/.' {NOT_A_FILE}"),
    ("RUN/ckpt_0000600.pt", f"--out RUN/ckpt_0000600.pt: {LIKE_A_CKPT}"),
    ("TMP/new/ckpt_0000001.pt", f"--out TMP/new/ckpt_0000001.pt: {LIKE_A_CKPT}"),
    ("RUN/ema_snapshots/ema_0000050.pt",
     f"--out RUN/ema_snapshots/ema_0000050.pt: {LIKE_A_SNAPSHOT}"),
    ("TMP/ema_0000004.pt", f"--out TMP/ema_0000004.pt: {LIKE_A_SNAPSHOT}"),
    ("RUN/ema_snapshots/posthoc.pt", f"--out RUN/ema_snapshots/posthoc.pt: {LIKE_A_SNAPSHOT}"),
    ("TMP/existing.pt", "--out TMP/existing.pt exists: pass --force to replace it, or choose "
     "another file"),
    ("TMP/existing.pt/out.pt", "--out TMP/existing.pt/out.pt: TMP/existing.pt is a file, not a "
     "folder"),
    ("/proc/x.pt", "--out /proc/x.pt: cannot create files in /proc (No such file or directory)"),
]  # fmt: skip


@pytest.mark.parametrize("out, message", OUT_ERRORS)
def test_script_out_errors_come_first_and_write_nothing(run_dir, tmp_path, capsys, out, message):
    """--out is checked before anything else: the other arguments here are bad too."""
    (tmp_path / "existing.pt").write_bytes(b"keep me")
    before = files_under(run_dir, tmp_path)
    out = out.replace("RUN", run_dir).replace("TMP", str(tmp_path))
    argv = ["--ckpt", tmp_path / "missing", "--sigma_rel", "0.5", "--out", out, "--step", "0"]
    message = message.replace("RUN", run_dir).replace("TMP", str(tmp_path))
    assert call(argv, capsys) == (1, "", f"error: {message}\n")
    assert files_under(run_dir, tmp_path) == before


def test_script_force_replaces_an_existing_out(run_dir, tmp_path, capsys):
    out = tmp_path / "existing.pt"
    out.write_bytes(b"old")
    argv = ["--ckpt", run_dir, "--sigma_rel", "0.08", "--out", out, "--force"]
    assert call(argv, capsys)[:1] == (0,)
    assert checkpoints.load(str(out))["posthoc_ema"]["sigma_rel"] == 0.08


def test_script_refuses_to_overwrite_its_inputs_even_with_force(run_dir, tmp_path, capsys):
    base, snap = tmp_path / "base.pt", tmp_path / "snap.pt"
    write_checkpoint(base)
    snap.write_bytes(open(ema.snapshot_path(run_dir, STEPS), "rb").read())
    before = files_under(tmp_path)
    for out in (base, snap):
        argv = ["--ckpt", base, "--sigma_rel", "0.1", "--snapshots", snap, "--out", out, "--force"]
        assert call(argv, capsys) == (
            1,
            "",
            f"error: --out {out} is one of the input files (--ckpt, --snapshots): write the "
            "result elsewhere, e.g. posthoc/ckpt.pt\n",
        )
    assert files_under(tmp_path) == before


def test_script_counts_each_snapshot_file_once(run_dir, tmp_path, capsys):
    """The same folder twice, a link to it and one of its files: 12 files, 24 profiles."""
    folder = os.path.join(run_dir, ema.SNAPSHOT_DIR)
    os.symlink(folder, tmp_path / "link")
    out = tmp_path / "o.pt"
    snapshots = [folder, folder, tmp_path / "link", ema.snapshot_path(run_dir, 300)]
    ckpt = os.path.join(run_dir, "ckpt_0000600.pt")
    argv = ["--ckpt", ckpt, "--sigma_rel", "0.08", "--out", out, "--snapshots", *snapshots]
    code, stdout, _ = call(argv, capsys)
    assert code == 0 and " from 24 snapshot profiles in 12 files, " in stdout
    written = torch.load(out, weights_only=True)["posthoc_ema"]
    expected, _ = fit_error(run_dir, 0.08, STEPS)
    assert written["coefficients"] == pytest.approx(expected.tolist(), abs=1e-9)


def test_script_help_is_whole(capsys):
    assert posthoc_ema.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert " ".join(posthoc_ema.__doc__.split()) in out
    assert out.rstrip().endswith("--step STEP step of the EMA (default: the newest snapshot's)")


def foreign_snapshot(path, out_features):
    power = ema.PowerEMA(torch.nn.Linear(6, out_features), stds=(0.05, 0.10))
    power.num_updates = 100
    utils.atomic_torch_save(power.snapshot(), str(path))


RANGE = "must be in (0, 0.2887) (typical: 0.05-0.15)"
OTHER_NET = "(other parameter names or shapes): use the snapshots of the checkpoint's run"
SCRIPT_ERRORS = [
    (["--sigma_rel", "abc"], "argument --sigma_rel: invalid float value: 'abc' (see --help)"),
    (["--out"], "argument --out: expected one argument (see --help)"),
    (["--step", "-3"], "--step -3: must be a training step >= 1 (default: the newest "
     "snapshot's)"),
    (["--sigma_rel", "0.5"], f"--sigma_rel: relative std 0.5 {RANGE}"),
    (["--sigma_rel", "nan"], f"--sigma_rel: relative std nan {RANGE}"),
    (["--ckpt", "TMP/missing.pt"], "--ckpt TMP/missing.pt: no such checkpoint file or run "
     "directory"),
    (["--ckpt", ""], "--ckpt '': no such checkpoint file or run directory"),
    (["--ckpt", "TMP/zeros.pt"], "--ckpt: TMP/zeros.pt holds a Tensor, not a checkpoint dict"),
    (["--ckpt", "TMP/nockpt"], "--ckpt=TMP/nockpt: no loadable ckpt_*.pt in this directory"),
    (["--ckpt", "TMP/other.pt"], "--snapshots: RUN/ema_snapshots/ema_0000050.pt holds a "
     f"different network than --ckpt TMP/other.pt {OTHER_NET}"),
    (["--snapshots", "SNAPS", "TMP/foreign"], "--snapshots: TMP/foreign/ema_0000100.pt holds a "
     f"different network than --ckpt RUN/ckpt_0000600.pt {OTHER_NET}"),
    (["--snapshots", "TMP/nowhere"], "--snapshots: TMP/nowhere is neither a snapshot file nor a "
     "folder"),
    (["--snapshots", "TMP/nockpt"], "--snapshots: no ema_<step>.pt files in TMP/nockpt"),
    (["--snapshots", "TMP/dict.pt"], "--snapshots: TMP/dict.pt is not an EMA snapshot (a dict of "
     "step, gammas, profiles, buffer_names written by a train.ema=power run)"),
]  # fmt: skip


@pytest.mark.parametrize("args, message", SCRIPT_ERRORS)
def test_script_errors_are_one_line(run_dir, tmp_path, capsys, args, message):
    torch.save(torch.zeros(3), tmp_path / "zeros.pt")
    torch.save({"step": 5, "gammas": [1.0]}, tmp_path / "dict.pt")
    write_checkpoint(tmp_path / "other.pt", out_features=4)
    foreign_snapshot(tmp_path / "foreign" / "ema_0000100.pt", out_features=4)
    (tmp_path / "nockpt" / "ema_snapshots").mkdir(parents=True)
    options = {"--ckpt": "RUN", "--sigma_rel": "0.1", "--out": "TMP/out.pt", "--snapshots": "SNAPS"}
    options.update({args[0]: args[1:]})
    argv = []
    for key, values in options.items():
        values = [values] if isinstance(values, str) else values
        argv += [key] + [v.replace("SNAPS", "RUN/ema_snapshots") for v in values]
    before = files_under(run_dir, tmp_path)
    argv = [a.replace("RUN", run_dir).replace("TMP", str(tmp_path)) for a in argv]
    message = message.replace("RUN", run_dir).replace("TMP", str(tmp_path))
    assert call(argv, capsys) == (1, "", f"error: {message}\n")
    assert files_under(run_dir, tmp_path) == before


@pytest.mark.parametrize("name", ["zeros.pt", "snapshot"])
def test_script_reads_ckpt_through_checkpoint_validation(run_dir, tmp_path, capsys, name):
    """--ckpt files are validated by checkpoints.load: its one line, after `--ckpt: `."""
    path = str(tmp_path / "zeros.pt") if name == "zeros.pt" else ema.snapshot_path(run_dir, 50)
    torch.save(torch.zeros(3), tmp_path / "zeros.pt")
    with pytest.raises(checkpoints.CheckpointError) as reason:
        checkpoints.load(path)
    before = files_under(run_dir, tmp_path)
    argv = ["--ckpt", path, "--sigma_rel", "0.1", "--out", tmp_path / "o.pt"]
    argv += ["--snapshots", os.path.join(run_dir, ema.SNAPSHOT_DIR)]
    assert call(argv, capsys) == (1, "", f"error: --ckpt: {reason.value}\n")
    assert files_under(run_dir, tmp_path) == before
