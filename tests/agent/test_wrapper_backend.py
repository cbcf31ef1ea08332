"""The opt-in ``ringwatch`` wrapper backend on real Gloo jobs.

Three jobs run side by side (ranks started directly, ``env://`` rendezvous on a free port),
each rank calling ``ringwatch.attach(wrap_backend=True)`` before ``init_process_group("gloo")``:

* 3 ranks, DDP with ringwatch's comm hook: Python collectives (sync and async), send/recv, a
  sub-group, a ``ProcessGroup`` base-class call (the front door records it, the wrapper under
  it must not), DDP, functional collectives, ``monitored_barrier``;
* 2 ranks, DDP without the comm hook, so its buckets go through the C++ reducer;
* 2 ranks whose wrapping fails (simulated): the job must run on as plain Gloo.

The logs must show every collective exactly once, in the same order on every member, the
C++-issued ones with ``api = "backend"`` and nothing left for the Flight Recorder backfill.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

import ringwatch
from ringwatch.analyzers import check_consistency

JOB = r'''
import json
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch.nn.parallel import DistributedDataParallel as DDP

import ringwatch


def main() -> None:
    log_dir, facts_dir, mode = sys.argv[1:4]
    ddp_hook = mode == "hook"
    assert ringwatch.attach(log_dir=log_dir, wrap_backend=True, ddp_hook=ddp_hook)
    if mode == "broken":
        from ringwatch.agent.capture import _wrapper_backend

        def broken(*args, **kwargs):
            raise RuntimeError("simulated failure")

        _wrapper_backend._wrap = broken
    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    world = dist.group.WORLD
    facts = {"rank": r, "world_type": type(world).__name__,
             "get_backend": str(dist.get_backend())}
    torch.manual_seed(0)
    if ddp_hook:
        sub = dist.new_group([0, 1])
        facts["sub_type"] = type(sub).__name__ if r in (0, 1) else None
        t = torch.full((8,), float(r + 1))
        dist.all_reduce(t)
        assert t[0].item() == sum(range(1, w + 1))
        work = dist.all_reduce(t, async_op=True)
        work.wait()
        big = torch.empty(8 * w)
        dist.all_gather_into_tensor(big, torch.full((8,), float(r)))
        assert big[8 * (w - 1)].item() == w - 1
        dist.broadcast(t, src=1)
        dist.barrier()
        nxt, prv = (r + 1) % w, (r - 1) % w
        buf = torch.empty(5)
        if r % 2 == 0:
            dist.send(torch.full((5,), float(r)), nxt)
            dist.recv(buf, prv)
        else:
            dist.recv(buf, prv)
            dist.send(torch.full((5,), float(r)), nxt)
        assert buf[0].item() == prv
        if r in (0, 1):
            s = torch.ones(3)
            dist.all_reduce(s, group=sub)
            assert s[0].item() == 2
        # The front door records this base-class call; the backend under it must not.
        dist.ProcessGroup.allreduce(world, [torch.ones(2)]).wait()
    model = DDP(torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 16)).sum().backward()
        opt.step()
    y = fc.wait_tensor(fc.all_reduce(torch.ones(4), "sum", world))
    assert y[0].item() == w
    if ddp_hook:
        g = fc.wait_tensor(fc.all_gather_tensor(torch.full((2,), float(r)), 0, world))
        assert g.tolist() == [float(i) for i in range(w) for _ in range(2)]
        if r in (0, 1):
            z = fc.wait_tensor(fc.all_reduce(torch.ones(3), "sum", sub))
            assert z[0].item() == 2
        dist.monitored_barrier()  # PyTorch's own "is it Gloo?" check must pass
    with open(f"{facts_dir}/facts-{r}.json", "w") as f:
        json.dump(facts, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
'''


class _Job:
    """The ranks of one job, started directly (``env://`` rendezvous on a free port), each in
    its own session so that nothing outlives the test."""

    def __init__(self, tmp: Path, name: str, nproc: int):
        self.name, self.dir = name, tmp / name
        self.dir.mkdir()
        script = self.dir / "job.py"
        script.write_text(JOB)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = {k: v for k, v in os.environ.items() if not k.startswith("RINGWATCH_")}
        base.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                    WORLD_SIZE=str(nproc), RINGWATCH_JOB_ID=name)
        self.procs = []
        for rank in range(nproc):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            out = open(self.dir / f"rank-{rank}.out", "w")
            proc = subprocess.Popen(
                [sys.executable, str(script), str(self.dir / "logs"), str(self.dir), name],
                cwd=self.dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
            self.procs.append((proc, out))

    def finish(self, deadline: float) -> tuple[list[int | None], str]:
        codes = []
        for proc, _ in self.procs:
            try:
                codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        for proc, out in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            out.close()
        text = "".join(f"--- rank {i}\n" + (self.dir / f"rank-{i}.out").read_text()
                       for i in range(len(self.procs)))
        return codes, text


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wrapper_backend")
    started = [_Job(tmp, name, n) for name, n in (("hook", 3), ("cpp", 2), ("broken", 2))]
    deadline = time.monotonic() + 50
    out = {}
    for job in started:
        codes, text = job.finish(deadline)
        assert codes == [0] * len(codes), f"job {job.name} failed {codes}:\n{text[-6000:]}"
        facts = [json.loads(p.read_text()) for p in sorted(job.dir.glob("facts-*.json"))]
        out[job.name] = (ringwatch.read_events(job.dir / "logs"), facts, text)
    return out


def _collectives(ev: pl.DataFrame) -> pl.DataFrame:
    return ev.filter(~pl.col("is_p2p"))


def test_groups_are_wrapped_and_present_as_gloo(jobs):
    ev, facts, _ = jobs["hook"]
    assert len(facts) == 3
    for f in facts:
        assert f["world_type"] == "RingwatchProcessGroup"
        assert f["get_backend"] == "gloo"
    assert [f["sub_type"] for f in facts] == ["RingwatchProcessGroup"] * 2 + [None]
    assert ev["backend"].unique().to_list() == ["gloo"]
    groups = {(r["pg"], r["pg_ranks"]) for r in ev.select("pg", "pg_ranks").iter_rows(named=True)}
    assert groups == {("0", "0-2"), ("1", "0-1")}


def test_functional_collectives_recorded_by_the_backend(jobs):
    ev, _, _ = jobs["hook"]
    fc = ev.filter(pl.col("api") == "backend")
    for rank in range(3):
        mine = fc.filter((pl.col("rank") == rank) & (pl.col("pg") == "0"))
        ops = mine.sort("idx")["op"].to_list()
        # DDP's construction (C++): parameter shapes, then the parameter broadcast; then the
        # functional all_reduce and all_gather_tensor.
        assert ops[-2:] == ["all_reduce", "all_gather_into_tensor_coalesced"], (rank, ops)
        assert "broadcast" in ops[:-2] and "all_gather" in ops[:-2], (rank, ops)
        assert mine.filter(pl.col("op") == "all_reduce")["nbytes"].to_list()[-1] == 16
    sub = fc.filter(pl.col("pg") == "1")
    assert sorted(sub["rank"].to_list()) == [0, 1]
    assert sub["op"].unique().to_list() == ["all_reduce"]
    assert set(fc["status"].unique()) == {"ok"}
    assert set(fc["end_source"].unique()) <= {"future", "wait", "poll"}


def test_ddp_buckets(jobs):
    ev, _, _ = jobs["hook"]
    ddp = ev.filter(pl.col("api") == "ddp")
    assert ddp.group_by("rank").len().sort("rank")["len"].to_list() == [3, 3, 3]
    assert set(ddp["op"].unique()) == {"all_reduce"}
    assert set(ddp["nbytes"].unique()) == {(16 * 4 + 4) * 4}
    # Without the comm hook the buckets come from DDP's C++ reducer: only the backend sees them.
    ev2, facts2, _ = jobs["cpp"]
    assert [f["get_backend"] for f in facts2] == ["gloo", "gloo"]
    assert ev2.filter(pl.col("api") == "ddp").height == 0
    buckets = ev2.filter((pl.col("api") == "backend") & (pl.col("op") == "all_reduce")
                         & (pl.col("nbytes") == (16 * 4 + 4) * 4))
    assert buckets.group_by("rank").len().sort("rank")["len"].to_list() == [3, 3]
    assert check_consistency(ev2).ok


def test_nothing_recorded_twice(jobs):
    for name in ("hook", "cpp"):
        ev, _, _ = jobs[name]
        per = _collectives(ev).group_by("rank", "pg", "seq").len()
        assert per["len"].max() == 1, per.filter(pl.col("len") > 1)
        p2p = ev.filter(pl.col("is_p2p")).group_by("rank", "pg", "op", "peer", "seq").len()
        assert p2p.height == 0 or p2p["len"].max() == 1
    ev, _, _ = jobs["hook"]
    base = ev.filter(pl.col("api") == "pg.allreduce")  # ProcessGroup.allreduce(world, ...)
    assert base.group_by("rank").len()["len"].to_list() == [1, 1, 1]
    assert set(base["nbytes"].to_list()) == {8}


def test_same_collectives_in_the_same_order_on_every_member(jobs):
    for name in ("hook", "cpp"):
        ev, _, _ = jobs[name]
        report = check_consistency(ev)
        assert report.ok, (name, report.problems)
        coll = _collectives(ev).sort("idx")
        for (pg,), g in coll.group_by("pg"):
            seen = {rank: [(r["seq"], r["op"], r["nbytes"])
                           for r in g.filter(pl.col("rank") == rank).iter_rows(named=True)]
                    for rank in g["rank"].unique().to_list()}
            first = next(iter(seen.values()))
            assert all(v == first for v in seen.values()), (name, pg, seen)
            seqs = [s for s, _, _ in first]
            assert seqs == sorted(set(seqs)) and seqs[0] == 1, (name, pg, seqs)


def test_every_row_complete(jobs):
    for name in ("hook", "cpp"):
        ev, _, _ = jobs[name]
        assert ev.filter(pl.col("api") == "flight_recorder").height == 0, name
        assert set(ev["status"].unique()) == {"ok"}, name
        assert (ev["t_end_ns"] >= ev["t_start_ns"]).all(), name
    ev, _, _ = jobs["hook"]
    apis = set(ev["api"].unique())
    assert {"dist.all_reduce", "dist.all_gather_into_tensor", "dist.broadcast", "dist.barrier",
            "dist.send", "dist.recv", "dist.monitored_barrier", "ddp", "backend"} <= apis
    p2p = ev.filter(pl.col("is_p2p"))
    assert p2p.height == 6 and p2p["peer"].null_count() == 0
    asyncs = ev.filter((pl.col("api") == "dist.all_reduce") & pl.col("async_op"))
    assert asyncs.height == 3


def test_rewrite_backend_arg():
    import torch.distributed.distributed_c10d as c10d

    from ringwatch.agent.capture import _wrapper_backend

    init = c10d.init_process_group

    def rw(*args, **kwargs):
        try:
            return _wrapper_backend.rewrite_backend_arg(init, args, kwargs)
        finally:
            _wrapper_backend._TLS.shown = None  # the hand-off to group creation: unused here

    assert rw("gloo") == (("ringwatch",), {})
    assert rw("GLOO", "env://") == (("ringwatch", "env://"), {})
    assert rw(backend="gloo", rank=0) == ((), {"backend": "ringwatch", "rank": 0})
    assert rw("cpu:gloo") == (("cpu:ringwatch",), {})
    for untouched in ("nccl", "cpu:gloo,cuda:nccl", "ringwatch"):
        assert rw(untouched) == ((untouched,), {})
    assert rw(device_id=3) == ((), {"device_id": 3})
    default = str(c10d.BackendConfig(c10d.Backend("undefined")))
    if default == "cpu:gloo":  # no accelerator: the default is Gloo alone
        assert rw() == ((), {"backend": "cpu:ringwatch"})
    else:  # Gloo plus the accelerator's backend: left alone
        assert rw() == ((), {})


def test_a_failure_to_wrap_leaves_plain_gloo(jobs):
    ev, facts, out = jobs["broken"]
    assert "could not wrap a Gloo group" in out
    assert [(f["world_type"], f["get_backend"]) for f in facts] == [("ProcessGroup", "gloo")] * 2
    assert ev.filter(pl.col("api") == "backend").height == 0
    # what only the backend would have seen is recovered from the Flight Recorder, as on Gloo
    assert ev.filter(pl.col("api") == "flight_recorder").height > 0
    assert check_consistency(ev).ok
