"""The demo's reading of a run: straggler, slow from the start, network, hang, healthy."""

from __future__ import annotations

from ringwatch._reading import interpret

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


def truth(kind, onset=None):
    return {"kind": kind, "onset_step": onset}


def test_straggler_after_the_onset():
    r = interpret(job(onset=20, late=2, late_ms=30), truth("straggler", 20), 4)
    assert (r.verdict, r.rank) == ("straggler", 2), r.lines
    # before: steps 2-19 (after the warm-up), rank 2 last in 5 of them (every 4th)
    assert ("rank 2 arrives last at 100% of collectives since the onset (28% before)"
            in r.lines[-1]), r.lines


def test_one_rank_slow_from_the_first_step():
    r = interpret(job(late=1, late_ms=30), truth("imbalance"), 4)
    assert (r.verdict, r.rank) == ("slow from the start", 1), r.lines


def test_slower_collectives_everywhere_is_the_network():
    r = interpret(job(onset=20, slow_ms=100), truth("link", 20), 4)
    assert (r.verdict, r.rank) == ("network", None), r.lines


def test_rank_last_but_peers_no_longer_waiting_is_not_a_straggler():
    # Arrives last by 2 ms on every collective (a rank at the far end of a slower link):
    # the peers' wait barely grows, so the bigger collectives are the network, not rank 3.
    r = interpret(job(onset=20, late=3, late_ms=2, slow_ms=100), truth("link", 20), 4)
    assert r.verdict == "network", r.lines


def test_rank_late_from_its_own_slow_transfers_is_not_a_compute_straggler():
    # Last to arrive by 10 ms, but as long in collectives as its peers: it left the previous
    # one late (the far end of a throttled link), it did not compute longer.
    r = interpret(job(onset=20, late=3, late_ms=10, slow_ms=100, late_ends_late=True),
                  truth("link", 20), 4)
    assert r.verdict == "network", r.lines
    r = interpret(job(onset=20, late=3, late_ms=10, slow_ms=100), truth("link", 20), 4)
    assert (r.verdict, r.rank) == ("straggler", 3), r.lines  # the same, late from outside


def test_rank_slow_before_and_after_the_onset_is_slow_from_the_start():
    r = interpret(job(late=1, late_ms=30), truth("straggler", 20), 4)
    assert (r.verdict, r.rank) == ("slow from the start", 1), r.lines
    assert "before and after the onset" in r.lines[-1]


def test_healthy_run_has_no_culprit():
    r = interpret(job(), truth("none"), 4)
    assert (r.verdict, r.rank) == ("none", None), r.lines


def test_hang_points_at_the_rank_behind():
    ev = job(steps=10)
    pending = [row(r, 10, 11, pg_ranks="0-3", step=10, mono_start_ns=2_000 * MS,
                   status="pending") for r in (0, 1, 3)]  # rank 2 never entered #11
    import polars as pl

    ev = pl.concat([ev, frame(pending)])
    r = interpret(ev, {"kind": "hang", "onset_step": 9,
                       "outcome": {"ended_wall_ns": 5_000 * MS}}, 4)
    assert (r.verdict, r.rank) == ("hang", 2), r.lines
    assert any("rank 2 last finished all_reduce #10" in line for line in r.lines), r.lines
    assert any("rank 0 waiting in all_reduce #11 of pg 0 for 3.0 s" in line
               for line in r.lines), r.lines


def test_no_complete_step():
    r = interpret(frame([]), truth("none"), 4)
    assert r.verdict == "no data"
