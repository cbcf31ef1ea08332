"""The recorder's bookkeeping, driven by a fake clock and a fake backend counter."""

from __future__ import annotations

import pytest

from ringwatch._clock import FakeClock
from ringwatch._schema import END_SOURCES, STATUSES
from ringwatch.agent.capture._recorder import GroupInfo, classify_error

from fakes import FakePG, group, issue_collective, issue_p2p, recorder


@pytest.fixture
def clock():
    return FakeClock(mono_ns=5_000, wall_ns=1_700_000_000_000_000_000)


@pytest.fixture
def rec(clock):
    return recorder(clock=clock)


# ---- groups -------------------------------------------------------------------------------------


def test_group_info_describes_itself():
    g = group(name="3", ranks=(0, 2, 4, 5), group_rank=1, desc="dp", backend="nccl")
    assert g.ranks_spec == "0,2,4-5"
    assert g.size == 4
    assert g.my_global_rank == 2
    assert g.to_global(3) == 5
    assert g.to_global(4) is None and g.to_global(-1) is None and g.to_global(None) is None
    d = g.describe()
    assert d == {"pg": "3", "pg_desc": "dp", "backend": "nccl", "pg_ranks": "0,2,4-5",
                 "pg_size": 4, "group_rank": 1, "last_seq": 0, "nccl_hook": False}


def test_add_group_is_idempotent_on_key(rec):
    pg = FakePG()
    g1 = group(rec, handle=pg)
    g2 = rec.add_group(GroupInfo(key=pg, name="other", desc=None, backend="gloo",
                                 global_ranks=[0, 1], group_rank=0, handle=pg))
    assert g2 is g1
    assert rec.groups_snapshot() == [g1]


# ---- issue, numbering, durations --------------------------------------------------------------


def test_blocking_collective_duration_comes_from_the_clock(rec, clock):
    g = group(rec)
    ev = issue_collective(rec, g)
    assert ev.status == "pending"
    assert ev.mono_issue == ev.mono_start == 5_000
    assert rec.pending_snapshot() == [ev]
    clock.advance(1_234)
    rec.end(ev)
    assert ev.mono_end == 6_234
    assert ev.mono_end - ev.mono_start == 1_234
    assert ev.status == "ok" and ev.end_source == "wait" and ev.error is None
    assert rec.pending_snapshot() == []
    assert rec.drain() == [ev]
    assert rec.drain() == []


def test_idx_is_issue_order_and_seq_follows_the_backend_counter(rec):
    g = group(rec)
    evs = [issue_collective(rec, g) for _ in range(4)]
    assert [e.idx for e in evs] == [0, 1, 2, 3]
    assert [e.seq for e in evs] == [1, 2, 3, 4]
    assert g.coll_seq == 4 and g.last_backend_seq == 4


def test_without_a_backend_counter_numbers_count_up(rec):
    g = group(rec)
    evs = [issue_collective(rec, g, backend=False) for _ in range(3)]
    assert [e.seq for e in evs] == [1, 2, 3]
    assert rec.take_gaps() == {}


def test_groups_number_independently(rec):
    a = group(rec, name="0")
    b = group(rec, name="1", ranks=(0,))
    e1 = issue_collective(rec, a)
    e2 = issue_collective(rec, b)
    e3 = issue_collective(rec, a)
    assert (e1.seq, e2.seq, e3.seq) == (1, 1, 2)
    assert (e1.idx, e2.idx, e3.idx) == (0, 1, 2)


def test_end_is_idempotent(rec, clock):
    g = group(rec)
    ev = issue_collective(rec, g)
    clock.advance(100)
    rec.end(ev, end_source="future")
    clock.advance(900)
    rec.end(ev, end_source="wait", status="error", error="late")
    assert ev.mono_end == 5_100
    assert ev.end_source == "future" and ev.status == "ok" and ev.error is None
    assert rec.drain() == [ev]
    assert rec.recorded == 1


def test_second_source_adds_device_time_to_a_finished_event(rec):
    g = group(rec)
    ev = issue_collective(rec, g)
    rec.end(ev, mono_end=9_000)
    rec.end(ev, device_ns=777, mono_end=99_999)
    assert ev.device_ns == 777
    assert ev.mono_end == 9_000
    rec.end(ev, device_ns=1)  # already set: kept
    assert ev.device_ns == 777
    assert len(rec.drain()) == 1


