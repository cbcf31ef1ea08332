"""A 2-rank Gloo job with two process groups (the world and one more), traced with
torch.profiler: the traces of tests/data/kineto/gloo-2groups-2ranks (see README.md)."""

import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerAction, ProfilerActivity, profile

dist.init_process_group("gloo")
rank = dist.get_rank()
other = dist.new_group([0, 1], group_desc="other")
with profile(activities=[ProfilerActivity.CPU], record_shapes=True,
             schedule=lambda _step: ProfilerAction.RECORD) as prof:
    for _ in range(3):
        t = torch.ones(100)
        dist.all_reduce(t)
        dist.all_reduce(t, group=other)
        dist.all_gather([torch.zeros(10) for _ in range(2)], torch.ones(10))
        prof.step()
prof.export_chrome_trace(f"{sys.argv[1]}/rank-{rank}.json.gz")
dist.destroy_process_group()
