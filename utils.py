"""Small shared helpers: distributed info, seeding, RNG state, atomic files, stop signals, a
host-sync detector, and the torchrun launcher used by run.sh (`python utils.py TORCHRUN_ARGS`)."""

import ctypes
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


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
    """Every RNG this process draws from, in types torch.load(weights_only=True) accepts
    (tensors, lists, numbers, strings)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(words, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, words, gauss = state["python"]
    random.setstate((version, tuple(int(w) for w in words.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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
            try:
                write(f)
            except RuntimeError as e:  # torch.save's report of a failed write (a full disk)
                failed = e.__cause__ or e.__context__
                if isinstance(failed, OSError):
                    raise OSError(failed.errno, failed.strerror, path) from e
                raise
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


# ---------------------------------------------------------------------------------------------
# Stopping at a step boundary: signals, a dead launcher, agreement over ranks.
# ---------------------------------------------------------------------------------------------
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StopRequest:
    """Records the first of STOP_SIGNALS this process receives (while installed) so that the
    training loop can stop at the next step boundary instead of dying mid-step. A launcher that
    died (the parent pid changed) counts as a request too."""

    def __init__(self):
        self.reason = None
        self.parent_pid = os.getppid()
        self.previous = {}

    def install(self):
        """Install the handlers (main thread only; elsewhere signals keep their defaults)."""
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                signum = getattr(signal, name)
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        self.reason = self.reason or signal.Signals(signum).name

    def requested(self, watch_parent=False):
        """True once a signal came (or, with watch_parent, once the parent process is gone)."""
        if watch_parent and self.reason is None and os.getppid() != self.parent_pid:
            self.reason = "the launcher's exit"
        return self.reason is not None


def die_with_parent(signum=signal.SIGTERM):
    """Ask Linux to send `signum` to this process when its parent (the launcher) dies, so a
    worker never trains on orphaned; a no-op where prctl is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def any_rank(flags, device):
    """Elementwise max over ranks of a list of 0/1 flags (0-dim tensors or bools), as one
    float tensor on `device`: one small all-reduce. Without a process group, the flags."""
    values = torch.stack(
        [
            f.to(torch.float32) if torch.is_tensor(f) else torch.full((), float(f), device=device)
            for f in flags
        ]
    )  # built on the device (a fill kernel, not a host-to-device copy: no sync)
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def peak_memory_mib(device):
    """This process's peak memory so far in MiB: on CUDA the caching allocator's peak of
    allocated tensor memory on `device` (torch.cuda.max_memory_allocated: a counter read, no
    sync); on the CPU the peak resident set size of the process (getrusage's ru_maxrss, in KiB
    on Linux and bytes on macOS). None for other devices."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type != "cpu":
        return None
    import resource  # POSIX only; imported here so that importing utils works everywhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def micro_batch_size(batch_size, world_size, grad_accum):
    """The rows one rank sees per forward pass: the global batch split over ranks and
    gradient-accumulation micro-steps (config.py checks that it divides evenly)."""
    return batch_size // (world_size * grad_accum)


def to_device(tensor, device):
    """`tensor` (on the CPU) on `device` without making the host wait: on CUDA through pinned
    memory and a non-blocking copy (a plain copy from pageable memory waits for the stream);
    elsewhere a plain `.to`."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class HostSyncCounter(TorchDispatchMode):
    """Records the operators that make the host wait for an accelerator, on any device, so a
    CPU test can prove that the training step has none: `.item()`, `bool(tensor)`, a 0-dim
    tensor passed where a number is expected (all `_local_scalar_dense`, also counted for CPU
    tensors on a GPU machine), `allclose`, `equal`, and the ops whose output size depends on the
    data (nonzero, boolean-mask indexing and assignment of a tensor, masked_select, unique,
    bincount, histc, repeat_interleave without output_size). Copies between the host and the
    device are not seen on the CPU: on CUDA, torch.cuda.set_sync_debug_mode("error") catches
    them (benchmarks/sync_check.py).

        with HostSyncCounter(where=lambda: trainer.step) as syncs:
            trainer.train_step()
        assert not syncs.hits, syncs.hits

    `hits` lists (operator name, where(), innermost frames of this repository)."""

    OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim"}
    OPS |= {"unique_consecutive", "equal", "allclose", "bincount", "histc"}

    def __init__(self, where=lambda: None):
        super().__init__()
        self.where, self.hits = where, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS or _data_sized(name, args, kwargs or {}):
            root = os.path.dirname(os.path.abspath(__file__))
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(root)]
            trail = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[-3:])
            self.hits.append((name, self.where(), trail))
        return func(*args, **(kwargs or {}))


def _data_sized(name, args, kwargs):
    """Whether the op's output (or work) size depends on tensor values: repeat_interleave without
    output_size; indexing with a boolean mask; assigning a tensor of values through one (a 0-dim
    value becomes masked_fill on CUDA, which does not sync)."""
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None
    if name not in ("index", "index_put", "index_put_"):
        return False
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    masked = any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "index":
        return masked
    return masked and torch.is_tensor(args[2]) and args[2].dim() > 0


