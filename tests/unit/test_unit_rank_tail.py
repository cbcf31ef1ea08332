"""The sidecar's per-rank summaries, read incrementally from segments the real writer wrote."""

from __future__ import annotations

import pytest

from ringwatch._clock import FakeClock
from ringwatch.agent.capture._writer import SegmentWriter, rank_dir
from ringwatch.agent.sidecar._node_state import NodeState
from ringwatch.agent.sidecar._points import collect_points
from ringwatch.agent.sidecar._rank_tail import KEEP_STEPS, RankLogTail, _Watermark

from fakes import JOB, group, identity, issue_collective, issue_p2p, recorder


class Rank:
    def __init__(self, log_dir, rank=0, *, compact_segments=32, host="host-a"):
        self.clock = FakeClock()
        self.rec = recorder(rank=rank, clock=self.clock)
        self.g = group(self.rec, group_rank=rank)
        ident = identity(rank)
        self.writer = SegmentWriter(rank_dir(log_dir, JOB, rank), ident,
                                    compact_segments=compact_segments, clock=self.clock)
        self.host = host

    def collective(self, dur_ns=1_000_000, gap_ns=4_000_000, nbytes=400, end=True):
        ev = issue_collective(self.rec, self.g, nbytes=nbytes)
        if end:
            self.clock.advance(dur_ns)
            self.rec.end(ev)
            self.clock.advance(gap_ns)
        return ev

    def flush(self):
        self.writer.write(self.rec.drain())
        self.writer.write_pending(self.rec.pending_snapshot())
        self.writer.write_meta({"written_ns": self.clock.wall_ns(), "host": self.host})


def test_watermark_keeps_only_what_is_above_the_contiguous_prefix():
    w = _Watermark()
    for n in (0, 1, 3, 5):
        w.add(n)
    assert (w.low, w.above) == (1, {3, 5})
    w.add(2)
    w.add(4)
    assert (w.low, w.above) == (5, set())
    assert 4 in w and 6 not in w


def test_totals_are_counted_once_across_flushes_and_compaction(tmp_path):
    r = Rank(tmp_path, compact_segments=3)
    tail = RankLogTail(tmp_path, clock=r.clock)
    for _ in range(2):
        r.collective()
    r.flush()
    s = tail.poll()[(JOB, 0)]
    t = s.ops[("0", "all_reduce")]
    assert (t.count, t.nbytes, t.busy_ns) == (2, 800, 2_000_000)
    assert t.gap_ns == 4_000_000  # one gap between the two
    for _ in range(2):  # segment 2, then segment 3 and the merge of 1..3
        for _ in range(2):
            r.collective()
        r.flush()
    assert any(p.name == "seg-00000001-00000003.parquet" for p in r.writer.dir.iterdir())
    s = tail.poll()[(JOB, 0)]
    t = s.ops[("0", "all_reduce")]
    assert (t.count, t.busy_ns, t.gap_ns) == (6, 6_000_000, 5 * 4_000_000)
    assert s.last_completed_seq["0"] == s.last_started_seq["0"] == 6
    assert tail.poll()[(JOB, 0)].ops[("0", "all_reduce")].count == 6  # nothing new: same


def test_a_compacted_file_is_read_for_its_unseen_rows_only(tmp_path, monkeypatch):
    # 32 segments merged after the tail read all but the newest: decoding the whole file took
    # the agent's memory up by a step at each merge (a busy rank's is hundreds of thousands
    # of rows); rows at or below the low-water mark are skipped as the file is read
    from ringwatch.agent.sidecar import _rank_tail

    read = []
    consume = _rank_tail._consume
    monkeypatch.setattr(_rank_tail, "_consume",
                        lambda s, frame: (read.append(frame.height), consume(s, frame))[1])
    r = Rank(tmp_path, compact_segments=3)
    tail = RankLogTail(tmp_path, clock=r.clock)
    for _ in range(2):  # segments 1 and 2, read
        for _ in range(3):
            r.collective()
        r.flush()
        tail.poll()
    for _ in range(3):  # segment 3, merged with 1 and 2 before the tail sees it
        r.collective()
    r.flush()
    assert [p.name for p in r.writer.dir.glob("seg-*")] == ["seg-00000001-00000003.parquet"]
    s = tail.poll()[(JOB, 0)]
    assert read == [3, 3, 3]
    assert s.ops[("0", "all_reduce")].count == 9


