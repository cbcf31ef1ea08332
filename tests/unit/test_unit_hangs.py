"""Hang frontier: never arrived, stuck in the collective, not running, consequences."""

from __future__ import annotations

import pytest

from ringwatch.analyzers import Finding, compute_frontier, detect_hangs
from ringwatch.analyzers._hangs import stall_threshold_s

from fakes import frame, row

S = 1_000_000_000


def ev(rank, seq, start_s, *, pg="0", pg_ranks="0-3", status="ok", op="all_reduce", step=None):
    end = None if status == "pending" else int((start_s + 0.01) * S)
    r = row(rank, seq - 1, seq, op, pg=pg, pg_ranks=pg_ranks, status=status, step=step,
            mono_start_ns=int(start_s * S), mono_end_ns=end)
    r["host"] = f"host{rank // 2}"
    return r


def healthy(seqs, ranks=(0, 1, 2, 3), **kw):
    return [ev(r, s, s, **kw) for s in seqs for r in ranks]


def test_frontier_per_group():
    rows = healthy(range(1, 4)) + [ev(r, 4, 4.0, status="pending", step=7) for r in (0, 2, 3)]
    fr = {r["rank"]: r for r in compute_frontier(frame(rows)).iter_rows(named=True)}
    assert fr[1]["entered_seq"] == 3 and fr[1]["pending_seq"] is None
    assert fr[0]["entered_seq"] == 4 and fr[0]["finished_seq"] == 3
    assert fr[0]["pending_seq"] == 4 and fr[0]["pending_step"] == 7
    assert fr[0]["pending_start_ns"] == 4 * S


def test_rank_that_never_arrived():
    rows = healthy(range(1, 4)) + [ev(r, 4, 4.0, status="pending", step=7) for r in (0, 2, 3)]
    (f,) = detect_hangs(frame(rows), now_ns=20 * S)
    assert (f.kind, f.cls, f.ranks, f.hosts, f.pg, f.seq) == (
        "hang", "never arrived", (1,), ("host0",), "0", 4)
    assert f.since_ns == 4 * S and f.since_step == 7 and f.confidence == 1.0
    assert "rank(s) 0,2,3 waiting in all_reduce #4 for 16.0 s" in f.evidence[0]
    assert "rank 1 last entered #3 here and is in no collective" in f.evidence[1]


def test_a_rank_stopped_while_issuing_a_collective_entered_nothing():
    """Rank 1 was stopped between recording an all_reduce and the backend numbering it (a
    signal landing mid-record): its peers wait at #4 and it never arrived. The reading says
    what it last finished and where it stopped, not "waiting in all_reduce #None"."""
    from ringwatch._reading import frontier_lines

    rows = healthy(range(1, 4)) + [ev(r, 4, 4.0, status="pending") for r in (0, 2, 3)]
    stopped = ev(1, 4, 4.5, status="pending")
    stopped["seq"] = None
    (f,) = detect_hangs(frame(rows + [stopped]), now_ns=20 * S)
    assert (f.cls, f.ranks, f.seq) == ("never arrived", (1,), 4)
    lines = frontier_lines(frame(rows + [stopped]), now_ns=20 * S)
    assert lines[1] == ("rank 1 last finished all_reduce #3 of pg 0, entered nothing since "
                        "(stopped while issuing all_reduce of pg 0, 15.5 s ago: before the "
                        "backend took it)")
    assert "#None" not in "\n".join(lines)


