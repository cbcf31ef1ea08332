"""A small real DDP training job on Gloo (CPU): the demo's workload, also used by tests and
benchmarks. Run it under ``torchrun``::

    torchrun --standalone --nproc-per-node 4 -m ringwatch._demo_job --steps 30

It trains an MLP of ``--layers`` square linear layers on random data; ``--bucket-cap-mb`` small
enough gives DDP several gradient buckets per step. ``--attach DIR`` calls
``ringwatch.attach(log_dir=DIR)`` in the script (the one-line use) instead of relying on
``ringwatch run``. Rank 0 prints one JSON line at the end: steps, median step time and DDP's
bucket count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ringwatch._demo_job", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="training steps")
    p.add_argument("--layers", type=int, default=6, help="linear layers")
    p.add_argument("--width", type=int, default=256, help="features per layer")
    p.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    p.add_argument("--bucket-cap-mb", type=float, default=0.25, help="DDP bucket size, MiB")
    p.add_argument("--attach", metavar="DIR", help="call ringwatch.attach(log_dir=DIR)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--extra-work-rank", type=int, default=-1,
                   help="this rank does --extra-work-factor times the compute, by design")
    p.add_argument("--extra-work-factor", type=float, default=1.0)
    p.add_argument("--step-sleep-ms", type=float, default=0.0,
                   help="sleep per step outside collectives (host-side work)")
    p.add_argument("--result", metavar="FILE", help="rank 0 writes its JSON summary here")
    p.add_argument("--python-hook", action="store_true",
                   help="register PyTorch's Python allreduce comm hook (a cost reference)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if args.attach:
        import ringwatch

        ringwatch.attach(log_dir=args.attach)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
    model = DDP(torch.nn.Sequential(*layers), bucket_cap_mb=args.bucket_cap_mb)
    if args.python_hook:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.allreduce_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    repeat = 1
    if rank == args.extra_work_rank:
        repeat = max(1, round(args.extra_work_factor))
    step_s = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        x = torch.randn(args.batch * repeat, args.width, generator=gen)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.step_sleep_ms:
            time.sleep(args.step_sleep_ms / 1e3)
        step_s.append(time.perf_counter() - t0)
    info = model._get_ddp_logging_data()  # refreshed at sampled iterations (10, 20, ...)
    def count(sizes) -> int:
        return len([s for s in str(sizes or "").split(",") if s.strip()])

    first = count(info.get("bucket_sizes"))
    buckets = count(info.get("rebuilt_bucket_sizes")) or first
    if rank == 0:
        out = {"world_size": world, "steps": args.steps, "buckets": buckets,
               "buckets_first_step": first,
               "median_step_s": statistics.median(step_s[1:] or step_s), "pid": os.getpid()}
        line = json.dumps(out)
        print(line, flush=True)
        if args.result:
            with open(args.result, "w") as f:
                f.write(line + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