def test_a_pending_collective_is_reported_with_its_age(tmp_path):
    r = Rank(tmp_path)
    tail = RankLogTail(tmp_path, clock=r.clock)
    r.collective()
    r.collective(end=False)
    r.flush()
    r.clock.advance(7_000_000_000)
    state = NodeState(host="host-a")
    state.ranks = tail.poll()
    assert state.ranks[(JOB, 0)].pending[:2] == ("0", "all_reduce")
    pts = {(p.spec.prom, dict(p.labels).get("pending_op")): p.value
           for p in collect_points(state, now_wall_ns=r.clock.wall_ns())}
    assert 6.9 <= pts[("ringwatch_collective_pending_seconds", "all_reduce")] <= 7.0 + 1e-9
    assert state.ranks[(JOB, 0)].last_started_seq["0"] == 2
    assert state.ranks[(JOB, 0)].last_completed_seq["0"] == 1


def test_a_hang_leaves_its_pending_file_as_it_is_and_the_tail_reads_it_once(tmp_path,
                                                                            monkeypatch):
    """A rank stuck in a collective flushes the same snapshot again and again: the writer
    leaves the file as it is, and the tail reads a file it has read only once."""
    import ringwatch.agent.sidecar._rank_tail as tail_mod

    r = Rank(tmp_path)
    tail = RankLogTail(tmp_path, clock=r.clock)
    reads = []
    real = tail_mod._read_pending
    monkeypatch.setattr(tail_mod, "_read_pending", lambda s, p: reads.append(p) or real(s, p))
    r.collective(end=False)
    r.flush()
    path = r.writer.dir / "pending.parquet"
    inode = path.stat().st_ino
    for _ in range(3):
        r.clock.advance(1_000_000_000)
        r.flush()
        assert tail.poll()[(JOB, 0)].pending[:2] == ("0", "all_reduce")
    assert path.stat().st_ino == inode and len(reads) == 1
    r.collective(end=False)  # a second one in flight: a new snapshot, read again
    r.flush()
    assert path.stat().st_ino != inode
    tail.poll()
    assert len(reads) == 2
    r.rec.end(r.rec.pending_snapshot()[0])
    r.rec.end(r.rec.pending_snapshot()[0])
    r.flush()  # nothing in flight: the file is gone, and so is the tail's reading
    assert not path.exists() and tail.poll()[(JOB, 0)].pending is None


def test_other_hosts_and_stale_jobs_are_left_out(tmp_path):
    a, b = Rank(tmp_path, 0, host="host-a"), Rank(tmp_path, 1, host="host-b")
    for r in (a, b):
        r.collective()
        r.flush()
    assert set(RankLogTail(tmp_path, host="host-b", clock=a.clock).poll()) == {(JOB, 1)}
    tail = RankLogTail(tmp_path, clock=a.clock, stale_after_s=60)
    assert set(tail.poll()) == {(JOB, 0), (JOB, 1)}
    a.clock.advance(61_000_000_000)
    assert tail.poll() == {}  # both ranks stopped writing a minute ago: forgotten


def test_an_unreadable_segment_is_counted_and_the_rest_read(tmp_path):
    r = Rank(tmp_path)
    r.collective()
    r.flush()
    (r.writer.dir / "seg-00000009.parquet").write_bytes(b"not parquet")
    tail = RankLogTail(tmp_path, clock=r.clock)
    ranks = tail.poll()
    assert tail.errors == 1
    assert ranks == {} or ranks[(JOB, 0)].ops[("0", "all_reduce")].count == 1


