"""Checkpoint files: atomic write, safe load, validation, newest-good fallback, run-directory lock,
and the comparison of a run's config with a checkpoint's on resume.

A checkpoint is one `ckpt_<step>.pt` file written by `torch.save` through a temporary file and a
rename. It holds only what `torch.load(weights_only=True)` accepts (tensors, numbers, strings,
lists, tuples, dicts): the config is a JSON string and the RNG states are tensors and lists, so
loading never runs code from the file. Nothing here knows of the training loop or the math.
"""

import fcntl
import glob
import json
import os
import re
import socket
import time
import warnings

import torch

import ema
import utils

CKPT_PATTERN = re.compile(r"ckpt_(\d+)\.pt$")
TMP_PREFIX = ".tmp-"  # utils._atomic_write's temporary files
LOCK_NAME = ".lock"
# Keys every checkpoint holds, with the type each must have.
REQUIRED = {
    "step": int,
    "model": dict,
    "ema": dict,
    "optimizer": dict,
    "scheduler": dict,
    "loader": dict,
    "rng": list,
    "world_size": int,
    "config": str,
    "data_info": dict,
    "metrics": dict,
    "healthy": bool,
}


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint (one line: the path and why)."""


class RunLocked(ValueError):
    """The run directory is used by another live process."""


# ---------------------------------------------------------------------------------------------
# Names.
# ---------------------------------------------------------------------------------------------
def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, f"ckpt_{step:07d}.pt")


def list_checkpoints(run_dir):
    """[(step, path)] of the checkpoints in run_dir, oldest first."""
    found = [
        (int(m.group(1)), p)
        for p in glob.glob(os.path.join(glob.escape(run_dir), "ckpt_*.pt"))
        if (m := CKPT_PATTERN.search(p))
    ]
    return sorted(found)


def find_latest(run_dir):
    """Path of the checkpoint with the highest step in run_dir (not checked), or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------------------------------
# Writing and reading.
# ---------------------------------------------------------------------------------------------
def save(state, path):
    """Write `state` atomically after checking that it loads with weights_only=True types."""
    utils.atomic_torch_save(state, path)


def load(path, map_location="cpu"):
    """The validated state dict of a checkpoint file. Never runs code from the file: raises
    CheckpointError (one line) for anything that is not a complete checkpoint."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles: the line says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign / unsafe files
        raise CheckpointError(f"{path} is not a readable checkpoint ({load_failure(e)})") from None
    validate(state, path)
    return state


def load_failure(error):
    """A short reason from torch.load's (often multi-paragraph) error."""
    text = str(error).strip()
    if "Weights only load failed" in text or "WeightsUnpickler error:" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return f"it holds objects other than tensors and plain data ({found[1]}), never loaded"
        return "not a file torch can load safely, never loaded"
    if isinstance(error, KeyError) or not text:  # a record torch expected is not there
        return "truncated or not a torch file"
    first = text.split("\n")[0].split(". ")[0]
    return f"truncated or not a torch file: {first[:120]}"


