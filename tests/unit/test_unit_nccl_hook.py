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


# ---- when the completion hook is safe (it aborts a group on any untimed work) -------------
from ringwatch.agent.capture import _nccl  # noqa: E402

from fakes import FakeNcclPG  # noqa: E402


@pytest.fixture
def slots(monkeypatch):
    monkeypatch.setattr(_nccl, "_SLOTS", {})
    return _nccl._SLOTS


def nccl_group(rec, pg):
    return group(rec, backend="nccl", handle=pg, name=pg.group_name)


def test_a_group_created_timed_gets_the_hook_and_its_works_are_recorded(rec, slots):
    pg = FakeNcclPG(timed_from_creation=True)
    g = nccl_group(rec, pg)
    assert _nccl.enable_completion_hook(rec, pg, g, timed=True)
    ev = issue_collective(rec, g, pg=pg)
    pg.finish_all()
    assert pg.aborted is None and ev.status == "ok" and ev.end_source == "watchdog"


def test_an_untimed_group_with_works_in_flight_is_polled_not_hooked(rec, slots):
    """Attaching late: the group ran collectives without timing, some still in flight when
    ringwatch arrives. Taking the hook then would abort the job (seen on a real GPU)."""
    pg = FakeNcclPG()
    pg.issue()  # before ringwatch: untimed
    g = nccl_group(rec, pg)
    assert not _nccl.enable_completion_hook(rec, pg, g, timed=False)
    assert pg.hook is None and pg.timing and not g.nccl_hook
    pg.issue()
    pg.finish_all()
    assert pg.aborted is None


def test_the_hook_on_an_untimed_group_is_what_would_abort_it():
    """The fake's rule, checked: a hook over an untimed work in flight aborts the group."""
    pg = FakeNcclPG()
    pg.issue()
    pg._enable_collectives_timing()
    pg._register_on_completion_hook(lambda wi: None)
    pg.finish_all()
    assert pg.aborted


def test_a_second_attach_re_points_the_hook_and_skips_older_works(clock, slots):
    pg = FakeNcclPG(timed_from_creation=True)
    first = recorder(clock=clock)
    assert _nccl.enable_completion_hook(first, pg, nccl_group(first, pg), timed=True)
    for _ in range(3):
        issue_collective(first, first.groups[pg], pg=pg)
    pg.finish_all()
    assert len(first.drain()) == 3
    _nccl.release_hooks(first)  # detach()
    pg.issue()  # issued while detached: nobody records it
    pg.finish_all()
    assert first.drain() == []
    pg.issue()  # in flight across the next attach
    second = recorder(clock=clock)
    g2 = nccl_group(second, pg)
    assert _nccl.enable_completion_hook(second, pg, g2, timed=False)  # timed=False: hooked
    assert pg.registrations == 1 and g2.nccl_hook and g2.hook_from == 5
    ev = issue_collective(second, g2, pg=pg)
    assert ev.seq == 6
    pg.finish_all()  # reports #5 (before this attach: ignored) and #6
    rows = second.drain()
    assert [r.seq for r in rows] == [6] and rows[0] is ev and pg.aborted is None


def test_attach_turns_timing_on_for_groups_created_later(monkeypatch):
    monkeypatch.delenv(_nccl.ENV_NCCL_TIMING, raising=False)
    assert _nccl.timing_from_creation() == (False, True)
    assert _nccl.ENV_NCCL_TIMING in __import__("os").environ
    monkeypatch.setenv(_nccl.ENV_NCCL_TIMING, "0")  # the job turned it off: respected
    assert _nccl.timing_from_creation() == (False, False)
    monkeypatch.setenv(_nccl.ENV_NCCL_TIMING, "1")
    assert _nccl.timing_from_creation() == (True, True)


def test_attach_after_init_remembers_the_groups_that_were_not_timed(monkeypatch):
    import types

    from ringwatch.agent.capture import _attach
    from ringwatch.agent.capture._state import STATE

    old = FakeNcclPG(name="0")
    monkeypatch.delenv(_nccl.ENV_NCCL_TIMING, raising=False)
    monkeypatch.setattr(_attach.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(_attach.c10d, "_world", types.SimpleNamespace(pg_names={old: "0"}))
    monkeypatch.setattr(STATE, "untimed_groups", set())
    monkeypatch.setattr(STATE, "nccl_untimed", False)
    _attach._time_nccl_works()
    assert STATE.untimed_groups == {old} and not STATE.nccl_untimed
    monkeypatch.setenv(_nccl.ENV_NCCL_TIMING, "1")  # set before the groups were made
    monkeypatch.setattr(STATE, "untimed_groups", set())
    _attach._time_nccl_works()
    assert STATE.untimed_groups == set()
