"""Compare every tensor of the newest checkpoints of two run directories (or two files).

    python benchmarks/compare_checkpoints.py RUN_A RUN_B

RUN_A and RUN_B are each a checkpoint file or a run directory, whose checkpoint of the highest
step is taken. Prints the largest absolute difference and exits 0 only when every tensor
(weights, EMA, optimizer state, RNG states) is bit-identical and both hold the same step; a
missing or unreadable checkpoint is one `error:` line (exit status 1).
"""

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


def tensors(obj, prefix=""):
    """{dotted path: tensor} of every tensor inside nested dicts / lists."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = (
        obj.items()
        if isinstance(obj, dict)
        else enumerate(obj)
        if isinstance(obj, (list, tuple))
        else ()
    )
    out = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def compare(a, b):
    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        sys.exit(f"different tensors: {sorted(ta.keys() ^ tb.keys())[:5]}")
    worst, name = 0.0, None
    for key in ta:
        if ta[key].shape != tb[key].shape or ta[key].dtype != tb[key].dtype:
            sys.exit(f"{key}: shape/dtype differ")
        if not torch.equal(ta[key], tb[key]):
            diff = (ta[key].double() - tb[key].double()).abs().max().item()
            if diff >= worst:
                worst, name = diff, key
    step_a, step_b = a.get("step"), b.get("step")
    print(
        f"{len(ta)} tensors compared; steps {step_a} / {step_b}; largest difference {worst:g}"
        + (f" ({name})" if name else "")
    )
    sys.exit(0 if name is None and step_a == step_b else 1)


def main(argv=None):
    parser = cli.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("run_a", metavar="RUN_A", help="a checkpoint file or a run directory")
    parser.add_argument("run_b", metavar="RUN_B", help="a checkpoint file or a run directory")
    args = parser.parse_args(argv)
    path_a, path_b = newest(args.run_a, "RUN_A"), newest(args.run_b, "RUN_B")
    compare(load(path_a, "RUN_A"), load(path_b, "RUN_B"))


if __name__ == "__main__":
    main()
