"""Send/recv between hosts as link evidence, live: real pipeline runs' rows read by the
agent's rank tails, pushed as OTLP by its pusher, ingested and analysed by the service, give
the findings ``ringwatch analyze`` gives on the same rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl
import pytest

from ringwatch._clock import FakeClock
from ringwatch.agent.sidecar._rank_tail import _COLUMNS, _consume
from ringwatch.analyzers._p2p_links import p2p_bandwidth, receive_table
from ringwatch.analyzers._policy import split_hiccups
from ringwatch.analyzers._timing import with_analysis_durations
from ringwatch.service._service import Service, ServiceConfig

from fakes import gpu_shaped, sidecar_steps

PIPELINE = Path(__file__).resolve().parents[1] / "data" / "pipeline"
# the service as the agent's OTLP exporter, in process (as benchmarks/live_replay.py runs it)
_spec = importlib.util.spec_from_file_location(
    "ringwatch_bench_live_replay",
    Path(__file__).resolve().parents[2] / "benchmarks" / "live_replay.py")
_replay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_replay)
_ToService = _replay._ToService


def _post_mortem(ev: pl.DataFrame):
    from ringwatch._analyze import analyze_events

    return split_hiccups(analyze_events(ev, now_ns=int(ev["t_end_ns"].max())))[0]


@pytest.mark.parametrize("name", ["link-p2p", "strag-mid", "pp4-strag"])
@pytest.mark.parametrize("shape", ["exact", "gpu"])
def test_the_agents_receive_figures_are_the_post_mortem_receive_table(name, shape):
    """Per (rank, sender, step): the receives and the fastest one, summed by the agent as it
    reads each rank's rows, as ``receive_table`` reads them from the whole log (measured, or
    re-timed as a GPU job reports them: device durations, watchdog ends)."""
    ev = pl.read_parquet(PIPELINE / f"{name}.parquet")
    if shape == "gpu":
        ev = gpu_shaped(ev, first_lead_ms=1)
    post = {(r, p, s): (n, b, d) for r, _, p, _, s, n, b, d in
            receive_table(with_analysis_durations(ev)).iter_rows()}
    live = {(rank, p, step): tuple(v) for rank, steps in sidecar_steps(ev).items()
            for step, _, _, recv in steps for p, v in recv.items()}
    assert live and len(post) > len(live) * 0.9  # every step but each rank's last
    for key, got in live.items():
        n, nbytes, ns = post[key]
        assert got[0] == n and got[1] * ns == nbytes * got[2], key  # the same rate


def test_the_agent_and_the_analyzers_leave_out_the_same_small_receives():
    from ringwatch.agent.sidecar._step_work import MIN_RECV_BYTES
    from ringwatch.analyzers._p2p_links import MIN_LINK_BYTES

    assert MIN_RECV_BYTES == MIN_LINK_BYTES


def test_a_receive_table_without_hosts_or_inside_one_host_is_no_link():
    table = pl.DataFrame(
        {"rank": [1, 1, 2], "host": ["a", "a", None], "peer": [0, 3, 0],
         "peer_host": ["a", "b", "a"], "step": [0, 0, 0], "receives": [2, 2, 1],
         "nbytes": [1 << 20] * 3, "duration_ns": [10_000_000, 20_000_000, 1]},
        schema=receive_table(pl.DataFrame()).schema)
    bw = p2p_bandwidth(table)
    assert bw["pg"].to_list() == ["p2p b>a"]  # inside host a, and a receiver with no host: out
    assert bw.row(0, named=True)["MBps"] == pytest.approx((1 << 20) / 20_000_000 * 1e3)


def _key(f) -> tuple:
    return f.kind, f.cls, f.ranks, f.hosts, f.since_step


def replay_live(path: Path, push: int, restart: int | None, tmp_path: Path):
    """A stored run's rows streamed ``push`` steps at a time through the agent's rank tails,
    its pusher and the service (restarted from its state files at step ``restart``): what
    the service showed open (hangs apart), what ``ringwatch analyze`` finds on the same rows
    (sorted), how many points the service refused, and the service."""
    ev = pl.read_parquet(path).with_columns(
        pl.lit(None, pl.Int64).alias("t_issue_ns")).select(
        "rank", "local_rank", "host", *_COLUMNS)
    want = sorted(_key(f) for f in _post_mortem(
        pl.read_parquet(path)) if f.kind != "hang")
    clock = FakeClock(wall_ns=int(ev["t_start_ns"].min()))
    svc = Service(ServiceConfig(state_dir=tmp_path), clock=clock)
    pusher, ranks = _replay.agent_for(ev, svc, clock)
    shown, refused = set(), 0
    steps = int(ev["step"].max()) + 1
    for lo in range(0, steps + 2, push):
        if restart is not None and lo <= restart < lo + push:  # killed: what its files hold
            svc = Service(ServiceConfig(state_dir=tmp_path), clock=clock)
            refused += pusher.exporter.rejected
            pusher.exporter = _ToService(svc, clock)
        part = ev.filter(pl.col("step").is_between(lo, lo + push - 1))
        for (rank,), rows in part.partition_by("rank", as_dict=True).items():
            _consume(ranks[rank], rows.drop("rank", "local_rank", "host"))
        if not part.is_empty():  # the service's clock: the newest row's end
            clock.advance(max(0, int(part["t_end_ns"].max()) - clock.wall_ns()))
        assert pusher.push(clock.wall_ns())
        svc.analyze_once()
        shown |= {_key(t.finding) for t in svc.store.current("job", state="open")
                  if t.finding.kind != "hang"}
    return shown, want, refused + pusher.exporter.rejected, svc


@pytest.mark.parametrize("name,push,restart", [
    ("link-p2p", 1, None), ("link-p2p", 6, None), ("link-p2p", 1, 31), ("link-p2p", 6, 36),
    ("strag-mid", 3, None), ("strag-mid", 1, 31), ("healthy", 4, None),
    ("strag-0", 60, None), ("strag-mid", 40, None), ("vpp-strag", 30, None),
    ("vb-strag0", 1, None), ("vb-strag0", 30, None), ("vb-strag0", 60, None),
    ("laststage", 60, None)])
def test_a_slow_link_between_the_stages_live_as_post_mortem(name, push, restart, tmp_path):
    """A real 2 x 2 x 2 pipeline whose stages sit one per host (``link-p2p``: host1's link at
    8 Mbit/s from step 25, so that only send/recv crosses it), streamed ``push`` steps at a
    time through the agent and the service: the service opens the slow link ``ringwatch
    analyze`` names (hosts, ranks, onset), also when it is restarted mid-fault (at step
    ``restart``, from its state files); a straggler whose late sends slow its receivers stays
    one straggler, no link (also through a restart: the pipeline is read again); a healthy run
    shows nothing. A push that carries the whole run (60 steps) or most of it gives what
    pushes of a step give: the stages are read from the rows it brings before they are
    judged."""
    shown, want, refused, _ = replay_live(PIPELINE / f"{name}.parquet", push, restart,
                                          tmp_path)
    assert sorted(shown) == want, (shown, want)
    assert refused == 0  # every point the agent sent was good
