"""A serving engine's own communicator (a stand-in with vLLM's GroupCoordinator methods that
moves data over a socket of its own, not torch.distributed), recorded through
``ringwatch.attach_communicator`` on a real 2-rank job: every call a row of its group, with
sizes, order and errors; the lateness of one rank is what the analyzers read."""

from __future__ import annotations

import json
import socket
from collections import Counter

import polars as pl
import pytest

from ringwatch._logs import open_job

from jobtools import JOBS, run_job, torchrun_cmd


@pytest.fixture(scope="module")
def comm_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("communicator")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, out = run_job(torchrun_cmd(2, [str(JOBS / "communicator.py"), "--log-dir", "logs",
                                       "--port", str(port)]), cwd=d)
    assert rc == 0, out
    job = open_job(d / "logs")
    issued = [json.loads((d / "logs" / f"issued-{r}.json").read_text()) for r in (0, 1)]
    return job, job.events(), issued


def test_every_call_is_a_row_of_the_communicators_group(comm_run):
    job, ev, issued = comm_run
    assert job.problems == []
    mine = ev.filter(pl.col("api") == "communicator")
    for rank in (0, 1):
        got = mine.filter(pl.col("rank") == rank)
        want = Counter({"all_reduce": 40, "all_gather": 40, "broken": 1})
        assert Counter(issued[rank]) == want + Counter({"send" if rank == 0 else "recv": 1})
        ops = Counter(got["op"].to_list())
        # the method after restore() is not recorded: exactly what was issued while attached
        assert ops == Counter({"all_reduce": 41, "all_gather": 40,
                               "send" if rank == 0 else "recv": 1})
        assert set(got["pg"]) == {"tp"} and set(got["pg_ranks"]) == {"0-1"}
        assert set(got["backend"]) == {"custom:StandInCoordinator"}
        coll = got.filter(~pl.col("is_p2p")).sort("idx")
        assert coll["seq"].to_list() == list(range(1, 82))  # issue order, one numbering
        ar = coll.filter(pl.col("op") == "all_reduce")
        assert set(ar["nbytes"]) == {1024} and set(ar["dtype"]) == {"float32"}


def test_a_call_that_raises_is_recorded_as_an_error_and_still_raises(comm_run):
    _, ev, _ = comm_run
    bad = ev.filter((pl.col("api") == "communicator") & (pl.col("status") != "ok"))
    assert bad.height == 2 and set(bad["status"]) == {"error"}
    assert all("the kernel failed" in e for e in bad["error"])


def test_send_and_recv_are_paired(comm_run):
    _, ev, _ = comm_run
    p2p = ev.filter((pl.col("api") == "communicator") & pl.col("is_p2p")).sort("rank")
    assert p2p.select("rank", "op", "peer", "seq").rows() == [(0, "send", 1, 1),
                                                              (1, "recv", 0, 1)]


def test_the_late_rank_is_the_one_its_peer_waits_for(comm_run):
    # rank 1 comes 20 ms late to every all-reduce from call 10: rank 0 waits in them
    _, ev, _ = comm_run
    ar = ev.filter((pl.col("api") == "communicator") & (pl.col("op") == "all_reduce")
                   & (pl.col("step") >= 12))
    wait = dict(ar.group_by("rank").agg(pl.col("duration_ns").median()).iter_rows())
    assert wait[0] > wait[1] + 10_000_000, wait
