"""One all-reduce through the process group that main.py would use (NCCL on CUDA, gloo on CPU).

python -m torch.distributed.run --standalone --nproc_per_node=N benchmarks/nccl_check.py
"""

import os

import torch
import torch.distributed as dist


def main():
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    value = torch.full((4,), float(dist.get_rank() + 1), device=device)
    dist.all_reduce(value)
    world = dist.get_world_size()
    expected = world * (world + 1) / 2
    assert torch.all(value == expected), (value, expected)
    if dist.get_rank() == 0:
        print(f"{dist.get_backend()} all-reduce over {world} process(es): {value[0].item()} ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
