"""Compare the newest checkpoints of two run directories (or two files): every tensor and value.

    python benchmarks/compare_checkpoints.py RUN_A RUN_B

RUN_A and RUN_B are each a checkpoint file or a run directory, whose checkpoint of the highest
step is taken. Prints the largest absolute difference and exits 0 only when every tensor
(weights, EMA, optimizer state, RNG states) is bit-identical and every other value (step, data
loader position, EMA update count, log-window sums, loss history, config, ...) is equal, except
those two runs may differ in without training differently (NOT_COMPARED: the run's name and
folder, its logger id, and the speed and memory figures of its last log line); a missing or
unreadable checkpoint is one `error:` line (exit status 1).
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402  (benchmarks/cli.py: argument validators)

import checkpoints  # noqa: E402


def newest(path, name):
    """The checkpoint file `path` names (itself, or its run directory's newest by step); exits
    with one line naming the argument `name` when there is none."""
    if os.path.isdir(path):
        found = checkpoints.find_latest(path)
        if found is None:
            cli.fail(f"{name}={path}: no ckpt_*.pt in this directory")
        path = found
    elif not os.path.exists(path):
        cli.fail(f"{name}={path}: no such file or directory")
    return path


def load(path, name):
    """The checkpoint file `path` (checkpoints.load: never runs code from the file); exits with
    one line naming the argument `name` if it is not one."""
    try:
        return checkpoints.load(path)
    except checkpoints.CheckpointError as e:
        cli.fail(f"{name}: {e}")


NOT_COMPARED = {  # may differ between two runs that trained identically
    "run_id",
    "config.name",
    "config.workdir",
    "metrics.steps_per_sec",
    "metrics.samples_per_sec",
    "metrics.peak_memory_mib",
}


def leaves(obj, prefix=""):
    """{dotted path: tensor or plain value} of everything inside nested dicts / lists; the
    JSON config string is opened into its fields."""
    if prefix == "config" and isinstance(obj, str):
        obj = json.loads(obj)
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out = {}
    for key, value in items:
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def compare(a, b):
    la, lb = ({k: v for k, v in leaves(s).items() if k not in NOT_COMPARED} for s in (a, b))
    if la.keys() != lb.keys():
        sys.exit(f"different contents: {sorted(la.keys() ^ lb.keys())[:5]}")
    ta = {k: v for k, v in la.items() if isinstance(v, torch.Tensor)}
    values = [k for k in la if k not in ta]
    worst, name = 0.0, None
    for key, tensor in ta.items():
        other = lb[key]
        if not isinstance(other, torch.Tensor):
            sys.exit(f"{key}: a tensor in RUN_A, a {type(other).__name__} in RUN_B")
        if tensor.shape != other.shape or tensor.dtype != other.dtype:
            sys.exit(f"{key}: shape/dtype differ")
        if not torch.equal(tensor, other):
            diff = (tensor.double() - other.double()).abs().max().item()
            if diff >= worst:
                worst, name = diff, key
    both_nan = lambda k: la[k] != la[k] and lb[k] != lb[k]  # NaN != NaN: equal runs here
    unequal = [k for k in values if la[k] != lb[k] and not both_nan(k)]
    print(
        f"{len(ta)} tensors and {len(values)} values compared; steps {a.get('step')} / "
        f"{b.get('step')}; largest difference {worst:g}"
        + (f" ({name})" if name else "")
        + "".join(f"\n{k}: {la[k]!r} / {lb[k]!r}" for k in unequal[:10])
        + (f"\n... {len(unequal) - 10} more values differ" if len(unequal) > 10 else "")
    )
    sys.exit(0 if name is None and not unequal else 1)


def main(argv=None):
    parser = cli.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("run_a", metavar="RUN_A", help="a checkpoint file or a run directory")
    parser.add_argument("run_b", metavar="RUN_B", help="a checkpoint file or a run directory")
    args = parser.parse_args(argv)
    path_a, path_b = newest(args.run_a, "RUN_A"), newest(args.run_b, "RUN_B")
    compare(load(path_a, "RUN_A"), load(path_b, "RUN_B"))


if __name__ == "__main__":
    main()
