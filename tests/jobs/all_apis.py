"""A job that calls every torch.distributed collective and p2p API at least once, sync and
async, on the world group and on a sub-group. Run with 4 ranks under torchrun.

Usage: all_apis.py [--attach LOG_DIR] --expect FILE

Rank 0 writes to FILE, as JSON, the list of (api, op, async) each rank issued through Python,
so the test can check ringwatch saw each one.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attach")
    p.add_argument("--expect", required=True)
    args = p.parse_args()
    if args.attach:
        import ringwatch

        ringwatch.attach(log_dir=args.attach)
    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    assert w == 4, "run with 4 ranks"
    sub = dist.new_group([0, 1])  # every rank calls new_group; 2 and 3 are not members
    pair = dist.new_group([2, 3])
    issued: list[tuple[str, str, bool]] = []

    def did(api: str, op: str, async_op: bool = False) -> None:
        issued.append((api, op, async_op))

    t = torch.full((8,), float(r + 1))
    for async_op in (False, True):
        works = []
        works.append(dist.all_reduce(t, async_op=async_op))
        did("dist.all_reduce", "all_reduce", async_op)
        works.append(dist.broadcast(t, src=1, async_op=async_op))
        did("dist.broadcast", "broadcast", async_op)
        works.append(dist.reduce(t, dst=2, async_op=async_op))
        did("dist.reduce", "reduce", async_op)
        outs = [torch.empty(8) for _ in range(w)]
        works.append(dist.all_gather(outs, t, async_op=async_op))
        did("dist.all_gather", "all_gather", async_op)
        big = torch.empty(8 * w)
        works.append(dist.all_gather_into_tensor(big, t, async_op=async_op))
        did("dist.all_gather_into_tensor", "all_gather_into_tensor", async_op)
        out = torch.empty(8)
        works.append(dist.reduce_scatter_tensor(out, torch.ones(8 * w), async_op=async_op))
        did("dist.reduce_scatter_tensor", "reduce_scatter_tensor", async_op)
        works.append(dist.all_to_all_single(torch.empty(8 * w), torch.arange(8.0 * w),
                                            async_op=async_op))
        did("dist.all_to_all_single", "all_to_all_single", async_op)
        ins = [torch.full((3,), float(r)) for _ in range(w)]
        outs = [torch.empty(3) for _ in range(w)]
        works.append(dist.all_to_all(outs, ins, async_op=async_op))
        did("dist.all_to_all", "all_to_all", async_op)
        glist = [torch.empty(8) for _ in range(w)] if r == 0 else None
        works.append(dist.gather(t, glist, dst=0, async_op=async_op))
        did("dist.gather", "gather", async_op)
        slist = [torch.full((8,), float(i)) for i in range(w)] if r == 3 else None
        works.append(dist.scatter(torch.empty(8), slist, src=3, async_op=async_op))
        did("dist.scatter", "scatter", async_op)
        works.append(dist.barrier(async_op=async_op))
        did("dist.barrier", "barrier", async_op)
        # sub-groups: members only
        if r in (0, 1):
            works.append(dist.all_reduce(t, group=sub, async_op=async_op))
            did("dist.all_reduce", "all_reduce", async_op)
            works.append(dist.broadcast(t, src=1, group=sub, async_op=async_op))
            did("dist.broadcast", "broadcast", async_op)
        else:
            works.append(dist.all_gather_into_tensor(torch.empty(16), t, group=pair,
                                                     async_op=async_op))
            did("dist.all_gather_into_tensor", "all_gather_into_tensor", async_op)
        # point to point: a ring, sync or async
        nxt, prv = (r + 1) % w, (r - 1) % w
        buf = torch.empty(5)
        if async_op:
            sw = dist.isend(torch.full((5,), float(r)), nxt)
            rw = dist.irecv(buf, prv)
            sw.wait()
            rw.wait()
            did("dist.isend", "send", True)
            did("dist.irecv", "recv", True)
        elif r % 2 == 0:
            dist.send(torch.full((5,), float(r)), nxt)
            dist.recv(buf, prv)
            did("dist.send", "send")
            did("dist.recv", "recv")
        else:
            dist.recv(buf, prv)
            dist.send(torch.full((5,), float(r)), nxt)
            did("dist.recv", "recv")
            did("dist.send", "send")
        assert buf[0].item() == prv
        for work in works:
            if work is not None:
                work.wait()

    # batched p2p, within the sub-group pair (2,3) and around the world ring
    ops = [dist.P2POp(dist.isend, torch.full((4,), float(r)), (r + 1) % w),
           dist.P2POp(dist.irecv, torch.empty(4), (r - 1) % w)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    did("dist.batch_isend_irecv", "send", True)
    did("dist.batch_isend_irecv", "recv", True)
    # receive from any source
    if r == 0:
        src = dist.recv(torch.empty(2))
        assert src in (1, 2, 3)
        did("dist.recv", "recv")
    elif r == 1:
        dist.send(torch.ones(2), 0)
        did("dist.send", "send")
    # coalescing manager
    a, b = torch.ones(4), torch.ones(6)
    with dist._coalescing_manager(async_ops=True) as cm:
        dist.all_reduce(a)
        dist.all_reduce(b)
    cm.wait()
    assert a[0].item() == w
    did("dist._coalescing_manager", "all_reduce_coalesced", True)
    # functional collectives: issued from C++, outside every Python hook
    import torch.distributed._functional_collectives as fc

    y = fc.wait_tensor(fc.all_reduce(torch.ones(4), "sum", dist.group.WORLD))
    assert y[0].item() == w
    z = fc.wait_tensor(fc.all_gather_tensor(torch.ones(2), 0, dist.group.WORLD))
    assert z.numel() == 2 * w
    # object collectives (several tensor collectives each)
    objs = [None] * w
    dist.all_gather_object(objs, {"rank": r})
    assert objs[3] == {"rank": 3}
    lst = [f"from {r}"]
    dist.broadcast_object_list(lst, src=2)
    assert lst == ["from 2"]
    gathered = [None] * w if r == 0 else None
    dist.gather_object(r, gathered, dst=0)
    got = [None]
    dist.scatter_object_list(got, [10, 11, 12, 13] if r == 0 else None, src=0)
    assert got[0] == 10 + r
    did("dist.all_gather_object", "all_gather")
    did("dist.broadcast_object_list", "broadcast")
    did("dist.gather_object", "gather")
    did("dist.scatter_object_list", "scatter")
    # monitored barrier (gloo only)
    dist.monitored_barrier()
    did("dist.monitored_barrier", "monitored_barrier")
    # a last sync all-reduce checks the data went through untouched
    x = torch.tensor([float(r)])
    dist.all_reduce(x)
    assert x.item() == sum(range(w))
    all_issued = [None] * w
    dist.all_gather_object(all_issued, issued)
    if r == 0:
        with open(args.expect, "w") as f:
            json.dump(all_issued, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
