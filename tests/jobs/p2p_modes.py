"""Two Gloo ranks exchange tensors point to point in three ways, ``N`` times each, in order:

1. ``dist.send`` / ``dist.recv`` (blocking: issue, then wait at once);
2. ``dist.isend`` / ``dist.irecv``, then the rank sleeps 5 ms before waiting (asynchronous,
   the thread off the CPU in between);
3. ``dist.isend`` / ``dist.irecv``, then the rank computes for 5 ms of its CPU time before
   waiting (asynchronous, the thread busy in between).

Run under ``ringwatch run`` with ``RINGWATCH_NATIVE=1``. With ``--cpu CPU`` each rank runs on
that CPU only (``os.sched_setaffinity``). With ``--gil``, a thread of the rank runs Python all
the while (as the agent's writer thread does when it drains a burst): the main thread, coming
back from a call into the backend, may wait for the GIL for a switch interval (5 ms) before it
can wait on the work.

Usage: p2p_modes.py N [--cpu CPU] [--gil]
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch
import torch.distributed as dist


def _spin() -> None:
    x = 0
    while True:
        x += 1


def main() -> None:
    n = int(sys.argv[1])
    if "--cpu" in sys.argv:
        os.sched_setaffinity(0, {int(sys.argv[sys.argv.index("--cpu") + 1])})
    if "--gil" in sys.argv:
        threading.Thread(target=_spin, daemon=True).start()
    dist.init_process_group("gloo")
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    t = torch.ones(64)
    for _ in range(n):  # 1: blocking
        if rank == 0:
            dist.send(t, peer)
        else:
            dist.recv(t, peer)
    for gap in ("sleep", "compute"):  # 2 and 3: asynchronous
        for _ in range(n):
            work = dist.isend(t, peer) if rank == 0 else dist.irecv(t, peer)
            if gap == "sleep":
                time.sleep(0.005)
            else:
                until = time.thread_time() + 0.005
                while time.thread_time() < until:
                    pass
            work.wait()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
