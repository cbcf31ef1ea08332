"""The NCCL completion-hook adapter and the work poller, fed with fake work infos."""

from __future__ import annotations

import datetime

import pytest

from ringwatch._clock import FakeClock
from ringwatch.agent.capture._nccl import backend_seq, on_work_info, poll_works

from fakes import (
    FakeOpType,
    FakeWork,
    FakeWorkInfo,
    group,
    issue_collective,
    issue_p2p,
    recorder,
    us,
)


@pytest.fixture
def clock():
    return FakeClock(mono_ns=1_000_000_000, wall_ns=1_700_000_000_000_000_000)


@pytest.fixture
def rec(clock):
    return recorder(clock=clock)


@pytest.fixture
def g(rec):
    info = group(rec, backend="nccl")
    info.nccl_hook = True
    return info


def wi(op, seq, start_us, end_us, dur_us=None):
    return FakeWorkInfo(op_type=op, seq=seq, time_started=us(start_us), time_finished=us(end_us),
                        active_duration=None if dur_us is None else us(dur_us))


def test_backend_seq_reads_the_counter_or_none(g):
    g.handle.seq = 42
    assert backend_seq(g.handle) == 42
    assert backend_seq(object()) is None
    assert backend_seq(None) is None


def test_hook_completes_the_pending_collective_with_its_times(rec, g, clock):
    ev = issue_collective(rec, g)
    assert ev.seq == 1
    clock.advance(5_000_000)
    on_work_info(rec, g, wi(FakeOpType.ALLREDUCE, 1, 1_000_010, 1_003_500, 2_750))
    assert ev.status == "ok"
    assert ev.end_source == "watchdog"
    assert ev.mono_end == 1_003_500_000  # steady-clock timedelta -> monotonic ns
    assert ev.device_ns == 2_750_000
    assert ev.mono_start == 1_000_000_000  # the issue time stays
    assert rec.drain() == [ev]


def test_hook_with_the_real_torch_op_type(rec, g):
    torch = pytest.importorskip("torch")
    op_type = torch._C._distributed_c10d.OpType.BROADCAST
    ev = issue_collective(rec, g, "broadcast")
    on_work_info(rec, g, wi(op_type, 1, 1_000_001, 1_000_900, 10))
    assert ev.status == "ok" and ev.mono_end == 1_000_900_000 and ev.device_ns == 10_000


def test_repeat_report_is_not_recorded_twice(rec, g):
    ev = issue_collective(rec, g)
    info = wi(FakeOpType.ALLREDUCE, 1, 1_000_001, 1_000_002, 1)
    on_work_info(rec, g, info)
    on_work_info(rec, g, info)
    assert rec.drain() == [ev]
    assert rec.recorded == 1


@pytest.mark.parametrize("first", [FakeOpType.COALESCED, FakeOpType.ALLREDUCE])
def test_coalesced_batch_is_finished_once_whatever_report_comes_first(rec, g, first):
    pg = g.handle
    rec.start_batch(g, pg.seq)
    a = issue_collective(rec, g, steps=0)
    b = issue_collective(rec, g, steps=0)
    pg.seq += 1
    rec.end_batch(g, pg.seq)
    second = FakeOpType.ALLREDUCE if first is FakeOpType.COALESCED else FakeOpType.COALESCED
    on_work_info(rec, g, wi(first, 1, 1_000_001, 1_000_400, 300))
    on_work_info(rec, g, wi(second, 1, 1_000_001, 1_000_500, 300))
    assert rec.drain() == [a, b]
    assert a.mono_end == b.mono_end == 1_000_400_000
    assert a.device_ns == b.device_ns == 300_000


def test_coalesced_summary_of_an_unseen_batch_is_not_a_row(rec, g):
    on_work_info(rec, g, wi(FakeOpType.COALESCED, 3, 1, 2, 1))
    assert rec.drain() == []


def test_unseen_collective_gets_the_reserved_issue_slot(rec, g):
    pg = g.handle
    first = issue_collective(rec, g)  # seq 1, idx 0
    pg.seq += 1  # DDP's reducer issues seq 2 from C++
    on_work_info(rec, g, wi(FakeOpType.ALLREDUCE, 2, 1_000_100, 1_000_300, 150))
    nxt = issue_collective(rec, g)
    (hook_row,) = rec.drain()
    assert hook_row.api == "nccl_hook" and hook_row.seq == 2 and hook_row.idx == 1
    assert hook_row.mono_start == 1_000_100_000 and hook_row.mono_end == 1_000_300_000
    assert hook_row.device_ns == 150_000
    assert (first.idx, nxt.idx, nxt.seq) == (0, 2, 3)
    assert rec.take_gaps() == {}


