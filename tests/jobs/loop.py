"""A job that all-reduces in a loop, writing its progress, until told to stop or killed.

Usage: loop.py --progress DIR [--iters N] [--sleep-ms MS] [--stall-rank R --stall-at K]

After each completed all-reduce, rank r writes the number completed so far to DIR/rank-r.
With --stall-rank, that rank stops issuing collectives after K iterations and sleeps (a rank
that never arrives: the others block in all-reduce number K+1).
"""

import argparse
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--progress", required=True)
    p.add_argument("--iters", type=int, default=10**9)
    p.add_argument("--sleep-ms", type=float, default=2.0)
    p.add_argument("--stall-rank", type=int, default=-1)
    p.add_argument("--stall-at", type=int, default=0)
    args = p.parse_args()
    dist.init_process_group("gloo")
    r = dist.get_rank()
    path = os.path.join(args.progress, f"rank-{r}")
    t = torch.ones(16)
    for i in range(args.iters):
        if r == args.stall_rank and i == args.stall_at:
            while True:
                time.sleep(1)
        dist.all_reduce(t)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(i + 1))
        os.replace(tmp, path)
        time.sleep(args.sleep_ms / 1e3)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