def test_finished_steps_are_summed_per_group_and_pushed_over_otlp_only(tmp_path):
    from ringwatch.agent.sidecar._prom_export import build_registry, exposition

    r = Rank(tmp_path)
    tail = RankLogTail(tmp_path, clock=r.clock)
    starts = {}
    for step in range(3):
        r.rec.step = step
        starts[step] = r.clock.wall_ns()
        for _ in range(2):  # two collectives of 1 ms per step
            r.collective(nbytes=1000)
    r.flush()
    state = NodeState(host="host-a")
    state.ranks = tail.poll()
    pts = [p for p in collect_points(state, now_wall_ns=r.clock.wall_ns(), steps_after={})
           if p.spec.entity == "rank_step"]
    by = {(p.spec.field, dict(p.labels)["step"]): p.value for p in pts}
    # steps 0 and 1 are finished (step 2 is the rank's current one)
    assert {s for _, s in by} == {"0", "1"}
    assert by[("busy_ns", "1")] == pytest.approx(0.002)
    assert by[("nbytes", "0")] == 2000 and by[("count", "0")] == 2
    assert by[("first_start_ns", "1")] == pytest.approx(starts[1] / 1e9)
    labels = dict(pts[0].labels)
    assert (labels["pg"], labels["pg_ranks"], labels["pg_size"]) == ("0", "0-1", "2")
    assert "ringwatch_step_collective" not in exposition(build_registry(state))
    later = {dict(p.labels)["step"] for p in collect_points(state, steps_after={(JOB, 0): 0})
             if p.spec.entity == "rank_step"}
    assert later == {"1"}  # step 0 was delivered: only what is new goes out


def test_overlapping_collectives_count_once_in_a_steps_busy_time():
    from ringwatch.agent.sidecar._rank_tail import StepTotals

    t = StepTotals()
    for start, end in ((0, 10), (5, 20), (18, 25), (40, 50), (45, 48)):
        t.add(start, end)
    assert t.busy_ns == 25 + 10  # [0, 25] and [40, 50]


def test_a_failed_push_sends_its_steps_again_and_a_delivered_step_never(tmp_path):
    from opentelemetry.sdk.metrics.export import MetricExportResult

    from ringwatch.agent.sidecar._otlp_export import OtlpPusher

    r = Rank(tmp_path)
    for step in range(4):
        r.rec.step = step
        r.collective()
    r.flush()
    state = NodeState(host="host-a")
    state.ranks = RankLogTail(tmp_path, clock=r.clock).poll()
    pusher = OtlpPusher(state, "http://127.0.0.1:9/v1/metrics", start_ns=0)
    sent = []

    class Exporter:
        ok = False

        def export(self, data, timeout_millis=None):
            sent.append(sorted({a.attributes["ringwatch.step"] for rm in data.resource_metrics
                                for sm in rm.scope_metrics for m in sm.metrics
                                if m.name == "ringwatch.step.collective.time"
                                for a in m.data.data_points}))
            return MetricExportResult.SUCCESS if self.ok else MetricExportResult.FAILURE

        def shutdown(self):
            pass

    pusher.exporter = Exporter()
    assert not pusher.push(r.clock.wall_ns())
    pusher.exporter.ok = True
    assert pusher.push(r.clock.wall_ns()) and pusher.push(r.clock.wall_ns())
    assert sent == [["0", "1", "2"], ["0", "1", "2"], []]
    assert state.errors["otlp_export"] == 1


def test_failed_pushes_to_a_dead_collector_hold_no_memory(tmp_path):
    # The real exporter against a closed loopback port, every push failing (no back-off):
    # nothing is queued, the steps not delivered are rebuilt from the tail each time.
    import gc
    import logging
    import socket
    import tracemalloc

    from ringwatch.agent.sidecar._otlp_export import OtlpPusher

    r = Rank(tmp_path)
    for step in range(KEEP_STEPS + 8):
        r.rec.step = step
        r.collective()
    r.flush()
    state = NodeState(host="host-a")
    state.ranks = RankLogTail(tmp_path, clock=r.clock).poll()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pusher = OtlpPusher(state, f"http://127.0.0.1:{port}/v1/metrics", start_ns=0,
                        timeout_s=0.05)
    # the exporter logs each failure; the test's log capture would keep every record
    logging.disable(logging.CRITICAL)
    try:
        for _ in range(20):  # the exporter's and urllib3's first-use allocations
            assert not pusher.push(r.clock.wall_ns())
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            assert not pusher.push(r.clock.wall_ns())
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        logging.disable(logging.NOTSET)
    assert state.errors["otlp_export"] == 220
    assert grown < 20_000, grown  # bytes, for 200 failed pushes of KEEP_STEPS steps each
    pusher.close()