def test_end_with_explicit_end_time_and_device_time(rec, clock):
    g = group(rec)
    ev = issue_collective(rec, g)
    clock.advance(10_000)
    rec.end(ev, end_source="watchdog", mono_end=7_000, device_ns=1_500)
    assert ev.mono_end == 7_000 and ev.device_ns == 1_500 and ev.end_source == "watchdog"


def test_end_exc_classifies_timeouts_and_errors(rec, clock):
    g = group(rec)
    ev1 = issue_collective(rec, g)
    ev2 = issue_collective(rec, g)
    clock.advance(50)
    rec.end_exc(ev1, RuntimeError("Connection closed by peer"))
    rec.end_exc(ev2, RuntimeError("Timed out waiting 1800000ms for recv"), end_source="future")
    assert ev1.status == "error" and ev1.error == "RuntimeError: Connection closed by peer"
    assert ev2.status == "timeout" and ev2.end_source == "future"
    assert ev1.mono_end == ev2.mono_end == 5_050
    assert {e.status for e in rec.drain()} <= set(STATUSES)


def test_end_exc_error_text_is_bounded(rec):
    g = group(rec)
    ev = issue_collective(rec, g)
    rec.end_exc(ev, ValueError("x" * 10_000))
    assert len(ev.error) == 2000


def test_classify_error():
    assert classify_error(TimeoutError("boom")) == "timeout"
    assert classify_error(RuntimeError("operation TIMED OUT")) == "timeout"
    assert classify_error(RuntimeError("NCCL error: unhandled system error")) == "error"


def test_status_and_end_source_values_are_in_the_schema(rec):
    g = group(rec)
    ev = issue_collective(rec, g)
    assert ev.status in STATUSES and ev.end_source in END_SOURCES
    rec.end(ev, end_source="poll")
    assert ev.status in STATUSES and ev.end_source in END_SOURCES


# ---- buffer bound ------------------------------------------------------------------------------


def test_buffer_bound_drops_and_counts(clock):
    rec = recorder(clock=clock, buffer_events=3)
    g = group(rec)
    evs = [issue_collective(rec, g) for _ in range(5)]
    for e in evs:
        rec.end(e)
    assert rec.dropped == 2
    assert rec.recorded == 3
    assert [e.idx for e in rec.drain()] == [0, 1, 2]
    # Draining frees room again.
    ev = issue_collective(rec, g)
    rec.end(ev)
    assert rec.drain() == [ev]
    assert rec.counters() == {"recorded": 4, "dropped": 2, "pending": 0, "backfilled": 0,
                              "unrecovered": 0}


# ---- pending ------------------------------------------------------------------------------------


def test_pending_snapshot_is_oldest_first_and_finish_pending_closes_all(rec):
    g = group(rec)
    evs = [issue_collective(rec, g) for _ in range(3)]
    rec.end(evs[1])
    assert [e.idx for e in rec.pending_snapshot()] == [0, 2]
    evs[0].work = object()
    closed = rec.finish_pending()
    assert closed == [evs[0], evs[2]]
    assert all(e.status == "pending" and e.work is None and e.mono_end is None for e in closed)
    assert rec.pending == {}
    assert rec.counters()["pending"] == 0
    # Closing is not finishing: those events are not queued for the writer.
    assert rec.drain() == [evs[1]]


def test_finish_pending_with_another_status(rec):
    g = group(rec)
    ev = issue_collective(rec, g)
    assert rec.finish_pending("unknown") == [ev]
    assert ev.status == "unknown"


# ---- steps --------------------------------------------------------------------------------------


def test_mark_step_counts_from_zero_and_accepts_explicit_numbers(rec):
    g = group(rec)
    e0 = issue_collective(rec, g)
    assert e0.step is None
    assert rec.mark_step() == 0
    e1 = issue_collective(rec, g)
    assert rec.mark_step() == 1
    assert rec.mark_step(10) == 10
    e2 = issue_collective(rec, g)
    assert rec.mark_step() == 11
    assert (e1.step, e2.step) == (0, 10)


