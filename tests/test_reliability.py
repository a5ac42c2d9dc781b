"""Cluster-grade reliability: stop signals, a dead launcher, SLURM requeue, trustworthy
checkpoints, non-finite and divergent steps, resuming with a changed config, the run lock."""

import errno
import io
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY_UNET, run_main, tiny_config

import checkpoints
import main
import trainer as trainer_lib
import utils
from logging_utils import read_metrics
from optimizers import lr_multiplier
from trainer import DiffusionTrainer, TrainingDiverged

SINGLE = utils.DistInfo()
TINY_FLAGS = [f"--config.{k}={v}".replace(" ", "") for k, v in TINY_UNET.items()]


def digits_flags(workdir, steps, **extra):
    """Command-line flags equal to tiny_config('digits', workdir, train__steps=steps, ...)."""
    values = {
        "workdir": workdir,
        "logging.wandb": "disabled",
        "train.steps": steps,
        "train.batch_size": 16,
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "train.sample_every": 0,
        "train.save_every": 1000,
        "sample.num": 12,
        "sample.batch_size": 8,
        "sample.steps": 3,
        "data.num_points": 512,
        "data.num_workers": 0,
        **extra,
    }
    return TINY_FLAGS + [f"--config.{k}={v}" for k, v in values.items()]


def start(cmd, env=None, output=subprocess.PIPE):
    """Popen of `cmd` in the repo root; `env` adds variables (None: unset)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=output, stderr=output, text=True, env=env)


def wait_for_metrics(run_dir, proc, timeout=120):
    """Block until the run has logged its first step (the loop is running)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while not (os.path.exists(path) and os.path.getsize(path)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run never logged"
        time.sleep(0.05)


def stop_line(text):
    lines = [line for line in text.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, text
    return lines[0]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), key
    for index, fields in a["optimizer"]["state"].items():
        for field, value in fields.items():
            assert torch.equal(value, b["optimizer"]["state"][index][field]), (index, field)


# ---------------------------------------------------------------------------------------------
# Stop signals and a dead launcher.
# ---------------------------------------------------------------------------------------------
def test_sigterm_checkpoints_and_resume_is_bit_identical(tmp_path):
    """SIGTERM to `python main.py` mid-run: one line, exit 0, a checkpoint at the step it
    stopped; rerunning the same command ends exactly where an uninterrupted run ends."""
    steps = 30
    flags = digits_flags(tmp_path / "b", steps)
    proc = start([sys.executable, "main.py", *flags])
    run_dir = tmp_path / "b" / "digits"
    wait_for_metrics(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    line = stop_line(out)
    stopped_at = int(line.split(" at step ")[1].split(";")[0])
    assert 1 <= stopped_at < steps
    done = read_metrics(run_dir)[-1]["step"]
    assert stopped_at - done <= 1  # at most the step in flight when the signal came
    path = checkpoints.checkpoint_path(str(run_dir), stopped_at)
    assert line == (
        f"stopped by SIGTERM at step {stopped_at}; checkpoint {path}; rerun the same command "
        f"to resume"
    )
    assert "Traceback" not in err
    resumed = start([sys.executable, "main.py", *flags])
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resuming from {path} at step {stopped_at}" in out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): same float sums
    try:
        config = tiny_config("digits", tmp_path / "a", train__steps=steps, train__save_every=1000)
        whole = main.train(config, {}, SINGLE)
    finally:
        torch.set_num_threads(threads)
    a = load(checkpoints.find_latest(whole.run_dir))
    b = load(checkpoints.find_latest(str(run_dir)))
    assert a["step"] == b["step"] == steps
    assert_same_weights(a, b)
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, steps + 1))


WORKER = """
import os, signal, sys, time
def finish(*args):  # as main.py does at the end of its mode (utils.mark_worker)
    open(os.path.join(os.environ["INTERPOLANTS_WORKER_STATUS_DIR"], "0.done"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, {handler})
open(sys.argv[1], "w").close()
time.sleep(60)
"""
WORKER_HANDLERS = {
    "finishes": "finish",  # checkpoints and says it is done: status 0, nothing said
    "dies": "lambda *args: sys.exit(0)",  # ends before its work is done, silently
    "stubborn": "signal.SIG_IGN",  # still running after the shutdown timeout: killed
}


@pytest.mark.parametrize("worker", list(WORKER_HANDLERS))
def test_the_launcher_says_when_it_killed_workers_after_the_shutdown_timeout(tmp_path, worker):
    """A stop signal to the launcher is forwarded; a worker that finishes within the shutdown
    timeout ends the launch with status 0 and no line of the launcher's; one that ends without
    finishing (killed at start-up, a sampler without a handler) gives 128 + 15 and one line;
    one still running after the timeout (a long eval, a hung collective) is killed, and the
    launcher says so in one error line with status 137."""
    handler = WORKER_HANDLERS[worker]
    stubborn = worker == "stubborn"
    script, ready = tmp_path / "worker.py", tmp_path / "ready"
    script.write_text(WORKER.format(handler=handler))
    torchrun = ["--standalone", "--nproc-per-node=1", "--signals-to-handle=SIGTERM"]
    cmd = [sys.executable, "utils.py", *torchrun, "--shutdown-timeout=1", str(script), str(ready)]
    proc = start(cmd)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if stubborn:
        assert proc.returncode == 137, err
        assert errors == [
            "error: 1 worker(s) still running 1 s after SIGTERM were killed (SHUTDOWN_TIMEOUT); "
            "rerun the same command to resume from the newest checkpoint"
        ]
    elif worker == "dies":
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert errors == [
            "error: SIGTERM stopped 1 of 1 worker(s) before their work was done (sample / eval: "
            "nothing written; training: nothing lost, it resumes from its newest checkpoint): "
            "rerun the same command"
        ]
    else:
        assert proc.returncode == 0 and errors == [], err
    assert "Traceback" not in err


