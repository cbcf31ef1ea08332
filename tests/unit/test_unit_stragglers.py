"""Stragglers from durations: who the others wait for, window after window."""

from __future__ import annotations

import random

import polars as pl

from ringwatch.analyzers import (
    compute_step_lateness,
    compute_straggler_scores,
    detect_stragglers,
)

from fakes import frame, row

MS = 1_000_000


def job(steps=60, *, onset=None, late=None, late_ms=0.0, ranks=4, buckets=3, seed=0,
        late_ends_late=False, on_time=(), blips=None):
    """``buckets`` all-reduces per step; healthy ranks arrive within 0-2 ms of each other in
    random order, every member leaves when the last arrives plus 5 ms. From ``onset`` (from
    the start when None) rank ``late`` arrives ``late_ms`` after the others, except in the
    steps of ``on_time``; with ``late_ends_late`` it also leaves that much later (its own
    transfers are slow). ``blips`` (step -> ms): rank ``late`` arrives that much after the
    others in that step, fault or not."""
    rng = random.Random(seed)
    rows, seq = [], 0
    for step in range(steps):
        on = late is not None and (onset is None or step >= onset) and step not in on_time
        for _ in range(buckets):
            seq += 1
            t0 = (step * 200 + seq % buckets * 30) * MS
            starts = {r: t0 + int(rng.uniform(0, 2) * MS) for r in range(ranks)}
            if on:
                starts[late] = max(starts.values()) + int(late_ms * MS)
            elif blips and step in blips:
                starts[late] = max(starts.values()) + int(blips[step] * MS)
            end = max(starts.values()) + 5 * MS
            for r in range(ranks):
                e = end + (int(late_ms * MS) if on and late_ends_late and r == late else 0)
                x = row(r, seq - 1, seq, pg_ranks=f"0-{ranks - 1}", step=step,
                        mono_start_ns=starts[r], mono_end_ns=e)
                x["host"] = f"host{r // 2}"
                rows.append(x)
    return frame(rows)


def test_the_onset_is_not_walked_back_over_late_steps_of_noise():
    # 4 ms late at steps 27 and 28 (noise: over the 2 ms noise floor), on time at 29, then
    # 15 ms late from 30: the fault starts at 30
    (f,) = detect_stragglers(job(onset=30, late=1, late_ms=15, blips={27: 4.0, 28: 4.0}))
    assert f.since_step == 30
    assert f.detected_step == 30  # the sum the blips began passes at the first fault step


def test_late_steps_as_large_as_the_fault_before_it_are_its_start():
    # the same steps 4 ms late, and a fault of 4 ms from 30: nothing tells them apart, the
    # streak (27-28, one step on time, then 30 on) is the change
    (f,) = detect_stragglers(job(onset=30, late=1, late_ms=4, blips={27: 4.0, 28: 4.0}))
    assert f.since_step == 27


def test_lateness_from_durations():
    lat = compute_step_lateness(job(steps=3, late=2, late_ms=20, buckets=1))
    by = {(r["rank"], r["step"]): r for r in lat.iter_rows(named=True)}
    assert by[(2, 1)]["wait_ns"] == 0 and by[(2, 1)]["last_arrivals"] == 1
    assert all(by[(r, 1)]["wait_ns"] >= 20 * MS for r in (0, 1, 3))
    assert by[(0, 1)]["last_arrivals"] == 0


def test_a_straggler_from_its_onset():
    (f,) = detect_stragglers(job(onset=30, late=1, late_ms=15))
    assert (f.kind, f.cls, f.ranks, f.hosts) == ("straggler", "compute straggler", (1,),
                                                  ("host0",))
    assert f.since_step == 30 and f.detected_step == 32, f  # the third late step
    assert f.until_step is None  # still late when the logs end
    # its peers wait ~15-17 ms at each of the 3 buckets of a step
    assert 0.045 <= f.gain_s_per_step <= 0.052, f


def test_one_rank_slow_from_the_start_among_its_peers_is_a_straggler():
    # no pipeline: every rank does the same work, so one slower from the first step is a
    # fault, named from that step, measured against its peers' usual
    (f,) = detect_stragglers(job(late=3, late_ms=30))
    assert (f.kind, f.cls, f.ranks, f.since_step, f.until_step) == (
        "straggler", "compute straggler", (3,), 2, None)
    assert 0.085 <= f.gain_s_per_step <= 0.095, f
    assert any("straggler from the start" in e for e in f.evidence), f.evidence


def test_late_from_the_start_with_its_whole_stage_is_structural_imbalance():
    ev = job(late=3, late_ms=30)
    # rank 3 has no peer in its stage: nothing says it should be as fast as the others
    (f,) = detect_stragglers(ev, stage={0: 0, 1: 0, 2: 0, 3: 1})
    assert (f.kind, f.cls, f.ranks, f.since_step) == ("imbalance", "structural imbalance",
                                                      (3,), 2)
    # its stage-mate is on time: rank 3 is the odd one out, a straggler
    (f,) = detect_stragglers(ev, stage={0: 0, 1: 0, 2: 1, 3: 1})
    assert (f.kind, f.ranks, f.since_step) == ("straggler", (3,), 2)


