"""One optimizer step of an objective on a tiny MLP, saving this rank's parameters and gradients:
run under torchrun by test_objectives.py (2 gloo processes; the test computes the 1-process
update in-process with one_step, on the same global batch).

python tests/objectives_ddp_worker.py OUT_DIR
For each (objective, mode) of CASES, writes OUT_DIR/<objective>_<mode>_rank<r>.pt. Mode `ddp`
calls the loss with the DDP-wrapped module (the trainer's way; the plain module for one
process); `unwrapped` calls it with `.module` (the trap: DDP's hooks never see the forward).
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import objectives  # noqa: E402
from mlp import MLP  # noqa: E402
from processes import build_process  # noqa: E402
from time_samplers import build_time_sampler  # noqa: E402

GLOBAL_BATCH, DIM = 16, 3
CASES = (("meanflow", "ddp"), ("meanflow", "unwrapped"), ("consistency", "ddp"))


def build(objective_name):
    torch.manual_seed(0)
    objective = objectives.build_objective(
        objective_name, time_sampler=build_time_sampler("uniform"), ratio=0.5
    )
    net = MLP(DIM, hidden=16, num_blocks=2, time_inputs=objective.needs_time_inputs)
    for p in net.parameters():  # no zero-initialised layers: every gradient is informative
        torch.nn.init.normal_(p, std=0.3)
    return objective, net


def global_batch(objective):
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(GLOBAL_BATCH, DIM, generator=generator)
    x1 = torch.randn(GLOBAL_BATCH, DIM, generator=generator)
    t = torch.rand(GLOBAL_BATCH, generator=generator)
    extra = objective.draw(GLOBAL_BATCH, generator, "cpu", t)
    return x0, x1, t, extra


def one_step(objective_name, mode, rank=0, world=1):
    """{"grads", "params"} of this rank after one SGD step (world 1: no process group)."""
    objective, net = build(objective_name)
    model = DistributedDataParallel(net) if world > 1 else net
    called = model.module if mode == "unwrapped" and world > 1 else model
    rows = slice(rank, None, world)  # the trainer's interleaving of the global batch
    x0, x1, t, extra = (v[rows] for v in global_batch(objective))
    process = build_process("linear")
    loss = objective.loss(called, process, x0, x1, t, extra, None, step=0, total_steps=100)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.1 * p.grad
    params = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return {"grads": grads, "params": params}


def run(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for objective_name, mode in CASES:
        path = os.path.join(out_dir, f"{objective_name}_{mode}_rank{rank}.pt")
        torch.save(one_step(objective_name, mode, rank, world), path)
    dist.barrier()  # every rank done before the group goes (a rank once aborted at teardown)
    dist.destroy_process_group()


if __name__ == "__main__":
    run(*sys.argv[1:])
