"""The demo's reading of a run: straggler, slow from the start, network, hang, healthy; from
the rows alone, whatever the ground truth says."""

from __future__ import annotations

import polars as pl

from ringwatch._reading import injected_line, interpret, read_run

from fakes import frame, row

MS = 1_000_000
RANKS = (0, 1, 2, 3)


def job(steps=40, *, onset=None, late=None, late_ms=0.0, slow_ms=0.0, base_ms=20.0,
        jitter=True, late_ends_late=False):
    """One all-reduce per step on 4 ranks. Healthy: ranks take turns arriving last by 1 ms.
    From ``onset`` (or from the start when None), ``late`` arrives ``late_ms`` after the rest
    and every collective lasts ``slow_ms`` longer; with ``late_ends_late`` the late rank also
    leaves its collectives ``late_ms`` after the others (its own transfers are the slow part)."""
    rows = []
    for step in range(steps):
        on = onset is None or step >= onset
        t0 = step * 200 * MS
        for r in RANKS:
            start = t0 + (MS if jitter and r == step % 4 else 0)
            if on and r == late:
                start = t0 + int(late_ms * MS)
            last = max(t0 + int(late_ms * MS) if on and late is not None else 0, t0 + MS)
            end = last + int((base_ms + (slow_ms if on else 0)) * MS)
            if on and r == late and late_ends_late:
                end += int(late_ms * MS)
            rows.append(row(r, step, step + 1, pg_ranks="0-3", step=step, mono_start_ns=start,
                            mono_end_ns=end))
    return frame(rows)


def hung(steps=10, *, behind=2):
    """``job(steps)``, then ranks other than ``behind`` wait in all-reduce #``steps + 1``
    from 2 s on, which ``behind`` never entered."""
    pending = [row(r, steps, steps + 1, pg_ranks="0-3", step=steps,
                   mono_start_ns=2_000 * MS, status="pending") for r in RANKS if r != behind]
    return pl.concat([job(steps=steps), frame(pending)])


def test_straggler_after_the_onset():
    r = interpret(job(onset=20, late=2, late_ms=30), 4, onset_step=20)
    assert (r.verdict, r.rank) == ("straggler", 2), r.lines
    # before: steps 2-19 (after the warm-up), rank 2 last in 5 of them (every 4th)
    assert ("rank 2 arrives last at 100% of collectives from step 20 (28% before)"
            in r.lines[-1]), r.lines
    assert r.lines[0].startswith("before step 20 ") and r.lines[1].startswith("from step 20 ")


def test_one_rank_slow_from_the_first_step():
    r = interpret(job(late=1, late_ms=30), 4)
    assert (r.verdict, r.rank) == ("slow from the start", 1), r.lines


def test_slower_collectives_everywhere_is_the_network():
    r = interpret(job(onset=20, slow_ms=100), 4, onset_step=20)
    assert (r.verdict, r.rank) == ("network", None), r.lines


def test_rank_last_but_peers_no_longer_waiting_is_not_a_straggler():
    # Arrives last by 2 ms on every collective (a rank at the far end of a slower link):
    # the peers' wait barely grows, so the bigger collectives are the network, not rank 3.
    r = interpret(job(onset=20, late=3, late_ms=2, slow_ms=100), 4, onset_step=20)
    assert r.verdict == "network", r.lines


def test_rank_late_from_its_own_slow_transfers_is_not_a_compute_straggler():
    # Last to arrive by 10 ms, but as long in collectives as its peers: it left the previous
    # one late (the far end of a throttled link), it did not compute longer.
    r = interpret(job(onset=20, late=3, late_ms=10, slow_ms=100, late_ends_late=True), 4,
                  onset_step=20)
    assert r.verdict == "network", r.lines
    r = interpret(job(onset=20, late=3, late_ms=10, slow_ms=100), 4, onset_step=20)
    assert (r.verdict, r.rank) == ("straggler", 3), r.lines  # the same, late from outside


def test_rank_slow_before_and_after_the_onset_is_slow_from_the_start():
    r = interpret(job(late=1, late_ms=30), 4, onset_step=20)
    assert (r.verdict, r.rank) == ("slow from the start", 1), r.lines
    assert "before and from step 20" in r.lines[-1]


