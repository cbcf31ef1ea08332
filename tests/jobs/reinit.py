"""Create, destroy and re-create the default process group in one process, with ringwatch
attached: the second lifetime must work exactly as without ringwatch."""

import sys

import torch
import torch.distributed as dist

import ringwatch

ringwatch.attach(log_dir=sys.argv[1])
for round_ in range(2):
    dist.init_process_group("gloo")
    t = torch.ones(2)
    dist.all_reduce(t)
    assert t[0].item() == dist.get_world_size()
    dist.destroy_process_group()
    print(f"round {round_} ok", flush=True)