# ---------------------------------------------------------------------------------------------
# The launcher of run.sh: torchrun, minus its tracebacks.
# ---------------------------------------------------------------------------------------------
class KilledAfterTimeout(logging.Handler):
    """Records the workers that torchrun kills because they were still running its shutdown
    timeout after a forwarded stop signal (it says so only in a log warning, which launch
    silences with the rest of its logging)."""

    LOGGER = "torch.distributed.elastic.multiprocessing.api"

    def __init__(self):
        super().__init__(logging.WARNING)
        self.pids = []

    def emit(self, record):
        if str(record.msg).startswith("Unable to shutdown process"):
            self.pids.append(record.args[0])

    @classmethod
    def install(cls):
        handler, logger = cls(), logging.getLogger(cls.LOGGER)
        logger.setLevel(logging.WARNING)
        logger.propagate = False  # recorded here, not printed
        logger.addHandler(handler)
        return handler


def check_output_dir(path, name):
    """ValueError naming `name` unless `path` is a directory, or can be made one, in which a
    file can be created (a probe that is removed at once; nothing else is made here)."""
    ancestor = os.path.abspath(path)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if os.path.islink(ancestor) and not os.path.exists(ancestor):
        raise ValueError(f"{name}: {ancestor} is a symbolic link to nothing (broken or a loop)")
    if not os.path.isdir(ancestor):
        inside = ancestor != os.path.abspath(path)
        where = f"is inside the file {ancestor}" if inside else "is a file"
        raise ValueError(f"{name} {where}; give a directory (created if absent)")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise ValueError(f"{name}: cannot create files in {ancestor} ({e.strerror or e})") from None


def threads_per_worker(workers, cores=None):
    """CPU threads for each of `workers` processes on this node: the cores this process may run
    on, shared out evenly (at least 1)."""
    if cores is None:  # sched_getaffinity is Linux's; macOS has only the machine's count
        affinity = getattr(os, "sched_getaffinity", None)
        cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    return max(1, cores // workers)


WORKER_STATUS_ENV = "INTERPOLANTS_WORKER_STATUS_DIR"  # set by launch for its workers


def mark_worker(outcome):
    """Tell utils.launch how this worker ended: `done` (its mode finished) or `stopped` (a stop
    signal ended it after it said so in one line): an empty file <local rank>.<outcome> in the
    folder the launcher names in WORKER_STATUS_ENV; nothing outside a launch."""
    folder = os.environ.get(WORKER_STATUS_ENV)
    if folder and os.path.isdir(folder):
        open(os.path.join(folder, f"{os.environ.get('LOCAL_RANK', '0')}.{outcome}"), "w").close()


class Stopped(BaseException):
    """A stop signal outside training (raise_on_stop_signals): args = (name, number). A
    BaseException, like KeyboardInterrupt: no `except Exception` on the way may swallow it (a
    checkpoint being read would be taken for a corrupt one)."""


def raise_on_stop_signals():
    """Make the first of STOP_SIGNALS raise Stopped(name, number) in the main thread and the
    later ones be ignored (Ctrl-C reaches a worker twice: directly and forwarded by torchrun):
    sample, eval and info end with one line instead of dying silently (SIGTERM) or with a
    traceback (SIGINT)."""

    def handle(signum, frame):
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        raise Stopped(signal.Signals(signum).name, signum)

    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), handle)


def launch(torchrun_args):
    """Run torchrun with `torchrun_args` in this process and return an exit status, printing no
    launcher traceback: a worker's own `error:` line (or traceback) is all the user sees, and
    a stop signal forwarded to the workers (they checkpoint and exit) ends with status 0 when
    every worker finished (mark_worker), else with 128 + the signal and one `error:` line
    unless every unfinished worker said why itself (a worker stopped before its work was done:
    sampling or eval wrote nothing, a run that had not started training has nothing to save),
    or 137 if torchrun had to kill workers still running after its shutdown timeout. Several
    workers on a node share its cores (OMP_NUM_THREADS, unless set) instead of torchrun's
    default of one thread each."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    killed = KilledAfterTimeout.install()
    args = torchrun.parse_args(torchrun_args)
    workers = torchrun.determine_local_world_size(args.nproc_per_node)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1, with a banner
        os.environ["OMP_NUM_THREADS"] = str(threads_per_worker(workers))
    status_dir = tempfile.mkdtemp(prefix="interpolants-workers-")
    os.environ[WORKER_STATUS_ENV] = status_dir  # the workers inherit it
    try:
        torchrun.run(args)
    except SignalException as e:  # forwarded to the workers, which checkpoint and say so
        name = signal.Signals(e.sigval).name
        if killed.pids:
            print(
                f"error: {len(killed.pids)} worker(s) still running {args.shutdown_timeout} s "
                f"after {name} were killed (SHUTDOWN_TIMEOUT); rerun the same command to resume "
                "from the newest checkpoint",
                file=sys.stderr,
            )
            return 128 + signal.SIGKILL
        outcomes = [f.rpartition(".")[2] for f in os.listdir(status_dir)]
        finished, explained = outcomes.count("done"), outcomes.count("stopped")
        if finished >= workers:
            return 0
        if finished + explained < workers:  # some worker ended without a word
            print(
                f"error: {name} stopped {workers - finished} of {workers} worker(s) before their "
                f"work was done (sample / eval: nothing written; training: nothing lost, it "
                f"resumes from its newest checkpoint): rerun the same command",
                file=sys.stderr,
            )
        return 128 + e.sigval
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal: the worker could not say anything itself
            name = signal.Signals(-failure.exitcode).name
            print(f"error: worker rank {rank} was killed by {name}", file=sys.stderr)
            return 128 - failure.exitcode
        return failure.exitcode
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