def test_healthy_jobs_have_no_straggler():
    for seed in range(5):
        assert detect_stragglers(job(seed=seed)) == (), seed


def test_late_from_its_own_slow_transfers_is_not_a_straggler():
    # It arrives last but also leaves last: its duration is not the shortest, so the
    # durations alone do not make it the one the others wait for.
    ev = job(onset=30, late=1, late_ms=15, late_ends_late=True)
    assert detect_stragglers(ev) == ()


def test_a_rank_slow_in_most_steps_before_its_run_is_a_straggler_since_it_began():
    # Slow from the start, but hidden by noise in the first steps: late by its peers' usual
    # from step 4 on.
    ev = job(late=2, late_ms=30)
    healthy = job()
    mixed = healthy.filter(healthy["step"] < 4).vstack(ev.filter(ev["step"] >= 4))
    (f,) = detect_stragglers(mixed.sort("rank", "idx"))
    assert (f.kind, f.ranks, f.since_step) == ("straggler", (2,), 4), f


def _brief(steps: tuple[int, ...]):
    healthy, slow = job(), job(late=1, late_ms=15)  # same collectives, numbered alike
    return healthy.filter(~healthy["step"].is_in(steps)).vstack(
        slow.filter(slow["step"].is_in(steps))).sort("rank", "idx")


def test_a_brief_slowdown_is_not_persistent():
    assert detect_stragglers(_brief((30,))) == ()
    assert detect_stragglers(_brief((30, 33))) == ()  # two far apart do not make a run
    assert detect_stragglers(_brief((30, 31))) == ()
    (f,) = detect_stragglers(_brief((30, 31)), persist=2)  # two in a row are enough here
    assert (f.since_step, f.detected_step, f.until_step) == (30, 31, 31)
    assert f.cls == "transient straggler" and f.confidence <= 0.5
    (f,) = detect_stragglers(_brief(tuple(range(30, 50))))  # late for 20 steps, then not
    assert (f.cls, f.since_step, f.detected_step, f.until_step) == \
        ("compute straggler", 30, 32, 49)


def test_a_hiccup_is_reported_apart_from_the_findings():
    from ringwatch._analyze import report_lines
    from ringwatch.analyzers._policy import split_hiccups

    brief = detect_stragglers(_brief((30, 31, 32, 33)))  # 4 steps behind, then caught up
    assert split_hiccups(brief) == ((), brief) and brief[0].until_step == 33
    long = detect_stragglers(_brief(tuple(range(30, 50))))
    assert split_hiccups(long) == (long, ())
    report = {"job_id": "j", "ranks": [0, 1, 2, 3], "collectives": 720, "as_of_ns": None,
              "_findings": (), "_hiccups": brief + brief}
    lines = report_lines(report)
    assert lines[1].startswith("no findings") and lines[2].startswith("2 hiccup(s)"), lines
    assert lines[3].startswith("  rank 1 on host0: 2x, steps 30-33 (~"), lines


def test_scores_rise_with_the_excess_and_reset_after():
    sc = compute_straggler_scores(compute_step_lateness(_brief((30, 31))))
    r1 = {r["step"]: r for r in sc.filter(sc["rank"] == 1).iter_rows(named=True)}
    assert r1[29]["cusum_ms"] == 0 and r1[30]["cusum_ms"] > 30 and \
        r1[31]["cusum_ms"] > r1[30]["cusum_ms"]
    assert r1[31]["score"] >= 1 and r1[31]["run_start"] == 30 and r1[31]["hits"] == 2
    # the excess is gone: the sum drains by the allowance every step
    assert r1[31]["cusum_ms"] > r1[35]["cusum_ms"] > r1[45]["cusum_ms"]
    assert 40 <= r1[31]["delay_ms"] <= 52  # three buckets, ~15-17 ms each
    others = sc.filter(sc["rank"] != 1)
    assert others["score"].max() < 0.5


def test_since_is_the_late_streak_not_an_earlier_blip():
    # one late step at 27, then late for good from 30: the sum never drains to zero between
    # them, but the change is at 30
    ev = _brief((27, *range(30, 60)))
    sc = compute_straggler_scores(compute_step_lateness(ev))
    r1 = {r["step"]: r for r in sc.filter(sc["rank"] == 1).iter_rows(named=True)}
    assert r1[29]["cusum_ms"] > 0 and r1[32]["run_start"] == 27
    (f,) = detect_stragglers(ev)
    assert (f.since_step, f.detected_step) == (30, 32), f