def test_a_stop_signal_while_the_trainer_is_built_stops_after_one_step(
    tmp_path, monkeypatch, capsys
):
    """SIGTERM while the data and model are still being built (before the loop's own handler):
    recorded, not fatal; the run takes one step, checkpoints and says so in its one line. That
    step is the last, so its samples are missing until the rerun writes them."""
    build = main.build_trainer

    def signalled_build(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return build(*args)

    def unhandled(signum, frame):
        raise AssertionError("the SIGTERM reached the previous handler")

    monkeypatch.setattr(main, "build_trainer", signalled_build)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        trainer = main.train(tiny_config("digits", tmp_path, train__steps=1), {}, SINGLE)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    path = checkpoints.checkpoint_path(trainer.run_dir, 1)
    assert trainer.step == 1 and trainer.stopped == ("SIGTERM", path)
    assert load(path)["step"] == 1
    assert stop_line(capsys.readouterr().out).startswith("stopped by SIGTERM at step 1; ")
    # At the last step the stop comes before that step's samples; the rerun, with no step
    # left, writes them, so that a finished run always ends with its final samples.
    final = os.path.join(trainer.run_dir, "samples_0000001.png")
    assert not os.path.exists(final)
    monkeypatch.setattr(main, "build_trainer", build)
    rerun = main.train(tiny_config("digits", tmp_path, train__steps=1), {}, SINGLE)
    assert rerun.step == 1 and os.path.exists(final)
    out = capsys.readouterr().out
    assert (
        "nothing to do: step 1 >= train.steps=1" in out
        and f"writing the final samples {final}" in out
    )


def test_kill_9_of_the_launcher_stops_the_workers_with_a_checkpoint(tmp_path):
    """`kill -9` of run.sh's launcher (2 workers): the workers get SIGTERM from the kernel
    (parent-death signal), agree, checkpoint and exit instead of training on orphaned."""
    flags = digits_flags(tmp_path, 100_000)
    log = open(tmp_path / "output.txt", "w")  # read by nobody: never a full pipe
    proc = start(["sh", "run.sh", *flags], env={"NPROC": "2"}, output=log)
    wait_for_metrics(tmp_path / "digits", proc)
    proc.kill()
    proc.wait()
    ckpt = None
    deadline = time.time() + 120
    while ckpt is None and time.time() < deadline:  # the orphans checkpoint, then exit
        ckpt = checkpoints.find_latest(str(tmp_path / "digits"))
        time.sleep(0.2)
    assert ckpt is not None, "the workers did not checkpoint"
    lock = checkpoints.RunLock(str(tmp_path / "digits"))
    while time.time() < deadline:  # ... and exit: the run lock is free again
        try:
            lock.acquire()
            break
        except checkpoints.RunLocked:
            time.sleep(0.2)
    else:
        pytest.fail("the orphaned workers kept running")
    lock.release()
    state = load(ckpt)
    assert state["world_size"] == 2 and state["step"] >= 1
    assert state["step"] - read_metrics(tmp_path / "digits")[-1]["step"] <= 1


def test_stop_request_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR2)
    stop = utils.StopRequest().install()
    assert not stop.requested()
    os.kill(os.getpid(), signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested() and stop.reason == "SIGUSR2"
    stop.restore()
    assert signal.getsignal(signal.SIGUSR2) is before
    orphan = utils.StopRequest()
    orphan.parent_pid = -1  # as if the launcher had died (a new parent was adopted)
    assert not orphan.requested() and orphan.requested(watch_parent=True)
    assert orphan.reason == "the launcher's exit"


def test_run_sh_user_error_is_one_line():
    result = subprocess.run(
        ["sh", "run.sh", "--config.train.stepz=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "NPROC": "1"},
    )
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: config key 'train.stepz' does not exist; valid keys")


# ---------------------------------------------------------------------------------------------
# SLURM: rendezvous from the environment; signal -> checkpoint -> requeue -> resume.
# ---------------------------------------------------------------------------------------------
FAKE_SCONTROL = """#!/bin/sh
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' $FAKE_HOSTS; exit 0; fi
if [ "$1" = requeue ]; then echo "$2" >> "$FAKE_LOG/requeued"; exit 0; fi
exit 1
"""
# srun: drop the options, run the command once per node (SLURM_NODEID), forward USR1 / TERM.
FAKE_SRUN = """#!/bin/bash
echo "$@" > "$FAKE_LOG/srun_args"
while [ "${1#--}" != "$1" ]; do shift; done
pids=""
for ((i = 0; i < ${SLURM_NNODES:-1}; i++)); do SLURM_NODEID=$i "$@" & pids="$pids $!"; done
trap 'kill -USR1 $pids' USR1
trap 'kill -TERM $pids' TERM
status=0
for p in $pids; do
  while :; do wait $p; s=$?; kill -0 $p 2>/dev/null || break; done
  [ $s -ne 0 ] && status=$s
done
exit $status
"""
# sh, for the rendezvous test only: records what run.sh would have been started with.
FAKE_SH = """#!/bin/bash
echo "NODE_RANK=$NODE_RANK MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT NNODES=$NNODES $*" \\
  > "$FAKE_LOG/task.$NODE_RANK"
"""


def fake_slurm(tmp_path, with_sh=False, nodes=2, hosts="gpu-a17 gpu-a18", port=None):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    shims = {"scontrol": FAKE_SCONTROL, "srun": FAKE_SRUN, **({"sh": FAKE_SH} if with_sh else {})}
    for name, text in shims.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_HOSTS": hosts,
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_SUBMIT_DIR": ROOT,
    }
    if port:
        env["MASTER_PORT"] = str(port)
    return env, log


def test_slurm_script_derives_the_rendezvous(tmp_path):
    text = open(os.path.join(ROOT, "scripts", "slurm.sbatch")).read()
    for line in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1"):
        assert line in text
    env, log = fake_slurm(tmp_path, with_sh=True)
    env = {**os.environ, **env}
    env.pop("MASTER_PORT", None)
    result = subprocess.run(
        ["bash", "scripts/slurm.sbatch", "--config.train.steps=5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    run_sh = os.path.join(ROOT, "run.sh")
    for rank in (0, 1):
        assert (log / f"task.{rank}").read_text().split() == [
            f"NODE_RANK={rank}",
            "MASTER_ADDR=gpu-a17",
            f"MASTER_PORT={20000 + 4242 % 20000}",
            "NNODES=2",
            run_sh,
            "--config.train.steps=5",
        ]
    assert "--ntasks-per-node=1" in (log / "srun_args").read_text()
    assert not (log / "requeued").exists()  # finished without a signal: no requeue


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refusal_on_rank_0_is_one_line_on_every_rank_with_two_processes(tmp_path):
    """Rank 0 alone locks the run directory and picks the checkpoint; when it refuses (here:
    every checkpoint corrupt), rank 1 raises the same error instead of waiting in a
    collective for a rank that has exited: one error line, status 1, no traceback. (Without
    OMP_NUM_THREADS the launcher shares the cores out itself, without torchrun's banner.)"""
    run_dir = tmp_path / "digits"
    run_dir.mkdir()
    (run_dir / "ckpt_0000004.pt").write_bytes(b"not a checkpoint")
    env = {"NPROC": "2", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": None}
    proc = start(["sh", "run.sh", *digits_flags(tmp_path, 4)], env=env)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    assert err.splitlines() == [
        f"error: no checkpoint in {run_dir} could be loaded (all renamed to *.corrupt): move a "
        "good one back, or start a new run with --config.name=NEW"
    ], err[-2000:]
    assert (run_dir / "ckpt_0000004.pt.corrupt").exists()


def test_workers_on_a_node_share_its_cores():
    assert [utils.threads_per_worker(n, cores=16) for n in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    assert utils.threads_per_worker(1) == len(os.sched_getaffinity(0))


def test_slurm_signal_checkpoint_requeue_resume(tmp_path):
    """The batch shell gets SIGUSR1 (the --signal early warning): the 2 workers checkpoint, the
    job requeues itself, and the requeued job (the same command) resumes and finishes."""
    env, log = fake_slurm(tmp_path, nodes=1, hosts="127.0.0.1", port=free_port())
    env = {**env, "NPROC": "2"}
    steps = 40
    cmd = ["bash", "scripts/slurm.sbatch", *digits_flags(tmp_path / "runs", steps)]
    proc = start(cmd, env=env)
    run_dir = tmp_path / "runs" / "digits"
    wait_for_metrics(run_dir, proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-2000:] + err  # all of stderr: a worker's fatal-error dump
    line = stop_line(out)
    assert line.startswith("stopped by SIGUSR1 at step ")
    assert (log / "requeued").read_text().split() == ["4242"]
    stopped_at = load(checkpoints.find_latest(str(run_dir)))["step"]
    assert 1 <= stopped_at < steps
    requeued = start(cmd, env={**env, "SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(free_port())})
    out, err = requeued.communicate(timeout=240)
    assert requeued.returncode == 0, out[-2000:] + err
    assert f"at step {stopped_at}" in out and "resuming from" in out
    assert load(checkpoints.find_latest(str(run_dir)))["step"] == steps
    assert (log / "requeued").read_text().split() == ["4242"]  # not requeued again
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, steps + 1))


# ---------------------------------------------------------------------------------------------
# Checkpoints: safe loading, corrupt files, stale temporaries, the lock.
# ---------------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this would create a marker file: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda s: s.update(config="[]"), "the stored config is a list, not a dict"),
        (lambda s: s.update(data_info={}), "data_info lacks a shape, num_classes or kind"),
        (lambda s: s.update(ema={}), "the EMA holds no weights (key 'model')"),
        (
            lambda s: s["ema"]["model"].update(extra=torch.zeros(2)),
            "its weights do not fit this model (unexpected: extra); its weights and its stored "
            "config disagree (an edited or mixed file)",
        ),
    ],
)
def test_a_damaged_checkpoint_is_one_line_for_sampling(tmp_path, damage, expected):
    """Keys that load but hold the wrong things (an edited or mixed checkpoint) are refused with
    one line naming the file, for sampling as for resuming; no AttributeError, KeyError or
    load_state_dict traceback."""
    trainer = main.train(tiny_config("checkerboard", tmp_path, train__steps=1), {}, SINGLE)
    state = load(checkpoints.find_latest(trainer.run_dir))
    damage(state)
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        main.load_for_sampling({}, SINGLE, ckpt=str(path), evaluating=False)
    assert str(info.value).startswith(f"{path}") and str(info.value).endswith(expected)


def test_crafted_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"step": 1, "model": RunsCode(str(marker))}, evil)
    with pytest.raises(checkpoints.CheckpointError, match="is not a readable checkpoint"):
        checkpoints.load(str(evil))
    assert not marker.exists()
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"step": 1}, protocol=4))  # torch warns about protocol 4
    reasons = {
        evil: "it holds objects other than tensors and plain data (io.open), never loaded",
        text: "not a file torch can load safely, never loaded",
        plain: "not a file torch can load safely, never loaded",
    }
    for path, reason in reasons.items():
        result = run_main("--mode=info", f"--ckpt={path}")
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert result.returncode == 1
        assert lines == [f"error: {path} is not a readable checkpoint ({reason})"]
    assert not marker.exists()


