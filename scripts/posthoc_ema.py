"""Post-hoc EMA (EDM2): write a checkpoint whose EMA weights have any relative std, reconstructed
from the power-EMA snapshots of a run trained with --config.train.ema=power and
--config.train.ema_snapshot_every=N (they are in <run_dir>/ema_snapshots/).

    python scripts/posthoc_ema.py --ckpt ckpts/digits --sigma_rel 0.08 --out posthoc/ckpt.pt
    python main.py --mode=sample --ckpt=posthoc/ckpt.pt --out=samples

--ckpt is a run directory (its newest good checkpoint is the base) or a checkpoint file. The
snapshots default to the run's `ema_snapshots` folder (the one beside a checkpoint file); name
other folders or snapshot files with --snapshots; snapshots after the base checkpoint's step
are left out (written after it, by a run stopped before its next checkpoint). The EMA is
reconstructed at the newest remaining snapshot's step, or at --step (from 1 up to that step).
The least-squares fit of the power profiles is `ema.posthoc_state_dict`; a fit whose relative
profile error exceeds MAX_PROFILE_ERROR (0.5) is refused: it would not be the EMA asked for
(snapshot more often, track relative stds closer to --sigma_rel with --config.train.ema_stds, or
choose a --step the snapshots cover). The output is the base checkpoint with its EMA weights
replaced (for --mode=sample / eval / info) plus a `posthoc_ema` record (sigma_rel, step,
coefficients, relative profile error), written atomically. --out must be a new file (--force
replaces one), not named like a checkpoint (ckpt_<step>.pt) or a snapshot (ema_<step>.pt) and
not in an ema_snapshots folder: a run would take it for its newest checkpoint or a snapshot.
"""

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoints  # noqa: E402
import ema  # noqa: E402
import utils  # noqa: E402

# A fit whose relative L2 profile error || sum_i x_i p_i - p_r || / || p_r || exceeds this is
# refused: the weights would average a visibly different window of the training trajectory.
MAX_PROFILE_ERROR = 0.5
SNAPSHOT_PATTERN = re.compile(r"ema_\d+\.pt")
EXAMPLE_OUT = "posthoc/ckpt.pt"


# ---------------------------------------------------------------------------------------------
# Arguments, checked before anything is loaded.
# ---------------------------------------------------------------------------------------------
def check_out_path(out, force):
    """One line unless `out` names a new checkpoint file that no run would mistake for its own."""
    folder = os.path.dirname(os.path.abspath(out)) if out else ""
    name = os.path.basename(out)
    if name in ("", ".", "..") or os.path.isdir(out):
        raise ValueError(
            f"--out {out!r} is not a file name: name the checkpoint file to write, "
            f"e.g. {EXAMPLE_OUT}"
        )
    if checkpoints.CKPT_PATTERN.fullmatch(name):
        raise ValueError(
            f"--out {out}: a file named ckpt_<step>.pt would be taken as a run's newest "
            f"checkpoint: choose another name, e.g. {EXAMPLE_OUT}"
        )
    if SNAPSHOT_PATTERN.fullmatch(name) or os.path.basename(folder) == ema.SNAPSHOT_DIR:
        raise ValueError(
            f"--out {out}: a file named ema_<step>.pt or in an {ema.SNAPSHOT_DIR} folder would "
            f"be read as an EMA snapshot: write it elsewhere, e.g. {EXAMPLE_OUT}"
        )
    if os.path.lexists(out) and not force:
        raise ValueError(f"--out {out} exists: pass --force to replace it, or choose another file")
    check_folder_writable(out, folder)


def check_folder_writable(out, folder):
    """The nearest existing folder above `out` is a folder we may create files in."""
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    utils.check_output_dir(existing, f"--out {out}")  # a probe file: os.access trusts root


def check_numbers(sigma_rel, step):
    try:
        ema.gamma_of_sigma_rel(sigma_rel)
    except ValueError as e:
        raise ValueError(f"--sigma_rel: {e}") from None
    if step is not None and step < 1:
        raise ValueError(
            f"--step {step}: must be a training step >= 1 (default: the newest snapshot's)"
        )


def check_ckpt_exists(ckpt):
    if not os.path.exists(ckpt):
        raise ValueError(f"--ckpt {ckpt or repr(ckpt)}: no such checkpoint file or run directory")


