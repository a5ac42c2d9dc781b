"""Post-hoc EMA (EDM2): a checkpoint whose EMA weights have any relative std, from the power-EMA
snapshots a `train.ema=power` run wrote to <run_dir>/ema_snapshots/.

    python scripts/posthoc_ema.py --ckpt ckpts/digits/ckpt_0001000.pt --sigma_rel 0.08 \
        --out ckpts/digits_posthoc/ckpt_0001000.pt
    python main.py --mode=sample --ckpt=ckpts/digits_posthoc/ckpt_0001000.pt --out=samples

The snapshots default to the `ema_snapshots` folder beside --ckpt (or name a folder or files
with --snapshots). The EMA is reconstructed at the newest snapshot's step unless --step is
given; the least-squares fit of the profiles is in `ema.posthoc_state_dict`. The output is the
base checkpoint with its EMA weights replaced (for --mode=sample / eval / info), plus a
`posthoc_ema` record (sigma_rel, step, coefficients, relative profile error). Write it outside
the run directory: there it would be taken as the newest checkpoint on resume.
"""

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ema  # noqa: E402
import utils  # noqa: E402


def replace_ema_weights(checkpoint, state_dict, info):
    """The checkpoint-format-specific part: sampling reads checkpoint["ema"]["model"]."""
    if not isinstance(checkpoint.get("ema"), dict) or "model" not in checkpoint["ema"]:
        raise ValueError("the checkpoint has no EMA weights (key ema.model)")
    old = checkpoint["ema"]["model"]
    if sorted(old) != sorted(state_dict) or any(old[k].shape != state_dict[k].shape for k in old):
        raise ValueError("the snapshots hold a different network than the checkpoint")
    checkpoint["ema"] = {**checkpoint["ema"], "model": state_dict}
    checkpoint["posthoc_ema"] = info
    return checkpoint


def snapshot_files(names, ckpt_path):
    """Snapshot paths from --snapshots (folders and files), default the folder beside --ckpt."""
    names = names or [os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), ema.SNAPSHOT_DIR)]
    paths = []
    for name in names:
        if os.path.isdir(name):
            paths += ema.list_snapshots(name)
        elif os.path.isfile(name):
            paths.append(name)
        else:
            raise ValueError(f"--snapshots: {name} is neither a snapshot file nor a folder")
    if not paths:
        raise ValueError(f"--snapshots: no ema_*.pt files in {', '.join(names)}")
    return paths


def check_out_path(out, ckpt_path):
    same_dir = os.path.dirname(os.path.abspath(out)) == os.path.dirname(os.path.abspath(ckpt_path))
    if same_dir and re.fullmatch(r"ckpt_\d+\.pt", os.path.basename(out)):
        raise ValueError(
            f"--out {out} would be taken as the run's newest checkpoint: write it to another folder"
        )


def run(args):
    check_out_path(args.out, args.ckpt)
    ema.gamma_of_sigma_rel(args.sigma_rel)  # range check before any loading
    paths = snapshot_files(args.snapshots, args.ckpt)
    try:
        checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = type(e).__name__
        raise ValueError(f"--ckpt {args.ckpt} is not a readable checkpoint ({reason})") from None
    state_dict, info = ema.posthoc_state_dict(paths, args.sigma_rel, args.step)
    utils.atomic_torch_save(replace_ema_weights(checkpoint, state_dict, info), args.out)
    print(
        f"wrote {args.out}: EMA sigma_rel={info['sigma_rel']} (gamma {info['gamma']:.3f}) at "
        f"step {info['step']} from {info['num_profiles']} snapshot profiles, relative profile "
        f"error {info['relative_profile_error']:.2e}"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="base checkpoint file")
    parser.add_argument("--sigma_rel", type=float, required=True, help="relative std, e.g. 0.08")
    parser.add_argument("--out", required=True, help="checkpoint file to write")
    parser.add_argument("--snapshots", nargs="*", help="snapshot folders or files")
    parser.add_argument("--step", type=int, default=None, help="time of the EMA (newest snapshot)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