def test_auto_step_counts_optimizer_steps_until_the_job_marks_its_own(rec):
    rec.auto_step()
    assert rec.step == 1
    rec.step = 0  # what attach() sets with auto_step on
    rec.auto_step()
    rec.auto_step()
    assert rec.step == 2
    rec.mark_step(100)
    rec.auto_step()
    assert rec.step == 100


# ---- point to point ------------------------------------------------------------------------------


def test_p2p_pairs_are_numbered_per_direction(rec):
    g = group(rec, ranks=(0, 1, 2))
    s1 = issue_p2p(rec, g, "send", 1)
    s2 = issue_p2p(rec, g, "send", 1)
    r1 = issue_p2p(rec, g, "recv", 1)
    s3 = issue_p2p(rec, g, "send", 2)
    r2 = issue_p2p(rec, g, "recv", 1)
    assert (s1.seq, s2.seq, s3.seq) == (1, 2, 1)
    assert (r1.seq, r2.seq) == (1, 2)
    assert g.pair_seq == {(0, 1): 2, (1, 0): 2, (0, 2): 1}
    assert all(e.is_p2p for e in (s1, s2, s3, r1, r2))


def test_gloo_p2p_steps_do_not_shift_collective_numbers_or_make_gaps(rec):
    g = group(rec)
    c1 = issue_collective(rec, g)
    issue_p2p(rec, g, "send", 1)  # Gloo counts send/recv on the same counter
    issue_p2p(rec, g, "recv", 1)
    c2 = issue_collective(rec, g)
    assert (c1.seq, c2.seq) == (1, 2)
    assert g.p2p_adjust == 2
    assert rec.take_gaps() == {}


def test_nccl_style_p2p_leaves_the_counter_alone(rec):
    g = group(rec, backend="nccl")
    issue_p2p(rec, g, "send", 1, steps=0)
    c = issue_collective(rec, g)
    assert c.seq == 1 and g.p2p_adjust == 0


def test_p2p_without_known_peer_gets_no_number(rec):
    g = group(rec)
    ev = rec.new_event(g, "recv", "dist.recv")
    ev.is_p2p = True
    with rec.lock:
        rec.issue(ev, 0)
        rec.assign_p2p_seq(g, ev, None, 0, 0, 1)
    assert ev.seq is None
    assert g.pair_seq == {}


# ---- gaps: ops issued outside the hooks ----------------------------------------------------------


def test_counter_jump_reserves_numbers_and_idx_before_the_revealing_op(rec):
    g = group(rec)
    pg = g.handle
    c1 = issue_collective(rec, g)
    pg.seq += 2  # two collectives issued from C++
    c2 = issue_collective(rec, g)
    assert c1.seq == 1 and c2.seq == 4
    assert c1.idx == 0 and c2.idx == 3
    assert rec.take_gaps() == {g: [(2, 1), (3, 2)]}
    assert rec.take_gaps() == {}
    assert g.gaps == []


def test_first_sight_of_a_group_counts_what_came_before(rec):
    g = group(rec, handle=FakePG(seq=5))
    ev = issue_collective(rec, g)
    assert ev.seq == 6
    assert rec.take_gaps() == {g: [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]}
    assert ev.idx == 5


def test_check_tail_notes_ops_after_the_last_recorded_one(rec):
    g = group(rec)
    issue_collective(rec, g)
    g.handle.seq += 1
    rec.check_tail(g, g.handle.seq)
    rec.check_tail(g, g.handle.seq)  # nothing new: nothing more reserved
    assert rec.take_gaps() == {g: [(2, 1)]}
    nxt = issue_collective(rec, g)
    assert nxt.seq == 3 and nxt.idx == 2


def test_stale_tail_reading_never_invents_unseen_ops(rec):
    """The writer reads the counter before taking the lock; by then the job may have issued
    more. A stale, lower reading must not rewind the bookkeeping (it once made the next op
    look like it followed an unseen one, shifting every later number by one)."""
    g = group(rec)
    issue_collective(rec, g)
    stale = g.handle.seq
    a = issue_collective(rec, g)
    b = issue_collective(rec, g)
    rec.check_tail(g, stale)
    c = issue_collective(rec, g)
    assert (a.seq, b.seq, c.seq) == (2, 3, 4)
    assert rec.take_gaps() == {}