def test_a_rank_last_by_noise_before_then_a_straggler_is_a_straggler():
    # Before step 40 rank 1 comes last by 6 ms at 3 steps of 5 (a busy host: 68% of all), and waits
    # little; from it, last by 10 ms at every step. Its peers' wait did not double, but it
    # comes last far more often than before: a change on it, not slow from the start.
    rows = []
    for step in range(80):
        t0 = step * 200 * MS
        late_ms = 10 if step >= 40 else 6 if step % 5 < 3 else 0
        for r in RANKS:
            start = t0 + (int(late_ms * MS) if r == 1 else MS if r == step % 4 else 0)
            end = t0 + max(int(late_ms * MS), MS) + 20 * MS
            rows.append(row(r, step, step + 1, pg_ranks="0-3", step=step,
                            mono_start_ns=start, mono_end_ns=end))
    r = interpret(frame(rows), 4, onset_step=40)
    assert (r.verdict, r.rank) == ("straggler", 1), r.lines
    assert "(68% before)" in r.lines[-1], r.lines


def test_a_split_with_no_step_before_it_reads_the_run_as_one():
    # an imbalance's onset is step 0: nothing to compare with, so one table
    r = interpret(job(late=1, late_ms=30), 4, onset_step=0)
    assert (r.verdict, r.rank) == ("slow from the start", 1), r.lines
    assert r.lines[0].startswith("all steps ")


def test_healthy_run_has_no_culprit():
    r = interpret(job(), 4)
    assert (r.verdict, r.rank) == ("none", None), r.lines


def test_hang_points_at_the_rank_behind():
    r = interpret(hung(), 4, now_ns=8_000 * MS)
    assert (r.verdict, r.rank) == ("hang", 2), r.lines
    assert any("a hang (never arrived), rank 2 behind it" in line for line in r.lines), r.lines
    assert any("rank 2 last finished all_reduce #10" in line for line in r.lines), r.lines
    assert any("rank 0 waiting in all_reduce #11 of pg 0 for 6.0 s" in line
               for line in r.lines), r.lines


def test_a_short_wait_at_the_end_is_not_a_hang():
    r = interpret(hung(), 4, now_ns=3_000 * MS)  # 1 s: under the 5 s a hang takes
    assert r.verdict != "hang", r.lines


def test_the_heartbeats_measure_the_stall():
    seen = dict.fromkeys(RANKS, 9_000 * MS)
    r = interpret(hung(), 4, last_seen_ns=seen)
    assert (r.verdict, r.rank) == ("hang", 2), r.lines


def test_the_verdict_is_the_data_s_not_the_ground_truth_s():
    # the truth says rank 3 hung at step 5, the rows show a healthy run that completed
    truth = {"kind": "hang", "rank": 3, "onset_step": 5,
             "outcome": {"ended_wall_ns": 60_000 * MS}}
    r = read_run(job(), truth, 4)
    assert (r.verdict, r.rank) == ("none", None), r.lines
    assert r.lines[0] == "injected: hang of rank 3 at step 5"
    assert r.lines[-1].startswith("reading: no rank stands out"), r.lines


def test_a_hang_the_truth_does_not_know_of_is_read_from_the_data():
    r = read_run(hung(), {"kind": "none", "onset_step": None}, 4, now_ns=8_000 * MS)
    assert (r.verdict, r.rank) == ("hang", 2), r.lines
    assert r.lines[0] == "injected: nothing (a healthy run)"


def test_the_injected_line_says_what_the_truth_says():
    assert injected_line({"kind": "link", "host": "host1", "onset_step": 12,
                          "description": "host1's link (egress) limited to 50 Mbit/s"}) == (
        "injected: link of host1 at step 12: host1's link (egress) limited to 50 Mbit/s")
    assert injected_line({"kind": "imbalance", "rank": 0, "onset_step": 0}) == (
        "injected: imbalance of rank 0 from the start")
    assert injected_line({"kind": "straggler", "rank": 1, "onset_step": None}) == (
        "injected: straggler of rank 1 (never applied)")


def test_no_complete_step():
    r = interpret(frame([]), 4)
    assert r.verdict == "no data"
