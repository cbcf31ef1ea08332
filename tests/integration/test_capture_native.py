"""The native hot path (``RINGWATCH_NATIVE=1``, ``attach(native=True)``): a C++ backend
wrapper built against the installed torch records the Gloo groups. On real multi-process jobs
it must give the rows the Python hooks give (same numbering, peers, roots, sizes, modes,
steps), plus the collectives issued from C++ that the Python hooks only recover from the
Flight Recorder; and where it cannot be built, the job runs on with the Python hooks."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl
import pytest

from ringwatch._logs import open_job
from ringwatch.agent.capture import _native
from ringwatch.analyzers import check_consistency, compare_flight_recorder

from jobtools import JOBS, PY, job_env, read_json_line, ringwatch_cmd, run_job, torchrun_cmd

# What the two paths must agree on, row for row (per rank, as multisets).
SAME = ["pg", "seq", "op", "peer", "root", "async_op", "nbytes", "status", "step"]


@pytest.fixture(scope="module")
def built():
    """The extension, built once for the module (tests/tools/require.sh brings the compiler,
    Python's headers and ninja)."""
    mod = _native.load()
    assert mod is not None, "the native hot path could not be built (see the warning)"
    return mod


def _apis(d, native: bool):
    script = [str(JOBS / "all_apis.py"), "--expect", "expect.json"]
    env = job_env(RINGWATCH_NATIVE="1") if native else job_env()
    rc, out = run_job(ringwatch_cmd("run", "--log-dir", "logs", "--", *torchrun_cmd(4, script)),
                      cwd=d, env=env)
    assert rc == 0, out
    job = open_job(d / "logs")
    return job, job.events(), json.loads((d / "expect.json").read_text())


@pytest.fixture(scope="module")
def apis(built, tmp_path_factory):
    return (_apis(tmp_path_factory.mktemp("apis_native"), True),
            _apis(tmp_path_factory.mktemp("apis_python"), False))


def test_every_api_recorded_natively_and_consistent(apis):
    (job, ev, expected), _ = apis
    assert job.problems == []
    assert ev["api"].unique().to_list() == ["native"]
    report = check_consistency(ev)
    assert report.ok, report.problems
    for rank, issued in enumerate(expected):
        got = Counter(ev.filter(pl.col("rank") == rank).select("op", "async_op").iter_rows())
        missing = Counter((op, bool(a)) for _, op, a in issued) - got
        assert not missing, f"rank {rank} missed {dict(missing)}"
    for rank in job.ranks:
        cmp = compare_flight_recorder(ev.filter(pl.col("rank") == rank), job.flight_recorder(rank))
        assert cmp.ok, (rank, cmp)
        assert cmp.matched >= 30
    meta = job.meta()
    assert all(m["counters"]["native_issues_dropped"] == 0 for m in meta.values())


def test_times_peers_and_roots(apis):
    (_, ev, _), _ = apis
    assert ev["status"].unique().to_list() == ["ok"]
    assert (ev["duration_ns"] >= 0).all() and ev["duration_ns"].null_count() == 0
    assert set(ev["end_source"].unique()) <= {"wait", "future", "poll"}
    p2p = ev.filter(pl.col("is_p2p"))
    assert p2p["peer"].null_count() == 0 and p2p["seq"].null_count() == 0
    rooted = ev.filter(pl.col("op").is_in(["broadcast", "reduce", "gather", "scatter"]))
    assert rooted["root"].null_count() == 0
    assert ev.filter(~pl.col("is_p2p"))["peer"].null_count() == ev.filter(~pl.col("is_p2p")).height


def test_same_rows_as_the_python_hooks(apis):
    """Row for row what the Python path records; the functional collectives (issued from
    C++) are seen as they happen, timed, where the Python path recovers them afterwards from
    the Flight Recorder with no completion state."""
    (_, native, _), (_, python, _) = apis
    fr = python.filter(pl.col("api") == "flight_recorder")
    assert fr.height == 8  # 2 per rank
    keys = fr.select("rank", "pg", "seq")
    for rank in range(4):
        n = native.filter(pl.col("rank") == rank).join(keys, on=["rank", "pg", "seq"], how="anti")
        p = python.filter((pl.col("rank") == rank) & (pl.col("api") != "flight_recorder"))
        assert Counter(n.select(SAME).iter_rows()) == Counter(p.select(SAME).iter_rows()), rank
    functional = native.join(keys, on=["rank", "pg", "seq"], how="semi")
    assert functional.height == 8
    assert functional["status"].unique().to_list() == ["ok"]
    assert functional["duration_ns"].null_count() == 0


@pytest.fixture(scope="module")
def ddp(built, tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp_native")
    rc, out = run_job(torchrun_cmd(4, ["-m", "ringwatch.cluster._job", "--steps", "12",
                                       "--attach", "logs", "--result", "result.json"]),
                      cwd=d, env=job_env(RINGWATCH_NATIVE="1"))
    assert rc == 0, out
    return open_job(d / "logs"), read_json_line(d / "result.json")


def test_ddp_buckets_from_the_reducer_every_step(ddp):
    """DDP's reducer issues its buckets from C++: the wrapper times each one, with no comm
    hook, on every rank and every step, in the same order everywhere."""
    job, result = ddp
    ev = job.events()
    report = check_consistency(ev)
    assert report.ok, report.problems
    buckets = ev.filter(pl.col("op") == "all_reduce").group_by("rank", "step").len()
    per_step = buckets.filter(pl.col("step") > 1)["len"].unique().to_list()
    assert per_step == [result["buckets"]]
    assert buckets["step"].n_unique() == 12
    lists = {r: g.sort("idx").select("pg", "seq", "op", "nbytes").rows()
             for (r,), g in ev.group_by("rank")}
    assert len({tuple(v) for v in lists.values()}) == 1
    for rank in job.ranks:
        cmp = compare_flight_recorder(ev.filter(pl.col("rank") == rank), job.flight_recorder(rank))
        assert cmp.ok, (rank, cmp)


def test_detach_restores_the_backend_and_steps_reach_the_rows(built, tmp_path):
    rc, out = run_job([PY, str(JOBS / "native_detach.py"), "logs", "result.json"], cwd=tmp_path,
                      env=job_env())
    assert rc == 0, out
    res = json.loads((tmp_path / "result.json").read_text())
    assert res == {"native": True, "wrapped_after_attach": True, "wrapped_after_detach": False,
                   "value": 1.0}
    ev = open_job(tmp_path / "logs").events().sort("idx")
    assert ev.select("op", "step", "async_op").rows() == [
        ("all_reduce", 41, False), ("broadcast", 42, False), ("all_reduce", 42, True)]


def test_no_compiler_falls_back_to_the_python_hooks(tmp_path):
    """Where the extension cannot be built, the job runs and is recorded all the same."""
    script = [str(JOBS / "all_apis.py"), "--expect", "expect.json"]
    env = job_env(RINGWATCH_NATIVE="1", RINGWATCH_NATIVE_DIR=str(tmp_path / "build"),
                  CXX="/bin/false")
    rc, out = run_job(ringwatch_cmd("run", "--log-dir", "logs", "--", *torchrun_cmd(4, script)),
                      cwd=tmp_path, env=env)
    assert rc == 0, out
    assert "native hot path is unavailable" in out
    ev = open_job(tmp_path / "logs").events()
    assert ev.filter(pl.col("api") == "native").height == 0
    assert ev.filter(pl.col("api") == "dist.all_reduce").height > 0


def _records(feed, rows):
    """Issue records as the extension writes them: (op, seq_before, seq_after, flags, peer)."""
    import numpy as np

    a = np.zeros(len(rows), dtype=feed.issue_dtype)
    for i, (op, before, after, flags, peer) in enumerate(rows):
        a[i] = (1_000 * (i + 1), 7, before, after, 4, 4, 1, op, 0, peer, -1, -1,
                flags | _native.F_END_FOLLOWS)
    return a


def _ends(feed, ids, *, peer=-1):
    import numpy as np

    e = np.zeros(len(ids), dtype=feed.end_dtype)
    for i, n in enumerate(ids):
        e[i] = (n, 1_000_000 + n, -1, -1, 0, 0, peer)
    return e


def test_bulk_numbering_of_batches_barriers_and_pairs(built):
    """The writer's bulk numbering, fed records as the extension writes them: a coalescing
    block takes one number, a monitored barrier two whatever its messages, send/recv count per
    pair and not in the collective numbers, ends that come before their issue wait for it,
    and a receive from any source is numbered in its pair when its sender is known."""
    import numpy as np

    from ringwatch.agent.capture._recorder import GroupInfo, RankIdentity, Recorder

    rec = Recorder(RankIdentity(job_id="j", rank=1, local_rank=1, world_size=3, host="h",
                                pid=1))
    feed = _native.NativeFeed(built, rec)
    g = rec.add_group(GroupInfo(key="0", name="0", desc=None, backend="gloo",
                                global_ranks=[0, 1, 2], group_rank=1))
    feed.groups.append(g)
    n = _native
    recs = _records(feed, [
        (0, 0, 1, 0, -1),                       # all_reduce                    -> 1
        (n.OP_SEND, 1, 2, 0, 2),                # send to 2 (counter moves)     -> pair 1
        (0, 2, 3, 0, -1),                       # all_reduce                    -> 2
        (n.OP_BATCH_START, 3, 3, 0, -1),        # a coalescing block opens
        (0, 3, 3, n.F_IN_BATCH, -1),            #   all_reduce                  -> 3
        (3, 3, 3, n.F_IN_BATCH, -1),            #   broadcast                   -> 3
        (n.OP_BATCH_END, 3, 4, 0, -1),          # closes: the counter moved once
        (n.OP_MONITORED, 4, -1, 0, -1),         # monitored barrier (before it)  -> 5
        (n.OP_MONITORED_DONE, 4, 9, 0, -1),     #   it returned: 5 steps, 3 messages
        (n.OP_RECV, 9, 10, 0, 0),               # recv from 0                   -> pair 1
        (n.OP_SEND, 10, 11, 0, 2),              # send to 2                     -> pair 2
        (0, 11, 12, 0, -1),                     # all_reduce                    -> 6
        (n.OP_RECV_ANY, 12, 13, 0, -1),         # recv from any source
    ])
    ids = np.arange(len(recs), dtype=np.uint64)
    feed._add_ends(_ends(feed, [0, 1]))  # ends drained before their issues
    feed._add_issues(recs, ids)
    feed._add_ends(_ends(feed, [2, 4, 5, 7, 9, 10, 11]))
    feed._add_ends(_ends(feed, [12], peer=2))  # the sender learnt at completion
    cols = feed._take(final=False)
    got = list(zip(cols["op"], cols["seq"], cols["peer"], strict=True))
    assert got == [("all_reduce", 1, None), ("send", 1, 2), ("all_reduce", 2, None),
                   ("all_reduce", 3, None), ("broadcast", 3, None),
                   ("monitored_barrier", 5, None), ("recv", 1, 0), ("send", 2, 2),
                   ("all_reduce", 6, None), ("recv", 1, 2)]
    assert list(cols["idx"]) == sorted(cols["idx"])
    assert set(cols["step"]) == {7} and set(cols["status"]) == {"ok"}
    assert g.coll_seq == 6 and g.pair_seq == {(1, 2): 2, (0, 1): 1, (2, 1): 1}
    assert feed.pending is not None and len(feed.pending["id"]) == 0


class _LateEnds:
    """The extension as seen by the feed, its drains scripted: what each drain returns."""

    def __init__(self, mod, drains):
        self._mod, self._drains = mod, list(drains)

    def start(self, _records):
        pass

    def drain(self, _most):
        return self._drains.pop(0) if self._drains else (b"", b"", b"")

    def __getattr__(self, name):
        return getattr(self._mod, name)


@pytest.mark.parametrize("end_comes", [True, False])
def test_the_last_poll_waits_briefly_for_an_end_still_to_come(built, end_comes):
    """A future's waiter can wake, and the job exit, before the callback that records the end
    has run: the last poll drains again for a moment, so the op is finished and not left
    pending; an end that never comes (a rank killed in a hang) costs that moment only."""
    import time

    import numpy as np

    from ringwatch.agent.capture._recorder import GroupInfo, RankIdentity, Recorder

    rec = Recorder(RankIdentity(job_id="j", rank=0, local_rank=0, world_size=2, host="h",
                                pid=1))
    probe = _native.NativeFeed(_LateEnds(built, []), rec)
    recs = _records(probe, [(0, 0, 1, 0, -1)])
    ends = _ends(probe, [0])
    issue = (recs.tobytes(), np.arange(1, dtype="<u8").tobytes(), b"")
    drains = [issue, (b"", b"", b""), (b"", b"", b"")] + (
        [(b"", b"", ends.tobytes())] if end_comes else [])
    feed = _native.NativeFeed(_LateEnds(built, drains), rec)
    feed.groups.append(rec.add_group(GroupInfo(key="0", name="0", desc=None, backend="gloo",
                                               global_ranks=[0, 1], group_rank=0)))
    t0 = time.monotonic()
    cols = feed.poll(final=True, grace_s=0.2)
    waited_s = time.monotonic() - t0
    assert list(cols["status"]) == (["ok"] if end_comes else ["pending"])
    assert waited_s <= 0.2 + 0.1, waited_s
    if not end_comes:
        assert waited_s >= 0.2, waited_s


def test_a_blocked_monitored_barrier_is_in_flight_then_an_error(built, tmp_path):
    """The one call that blocks inside the backend is recorded before it: while rank 0 waits
    for a rank that never comes, its pending snapshot holds the barrier; the timeout then ends
    it as an error, and the job goes on."""
    import polars as pl

    env = job_env(RINGWATCH_NATIVE="1", RINGWATCH_JOB_ID="mb", RINGWATCH_FLUSH_INTERVAL_S="0.3")
    rank0 = tmp_path / "logs" / "mb" / "rank-00000"
    rc, out = run_job(ringwatch_cmd("run", "--log-dir", "logs", "--", *torchrun_cmd(2, [
        str(JOBS / "native_monitored.py"), str(rank0), "snapshot.parquet"])),
        cwd=tmp_path, env=env)
    assert rc == 0, out
    snap = pl.read_parquet(tmp_path / "snapshot.parquet")
    assert snap.select("op", "status", "api").rows() == [
        ("monitored_barrier", "pending", "native")]
    ev = open_job(tmp_path / "logs").events().filter(pl.col("rank") == 0).sort("idx")
    assert ev.select("op", "seq", "status").rows() == [
        ("all_reduce", 1, "ok"), ("monitored_barrier", 3, "error")]


def test_blocking_send_recv_read_blocking_while_another_thread_holds_the_gil(built, tmp_path):
    """``dist.send``/``dist.recv`` are marked blocking by the capture's wrappers, not guessed
    from how soon the wait came: a thread of the rank runs Python all the while (as the agent's
    writer does when it drains a burst), so the main thread often waits for the GIL between
    the backend's return and its wait (before the marks, some of 300 blocking sends read
    asynchronous); a rank that sleeps or computes before waiting is asynchronous."""
    n = 300
    rc, out = run_job(ringwatch_cmd("run", "--log-dir", "logs", "--", *torchrun_cmd(
        2, [str(JOBS / "p2p_modes.py"), str(n), "--gil"])), cwd=tmp_path,
        env=job_env(RINGWATCH_NATIVE="1"), timeout=300)
    assert rc == 0, out
    ev = open_job(tmp_path / "logs").events()
    assert ev["api"].unique().to_list() == ["native"]
    for rank, op in ((0, "send"), (1, "recv")):
        modes = ev.filter((pl.col("rank") == rank) & (pl.col("op") == op)).sort("idx")[
            "async_op"].to_list()
        assert len(modes) == 3 * n
        blocking, slept, computed = modes[:n], modes[n:2 * n], modes[2 * n:]
        assert not any(blocking), (rank, sum(blocking))
        assert all(slept) and all(computed), (rank, n - sum(slept), n - sum(computed))