def test_check_tail_with_unknown_counter_does_nothing(rec):
    g = group(rec)
    issue_collective(rec, g)
    rec.check_tail(g, None)
    assert rec.take_gaps() == {}


def test_gaps_after_hook_start_are_reserved_for_the_nccl_hook(rec):
    g = group(rec, backend="nccl")
    pg = g.handle
    pg.seq = 2  # two collectives before the hook was registered
    g.nccl_hook = True
    g.hook_from = 2
    c = issue_collective(rec, g)  # reveals 1, 2 (before the hook: backfill)
    pg.seq += 1  # one from C++ after the hook: the hook will report it
    rec.check_tail(g, pg.seq)
    assert c.seq == 3
    assert rec.take_gaps() == {g: [(1, 0), (2, 1)]}
    assert g.reserved == {4: 3}


# ---- coalescing ----------------------------------------------------------------------------------


def test_a_coalesced_batch_shares_one_number(rec):
    g = group(rec)
    pg = g.handle
    c0 = issue_collective(rec, g)
    rec.start_batch(g, pg.seq)
    a = issue_collective(rec, g, steps=0)
    b = issue_collective(rec, g, steps=0)
    pg.seq += 1  # the batch is one collective for the backend
    evs = rec.end_batch(g, pg.seq)
    c3 = issue_collective(rec, g)
    assert evs == [a, b]
    assert (c0.seq, a.seq, b.seq, c3.seq) == (1, 2, 2, 3)
    assert g.coalescing is None and g.batch_seq is None
    assert rec.take_gaps() == {}


def test_start_batch_notes_unseen_ops_first(rec):
    g = group(rec)
    issue_collective(rec, g)
    g.handle.seq += 1
    rec.start_batch(g, g.handle.seq)
    a = issue_collective(rec, g, steps=0)
    g.handle.seq += 1
    rec.end_batch(g, g.handle.seq)
    assert a.seq == 3
    assert rec.take_gaps() == {g: [(2, 1)]}


def test_p2p_only_batch_advances_the_collective_number(rec):
    g = group(rec, backend="nccl")
    pg = g.handle
    rec.start_batch(g, pg.seq)
    s = issue_p2p(rec, g, "send", 1, steps=0)
    r = issue_p2p(rec, g, "recv", 1, steps=0)
    pg.seq += 1  # NCCL bumps its collective counter for any batch
    assert rec.end_batch(g, pg.seq) == [s, r]
    c = issue_collective(rec, g)
    assert (s.seq, r.seq) == (1, 1)  # pair numbers
    assert c.seq == 2
    assert g.p2p_adjust == 0


def test_end_batch_without_open_batch_returns_nothing(rec):
    g = group(rec)
    assert rec.end_batch(g, None) == []


# ---- NCCL hook de-duplication (complete_seq / complete_p2p) --------------------------------------


def nccl_group(rec):
    g = group(rec, backend="nccl")
    g.nccl_hook = True
    return g


def test_complete_seq_finishes_the_pending_collective(rec, clock):
    g = nccl_group(rec)
    ev = issue_collective(rec, g)
    assert g.by_seq == {1: [ev]}
    clock.advance(10_000)
    rec.complete_seq(g, 1, op="all_reduce", mono_start=5_500, mono_end=8_000, device_ns=2_000)
    assert ev.status == "ok" and ev.end_source == "watchdog"
    assert ev.mono_end == 8_000 and ev.device_ns == 2_000
    assert ev.mono_start == 5_000  # the issue time stays
    assert g.by_seq == {}
    assert rec.drain() == [ev]


def test_complete_seq_repeat_is_dropped(rec):
    g = nccl_group(rec)
    ev = issue_collective(rec, g)
    rec.complete_seq(g, 1, op="all_reduce", mono_start=1, mono_end=2, device_ns=3)
    rec.complete_seq(g, 1, op="all_reduce", mono_start=1, mono_end=2, device_ns=3)
    assert rec.drain() == [ev]