# ---------------------------------------------------------------------------------------------
# Snapshots.
# ---------------------------------------------------------------------------------------------
def snapshots_in(folder):
    """The ema_<step>.pt files of a snapshot folder, oldest first."""
    found = ema.list_snapshots(folder)
    return [p for p in found if SNAPSHOT_PATTERN.fullmatch(os.path.basename(p))]


def default_snapshot_files(ckpt):
    """The snapshots of the run of --ckpt (a run directory or a checkpoint file in one)."""
    run_dir = ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))
    folder = os.path.join(run_dir, ema.SNAPSHOT_DIR)
    paths = snapshots_in(folder)
    if not paths:
        raise ValueError(
            f"--ckpt {ckpt}: no EMA snapshots (ema_<step>.pt) in {folder}: post-hoc EMA needs a "
            "run trained with --config.train.ema=power --config.train.ema_snapshot_every=N "
            "(or name snapshot folders or files with --snapshots)"
        )
    return paths


def snapshot_files(names, ckpt):
    """Snapshot paths from --snapshots (folders and files, each file once), default the run's."""
    if not names:
        return default_snapshot_files(ckpt)
    paths = []
    for name in names:
        if os.path.isdir(name):
            paths += snapshots_in(name)
        elif os.path.isfile(name):
            paths.append(name)
        else:
            raise ValueError(f"--snapshots: {name} is neither a snapshot file nor a folder")
    if not paths:
        raise ValueError(f"--snapshots: no ema_<step>.pt files in {', '.join(names)}")
    unique = {}
    for path in paths:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def check_out_is_no_input(out, ckpt, paths):
    inputs = {os.path.realpath(p) for p in paths}
    if os.path.isfile(ckpt):
        inputs.add(os.path.realpath(ckpt))
    if os.path.realpath(out) in inputs:
        raise ValueError(
            f"--out {out} is one of the input files (--ckpt, --snapshots): write "
            f"the result elsewhere, e.g. {EXAMPLE_OUT}"
        )


def is_snapshot(snap):
    """Whether a loaded file has the layout of ema.PowerEMA.snapshot()."""
    if not isinstance(snap, dict) or not {"step", "gammas", "profiles", "buffer_names"} <= set(
        snap
    ):
        return False
    gammas, profiles = snap["gammas"], snap["profiles"]
    return (
        isinstance(snap["step"], int)
        and snap["step"] >= 1
        and isinstance(gammas, list)
        and all(isinstance(g, (int, float)) for g in gammas)
        and isinstance(profiles, list)
        and len(profiles) == len(gammas) > 0
        and all(isinstance(p, dict) and all(map(torch.is_tensor, p.values())) for p in profiles)
        and isinstance(snap["buffer_names"], list)
    )


def read_snapshot(path):
    """(step, gammas, [{name: shape} per profile]) of a snapshot file; one line if it is none."""
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, foreign or unsafe file
        reason = checkpoints.load_failure(e)
        raise ValueError(f"--snapshots: {path} is not an EMA snapshot ({reason})") from None
    if not is_snapshot(snap):
        raise ValueError(
            f"--snapshots: {path} is not an EMA snapshot (a dict of step, gammas, profiles, "
            "buffer_names written by a train.ema=power run)"
        )
    shapes = [{k: tuple(v.shape) for k, v in p.items()} for p in snap["profiles"]]
    return snap["step"], [float(g) for g in snap["gammas"]], shapes


def check_fit(snapshots, sigma_rel, step):
    """The target step; one line if it lies beyond the snapshots or the fit is too poor."""
    newest = max(s for s, _, _ in snapshots)
    if step is not None and step > newest:
        raise ValueError(
            f"--step {step} is after the newest snapshot (step {newest}): the EMA can only be "
            f"reconstructed at steps up to {newest}"
        )
    target = newest if step is None else step
    steps = [s for s, gammas, _ in snapshots for _ in gammas]
    gammas = [g for _, snap_gammas, _ in snapshots for g in snap_gammas]
    _, error = ema.solve_posthoc_coefficients(
        steps, gammas, target, ema.gamma_of_sigma_rel(sigma_rel)
    )
    if error > MAX_PROFILE_ERROR:
        raise ValueError(
            f"--sigma_rel {sigma_rel} at step {target}: the snapshots fit its profile with "
            f"relative error {error:.2f} > {MAX_PROFILE_ERROR}, so the result would not be that "
            "EMA: choose a --step the snapshots cover, or train with more snapshots "
            "(--config.train.ema_snapshot_every) and relative stds around it "
            "(--config.train.ema_stds)"
        )
    return target