def test_a_rank_stopped_inside_a_wait_its_peers_finished_never_arrived_at_the_next():
    """Rank 1 entered #4 and #5 and stopped before it saw them end (blocked inside their
    wait); its peers finished both and wait at #6: the group waits for rank 1 at #6, not in
    a collective that does not complete."""
    rows = healthy(range(1, 4)) + [ev(r, s, float(s)) for s in (4, 5) for r in (0, 2, 3)]
    rows += [ev(1, s, float(s), status="pending") for s in (4, 5)]
    rows += [ev(r, s, float(s), status="pending") for s in (6, 7) for r in (0, 2, 3)]
    (f,) = detect_hangs(frame(rows), now_ns=20 * S)
    assert (f.cls, f.ranks, f.seq, f.since_ns) == ("never arrived", (1,), 6, 6 * S)
    assert "rank 1 last entered #5 here; every peer finished #4..#5" in f.evidence[1]
    from ringwatch._reading import frontier_lines
    lines = frontier_lines(frame(rows), now_ns=20 * S)
    assert lines[1] == ("rank 1 last finished all_reduce #5 of pg 0 by its peers' ends "
                        "(2 end(s) it never saw), entered nothing since")
    assert lines[0].startswith("rank 0 waiting in all_reduce #6..#7 (2 in flight)")
    # one peer has not finished #5 yet: rank 1 may be waiting for it there, as it says
    rows = [r for r in rows if not (r["rank"] == 3 and r["seq"] == 5)]
    rows.append(ev(3, 5, 5.0, status="pending"))
    (f,) = detect_hangs(frame(rows), now_ns=20 * S)
    assert f.seq == 4 and f.cls == "stuck in the collective"
    assert frontier_lines(frame(rows), now_ns=20 * S)[1].startswith("rank 1 waiting in")
    # numbered from 0 (a dump's numbers): a peer still in #0 has not finished it either
    rows = [ev(r, 0, 1.0, status="pending") for r in (0, 1, 3)] + [ev(2, 0, 1.0)]
    rows += [ev(2, 1, 2.0, status="pending")]
    (f,) = detect_hangs(frame(rows), now_ns=20 * S)
    assert (f.cls, f.seq, f.ranks) == ("stuck in the collective", 0, (0, 1, 3))


def test_too_short_a_stall_is_not_a_hang():
    rows = healthy(range(1, 4)) + [ev(r, 4, 4.0, status="pending") for r in (0, 2, 3)]
    assert detect_hangs(frame(rows), now_ns=8 * S) == ()  # 4 s < 5 s
    assert len(detect_hangs(frame(rows), now_ns=10 * S)) == 1  # 6 s
    assert detect_hangs(frame(healthy(range(1, 9))), now_ns=100 * S) == ()


def test_the_stall_threshold_scales_with_the_step_time():
    # One collective per 3 s step: 10 steps are 30 s, longer than the 5 s floor.
    rows = [ev(r, s, 3.0 * s, step=s) for s in range(1, 6) for r in range(4)]
    rows += [ev(r, 6, 18.0, step=6, status="pending") for r in (0, 2, 3)]
    assert stall_threshold_s(frame(rows)) == pytest.approx(30.0)
    assert detect_hangs(frame(rows), now_ns=(18 + 20) * S) == ()
    (f,) = detect_hangs(frame(rows), now_ns=(18 + 31) * S)
    assert f.ranks == (1,) and f.detected_ns == (18 + 30) * S
    assert "a hang after 30.0 s" in f.evidence[0]
    assert stall_threshold_s(frame(rows), 2.0) == 2.0  # given: used as is


def test_the_stall_threshold_follows_steps_that_all_slowed_but_not_a_hang():
    """0.3 s steps, then every step 12 s long (a link at a few Mbit/s): a collective 8 s in
    flight is no hang (the bar is 10 of the newest steps), while after the usual steps a
    collective that stopped is one after the 5 s floor."""
    starts = [0.3 * s for s in range(20)] + [6.0 + 12.0 * k for k in range(4)]
    rows = [ev(r, s + 1, t, step=s) for s, t in enumerate(starts) for r in range(4)]
    now = starts[-1] + 12.0
    rows += [ev(r, 25, now, step=24, status="pending") for r in range(4)]
    assert stall_threshold_s(frame(rows)) == pytest.approx(120.0)
    assert detect_hangs(frame(rows), now_ns=int((now + 8) * S)) == ()
    usual = [r for r in rows if r["step"] < 20]
    usual += [ev(r, 21, 6.0, step=20, status="pending") for r in range(4)]
    assert stall_threshold_s(frame(usual)) == pytest.approx(5.0)
    (f,) = detect_hangs(frame(usual), now_ns=int(12.0 * S))
    assert f.cls == "stuck in the collective"


def test_everyone_inside_and_nobody_out_is_the_collective():
    rows = healthy(range(1, 4)) + [ev(r, 4, 4.0, status="pending") for r in (0, 1, 2, 3)]
    (f,) = detect_hangs(frame(rows), now_ns=30 * S)
    assert f.cls == "stuck in the collective" and f.ranks == (0, 1, 2, 3)
    assert f.hosts == ("host0", "host1")
    assert "network or device" in f.evidence[-1]


def test_some_members_finished_the_others_are_stuck():
    rows = healthy(range(1, 4)) + [ev(r, 4, 4.0) for r in (0, 1)] + \
        [ev(r, 4, 4.0, status="pending") for r in (2, 3)]
    (f,) = detect_hangs(frame(rows), now_ns=30 * S)
    assert f.cls == "stuck in the collective" and f.ranks == (2, 3)