def test_complete_seq_of_an_unseen_op_records_it_once(rec):
    g = nccl_group(rec)
    rec.complete_seq(g, 1, op="all_reduce", mono_start=100, mono_end=200, device_ns=50)
    rec.complete_seq(g, 1, op="all_reduce", mono_start=100, mono_end=200, device_ns=50)
    (ev,) = rec.drain()
    assert ev.api == "nccl_hook" and ev.seq == 1 and ev.op == "all_reduce"
    assert (ev.mono_start, ev.mono_end, ev.device_ns) == (100, 200, 50)
    assert ev.status == "ok" and ev.end_source == "watchdog"
    assert ev.step is None


def test_complete_seq_uses_the_reserved_idx(rec):
    g = nccl_group(rec)
    pg = g.handle
    pg.seq += 1  # issued from C++
    nxt = issue_collective(rec, g)  # reveals it: idx 0 reserved for seq 1
    assert g.reserved == {1: 0}
    rec.complete_seq(g, 1, op="broadcast", mono_start=1, mono_end=2, device_ns=None)
    (ev,) = rec.drain()
    assert ev.idx == 0 and ev.seq == 1 and ev.op == "broadcast"
    assert nxt.idx == 1 and nxt.seq == 2
    assert g.reserved == {}


def test_complete_seq_coalesced_summary_alone_is_not_recorded(rec):
    g = nccl_group(rec)
    rec.complete_seq(g, 5, op="coalesced", mono_start=1, mono_end=2, device_ns=3)
    assert rec.drain() == []


def test_complete_seq_finishes_a_whole_coalesced_batch_once(rec):
    g = nccl_group(rec)
    pg = g.handle
    rec.start_batch(g, pg.seq)
    a = issue_collective(rec, g, steps=0)
    b = issue_collective(rec, g, steps=0)
    pg.seq += 1
    rec.end_batch(g, pg.seq)
    rec.complete_seq(g, 1, op="coalesced", mono_start=1, mono_end=900, device_ns=40)
    rec.complete_seq(g, 1, op="all_reduce", mono_start=1, mono_end=950, device_ns=40)
    assert rec.drain() == [a, b]
    assert a.mono_end == b.mono_end == 900


def test_complete_p2p_picks_the_latest_issued_before_the_work_started(rec, clock):
    g = nccl_group(rec)
    s1 = issue_p2p(rec, g, "send", 1, steps=0)
    clock.advance(1_000)
    s2 = issue_p2p(rec, g, "send", 1, steps=0)
    clock.advance(1_000)
    r1 = issue_p2p(rec, g, "recv", 1, steps=0)
    assert g.p2p_waiting == [s1, s2, r1]
    # The work of s1 (created right after it was issued) completes first.
    rec.complete_p2p(g, "send", mono_start=s1.mono_issue + 10, mono_end=9_000, device_ns=5)
    assert s1.status == "ok" and s1.mono_end == 9_000 and s1.device_ns == 5
    assert s2.status == "pending"
    rec.complete_p2p(g, "recv", mono_start=None, mono_end=9_500, device_ns=None)
    assert r1.status == "ok"
    rec.complete_p2p(g, "send", mono_start=s2.mono_issue + 10, mono_end=9_900, device_ns=7)
    assert s2.status == "ok"
    assert g.p2p_waiting == []
    assert rec.drain() == [s1, r1, s2]


def test_complete_p2p_with_nothing_waiting_records_a_hook_only_row(rec):
    g = nccl_group(rec)
    rec.complete_p2p(g, "recv", mono_start=10, mono_end=20, device_ns=3)
    (ev,) = rec.drain()
    assert ev.is_p2p and ev.op == "recv" and ev.api == "nccl_hook" and ev.seq is None
    assert (ev.mono_start, ev.mono_end, ev.status) == (10, 20, "ok")


# ---- secondary sources ---------------------------------------------------------------------------


def test_unseen_event_never_pending_and_takes_next_idx(rec):
    g = group(rec)
    issue_collective(rec, g)
    ev = rec.unseen_event(g, "broadcast", "flight_recorder", seq=7, idx=None, mono_start=None)
    assert ev.idx == 1 and ev.seq == 7 and ev.mono_start is None and ev.step is None
    assert ev.idx not in rec.pending
    rec.add_finished(ev)
    assert rec.drain() == [ev]


