"""Compare every tensor of the newest checkpoints of two run directories (or two files).

    python benchmarks/compare_checkpoints.py RUN_A RUN_B

Prints the largest absolute difference and exits 0 only when every tensor (weights, EMA,
optimizer state, RNG states) is bit-identical and both hold the same step.
"""

import glob
import os
import sys

import torch


def newest(path):
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "ckpt_*.pt")))
    if not found:
        sys.exit(f"error: no ckpt_*.pt in {path}")
    return found[-1]


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


def main(path_a, path_b):
    a = torch.load(newest(path_a), map_location="cpu", weights_only=True)
    b = torch.load(newest(path_b), map_location="cpu", weights_only=True)
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


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