def drop_snapshots_after(paths, snapshots, step, ckpt_path):
    """(paths, snapshots) of the snapshots at or before the base checkpoint's `step`, with a
    note for those left out: written after it (by a run stopped before its next checkpoint),
    they are not of the checkpoint's trajectory as far as it goes. One line if none is left."""
    kept = [(p, s) for p, s in zip(paths, snapshots, strict=True) if s[0] <= step]
    if len(kept) < len(paths):
        print(
            f"note: leaving out {len(paths) - len(kept)} snapshot(s) after step {step} of the base "
            f"checkpoint {ckpt_path}"
        )
    if not kept:
        raise ValueError(
            f"--snapshots: every snapshot is after step {step} of the base checkpoint {ckpt_path}: "
            f"use a later checkpoint of the same run"
        )
    return [p for p, _ in kept], [s for _, s in kept]


def check_same_network(paths, snapshots, ema_weights, ckpt_path):
    shapes = {k: tuple(v.shape) for k, v in ema_weights.items()}
    for path, (_, _, profile_shapes) in zip(paths, snapshots, strict=True):
        if any(profile != shapes for profile in profile_shapes):
            raise ValueError(
                f"--snapshots: {path} holds a different network than --ckpt {ckpt_path} "
                "(other parameter names or shapes): use the snapshots of the checkpoint's run"
            )


# ---------------------------------------------------------------------------------------------
# The work.
# ---------------------------------------------------------------------------------------------
def load_base_checkpoint(ckpt):
    """(state, path) of the newest good checkpoint of a run directory, or of a checkpoint file."""
    try:
        return checkpoints.resolve(ckpt, warn=lambda line: print(line, file=sys.stderr))
    except checkpoints.CheckpointError as e:
        message = str(e)
        raise ValueError(
            message if message.startswith("--ckpt") else f"--ckpt: {message}"
        ) from None


def replace_ema_weights(checkpoint, state_dict, info):
    """The checkpoint-format-specific part: sampling reads checkpoint["ema"]["model"]."""
    checkpoint["ema"] = {**checkpoint["ema"], "model": state_dict}
    checkpoint["posthoc_ema"] = info
    return checkpoint


def run(args):
    check_out_path(args.out, args.force)
    check_numbers(args.sigma_rel, args.step)
    check_ckpt_exists(args.ckpt)
    checkpoint, ckpt_path = load_base_checkpoint(args.ckpt)
    paths = snapshot_files(args.snapshots, args.ckpt)
    check_out_is_no_input(args.out, args.ckpt, paths)
    snapshots = [read_snapshot(p) for p in paths]
    paths, snapshots = drop_snapshots_after(paths, snapshots, checkpoint["step"], ckpt_path)
    check_fit(snapshots, args.sigma_rel, args.step)
    check_same_network(paths, snapshots, checkpoint["ema"]["model"], ckpt_path)
    state_dict, info = ema.posthoc_state_dict(paths, args.sigma_rel, args.step)
    utils.atomic_torch_save(replace_ema_weights(checkpoint, state_dict, info), args.out)
    print(
        f"wrote {args.out}: EMA sigma_rel={info['sigma_rel']} (gamma {info['gamma']:.3f}) at "
        f"step {info['step']} from {info['num_profiles']} snapshot profiles in {len(paths)} "
        f"files, relative profile error {info['relative_profile_error']:.2e}; base checkpoint "
        f"{ckpt_path} (step {checkpoint['step']})"
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line `error: ...` with exit status 1."""

    def error(self, message):
        self.exit(1, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    parser = OneLineParser(
        prog="posthoc_ema.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--ckpt", required=True, help="base checkpoint: a run directory (its newest) or a file"
    )
    parser.add_argument(
        "--sigma_rel",
        type=float,
        required=True,
        help=f"relative std of the EMA, in (0, {ema.MAX_SIGMA_REL:.4f}), e.g. 0.08",
    )
    parser.add_argument("--out", required=True, help="new checkpoint file to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.add_argument(
        "--snapshots", nargs="*", help="snapshot folders or files (default: the run's)"
    )
    parser.add_argument(
        "--step", type=int, default=None, help="step of the EMA (default: the newest snapshot's)"
    )
    return parser.parse_args(argv)


def main(argv=None):
    """Exit status: 0 written (or --help), 1 `error: ...` (one line on stderr, nothing written)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a failed read or write (full disk, permissions)
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
