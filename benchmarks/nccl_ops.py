"""Every collective API once on NCCL, with ringwatch attached, then what ringwatch recorded.

A GPU check (``benchmarks/gpu_check.sh`` runs it): one rank per GPU under torchrun, each
collective issued through ``torch.distributed`` on CUDA tensors, sync and async, plus a few
issued by PyTorch from C++ (DDP's bucket all-reduces). After ``detach()`` rank 0 reads the logs
back and prints, per (api, op), how many rows were recorded, with which end source, and whether
each carries the device-side duration (CUDA events) that the NCCL completion hook reports.

    torchrun --standalone --nproc-per-node 1 benchmarks/nccl_ops.py --log-dir DIR --out FILE

Exit status 0 when every issued call is recorded with a device duration, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _issue(dist, torch, dev, world: int, rank: int) -> list[tuple[str, str]]:
    """Issues each API once sync and once async; returns (api, op) of each Python call."""
    issued: list[tuple[str, str]] = []
    t = torch.full((1024,), float(rank + 1), device=dev)
    works = []

    def did(api: str, op: str, work) -> None:
        issued.append((api, op))
        if work is not None:
            works.append(work)

    for async_op in (False, True):
        did("dist.all_reduce", "all_reduce", dist.all_reduce(t, async_op=async_op))
        did("dist.broadcast", "broadcast", dist.broadcast(t, src=0, async_op=async_op))
        out = torch.empty(world * t.numel(), device=dev)
        did("dist.all_gather_into_tensor", "all_gather_into_tensor",
            dist.all_gather_into_tensor(out, t, async_op=async_op))
        red = torch.empty(t.numel() // world, device=dev)
        did("dist.reduce_scatter_tensor", "reduce_scatter_tensor",
            dist.reduce_scatter_tensor(red, t[: red.numel() * world], async_op=async_op))
        a2a = torch.empty_like(t)
        did("dist.all_to_all_single", "all_to_all_single",
            dist.all_to_all_single(a2a, t, async_op=async_op))
        outs = [torch.empty_like(t) for _ in range(world)]
        did("dist.all_gather", "all_gather", dist.all_gather(outs, t, async_op=async_op))
        did("dist.all_to_all", "all_to_all",
            dist.all_to_all([torch.empty_like(t) for _ in range(world)],
                            [t.clone() for _ in range(world)], async_op=async_op))
        did("dist.reduce", "reduce", dist.reduce(t, dst=0, async_op=async_op))
        did("dist.barrier", "barrier", dist.barrier(async_op=async_op))
    for w in works:
        w.wait()
    torch.cuda.synchronize(dev)
    return issued


def _ddp_steps(torch, dev, steps: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).to(dev),
                bucket_cap_mb=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        model(torch.randn(64, 1024, device=dev)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(dev)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--log-dir", required=True)
    p.add_argument("--out", required=True, help="rank 0 writes its report (JSON) here")
    p.add_argument("--ddp-steps", type=int, default=20)
    p.add_argument("--late-attach", action="store_true",
                   help="attach only after the group has run collectives, with hundreds of "
                   "them still in flight (untimed): the job must go on, and ringwatch record "
                   "what is issued after")
    args = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    import ringwatch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    job = "nccl-late-attach" if args.late_attach else "nccl-ops"
    if args.late_attach:
        dist.init_process_group("nccl", device_id=dev)
        big = torch.ones(16 << 20, device=dev)  # 64 MiB: the queue takes a while to drain
        in_flight = [dist.all_reduce(big, async_op=True) for _ in range(300)]
    if not ringwatch.attach(log_dir=args.log_dir, job_id=job):
        print("ringwatch.attach() returned False", file=sys.stderr)
        return 1
    if args.late_attach:
        for w in in_flight:
            w.wait()
    else:
        dist.init_process_group("nccl", device_id=dev)
    rank, world = dist.get_rank(), dist.get_world_size()
    issued = _issue(dist, torch, dev, world, rank)
    _ddp_steps(torch, dev, args.ddp_steps)
    dist.barrier()
    torch.cuda.synchronize(dev)
    time.sleep(2)  # the watchdog reports completions to the hook thread every ~100 ms
    ringwatch.detach()  # flushes every row, then the Flight Recorder copy
    ok = True
    if rank == 0:
        import polars as pl

        df = ringwatch.read_events(Path(args.log_dir) / job).filter(
            (pl.col("rank") == 0) & pl.col("api").is_in(["ddp", *{a for a, _ in issued}]))
        table = (df.group_by("api", "op", "end_source", "status")
                 .agg(pl.len().alias("rows"),
                      pl.col("device_duration_ns").is_not_null().sum().alias("with_device"),
                      pl.col("device_duration_ns").median().alias("device_ns_median"),
                      pl.col("duration_ns").median().alias("host_ns_median"))
                 .sort("api", "op", "end_source"))
        missing = []
        for api, op in sorted(set(issued)):
            rows = df.filter((pl.col("api") == api) & (pl.col("op") == op))
            want = issued.count((api, op))
            timed = rows.filter(pl.col("device_duration_ns").is_not_null()).height
            if rows.height < want or (timed < want and not args.late_attach):
                missing.append({"api": api, "op": op, "issued": want, "rows": rows.height,
                                "with_device_duration": timed})
        ddp = df.filter(pl.col("api") == "ddp")
        report = {"late_attach": args.late_attach, "world_size": world, "torch": torch.__version__,
                  "gpu": torch.cuda.get_device_name(dev),
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                  "rows": df.height, "ddp_rows": ddp.height,
                  "ddp_rows_with_device_duration":
                      ddp.filter(pl.col("device_duration_ns").is_not_null()).height,
                  "python_calls": len(issued), "missing": missing,
                  "table": table.to_dicts()}
        ok = not missing and ddp.height >= args.ddp_steps
        report["ok"] = ok
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        with pl.Config(tbl_rows=60, tbl_cols=10, tbl_width_chars=160):
            print(table)
        print(f"nccl_ops: {'OK' if ok else 'MISSING ROWS'}: {len(issued)} Python calls, "
              f"{ddp.height} DDP rows; missing {missing}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
