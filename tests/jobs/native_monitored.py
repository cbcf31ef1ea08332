"""Two Gloo ranks: rank 0 waits in a monitored barrier that rank 1 never enters, until the
barrier's timeout. Run under ``ringwatch run`` with ``RINGWATCH_NATIVE=1``. While rank 0 is
blocked, a thread of it copies its pending snapshot to SNAPSHOT, so the test can check the
barrier was seen in flight (what a hang looks like), then that it ended in error.

Usage: native_monitored.py RANK0_PENDING_DIR SNAPSHOT
"""

from __future__ import annotations

import datetime
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    pending, snapshot = Path(sys.argv[1]) / "pending.parquet", sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    t = torch.ones(2)
    dist.all_reduce(t)
    if rank == 0:
        def grab() -> None:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                time.sleep(0.2)
                if pending.exists():
                    shutil.copy(pending, snapshot)
                    return

        threading.Thread(target=grab, daemon=True).start()
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=5))
            raise SystemExit("the monitored barrier passed without rank 1")
        except RuntimeError:
            pass
    else:
        time.sleep(7)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