def corrupt(path, kind):
    """Damage a checkpoint file in one of the ways a crash or a full disk leaves it."""
    data = open(path, "rb").read()
    if kind == "truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "garbage":
        open(path, "wb").write(b"this is not a checkpoint" * 10)
    elif kind == "missing keys":
        state = torch.load(path, weights_only=True)
        del state["optimizer"]
        torch.save(state, path)
    elif kind == "nan weights":
        state = torch.load(path, weights_only=True)
        next(iter(state["model"].values())).fill_(math.nan)
        torch.save(state, path)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """The run directory of a 4-step tiny digits run (checkpoints at steps 2 and 4)."""
    workdir = tmp_path_factory.mktemp("four_steps")
    return Path(main.train(tiny_config("digits", workdir, train__steps=4), {}, SINGLE).run_dir)


def test_checkpoint_paths_that_are_not_checkpoints_get_one_line(tmp_path):
    """--ckpt= empty, a symbolic link loop, a directory named like a checkpoint inside a run,
    and a power-EMA snapshot: each names what it is (before, 'no such file' or a missing key)."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "ckpt_0000005.pt").mkdir()
    snapshot = tmp_path / "ema_0000004.pt"
    torch.save({"step": 4, "stds": [0.1], "gammas": [6.9], "profiles": [{}]}, snapshot)
    cases = [
        ("", "--ckpt= is empty: give a checkpoint file or a run directory"),
        (tmp_path / "loop", f"--ckpt={tmp_path / 'loop'}: a symbolic link to nothing"),
        (snapshot, f"{snapshot} is a power-EMA snapshot, not a checkpoint: make a checkpoint"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError) as info:
            checkpoints.resolve(str(path))
        assert str(info.value).startswith(message), info.value
    warnings = []  # a run directory whose only "checkpoint" is a directory
    with pytest.raises(ValueError) as info:
        checkpoints.resolve(str(tmp_path), warn=warnings.append)
    assert str(info.value) == f"--ckpt={tmp_path}: no loadable ckpt_*.pt in this directory"
    assert f"{tmp_path / 'ckpt_0000005.pt'} is a directory, not a checkpoint file" in warnings[0]


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("truncated", "is not a readable checkpoint"),
        ("empty", "is empty, not a checkpoint"),
        ("garbage", "is not a readable checkpoint"),
        ("missing keys", "key 'optimizer' is missing"),
        ("nan weights", "is not finite"),
    ],
)
def test_corrupt_newest_checkpoint_is_set_aside(tmp_path, four_steps, kind, reason):
    run_dir = tmp_path / "runs" / "digits"
    run_dir.mkdir(parents=True)
    for name in ("ckpt_0000002.pt", "ckpt_0000004.pt"):
        shutil.copy(four_steps / name, run_dir / name)
    corrupt(run_dir / "ckpt_0000004.pt", kind)
    (run_dir / ".tmp-abc123ckpt_0000006.pt").write_bytes(b"half written")
    (run_dir / "ema_snapshots").mkdir()
    (run_dir / "ema_snapshots" / ".tmp-x1ema_0000006.pt").write_bytes(b"half written")
    messages = []
    state, path = checkpoints.load_newest_good(str(run_dir), warn=messages.append)
    assert state["step"] == 2 and path == str(run_dir / "ckpt_0000002.pt")
    assert len(messages) == 1 and reason in messages[0] and "ckpt_0000004.pt.corrupt" in messages[0]
    assert sorted(os.listdir(run_dir)) == [
        ".tmp-abc123ckpt_0000006.pt",
        "ckpt_0000002.pt",
        "ckpt_0000004.pt.corrupt",
        "ema_snapshots",
    ]
    resumed = main.build_trainer(tiny_config("digits", tmp_path / "runs", train__steps=4), SINGLE)
    assert resumed.step == 2
    assert ".tmp-abc123ckpt_0000006.pt" not in os.listdir(run_dir)  # stale temporaries removed
    assert os.listdir(run_dir / "ema_snapshots") == []
    resumed.run_lock.release()


def first_tensor(weights):
    return next(v for v in weights.values() if torch.is_tensor(v) and v.is_floating_point())


DAMAGED_STATES = {  # kind: (damage to a loaded state, the reason in the warning)
    "nan EMA weights": (
        lambda s: first_tensor(s["ema"]["model"]).fill_(math.nan),
        "EMA weight '{}' is not finite",
    ),
    "a reshaped weight": (
        lambda s: s["model"].update({k: v[:1] for k, v in list(s["model"].items())[:1]}),
        "model weights do not fit the network",
    ),
    "no EMA update count": (
        lambda s: s["ema"].pop("num_updates"),
        "the step or the EMA's update count is not a whole number >= 0",
    ),
    "no loader position": (
        lambda s: s["loader"].pop("epoch"),
        "the data loader's position (epoch, batch) is missing",
    ),
    "no RNG state": (lambda s: s["rng"].clear(), "0 RNG states for world size 1"),
    "wrong optimizer moments": (
        lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
        "the optimizer's moments of parameter 0 do not fit the network",
    ),
    "a missing parameter group": (
        lambda s: s["optimizer"]["param_groups"].pop(),
        "the optimizer holds parameter groups of sizes",
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGED_STATES))
def test_a_newest_checkpoint_that_loads_but_does_not_fit_is_set_aside(tmp_path, four_steps, kind):
    """A file that torch loads and whose config matches, but whose contents cannot restore
    this run (an edited, mixed or bit-damaged file), is set aside like an unreadable one and the
    run resumes from the older checkpoint, instead of a traceback from load_state_dict. No
    checkpoint with a non-finite EMA is ever resumed from."""
    damage, reason = DAMAGED_STATES[kind]
    run_dir = tmp_path / "runs" / "digits"
    run_dir.mkdir(parents=True)
    for name in ("ckpt_0000002.pt", "ckpt_0000004.pt"):
        shutil.copy(four_steps / name, run_dir / name)
    state = load(run_dir / "ckpt_0000004.pt")
    damage(state)
    torch.save(state, run_dir / "ckpt_0000004.pt")
    reason = reason.format(
        next(k for k, v in state["ema"]["model"].items() if v.is_floating_point())
    )
    messages = []
    with mock.patch("builtins.print", messages.append):
        resumed = main.build_trainer(
            tiny_config("digits", tmp_path / "runs", train__steps=4), SINGLE
        )
    resumed.run_lock.release()
    assert resumed.step == 2
    warning = next(m for m in messages if str(m).startswith("warning:"))
    assert reason in warning and "renamed to ckpt_0000004.pt.corrupt" in warning, warning
    assert {"ckpt_0000002.pt", "ckpt_0000004.pt.corrupt"} <= set(os.listdir(run_dir))
    assert not any(name.startswith("ckpt_0000004.pt.corrupt.") for name in os.listdir(run_dir))


def test_a_checkpoint_that_fails_to_restore_is_one_line(tmp_path, four_steps, monkeypatch):
    """Whatever still slips past the checks stops with one line naming the file."""
    run_dir = tmp_path / "runs" / "digits"
    run_dir.mkdir(parents=True)
    shutil.copy(four_steps / "ckpt_0000004.pt", run_dir / "ckpt_0000004.pt")

    def broken_load(self, state, path=None):
        raise KeyError("epoch")

    monkeypatch.setattr(DiffusionTrainer, "load", broken_load)
    with pytest.raises(main.RankError) as info:  # printed by every rank: it may be this one's
        main.build_trainer(tiny_config("digits", tmp_path / "runs", train__steps=4), SINGLE)
    assert str(info.value) == (
        f"{run_dir / 'ckpt_0000004.pt'} could not be restored ('epoch'): move it out of the run "
        f"directory to resume from an older checkpoint"
    )
    checkpoints.RunLock(str(run_dir)).acquire().release()  # no lock left behind

    def out_of_memory(self, state, path=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DiffusionTrainer, "load", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # main's memory line, not 'move it out'
        main.build_trainer(tiny_config("digits", tmp_path / "runs", train__steps=4), SINGLE)
    checkpoints.RunLock(str(run_dir)).acquire().release()


def test_no_loadable_checkpoint_stops_instead_of_restarting(tmp_path):
    trainer = main.train(tiny_config("digits", tmp_path, train__steps=2), {}, SINGLE)
    corrupt(os.path.join(trainer.run_dir, "ckpt_0000002.pt"), "garbage")
    with pytest.raises(ValueError, match="no checkpoint in .* could be loaded"):
        main.train(tiny_config("digits", tmp_path, train__steps=2), {}, SINGLE)
    assert os.path.exists(os.path.join(trainer.run_dir, "ckpt_0000002.pt.corrupt"))
    assert read_metrics(trainer.run_dir)  # the metrics of the run were not truncated


def test_second_launch_on_a_run_directory_stops_at_once(tmp_path):
    run_dir = tmp_path / "digits"
    lock = checkpoints.RunLock(str(run_dir)).acquire()
    result = run_main(*digits_flags(tmp_path, 2))
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: run directory {run_dir} is in use by pid {os.getpid()} on")
    assert os.listdir(run_dir) == [".lock"]  # nothing written
    lock.release()
    trainer = main.train(tiny_config("digits", tmp_path, train__steps=1), {}, SINGLE)
    assert trainer.step == 1  # the lock is free once its holder is done


# ---------------------------------------------------------------------------------------------
# Non-finite and divergent steps.
# ---------------------------------------------------------------------------------------------
def scale_loss_at(monkeypatch, steps, factor):
    """Multiply the loss by `factor` (nan, 1e27, ...) on the given 0-based steps."""
    original = DiffusionTrainer.loss

    def loss(self, *args):
        value = original(self, *args)
        return value * factor if self.step in steps else value

    monkeypatch.setattr(DiffusionTrainer, "loss", loss)


def test_a_checkpoint_precedes_periodic_sampling_and_eval_and_resumes_exactly(
    tmp_path, monkeypatch
):
    """Sampling and eval can outlast a preemption's grace period, so the step they follow is
    saved first (even off the save_every grid); resuming from that checkpoint (with dropout:
    the global RNG) ends exactly where a run that went on after sampling ends."""
    config = dict(train__steps=4, train__save_every=100, train__sample_every=3, model__dropout=0.2)
    seen = []
    original = DiffusionTrainer.save_samples

    def save_samples(self):
        seen.append(
            (self.step, os.path.exists(checkpoints.checkpoint_path(self.run_dir, self.step)))
        )
        return original(self)

    monkeypatch.setattr(DiffusionTrainer, "save_samples", save_samples)
    whole = main.train(tiny_config("digits", tmp_path / "a", **config), {}, SINGLE)
    assert seen == [(3, True), (4, True)]
    main.train(tiny_config("digits", tmp_path / "b", **config), {}, SINGLE, until=3)
    run_dir = os.path.join(tmp_path, "b", "digits")
    assert [step for step, _ in checkpoints.list_checkpoints(run_dir)] == [3]
    resumed = main.train(tiny_config("digits", tmp_path / "b", **config), {}, SINGLE)
    assert resumed.step == whole.step == 4
    a = load(checkpoints.checkpoint_path(whole.run_dir, 4))
    assert_same_weights(a, load(checkpoints.checkpoint_path(run_dir, 4)))


def test_a_metrics_line_cut_off_by_a_crash_is_dropped_with_a_warning_on_resume(tmp_path, capsys):
    """A run killed (or out of disk) while appending to metrics.jsonl leaves a torn last line;
    the rerun says so in one line, drops it (and any line that is not a record), resumes, and
    leaves a file whose every line is a record, one per step."""
    config = dict(train__steps=4, train__save_every=2)
    main.train(tiny_config("checkerboard", tmp_path, **config), {}, SINGLE, until=3)
    path = os.path.join(tmp_path, "checkerboard", "metrics.jsonl")
    with open(path, "a") as f:
        f.write('[1, 2]\n{"step": 4, "time": 17')  # a non-record, then a torn append
    capsys.readouterr()
    trainer = main.train(tiny_config("checkerboard", tmp_path, **config), {}, SINGLE)
    out = capsys.readouterr().out
    assert f"warning: {path}: dropped 2 unreadable line(s), cut off while being written" in out
    assert "resuming from" in out and "at step 2" in out
    with open(path) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    assert trainer.step == 4


def test_non_finite_steps_change_nothing_and_are_counted(tmp_path, monkeypatch, capsys):
    config = dict(train__steps=4, train__save_every=2, train__keep_ckpts=1)
    main.train(tiny_config("digits", tmp_path, **config), {}, SINGLE, until=2)
    good = load(os.path.join(tmp_path, "digits", "ckpt_0000002.pt"))
    scale_loss_at(monkeypatch, {2, 3}, math.nan)
    trainer = main.train(tiny_config("digits", tmp_path, **config), {}, SINGLE)
    after = load(os.path.join(trainer.run_dir, "ckpt_0000004.pt"))
    assert_same_weights(good, after)  # weights, EMA and Adam moments untouched
    assert after["ema"]["num_updates"] == 4 and not after["healthy"]
    steps = {s["step"]: s for s in good["optimizer"]["state"].values()}
    assert all(s["step"].item() == 2 for s in after["optimizer"]["state"].values()), steps
    records = read_metrics(trainer.run_dir)
    assert [(r["step"], r["loss"], r["skipped_steps"]) for r in records[2:]] == [
        (3, None, 1),
        (4, None, 2),
    ]
    assert "warning: 1 non-finite step(s) between steps 3 and 3 skipped" in capsys.readouterr().out
    # keep_ckpts=1, but the newest healthy checkpoint is protected
    assert sorted(f for f in os.listdir(trainer.run_dir) if f.startswith("ckpt_")) == [
        "ckpt_0000002.pt",
        "ckpt_0000004.pt",
    ]


def test_too_many_consecutive_bad_steps_stop_the_run(tmp_path, monkeypatch):
    scale_loss_at(monkeypatch, set(range(2, 100)), math.inf)
    config = tiny_config("digits", tmp_path, train__steps=20, train__max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match="at step 5: 3 consecutive non-finite steps"):
        main.train(config, {}, SINGLE)
    state = load(os.path.join(tmp_path, "digits", "ckpt_0000002.pt"))
    assert state["healthy"] and state["step"] == 2


def test_exploding_loss_never_replaces_the_last_healthy_checkpoint(tmp_path, monkeypatch, capsys):
    history = trainer_lib.DIVERGENCE_MIN_HISTORY
    scale_loss_at(monkeypatch, set(range(history, 100)), 1e12)  # finite loss and grad norm
    config = tiny_config(
        "digits", tmp_path, train__steps=history + 3, train__save_every=1, train__keep_ckpts=1
    )
    trainer = main.train(config, {}, SINGLE)
    losses = [r["loss"] for r in read_metrics(trainer.run_dir)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] > 1e10
    names = sorted(f for f in os.listdir(trainer.run_dir) if f.startswith("ckpt_"))
    assert names == [f"ckpt_{history:07d}.pt", f"ckpt_{history + 3:07d}.pt"]
    assert load(os.path.join(trainer.run_dir, names[0]))["healthy"]
    assert not load(os.path.join(trainer.run_dir, names[1]))["healthy"]
    assert capsys.readouterr().out.count("the run looks diverged") == 1


# ---------------------------------------------------------------------------------------------
# Resuming with a changed config; starting from another run's weights.
# ---------------------------------------------------------------------------------------------
def test_changing_what_is_trained_stops_with_one_line(tmp_path):
    main.train(tiny_config("checkerboard", tmp_path, train__steps=2), {}, SINGLE)
    changed = tiny_config("checkerboard", tmp_path, train__steps=2, model__hidden=64, seed=3)
    with pytest.raises(ValueError) as info:
        main.train(changed, {}, SINGLE)
    message = str(info.value)
    assert "model.hidden: 32 -> 64" in message and "seed: 0 -> 3" in message
    assert "--config.name=NEW" in message and "\n" not in message


def test_immutable_by_default():
    """A key nobody listed (e.g. added to config.py later) may not change on resume."""
    old = {"train": {"steps": 4, "lr": 1e-3, "new_knob": 1}, "sample": {"num": 2}}
    new = {"train": {"steps": 8, "lr": 1e-3, "new_knob": 2}, "sample": {"num": 5}}
    mutable, immutable = checkpoints.config_changes(old, new)
    assert mutable == [("sample.num", 2, 5), ("train.steps", 4, 8)]
    assert immutable == [("train.new_knob", 1, 2)]
    assert checkpoints.config_changes(old, {**new, "extra": {"key": 1}})[1] == immutable


def test_changed_lr_and_steps_apply_and_continue_the_schedule(tmp_path, capsys):
    """train.lr really reaches the optimizer, and extending a cosine run re-defines the schedule
    over the new total from the current step: no restarted warmup."""
    kw = dict(train__lr_schedule="cosine", train__warmup_steps=2, train__min_lr_ratio=0.1)
    main.train(tiny_config("digits", tmp_path, train__steps=4, **kw), {}, SINGLE)
    config = tiny_config("digits", tmp_path, train__steps=8, train__lr=5e-4, **kw)
    trainer = main.build_trainer(config, SINGLE)
    out = capsys.readouterr().out
    assert "applying changed train.lr: 0.002 -> 0.0005, train.steps: 4 -> 8" in out
    assert "cosine lr schedule is re-defined over 8 steps and continues at step 4" in out

    def expected(step):  # cosine from 5e-4 to 5e-5 over steps 2..8, in closed form
        return 5e-5 + (5e-4 - 5e-5) * (1 + math.cos(math.pi * (step - 2) / 6)) / 2

    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected(4), rel=1e-12)
    trainer.run_lock.release()
    main.train(config, {}, SINGLE)
    logged = {r["step"]: r["lr"] for r in read_metrics(os.path.join(tmp_path, "digits"))}
    for step in range(5, 9):  # the lr logged after step s is the one of step s
        assert logged[step] == pytest.approx(expected(step), rel=1e-12)
    assert lr_multiplier(8, "cosine", 8, 2, 0.1) == pytest.approx(0.1)


def test_init_from_loads_weights_only_and_checks_shapes(tmp_path):
    source = main.train(tiny_config("checkerboard", tmp_path / "a", train__steps=2), {}, SINGLE)
    config = tiny_config("checkerboard", tmp_path / "b", train__steps=2)
    config.train.init_from = source.run_dir
    trainer = main.build_trainer(config, SINGLE)
    assert trainer.step == 0
    for name, value in source.net.state_dict().items():
        assert torch.equal(trainer.net.state_dict()[name], value), name
    for name, value in source.ema.model.state_dict().items():
        assert torch.equal(trainer.ema.model.state_dict()[name], value), name
    trainer.run_lock.release()
    wider = tiny_config("checkerboard", tmp_path / "c", train__steps=2, model__hidden=48)
    wider.train.init_from = source.run_dir
    with pytest.raises(ValueError, match="its weights do not fit this model .*shape: "):
        main.build_trainer(wider, SINGLE)
    assert not (tmp_path / "c").exists()  # refused before the run directory (and its lock)
    missing = tiny_config("checkerboard", tmp_path / "d", train__steps=2)
    missing.train.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ValueError) as info:
        main.build_trainer(missing, SINGLE)
    assert str(info.value) == f"train.init_from={tmp_path / 'nowhere'}: no such file"
    assert not (tmp_path / "d").exists()


def test_a_changed_init_from_on_resume_says_it_is_ignored(tmp_path, capsys):
    """A run with checkpoints resumes from its own; a train.init_from given then is not
    'applied' (as the resume line used to say) but reported as ignored, weights untouched."""
    source = main.train(tiny_config("checkerboard", tmp_path / "a", train__steps=1), {}, SINGLE)
    run = main.train(tiny_config("checkerboard", tmp_path / "b", train__steps=2), {}, SINGLE)
    weights = {k: v.clone() for k, v in run.net.state_dict().items()}
    again = tiny_config("checkerboard", tmp_path / "b", train__steps=2)
    again.train.init_from = source.run_dir
    capsys.readouterr()
    resumed = main.build_trainer(again, SINGLE)
    resumed.run_lock.release()
    line = capsys.readouterr().out.splitlines()[0]
    assert line == (
        f"resuming from {run.run_dir}/ckpt_0000002.pt at step 2; ignoring the changed "
        f"train.init_from={source.run_dir!r}: a run resumes from its own checkpoint (start a new "
        f"run with --config.name=NEW to initialise from it)"
    )
    assert all(torch.equal(resumed.net.state_dict()[k], v) for k, v in weights.items())
    started = tiny_config("checkerboard", tmp_path / "c", train__steps=1)
    started.train.init_from = source.run_dir
    main.train(started, {}, SINGLE)
    capsys.readouterr()
    unset = tiny_config("checkerboard", tmp_path / "c", train__steps=2)  # the flag dropped
    main.build_trainer(unset, SINGLE).run_lock.release()
    assert "train.init_from" not in capsys.readouterr().out  # nothing ignored or applied


def test_a_full_disk_while_saving_a_checkpoint_is_an_os_error_naming_the_file(tmp_path):
    """torch.save reports a failed write (ENOSPC) as a RuntimeError; the atomic save turns it
    back into the OSError (main prints it as one line naming the checkpoint), removes its
    temporary file and leaves the previous checkpoint whole."""
    path = tmp_path / "ckpt_0000002.pt"
    utils.atomic_torch_save({"w": torch.ones(3)}, str(path))

    class FullDisk(io.FileIO):
        written = 0

        def write(self, data):
            FullDisk.written += len(data)
            if FullDisk.written > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        return FullDisk(fd, "wb") if mode == "wb" else real_fdopen(fd, mode, *args, **kwargs)

    with mock.patch.object(os, "fdopen", fdopen), pytest.raises(OSError) as info:
        utils.atomic_torch_save({"w": torch.randn(10_000)}, str(path))
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(path))
    assert main.os_error_line(info.value).startswith(f"{path}: No space left on device (")
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000002.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_os_error_is_one_line():
    e = OSError(28, "No space left on device", "ckpts/x/.tmp-1ckpt_0000002.pt")
    line = main.os_error_line(e)
    assert line.startswith("ckpts/x/.tmp-1ckpt_0000002.pt: No space left on device")
    assert "\n" not in line
    message = "mnist: missing data/mnist/train-images-idx3-ubyte(.gz); download them from ..."
    assert main.os_error_line(FileNotFoundError(message)) == message  # no file: its own words
    # a rename onto a directory names the target, not the temporary file, and no disk hint
    renamed = IsADirectoryError(
        21, "Is a directory", "runs/x/.tmp-ab12config.json", None, "runs/x/config.json"
    )
    assert main.os_error_line(renamed) == "runs/x/config.json: Is a directory"


def test_an_atomic_write_onto_a_directory_names_the_file(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(OSError) as info:
        utils.atomic_write_json({"a": 1}, str(tmp_path / "config.json"))
    assert main.os_error_line(info.value) == f"{tmp_path / 'config.json'}: Is a directory"


def test_checkpoint_loads_with_weights_only_and_restores_every_rng(tmp_path):
    trainer = main.train(tiny_config("digits", tmp_path, train__steps=1), {}, SINGLE)
    state = checkpoints.load(checkpoints.find_latest(trainer.run_dir))
    utils.set_rng_state(state["rng"][0])
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    utils.set_rng_state(state["rng"][0])
    assert drawn == (random.random(), np.random.rand(), torch.rand(1).item())
    assert json.loads(state["config"])["train"]["steps"] == 1


@pytest.mark.parametrize("signame,launch", [("SIGTERM", "run.sh"), ("SIGINT", "python")])
def test_a_stop_signal_during_sampling_fails_with_one_line(tmp_path, signame, launch):
    """A stop signal to the process group (run.sh's or python main.py's) while the workers
    sample: they say so in one line and the command exits 128 + the signal, not 0 (a script
    must not take the missing samples for success); nothing is written. Before, SIGTERM
    through run.sh exited 0 silently and SIGINT printed a KeyboardInterrupt traceback."""
    trainer = main.train(tiny_config("moons", tmp_path, train__steps=1), {}, SINGLE)
    out = tmp_path / "samples"
    command = ["sh", "run.sh"] if launch == "run.sh" else [sys.executable, "main.py"]
    proc = subprocess.Popen(
        command
        + ["--mode=sample", f"--ckpt={trainer.run_dir}", f"--out={out}"]
        + ["--config.sample.num=200000", "--config.sample.steps=500"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    seen = ""
    deadline = time.time() + 120
    while "sampling:" not in seen:  # the workers are inside the sampler
        assert time.time() < deadline and proc.poll() is None, seen
        seen += proc.stderr.read(1)
    os.killpg(proc.pid, getattr(signal, signame))
    _, stderr = proc.communicate(timeout=120)
    errors = [line for line in (seen + stderr).splitlines() if "error" in line.lower()]
    assert proc.returncode == 128 + getattr(signal, signame), stderr[-2000:]
    assert errors == [
        f"error: stopped by {signame} during --mode=sample before it finished: rerun it"
    ], errors
    assert "Traceback" not in stderr and not out.exists()


def test_a_stop_signal_outside_training_escapes_broad_handlers_and_fires_once(tmp_path):
    """utils.Stopped is a BaseException: a SIGTERM while a checkpoint is read is not taken for
    a corrupt file (an `except Exception` would fall back to an older checkpoint and go on);
    a second stop signal (Ctrl-C reaches a torchrun worker twice) is ignored, not a traceback
    in the middle of the first one's handling."""
    trainer = main.train(tiny_config("checkerboard", tmp_path, train__steps=2), {}, SINGLE)
    previous = {name: signal.getsignal(getattr(signal, name)) for name in utils.STOP_SIGNALS}
    try:
        utils.raise_on_stop_signals()

        def load_interrupted(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises here

        with mock.patch.object(torch, "load", load_interrupted):
            with pytest.raises(utils.Stopped) as info:
                checkpoints.resolve(trainer.run_dir)
        assert info.value.args == ("SIGTERM", signal.SIGTERM)
        assert sorted(os.listdir(trainer.run_dir)).count("ckpt_0000002.pt") == 1  # not set aside
        os.kill(os.getpid(), signal.SIGINT)  # the second: ignored
        time.sleep(0.1)
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
