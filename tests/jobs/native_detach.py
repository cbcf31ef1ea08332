"""One Gloo rank (world size 1) that checks, in process, what the native hot path promises:
attach(native=True) wraps the group's backend, mark_step() reaches the rows recorded in C++,
detach() gives the group its own backend back and later calls are not recorded.

Usage: native_detach.py LOG_DIR RESULT_JSON
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist


def main() -> None:
    log_dir, result = sys.argv[1], sys.argv[2]
    import ringwatch
    from ringwatch.agent.capture._state import STATE

    assert ringwatch.attach(log_dir=log_dir, job_id="native-detach", native=True)
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    mod = STATE.native_module
    pg = dist.group.WORLD
    out = {"native": mod is not None, "wrapped_after_attach": bool(mod and mod.is_wrapped(pg))}
    t = torch.ones(4)
    ringwatch.mark_step(41)
    dist.all_reduce(t)
    ringwatch.mark_step(42)
    dist.broadcast(t, 0)
    dist.all_reduce(t, async_op=True).wait()
    ringwatch.detach()
    out["wrapped_after_detach"] = bool(mod and mod.is_wrapped(pg))
    dist.all_reduce(t)  # not recorded: the agent is detached
    out["value"] = t[0].item()
    dist.destroy_process_group()
    with open(result, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
