"""Small shared helpers: distributed info, seeding, RNG state, atomic files."""

import json
import os
import random
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed():
    """Start the process group when launched by torchrun with more than one process.

    NCCL on CUDA (one GPU per local rank), gloo on CPU. A single process, launched by torchrun or
    as `python main.py`, runs without a process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor):
    """Mean of a tensor over ranks (the tensor itself when not distributed)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def all_gather_objects(obj):
    """List of `obj` from every rank, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed):
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state():
    """Every RNG this process draws from, as a picklable dict."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def mix_seed(*values):
    """A well-mixed 63-bit seed from a tuple of ints (splitmix64 over the values).

    torch's CPU generator keys on the low 32 bits of its seed only, so seeds such as
    (seed << 32) | index would collide; every output bit here depends on every input.
    """
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (
            state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)
        ) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
        state = (state * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state >> 1


def step_generator(seed, step, device):
    """A generator whose stream depends only on (seed, step): the randomness of one global batch,
    identical on every rank and after a resume."""
    generator = torch.Generator(device=device)
    generator.manual_seed(mix_seed(seed, step))
    return generator


def _atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_npz(arrays, path):
    """np.savez of a dict of arrays, written atomically."""
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write_text(text, path):
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(obj, path):
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)
