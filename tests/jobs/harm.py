"""A job whose ringwatch internals are broken on purpose: it must still run correctly.

Usage: harm.py --attach LOG_DIR --break Class.method [--break ...]

Each named method of ringwatch's recorder or writer is replaced by one that raises; the job
then runs collectives of every kind and a few DDP steps, and checks their results.
"""

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ringwatch
from ringwatch.agent.capture import _recorder, _writer

CLASSES = {"Recorder": _recorder.Recorder, "SegmentWriter": _writer.SegmentWriter,
           "GroupInfo": _recorder.GroupInfo}


def _boom(*_args, **_kwargs):
    raise RuntimeError("injected failure inside ringwatch")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attach", required=True)
    p.add_argument("--break", dest="broken", action="append", default=[])
    args = p.parse_args()
    ringwatch.attach(log_dir=args.attach, flush_interval_s=0.2)
    dist.init_process_group("gloo")
    for name in args.broken:
        cls, meth = name.split(".")
        setattr(CLASSES[cls], meth, _boom)
    r, w = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(r)])
    dist.all_reduce(t)
    assert t.item() == sum(range(w))
    work = dist.all_reduce(t, async_op=True)
    work.wait()
    assert t.item() == w * sum(range(w))
    buf = torch.zeros(3)
    if r == 0:
        dist.send(torch.ones(3), 1)
    elif r == 1:
        dist.recv(buf, 0)
        assert buf.sum().item() == 3
    outs = [torch.zeros(1) for _ in range(w)]
    dist.all_gather(outs, torch.tensor([float(r)]))
    assert [o.item() for o in outs] == [float(i) for i in range(w)]
    sub = dist.new_group([0, 1])
    if r < 2:
        x = torch.ones(2)
        dist.all_reduce(x, group=sub)
        assert x.sum().item() == 4
    model = DDP(torch.nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {r} ok", flush=True)


if __name__ == "__main__":
    main()