def test_a_silent_agent_is_a_rank_not_running():
    rows = healthy(range(1, 4)) + [ev(r, 4, 4.0, status="pending") for r in (0, 1, 2, 3)]
    seen = {0: 30 * S, 1: 30 * S, 2: 5 * S, 3: 30 * S}  # rank 2 stopped writing at 5 s
    (f,) = detect_hangs(frame(rows), now_ns=30 * S, last_seen_ns=seen)
    assert (f.cls, f.ranks, f.hosts) == ("rank not running", (2,), ("host1",))
    assert "rank 2's agent silent for 25.0 s" in f.evidence[1]


def test_a_rank_blocked_in_another_group_is_a_consequence():
    # rank 1 waits in tp group "1" (ranks 0,1) for rank 0, which is stuck outside collectives;
    # the dp group "2" (ranks 1,3) sees rank 1 never arrive: a consequence, ranked second.
    rows = (healthy(range(1, 3), ranks=(0, 1), pg="1", pg_ranks="0-1")
            + healthy(range(1, 3), ranks=(1, 3), pg="2", pg_ranks="1,3")
            + [ev(1, 3, 3.0, pg="1", pg_ranks="0-1", status="pending"),
               ev(3, 3, 3.5, pg="2", pg_ranks="1,3", status="pending")])
    root, consequence = detect_hangs(frame(rows), now_ns=30 * S)
    assert (root.pg, root.cls, root.ranks, root.confidence) == ("1", "never arrived", (0,), 1.0)
    assert (consequence.pg, consequence.ranks, consequence.confidence) == ("2", (1,), 0.5)
    assert "rank 1 last entered #2 here and is waiting in pg 1 #3" in consequence.evidence[1]


def test_finding_validates_and_serialises():
    f = Finding(kind="hang", cls="never arrived", ranks=(1,), hosts=("h",), pg="0", seq=4,
                evidence=("x",))
    assert f.to_dict()["ranks"] == [1] and f.to_dict()["evidence"] == ["x"]
    assert f.headline() == "HANG (never arrived): rank 1 on h at pg 0 #4"
    with pytest.raises(ValueError):
        Finding(kind="nope", cls="", ranks=())
    with pytest.raises(ValueError):
        Finding(kind="hang", cls="", ranks=(), confidence=2.0)


def test_findings_name_the_local_rank():
    from ringwatch.analyzers._findings import with_local_ranks

    f = Finding(kind="straggler", cls="compute straggler", ranks=(6, 9), hosts=("host1",))
    (g,) = with_local_ranks((f,), {6: 2, 9: None})
    assert g.local_ranks == (2, None)
    assert g.headline() == "STRAGGLER (compute straggler): rank 6 (local 2), rank 9 on host1"
    assert g.to_dict()["local_ranks"] == [2, None]
    assert f.headline() == "STRAGGLER (compute straggler): rank 6, rank 9 on host1"


def test_ends_unseen_is_the_rule_for_every_rank_on_random_groups():
    """The linear form of the rule (the others' least finished, most entered and those in
    flight) names the ranks the rule names, checked rank by rank against every other
    member, on random groups: numbers from 0, ranks with no number, members not in the
    frontier, duplicates in the member list."""
    import random

    from ringwatch.analyzers._hangs import ends_unseen

    def seq(numbers, r):
        return -1 if numbers.get(r) is None else numbers[r]

    def rule(members, entered, finished, pending):
        out = {}
        for r, first in pending.items():
            mine, others = seq(entered, r), [m for m in members if m != r]
            if others and all(seq(finished, m) >= mine and pending.get(m, mine + 1) > mine
                              for m in others) and any(seq(entered, m) > mine for m in others):
                out[r] = first
        return out

    rng = random.Random(5)
    named = 0
    for _ in range(3000):
        size = rng.randint(1, 6)
        members = list(range(size)) + ([0] if rng.random() < 0.1 else [])
        ranks = range(size + (rng.random() < 0.2))  # sometimes one outside the group
        entered, finished, pending = {}, {}, {}
        for r in ranks:
            if rng.random() < 0.9:
                entered[r] = rng.randint(0, 4)
                done = rng.randint(-1, entered[r])
                if done >= 0:
                    finished[r] = done
                if rng.random() < 0.6:
                    pending[r] = rng.randint(done + 1, entered[r] + 1)
        want = rule(members, entered, finished, pending)
        assert ends_unseen(members, entered, finished, pending) == want
        named += bool(want)
    assert named > 100  # the rule names ranks in many of them
