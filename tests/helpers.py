"""Shared test helpers: tiny configs that train in a second, and runners of main.py (a
subprocess, forks of one process, torchrun)."""

import json
import os
import signal
import subprocess
import sys

import torch

import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_UNET = {
    "model.base_channels": 8,
    "model.channel_mults": (1, 2),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (),
    "model.num_heads": 1,
}
TINY_MLP = {"model.hidden": 32, "model.num_blocks": 2}


def tiny_config(preset, workdir, **overrides):
    """A preset shrunk to a few tiny steps, writing under `workdir`, wandb disabled."""
    c = config_lib.get_config(preset)
    values = dict(TINY_MLP if c.model.name == "mlp" else TINY_UNET)
    values.update(
        {
            "workdir": str(workdir),
            "logging.wandb": "disabled",
            "train.steps": 4,
            "train.batch_size": 16,
            "train.warmup_steps": 2,
            "train.log_every": 1,
            "train.sample_every": 0,
            "train.save_every": 2,
            "sample.num": 12,
            "sample.batch_size": 8,
            "sample.steps": 3,
            "data.num_points": 512,
            "data.num_workers": 0,
        }
    )
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return config_lib.set_values(c, values)


def minimal_checkpoint(weights, step, data_dims):
    """The smallest state checkpoints.load accepts (every key of checkpoints.REQUIRED): model and
    EMA both `weights` (the EMA a copy), 2-D-points data_info of `data_dims` dimensions."""
    return {
        "step": step,
        "model": weights,
        "ema": {"model": {k: v.clone() for k, v in weights.items()}},
        "optimizer": {},
        "scheduler": {},
        "loader": {},
        "rng": [],
        "world_size": 1,
        "config": "{}",
        "data_info": {"shape": [data_dims], "num_classes": 0, "kind": "points"},
        "metrics": {},
        "healthy": True,
    }


def run_main(*args, env=None, timeout=240):
    """Run `python main.py ARGS` in the repo root; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


# Imports main.py once, then runs each argv list in a fork of itself through main.py's __main__
# block, as a subprocess `python main.py ARGV` would (exit code, stdout, stderr; only atexit
# handlers are skipped), without paying the imports (1.5 s) for each. The parent has run no
# torch work, so forking it is safe. A case still running after `timeout` s is killed by SIGALRM.
FORKED_MAIN = """
import json, os, runpy, signal, sys
root, cases, timeout = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, root)
os.chdir(root)
import main
for i, argv in enumerate(cases):
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            os.dup2(os.open(f"{sys.argv[4]}/{i}.{name}", flags), fd)
        signal.alarm(timeout)
        sys.argv = [os.path.join(root, "main.py"), *argv]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)  # sys.exit("text"), as Python reports it
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
    status = os.waitpid(pid, 0)[1]
    with open(f"{sys.argv[4]}/{i}.code", "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
"""


def run_main_forked(cases, scratch, timeout=60):
    """[CompletedProcess] of `python main.py ARGV` for each argv list in `cases`, each run in a
    fork of one process that imported main.py once (FORKED_MAIN); `scratch` holds the output."""
    os.makedirs(scratch, exist_ok=True)
    argv = [sys.executable, "-c", FORKED_MAIN, ROOT, json.dumps(cases), str(timeout), scratch]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(argv, cwd=ROOT, env=env, check=True, timeout=timeout * (len(cases) + 1))

    def read(i, name):
        with open(os.path.join(scratch, f"{i}.{name}")) as f:
            return f.read()

    for i, case in enumerate(cases):
        if int(read(i, "code")) == -signal.SIGALRM:
            raise subprocess.TimeoutExpired(["main.py", *case], timeout)
    return [
        subprocess.CompletedProcess(
            argv, int(read(i, "code")), read(i, "stdout"), read(i, "stderr")
        )
        for i in range(len(cases))
    ]


def run_torchrun(nproc, script, *args, timeout=240):
    """Run `script ARGS` under torchrun with `nproc` gloo processes (1 thread each, a free
    rendezvous port) in the repo root; asserts it succeeded."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_port=0",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=localhost:0",
        script,
        *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def perturb_zero_init(net, std=0.1):
    """Fill every all-zero parameter (zero-initialised layers, norm biases) with noise."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if torch.all(p == 0):
                torch.nn.init.normal_(p, std=std)
    return net