def validate(state, path):
    """Raise CheckpointError unless `state` has every key with its type and finite weights."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    if {"profiles", "gammas"} <= set(state) and "model" not in state:
        raise CheckpointError(
            f"{path} is a power-EMA snapshot, not a checkpoint: make a checkpoint of any EMA "
            f"length from the snapshots with scripts/posthoc_ema.py"
        )
    for key, kind in REQUIRED.items():
        if key not in state:
            raise CheckpointError(f"{path} is not a complete checkpoint: key {key!r} is missing")
        if not isinstance(state[key], kind):
            raise CheckpointError(
                f"{path}: key {key!r} is a {type(state[key]).__name__}, expected {kind.__name__}"
            )
    try:
        config = json.loads(state["config"])
    except ValueError:
        raise CheckpointError(f"{path}: the stored config is not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the stored config is a {type(config).__name__}, not a dict")
    info = state["data_info"]
    if not (
        isinstance(info.get("shape"), (list, tuple))
        and all(isinstance(n, int) and n > 0 for n in info["shape"])
        and isinstance(info.get("num_classes"), int)
        and isinstance(info.get("kind"), str)
    ):
        raise CheckpointError(f"{path}: data_info lacks a shape, num_classes or kind")
    if not isinstance(state["ema"].get("model"), dict):
        raise CheckpointError(f"{path}: the EMA holds no weights (key 'model')")
    for where, weights in weight_sets(state):
        if not isinstance(weights, dict):
            raise CheckpointError(f"{path}: {where} is a {type(weights).__name__}, not weights")
        for name, value in weights.items():
            if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
                raise CheckpointError(f"{path}: {where} weight {name!r} is not finite")


def weight_sets(state):
    """[(where, state dict)]: the model's weights, the EMA's, and a power EMA's profiles."""
    profiles = state["ema"].get("profiles") or []
    if not isinstance(profiles, list):
        profiles = [profiles]  # validate reports it as not weights
    return [("model", state["model"]), ("EMA", state["ema"]["model"])] + [
        (f"EMA profile {i}", p) for i, p in enumerate(profiles)
    ]


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_training_state(state, path, model_state, group_shapes):
    """Raise CheckpointError unless the training state of a validated checkpoint fits a trainer
    whose network has the state dict `model_state` and whose optimizer has parameter groups of
    the shapes `group_shapes` (a list of lists of torch.Size): every weight set shape for shape,
    the EMA's update count, the loader's position, one RNG state per rank and AdamW's moments.
    A file that passes restores without error; one that does not is damaged (its config has
    already been compared with the run's), so resume sets it aside like an unreadable one."""

    def fail(why):
        raise CheckpointError(f"{path}: {why}")

    for where, weights in weight_sets(state):
        wrong = sorted(set(model_state) ^ set(weights)) or [
            k for k, v in model_state.items() if getattr(weights[k], "shape", None) != v.shape
        ]
        if wrong:
            fail(f"{where} weights do not fit the network ({', '.join(wrong[:3])})")
    if not is_count(state["step"]) or not is_count(state["ema"].get("num_updates")):
        fail("the step or the EMA's update count is not a whole number >= 0")
    loader = state["loader"]
    if not (is_count(loader.get("epoch")) and is_count(loader.get("batch"))):
        fail("the data loader's position (epoch, batch) is missing")
    if state["world_size"] < 1 or len(state["rng"]) != state["world_size"]:
        fail(f"{len(state['rng'])} RNG states for world size {state['world_size']}")
    groups = state["optimizer"].get("param_groups")
    moments = state["optimizer"].get("state")
    if not isinstance(groups, list) or not isinstance(moments, dict):
        fail("the optimizer state lacks param_groups or state")
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
    if sizes != [len(shapes) for shapes in group_shapes]:
        fail(
            f"the optimizer holds parameter groups of sizes {sizes}, the network's are "
            f"{[len(shapes) for shapes in group_shapes]}"
        )
    for index, shape in enumerate(s for shapes in group_shapes for s in shapes):
        entry = moments.get(index, {})
        if not isinstance(entry, dict) or any(
            getattr(entry.get(k), "shape", shape) != shape for k in ("exp_avg", "exp_avg_sq")
        ):
            fail(f"the optimizer's moments of parameter {index} do not fit the network")


def config_of(state):
    """The checkpoint's config as a plain nested dict."""
    return json.loads(state["config"])


def load_newest_good(run_dir, set_aside=True, warn=print, map_location="cpu", check=None):
    """(state, path) of the newest checkpoint in run_dir that loads and validates, or
    (None, None). A bad one is renamed to `<name>.corrupt` (set_aside) with a one-line warning,
    never deleted; without set_aside it is only reported. `check(state, path)`, when given,
    runs on each loaded state: a CheckpointError from it makes the file bad too; any other
    error stops the search."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            state = load(path, map_location)
            if check is not None:
                check(state, path)
            return state, path
        except CheckpointError as e:
            if set_aside:
                aside = unused_name(path + ".corrupt")
                os.replace(path, aside)
                warn(f"warning: {e}; renamed to {os.path.basename(aside)}, trying an older one")
            else:
                warn(f"warning: {e}; trying an older one")
    return None, None


def unused_name(path):
    """`path`, or `path.1`, `path.2`, ... : the first that does not exist."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def set_aside_snapshots_after(run_dir, step):
    """Rename the EMA snapshots of run_dir written after `step` to `<name>.abandoned` (never
    deleted): when a run resumes from its checkpoint at `step` (or starts at 0), they belong to
    a trajectory it abandons (written before a crash or stop that came ahead of the next
    checkpoint), and post-hoc reconstruction must not mix them with the new ones. Returns the
    new paths."""
    moved = []
    for path in ema.list_snapshots(os.path.join(run_dir, ema.SNAPSHOT_DIR)):
        found = re.search(r"ema_(\d+)\.pt$", path)
        if found and int(found[1]) > step:
            aside = unused_name(path + ".abandoned")
            os.replace(path, aside)
            moved.append(aside)
    return moved