def busy_job(steps=50, *, onset=None, late=None, ranks=8, seed=0, until=None):
    """A job whose noise is in its transfers, not its compute (as on a crowded machine): each
    step every rank computes 45-55 ms, then one all-reduce that every rank leaves 5-45 ms
    after the last arrival (uniform), and its next step starts when it left. From ``onset``
    rank ``late`` computes 80-90 ms: it comes last by about the job's noise (up to step
    ``until``, excluded, when given)."""
    rng = random.Random(seed)
    rows, t = [], dict.fromkeys(range(ranks), 0)
    for step in range(steps):
        compute = {r: rng.uniform(45, 55) for r in range(ranks)}
        if late is not None and step >= onset and (until is None or step < until):
            compute[late] = rng.uniform(80, 90)
        starts = {r: t[r] + int(c * MS) for r, c in compute.items()}
        last = max(starts.values())
        for r in range(ranks):
            t[r] = last + int(rng.uniform(5, 45) * MS)
            x = row(r, step, step + 1, pg_ranks=f"0-{ranks - 1}", step=step,
                    mono_start_ns=starts[r], mono_end_ns=t[r])
            x["host"] = f"host{r // 4}"
            rows.append(x)
    return frame(rows)


def test_time_outside_collectives_is_per_rank_and_counts_overlaps_once():
    from ringwatch.analyzers._stragglers import compute_outside_ns

    rows = []
    for i, (a, b, step) in enumerate([(0, 10, 0), (5, 12, 0), (20, 25, 0), (55, 60, 1)]):
        rows.append(row(0, i, i + 1, step=step, mono_start_ns=a * MS, mono_end_ns=b * MS))
    rows.append(row(1, 0, 1, step=0, mono_start_ns=40 * MS, mono_end_ns=50 * MS))
    got = {(r, s): v / MS for r, s, v in compute_outside_ns(frame(rows)).iter_rows()}
    # rank 0: the 2nd starts inside the 1st (0), the 3rd 8 ms after both ended; step 1: 30 ms
    assert got == {(0, 0): 8.0, (0, 1): 30.0, (1, 0): 0.0}
    lat = compute_step_lateness(busy_job(steps=3)).filter(pl.col("step") > 0)  # 0: no before
    assert lat["compute_ns"].min() >= 45 * MS and lat["compute_ns"].max() <= 55 * MS


def test_a_rank_late_while_computing_longer_is_named_before_the_sum_passes():
    ev = busy_job(onset=30, late=5)
    sc = compute_straggler_scores(compute_step_lateness(ev))
    at = {r["step"]: r for r in sc.filter(sc["rank"] == 5).iter_rows(named=True)}
    assert at[32]["busy_run"] >= 3 and at[32]["compute_ratio"] >= 1.5
    assert at[32]["score"] < 1.0  # the sum alone would still wait
    (f,) = detect_stragglers(ev)
    assert (f.ranks, f.cls, f.since_step, f.detected_step) == ((5,), "compute straggler", 30,
                                                               32), f
    assert any("outside collectives" in e and "it computes longer" in e for e in f.evidence)


def test_a_straggler_named_by_its_compute_time_ends_when_it_stops_being_late():
    # Late from step 30 to 37 by about the job's noise: named by its compute time. With the
    # noise taken larger (an online window's frozen baseline), its excess never passes it:
    # the busy steps alone say when it ended (this used to crash, or end it before it was
    # named).
    ev = busy_job(onset=30, late=5, until=38)
    for noise_ms in (None, 50.0, 200.0):
        (f,) = detect_stragglers(ev, noise_ms=noise_ms)
        assert (f.ranks, f.since_step, f.detected_step, f.until_step) == ((5,), 30, 32, 37), f
        assert f.cls == "compute straggler" and f.gain_s_per_step > 0


def test_a_noisy_healthy_job_has_no_busy_straggler():
    for seed in range(5):
        assert detect_stragglers(busy_job(seed=seed)) == (), seed


def test_a_live_reader_holds_back_what_may_still_end_as_a_hiccup():
    from ringwatch.analyzers._findings import Finding
    from ringwatch.analyzers._policy import split_undecided

    young = Finding("straggler", "compute straggler", (2,), since_step=30)
    ended = Finding("straggler", "compute straggler", (1,), since_step=5, until_step=20)
    hang = Finding("hang", "never arrived", (3,), since_step=31)
    # still on at step 39: late in one of steps 36..39 (4 on-time steps in a row end it),
    # so late 7 steps at least (30..36), one fewer than a hiccup can last: it may yet be one
    assert split_undecided((young, ended, hang), newest_step=39) == ((ended, hang), (young,))
    # still on at 40: late 8 steps at least (30..37): decided
    assert split_undecided((young,), newest_step=40) == ((young,), ())
    # the job stopped sending steps while it was late: what a post-mortem pass would say
    assert split_undecided((young,), newest_step=36, data_ended=True) == ((young,), ())
    # a slow link on send/recv alone is held as long (a late sender among its ranks, not yet
    # shown, would take it); one over a collective group is the link pass's to hold
    p2p = Finding("slow_link", "slow communication", (0, 1), pg="p2p 1>0", since_step=30)
    group = Finding("slow_link", "slow communication", (0, 1), pg="0", since_step=30)
    assert split_undecided((p2p, group), newest_step=39) == ((group,), (p2p,))
    assert split_undecided((p2p, group), newest_step=40) == ((p2p, group), ())