def test_a_dead_collector_is_logged_once_per_period_not_once_per_push(tmp_path, caplog):
    # The SDK warns on every failed try; the agent lets one through per period, and the
    # next one says how many it held back. Its own counter still has every failure.
    import logging
    import socket

    from ringwatch.agent.sidecar._otlp_export import (
        EXPORT_LOG_PERIOD_S,
        SDK_EXPORT_LOGGER,
        OncePerPeriod,
        OtlpPusher,
    )

    logging.getLogger(SDK_EXPORT_LOGGER).filters.clear()  # a fresh filter, not a past test's
    state = NodeState(host="host-a")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pusher = OtlpPusher(state, f"http://127.0.0.1:{port}/v1/metrics", start_ns=0,
                        timeout_s=0.05)
    with caplog.at_level(logging.INFO, logger=SDK_EXPORT_LOGGER):
        for _ in range(30):
            assert not pusher.push(0)
    shown = [r for r in caplog.records if r.name == SDK_EXPORT_LOGGER]
    (quiet,) = logging.getLogger(SDK_EXPORT_LOGGER).filters
    assert len(shown) == 1 and quiet.held >= 29, (shown, quiet.held)
    assert state.errors["otlp_export"] == 30
    pusher.close()
    # by the records' own times: one per period, the next one with the count held back
    f = OncePerPeriod(EXPORT_LOG_PERIOD_S)
    passed = []
    for t_s in range(0, 700, 10):
        rec = logging.LogRecord(SDK_EXPORT_LOGGER, logging.WARNING, __file__, 1,
                                "Transient error %s", ("refused",), None)
        rec.created = float(t_s)
        if f.filter(rec):
            passed.append((t_s, rec.getMessage()))
    assert [t for t, _ in passed] == [0, 300, 600], passed
    assert passed[0][1] == "Transient error refused"
    assert passed[1][1] == ("Transient error refused (and 29 more export message(s) in the "
                            "300 s before it, held back)"), passed


def test_send_recv_peers_and_the_first_op_are_exported_for_the_stages(tmp_path):
    from ringwatch.agent.sidecar._prom_export import build_registry, exposition

    r = Rank(tmp_path, rank=1)
    tail = RankLogTail(tmp_path, clock=r.clock)
    for op, peer in (("recv", 0), ("send", 2), ("recv", 2), ("send", 0), ("recv", 0)):
        ev = issue_p2p(r.rec, r.g, op, peer)
        r.clock.advance(1_000_000)
        r.rec.end(ev)
    r.collective()  # not a pair
    r.flush()
    s = tail.poll()[(JOB, 1)]
    assert s.p2p == {0: 3, 2: 2} and s.first_p2p[1] == "recv"
    state = NodeState(host="host-a")
    state.ranks = {(JOB, 1): s}
    pts = {(dict(p.labels)["peer"], dict(p.labels)["first_op"]): p.value
           for p in collect_points(state) if p.spec.entity == "rank_p2p"}
    assert pts == {("0", "recv"): 3, ("2", "recv"): 2}
    text = exposition(build_registry(state))
    assert 'ringwatch_p2p_ops_total{' in text and 'peer="2"' in text


def test_recent_spans_keep_the_newest_in_order_in_fixed_memory():
    from ringwatch.agent.sidecar._rank_tail import Spans

    s = Spans(cap=4)
    assert len(s) == 0 and s.array().shape == (0, 2)
    s.extend([(1, 2), (3, 4)])
    assert s.array().tolist() == [[1, 2], [3, 4]]
    held = s._a
    s.extend([(5, 6), (7, 8), (9, 10), (11, 12)])
    assert len(s) == 4 and s.array().tolist() == [[5, 6], [7, 8], [9, 10], [11, 12]]
    s.append(13, 14)
    assert s.array().tolist() == [[7, 8], [9, 10], [11, 12], [13, 14]]
    assert s._a is held and len(held) == 8  # no array grows or is replaced