def test_release_drops_every_reference_to_groups_and_works(rec):
    """After the final flush the recorder must not keep the job's process groups alive (a
    destroyed group still referenced keeps its Gloo connections open)."""
    pg = FakePG()
    g = group(rec, handle=pg)
    ev = issue_collective(rec, g)
    work = object()
    ev.work = work
    rec.wait_watch[id(work)] = ev
    rec.release()
    assert rec.groups_snapshot() == []
    assert g.handle is None and g.key is None
    assert rec.wait_watch == {} and ev.work is None


# ---- backfill from the Flight Recorder -----------------------------------------------------------


def test_backfill_hands_back_what_the_fr_does_not_hold_yet(rec):
    from ringwatch.agent.capture._backfill import backfill

    from fakes import dump, fr_entry

    g = group(rec)
    pg = g.handle
    pg.seq = 2  # two collectives from C++ before the first hooked one
    issue_collective(rec, g)
    rec.drain()
    gaps = rec.take_gaps()
    assert gaps == {g: [(1, 0), (2, 1)]}
    lagging = dump([fr_entry(1, 2, "gloo:broadcast")])  # seq 1 not in the FR yet
    found, missed = backfill(rec, gaps, lagging, give_up=False)
    assert found == 1 and missed == {g: [(1, 0)]}
    assert [(e.seq, e.idx, e.op) for e in rec.drain()] == [(2, 1, "broadcast")]
    rec.return_gaps(missed)
    full = dump([fr_entry(0, 1, "gloo:all_gather"), fr_entry(1, 2, "gloo:broadcast")])
    found, missed = backfill(rec, rec.take_gaps(), full, give_up=False)
    assert found == 1 and missed == {}
    (ev,) = rec.drain()
    assert (ev.seq, ev.idx, ev.op, ev.api) == (1, 0, "all_gather", "flight_recorder")
    assert rec.unrecovered == 0


def test_backfill_gives_up_with_a_placeholder(rec):
    from ringwatch.agent.capture._backfill import backfill

    g = group(rec)
    g.handle.seq = 1
    issue_collective(rec, g)
    rec.drain()
    found, missed = backfill(rec, rec.take_gaps(), None, give_up=True)
    assert (found, missed) == (0, {})
    (ev,) = rec.drain()
    assert (ev.seq, ev.idx, ev.op, ev.status) == (1, 0, "unknown", "unknown")
    assert rec.unrecovered == 1


def test_a_counter_read_during_a_blocking_call_is_not_taken_for_unseen_ops(rec):
    """The writer reads a group's counter while a blocking call (a monitored barrier, whose
    internal messages move the counter) is inside the backend: that reading must not pass for
    ops issued outside the hooks, or the barrier and every later number come out one off, with
    a phantom gap for the Flight Recorder backfill."""
    from ringwatch.agent.capture import _pg_hooks
    from ringwatch.agent.capture._ops import OP_SPECS

    g = group(rec)
    pg = g.handle
    before = issue_collective(rec, g)

    def monitored_barrier(self):
        self.seq += 3  # its internal messages, then the writer looks, then it returns
        rec.check_tail(g, self.seq)
        return None

    c = _pg_hooks._Call()
    c.event = rec.new_event(g, "monitored_barrier", "dist.monitored_barrier")
    c.group, c.kind, c.nccl, c.src, c.dst, c.sync = g, "blocking", False, None, None, True
    assert OP_SPECS["monitored_barrier"].kind == "blocking"
    _pg_hooks._issue(rec, c, monitored_barrier, pg, (), {})
    after = issue_collective(rec, g)
    assert rec.take_gaps() == {}
    assert (before.seq, c.event.seq, after.seq) == (1, 1 + _pg_hooks.MONITORED_BARRIER_WIDTH,
                                                    2 + _pg_hooks.MONITORED_BARRIER_WIDTH)
    assert g.blocking == 0
    rec.check_tail(g, pg.seq)  # once it is numbered, the writer's readings count again
    assert rec.take_gaps() == {}
