"""A job that all-reduces in a loop, writing its progress, until told to stop or killed.

Usage: loop.py --progress DIR [--iters N] [--sleep-ms MS] [--stall-rank R --stall-at K]
               [--stop-file PATH]

After each completed all-reduce, rank r writes the number completed so far to DIR/rank-r.
With --stall-rank, that rank stops issuing collectives after K iterations and sleeps (a rank
that never arrives: the others block in all-reduce number K+1). With --stop-file, every rank
stops after the iteration in which rank 0 saw that file (the flag travels in the all-reduce
itself). Each rank checks every sum it gets and prints ``rank R ok: N iterations`` at the end.
"""

import argparse
import os
import sys
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
    p.add_argument("--stop-file")
    args = p.parse_args()
    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    path = os.path.join(args.progress, f"rank-{r}")
    t = torch.ones(16)
    done = 0
    for i in range(args.iters):
        if r == args.stall_rank and i == args.stall_at:
            while True:
                time.sleep(1)
        t.fill_(1.0)
        if args.stop_file and r == 0 and os.path.exists(args.stop_file):
            t[0] = 1.0 + w  # the sum tells every rank to stop after this iteration
        dist.all_reduce(t)
        assert t[1:].eq(w).all(), t
        done = i + 1
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(done))
        os.replace(tmp, path)
        if t[0].item() > w:
            break
        time.sleep(args.sleep_ms / 1e3)
    dist.destroy_process_group()
    sys.stdout.write(f"rank {r} ok: {done} iterations\n")  # one write: ranks share the file
    sys.stdout.flush()


if __name__ == "__main__":
    main()