def resolve(path, warn=print, flag="--ckpt"):
    """(state, path) of a --ckpt argument (or of the setting `flag`): a checkpoint file, or the
    newest good checkpoint of a run directory (bad ones reported, not moved: the run may be
    live). One line on failure."""
    if path is None:
        raise ValueError(f"{flag} is required in this mode: a checkpoint file or a run directory")
    if not path:
        raise ValueError(f"{flag}= is empty: give a checkpoint file or a run directory")
    if os.path.isdir(path):
        state, found = load_newest_good(path, set_aside=False, warn=warn)
        if state is None:
            raise CheckpointError(f"{flag}={path}: no loadable ckpt_*.pt in this directory")
        return state, found
    if os.path.islink(path) and not os.path.exists(path):
        raise CheckpointError(f"{flag}={path}: a symbolic link to nothing (broken or a loop)")
    if not os.path.exists(path):
        raise CheckpointError(f"{flag}={path}: no such file")
    return load(path), path


def remove_stale_temporaries(run_dir):
    """Delete half-written `.tmp-*` files left by a process that died while saving (call with
    the run lock held, so no live writer owns them). Returns their names."""
    stale = []
    for folder in (run_dir, os.path.join(run_dir, ema.SNAPSHOT_DIR)):
        stale += sorted(glob.glob(os.path.join(glob.escape(folder), TMP_PREFIX + "*")))
    for path in stale:
        os.remove(path)
    return [os.path.relpath(p, run_dir) for p in stale]


# ---------------------------------------------------------------------------------------------
# One live run per run directory.
# ---------------------------------------------------------------------------------------------
class RunLock:
    """An exclusive flock on `<run_dir>/.lock`, which holds "pid@host since time" of the owner.

    The OS releases it when the process exits, however it dies, so a stale lock never blocks.
    """

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.file = None

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise RunLocked(
                f"run directory {os.path.dirname(self.path)} is in use by {owner}: wait for it "
                f"to finish or stop it, or use another --config.name"
            ) from None
        f.seek(0)
        f.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"pid {os.getpid()} on {socket.gethostname()} (since {started})\n")
        f.flush()
        self.file = f
        return self

    def release(self):
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


# ---------------------------------------------------------------------------------------------
# Config changes on resume.
# ---------------------------------------------------------------------------------------------
# What may change between a checkpoint and its resume: cadence, sampling, evaluation, logging,
# the length and learning rate of the run, where things live. Everything else (model, data,
# process, prediction, time sampler, batch, seed, optimizer, precision, and any key added later)
# defines what is being trained and may not change.
MUTABLE_KEYS = (
    "name",
    "workdir",
    "data.root",
    "data.num_workers",
    "train.steps",
    "train.lr",
    "train.log_every",
    "train.sample_every",
    "train.save_every",
    "train.eval_every",
    "train.keep_ckpts",
    "train.max_bad_steps",
    "train.init_from",
    "train.compile",
    "train.ema_snapshot_every",
)
MUTABLE_PREFIXES = ("sample.", "eval.", "logging.")


def is_mutable(key):
    return key in MUTABLE_KEYS or key.startswith(MUTABLE_PREFIXES)


def flatten(tree, prefix=""):
    """{dotted key: value} of a nested dict, tuples as lists (as after a JSON round trip)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return out


def config_changes(old, new):
    """(mutable, immutable): sorted lists of (key, old value, new value) where the nested dicts
    `old` (the checkpoint's) and `new` differ. A key the checkpoint lacks (added to config.py
    after it was written) is not a change; a key the new config lacks is."""
    old_flat, new_flat = flatten(old), flatten(new)
    missing = object()
    changed = [
        (key, old_flat.get(key, missing), new_flat.get(key, missing))
        for key in sorted(set(old_flat) | set(new_flat))
        if key in old_flat and old_flat[key] != new_flat.get(key, missing)
    ]
    changed = [(k, a, None if b is missing else b) for k, a, b in changed]
    mutable = [c for c in changed if is_mutable(c[0])]
    immutable = [c for c in changed if not is_mutable(c[0])]
    return mutable, immutable


def describe_changes(changes):
    return ", ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in changes)