def test_unseen_collective_noticed_by_a_later_issue(rec, g):
    pg = g.handle
    pg.seq += 1  # C++ op, seq 1
    nxt = issue_collective(rec, g)  # reserves idx 0 for seq 1
    on_work_info(rec, g, wi(FakeOpType.ALLREDUCE, 1, 1_000_001, 1_000_002))
    (hook_row,) = rec.drain()
    assert hook_row.idx == 0 and nxt.idx == 1 and nxt.seq == 2
    assert hook_row.device_ns is None


def test_send_recv_are_matched_by_direction_and_time(rec, g, clock):
    s1 = issue_p2p(rec, g, "send", 1, steps=0)  # issued at 1_000_000 us
    clock.advance(1_000_000)
    s2 = issue_p2p(rec, g, "send", 1, steps=0)  # issued at 1_001_000 us
    r1 = issue_p2p(rec, g, "recv", 1, steps=0)
    on_work_info(rec, g, wi(FakeOpType.SEND, 0, 1_001_005, 1_001_700, 600))
    assert s2.status == "ok" and s2.mono_end == 1_001_700_000 and s2.device_ns == 600_000
    assert s1.status == "pending" and r1.status == "pending"
    on_work_info(rec, g, wi(FakeOpType.RECV, 0, 1_001_006, 1_001_800))
    on_work_info(rec, g, wi(FakeOpType.SEND, 0, 1_000_001, 1_001_900))
    assert rec.drain() == [s2, r1, s1]


def test_wall_clock_datetimes_from_older_torch_are_converted(rec, g, clock):
    ev = issue_collective(rec, g)
    offset_ns = clock.wall_ns() - clock.mono_ns()
    end_mono_ns = clock.mono_ns() + 2_000_000
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    end_wall = epoch + datetime.timedelta(microseconds=(end_mono_ns + offset_ns) // 1000)
    info = FakeWorkInfo(op_type=FakeOpType.ALLREDUCE, seq=1, time_started=end_wall,
                        time_finished=end_wall, active_duration=us(5))
    on_work_info(rec, g, info)
    assert ev.status == "ok"
    # datetime has µs resolution; the conversion must land within a microsecond.
    assert abs(ev.mono_end - end_mono_ns) < 1_000
    assert ev.device_ns == 5_000


def test_hook_never_raises_into_torch(rec, g):
    ev = issue_collective(rec, g)
    bad = FakeWorkInfo(op_type=FakeOpType.ALLREDUCE, seq="not a number", time_started=None,
                       time_finished=None, active_duration=None)
    on_work_info(rec, g, bad)  # must not raise
    assert ev.status == "pending"


def test_hook_without_times_keeps_the_event_open_ended(rec, g):
    ev = issue_collective(rec, g)
    on_work_info(rec, g, FakeWorkInfo(op_type=FakeOpType.ALLREDUCE, seq=1, time_started=None,
                                      time_finished=None, active_duration=None))
    assert ev.status == "ok"
    # No time from the hook: the recorder's clock gives the end.
    assert ev.mono_end == 1_000_000_000 and ev.device_ns is None


# ---- poller --------------------------------------------------------------------------------------


def test_poll_works_finishes_completed_works_only(rec, clock):
    g = group(rec, backend="nccl")  # no hook: the poller finishes its events
    done = issue_collective(rec, g)
    running = issue_collective(rec, g)
    failed = issue_collective(rec, g)
    untimed = issue_collective(rec, g)
    no_work = issue_collective(rec, g)
    done.work = FakeWork(duration_ms=1.5)
    running.work = FakeWork(completed=False)
    failed.work = FakeWork(success=False)
    untimed.work = FakeWork(duration_ms=None)
    clock.advance(7_000)
    assert poll_works(rec) == 3
    assert done.status == "ok" and done.end_source == "poll" and done.device_ns == 1_500_000
    assert done.mono_end == 1_000_007_000 and done.work is None
    assert failed.status == "error"
    assert untimed.status == "ok" and untimed.device_ns is None
    assert running.status == "pending" and no_work.status == "pending"
    assert rec.drain() == [done, failed, untimed]
