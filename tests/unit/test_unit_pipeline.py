"""Hybrid-parallel jobs: the layout from the groups and send/recv pairs, and the verdicts from
each rank's unblocked time against its stage's, on real runs (``tests/data/pipeline/``: 8 Gloo
ranks, dp x tp x pp = 2 x 2 x 2, 1F1B)."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

from ringwatch._analyze import analyze_events
from ringwatch.analyzers._layout import infer_layout, parse_layout
from ringwatch.analyzers._policy import split_hiccups
from ringwatch.analyzers._work import compute_step_work

DATA = Path(__file__).resolve().parents[1] / "data" / "pipeline"


def _run(name: str) -> pl.DataFrame:
    return pl.read_parquet(DATA / f"{name}.parquet")


def _findings(ev: pl.DataFrame, **kw):
    return split_hiccups(analyze_events(ev, now_ns=int(ev["t_end_ns"].max()), **kw))[0]


def test_the_layout_is_read_from_the_groups_and_the_pipeline():
    lay = infer_layout(_run("healthy"))
    assert (lay.dp, lay.tp, lay.pp, lay.source) == (2, 2, 2, "inferred")
    # tp index fastest, then replica, then stage: stage 0 holds ranks 0-3
    assert lay.stage == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1, 7: 1}
    assert len(lay.tp_groups) == len(lay.dp_groups) == 4
    assert lay.describe() == "dp=2 x tp=2 x pp=2 (inferred from the groups and send/recv pairs)"


def test_a_job_without_send_recv_is_one_role():
    ev = _run("healthy").filter(~pl.col("is_p2p"))
    assert set(infer_layout(ev).stage.values()) == {0}


def test_send_recv_that_chain_no_path_give_no_stages():
    ev = _run("healthy")
    # rank 0 also sends to rank 7 and rank 3: a star, not a chain
    extra = ev.filter(pl.col("is_p2p") & (pl.col("rank") == 0)).head(2).with_columns(
        pl.Series("peer", [7, 3], dtype=pl.Int32))
    lay = infer_layout(pl.concat([ev, extra]))
    assert lay.pp == 1 and lay.notes


@pytest.mark.parametrize("spec,stage_of_5", [("tp=2,pp=2,dp=2", 1), ("pp=2", 1),
                                             ("tp=2,pp=4", 2)])
def test_a_declared_layout(spec, stage_of_5):
    lay = parse_layout(spec, 8)
    assert lay.source == "declared" and lay.stage[5] == stage_of_5


@pytest.mark.parametrize("spec", ["tp=3", "tp=2,pp=2,dp=4", "tp=x", "mp=2", "tp=0"])
def test_a_declared_layout_that_does_not_fit_is_refused(spec):
    with pytest.raises(ValueError):
        parse_layout(spec, 8)


def test_unblocked_time_reads_the_pipeline_right():
    # a receive waits for the neighbour stage: blocked, not work; isends are not waits
    w = compute_step_work(_run("strag-mid")).filter(pl.col("step") >= 30)
    per = dict(w.group_by("rank").agg(pl.col("work_ms").median()).iter_rows())
    peers = [per[r] for r in (4, 6, 7)]
    assert per[5] > 1.5 * max(peers)
    # its pipeline neighbours (ranks 0, 1) block in their receives: their work is as ever
    assert max(per[0], per[1]) < 1.2 * max(per[2], per[3])


def test_healthy_gives_no_finding():
    assert _findings(_run("healthy")) == ()


def test_a_straggler_mid_run_is_named_against_its_stage():
    (f,) = _findings(_run("strag-mid"))
    assert (f.kind, f.cls, f.ranks) == ("straggler", "compute straggler", (5,))
    # injected at step 25; far behind (over the threshold) in its first three steps:
    # conclusive at the third (a burst is not that far behind that long)
    assert 25 <= f.since_step <= 27 and f.detected_step - f.since_step <= 2, f
    # the replay's step, and the step as it was before the onset, measured
    (line,) = [e for e in f.evidence if "working like its peers" in e]
    assert re.search(rf"\(replay of the steps' dependencies\); before step {f.since_step} "
                     r"the step took \d+ ms$", line), line


def test_a_replica_slow_from_the_first_step_is_a_straggler_not_imbalance():
    (f,) = _findings(_run("strag-0"))
    assert (f.kind, f.cls, f.ranks) == ("straggler", "compute straggler", (3,))
    assert f.since_step <= 3 and "first steps" in f.evidence[0]
    assert not any("before step" in e for e in f.evidence)  # no step before it to measure


def test_a_heavier_last_stage_is_structural_imbalance_naming_the_stage():
    (f,) = _findings(_run("laststage"))
    assert (f.kind, f.cls, f.ranks) == ("imbalance", "structural imbalance", (4, 5, 6, 7))
    assert "stage 1" in f.evidence[0] and f.gain_s_per_step > 0


def test_varying_sequence_lengths_are_workload_imbalance_not_a_fault():
    fs = _findings(_run("varyseq"))
    assert fs and all((f.kind, f.cls) == ("imbalance", "workload imbalance") for f in fs)


def test_a_slow_link_between_the_stages_is_a_slow_link_not_a_straggler():
    """host1's link limited to 8 Mbit/s from step 25 (a real run, `link-p2p`): the stages sit
    one per host, so only send/recv crosses the link; the step went from ~210 to ~730 ms,
    every rank blocked, none working more. Before send/recv counted: no findings."""
    (f,) = _findings(_run("link-p2p"))
    assert (f.kind, f.cls) == ("slow_link", "slow communication")
    assert f.hosts == ("host0", "host1") and f.ranks == tuple(range(8))
    assert 24 <= f.since_step <= 26 and f.detected_step - f.since_step == 3, f
    assert f.evidence[0].startswith("send/recv host")
    assert any("ringwatch probe" in e for e in f.evidence)  # two hosts: either end


@pytest.mark.parametrize("name", ["strag-mid", "strag-ends", "pp4-strag"])
def test_a_straggler_slows_its_receivers_but_is_no_slow_link(name):
    # its late sends make its neighbours' receives slower, as a slow link would: on
    # send/recv alone, with the straggler among the ranks, that is the straggler's doing
    from ringwatch.analyzers._links import detect_slow_links
    from ringwatch.analyzers._timing import with_analysis_durations

    (link,) = detect_slow_links(with_analysis_durations(_run(name)))
    assert link.pg.startswith("p2p ")  # what the run shows without the straggler's rule
    fs = _findings(_run(name))
    assert [f.kind for f in fs] == ["straggler"], fs
    assert any("its send/recv across hosts is slower" in e for e in fs[0].evidence)


def test_without_the_layout_the_lateness_detector_cannot_tell():
    # what the layout buys: read as one role with lateness at the collectives alone (the DDP
    # rules), a 4-stage or interleaved pipeline's straggler is not named alone (the ranks
    # its stage holds up reach the data-parallel all-reduces late too)
    from ringwatch.analyzers._layout import Layout

    flat = Layout(stage={r: 0 for r in range(8)})
    for name, victim in (("pp4-strag", 3), ("vpp-strag", 5)):
        ev = _run(name)
        assert [f.ranks for f in _findings(ev) if f.kind == "straggler"] == [(victim,)]
        assert [f.ranks for f in _findings(ev, layout=flat)
                if f.kind == "straggler"] != [(victim,)], name


def _row(rank, step, idx, op, start_ms, end_ms, *, peer=None, pg="0", seq=None, blocking=True):
    ms = 1_000_000
    return {"rank": rank, "step": step, "idx": idx, "pg": pg, "seq": seq,
            "is_p2p": op in ("send", "recv"), "peer": peer, "op": op,
            "async_op": not blocking, "mono_start_ns": int(start_ms * ms),
            "mono_end_ns": int(end_ms * ms)}


def _two_stage_rows(work_ms: dict[int, float], steps: int = 6, *, xfer_ms: float = 1.0,
                    first_step: int = 0, t0_ms: float = 0.0) -> pl.DataFrame:
    """Two stages, one micro-batch, data parallel 2, measured as it would run: stage 0
    (ranks 0, 1) works 5 ms, isends its activation to stage 1 (ranks 2, 3), which works
    ``work_ms[r]`` on it and isends the gradient back; each stage then all-reduces with its
    replica. The pipeline's transfers take ``xfer_ms``, the rest 1 ms; a step starts when the
    all-reduces end (the first at ``t0_ms``)."""
    rows, t = [], t0_ms
    for step in range(first_step, first_step + steps):
        idx = 3 * step
        grad_at = {}
        for r in (2, 3):
            act = t + 5 + xfer_ms
            sent = act + work_ms[r]
            grad_at[r - 2] = sent + xfer_ms
            rows += [_row(r, step, idx, "recv", t, act, peer=r - 2),
                     _row(r, step, idx + 1, "send", sent, sent + 1, peer=r - 2, blocking=False)]
        arrive = {r: grad_at[r] + 1 for r in (0, 1)} | {r: grad_at[r - 2] + 1 for r in (2, 3)}
        end = {0: max(arrive[0], arrive[1]) + 1, 2: max(arrive[2], arrive[3]) + 1}
        for r in (0, 1):
            rows += [_row(r, step, idx, "send", t + 5, t + 6, peer=r + 2, blocking=False),
                     _row(r, step, idx + 1, "recv", t + 6, grad_at[r], peer=r + 2)]
        for r in range(4):
            rows.append(_row(r, step, idx + 2, "all_reduce", arrive[r], end[0 if r < 2 else 2],
                             pg="dp0" if r < 2 else "dp1", seq=step))
        t = end[0]
    return pl.DataFrame(rows)


def test_the_replay_runs_the_dependencies_and_credits_only_the_critical_path():
    from ringwatch.analyzers._replay import replay_fixed_step_ms

    # rank 2 works 30 ms per step, its replica rank 3 10 ms: every step waits for rank 2
    ev = _two_stage_rows({2: 30, 3: 10})
    measured = 5 + 1 + 30 + 1 + 1 + 1  # stage 0's work, the chain through rank 2, all-reduce
    fixed = replay_fixed_step_ms(ev, 2, [3], 0)
    # fixed, rank 2's work (31 ms a step) is scaled to rank 3's (11): the 30 ms of it on the
    # chain shrink alike, and no more (the rest is stage 0's work and the transfers; the
    # 1 ms after its send overlaps the all-reduce's wait for stage 0)
    assert fixed == pytest.approx(measured - 30 * (1 - 11 / 31), abs=0.05)
    assert replay_fixed_step_ms(ev, 3, [2], 0) == pytest.approx(measured)  # never the slower


def test_the_fixed_replay_runs_with_the_transfers_from_before_the_onset():
    from ringwatch.analyzers._replay import replay_fixed_step_ms

    # rank 2 goes from 10 to 30 ms of work at step 10; while the job waits for it, the
    # pipeline's transfers read 1 ms instead of the 4 ms they took before (on a host whose
    # transfers are CPU work, the waiting ranks leave them the cores)
    before = _two_stage_rows({2: 10, 3: 10}, 10, xfer_ms=4)
    t0_ms = before["mono_end_ns"].max() / 1e6
    ev = pl.concat([before, _two_stage_rows({2: 30, 3: 10}, 10, xfer_ms=1, first_step=10,
                                            t0_ms=t0_ms)])
    # fixed, the job is as it was before the onset (5 + 4 + 10 + 4 + 1 + 1 ms) with rank 2's
    # work scaled to rank 3's (31 ms to 11: the 30 on the chain read 10.6): its own
    # transfers, not the fault's
    fixed = 5 + 4 + 30 * 11 / 31 + 4 + 1 + 1
    assert replay_fixed_step_ms(ev, 2, [3], 10) == pytest.approx(fixed, abs=0.05)
    # with no step before the fault, its transfers are the fault's own
    assert replay_fixed_step_ms(ev.filter(pl.col("step") >= 10), 2, [3], 10) \
        == pytest.approx(fixed - 2 * 3, abs=0.05)


def test_the_replay_waits_for_the_asynchronous_ops_where_the_rank_did():
    from ringwatch.analyzers._replay import _ops, _step_ends, _step_rows

    rows = _step_rows(_two_stage_rows({2: 30, 3: 10}), [1, 2])
    ops = _ops(rows.filter(pl.col("step") == 2), _step_ends(rows)[1])
    # rank 3's isend completed 1 ms after issue; it then waited in the all-reduce, not in
    # the send: a wait for the send, then 1 ms of work, then the all-reduce
    kinds = [op.key[0] for op in ops[3]]
    assert kinds == ["r", "s", "w", "c"]
    assert [round(op.work_ns / 1e6) for op in ops[3]] == [0, 10, 0, 1]
    # stage 0's first op starts 5 ms after the previous step's all-reduce: its work
    assert round(ops[0][0].work_ns / 1e6) == 5


def test_a_straggler_that_ends_is_named_with_its_end():
    """Rank 5 (stage 1) did 2x the work in steps 21-40 of 80, then as before (a real run:
    ``--slowdown-steps 20``). The post-mortem names it with its end; before episodes, the
    median of its extra work from the onset to the end of the data was ~0 and it was lost."""
    (f,) = _findings(_run("strag-ends"))
    assert (f.kind, f.cls, f.ranks) == ("straggler", "compute straggler", (5,))
    assert 20 <= f.since_step <= 22 and f.detected_step <= 26
    assert 39 <= f.until_step <= 41  # its last slowed step: 40
    assert "to step" in f.evidence[0]
    assert any(f"in steps {f.since_step}-" in e for e in f.evidence)  # the what-if's span


@pytest.mark.parametrize("name,push", [(n, 5) for n in ("healthy", "laststage", "varyseq",
                                                         "strag-mid", "strag-0", "strag-ends",
                                                         "loaded-burst", "pp4-loaded",
                                                         "pp4-strag", "pp4-varyseq",
                                                         "vpp-strag", "vpp-laststage",
                                                         "vb-vary", "vb-strag0",
                                                         "vb222-strag", "b-strag")]
                         + [("strag-mid", 1), ("strag-ends", 1), ("pp4-strag", 1),
                            ("vb222-strag", 1)])
def test_the_online_window_gives_the_post_mortem_verdicts_through_a_restart(name, push):
    """Streamed ``push`` steps at a time into the service's window (the rows, each rank's step
    and blocked time, some ranks' steps later than others', the layout), with the window's
    state saved and restored into a new one late in the run, as a restarted service does: the
    same (kind, class, ranks, since) as the whole log gives. (A window reopened a step at a
    time needs a dozen steps before it can judge a pipeline's work again: the episodes it
    carries must outlast that.)"""
    import json

    from ringwatch.analyzers._online import OnlineWindow
    from ringwatch.analyzers._policy import split_undecided

    ev = _run(name)
    want = sorted((f.kind, f.cls, f.ranks, f.since_step) for f in _findings(ev)
                  if f.kind in ("straggler", "imbalance"))
    work = compute_step_work(ev)
    lay = infer_layout(ev)
    w = OnlineWindow(keep_steps=40)  # shorter than the run: onsets must outlive the window
    shown = set()
    steps = int(ev["step"].max()) + 1
    for lo in range(0, steps, push):
        if lo == steps - 15:
            state = json.loads(json.dumps(w.state()))
            w = OnlineWindow(keep_steps=40)
            w.restore(state)
        w.layout = lay
        w.add(ev.filter(pl.col("step").is_between(lo, lo + push - 1)))
        # ranks report their steps as they finish them: the last stage 3 steps behind the
        # first, and within each stage, some ranks 1-2 steps behind their peers
        lag = pl.when(pl.col("rank") >= 4).then(3).otherwise(0) + pl.col("rank") % 3
        w.add_work(work.filter((pl.col("step") + lag).is_between(lo, lo + push - 1)))
        got, _ = split_undecided(split_hiccups(tuple(
            f for f in w.findings(now_ns=int(ev["t_end_ns"].max()))
            if f.kind in ("straggler", "imbalance")))[0], newest_step=lo + push - 1)
        shown |= {(f.kind, f.cls, f.ranks, f.since_step) for f in got}
    assert sorted(shown) == want  # every round shows what the whole log gives, no more


def test_live_only_the_steps_every_rank_reported_are_judged():
    """A healthy 16-rank dp x tp x pp = 4 x 2 x 2 job's step and blocked times as the live
    service held them at step 24 (``tests/data/live/pipeline-w16-work.parquet``): steps 23
    and 24 reported by 12 and 4 of the 16 ranks. Judged with those, the half-reported steps
    read as replicas that differ (workload imbalance in both stages); up to the newest step
    every rank reported, nothing, as post-mortem."""
    from ringwatch.analyzers._work import detect_work_findings, reported_steps

    work = pl.read_parquet(DATA.parent / "live" / "pipeline-w16-work.parquet")
    roles = parse_layout("tp=2,pp=2,dp=4", 16).peers_frame()

    def found(w):  # hiccups apart, as both the service and `ringwatch analyze` set them
        return split_hiccups(detect_work_findings(None, roles, work=w))[0]

    assert {f.cls for f in found(work)} == {"workload imbalance"}
    assert reported_steps(work)["step"].max() == 22
    assert found(reported_steps(work)) == ()


def _episodes(xs, **kw):
    from ringwatch.analyzers._work import work_episodes

    args = {"k": 1.0, "h": 6.0, "persist": 3, "grace": 8} | kw
    return [(e.since, e.detected, e.until, e.paused) for e in work_episodes(xs, **args)]


def test_an_episode_ends_at_its_last_step_behind():
    xs = [0.0] * 20 + [4.0] * 10 + [0.0] * 30
    # conclusive at its sixth step behind: each step counts for at most h / (2 persist)
    assert _episodes(xs) == [(20, 25, 29, None)]


def test_an_episode_to_the_end_of_the_data_is_still_on():
    assert _episodes([0.0] * 20 + [4.0] * 10) == [(20, 25, None, None)]
    # on time since, but fewer steps than the grace: an end cannot be told from a pause
    assert _episodes([0.0] * 20 + [4.0] * 10 + [0.0] * 7) == [(20, 25, None, None)]
    assert _episodes([0.0] * 20 + [4.0] * 10 + [0.0] * 8) == [(20, 25, 29, None)]


def test_a_burst_of_a_few_steps_far_behind_is_no_episode():
    """A rank descheduled on a shared host: three steps five noise units behind, a few more
    a little behind, then as before. Summed whole it was conclusive at its fourth step; each
    step capped at h / (2 persist) over the slack, it is a few steps behind, no episode."""
    burst = [0.0] * 20 + [5.0, 4.0, 0.0, 5.0, 0.5, 2.0, 2.5, 0.0] + [0.0] * 30
    assert _episodes(burst) == []
    from ringwatch.analyzers._work import step_cap
    assert step_cap(1.0, 6.0, 3) == 2.0
    # the same steps held: a straggler
    assert _episodes([0.0] * 20 + [5.0, 4.0, 3.0, 5.0, 2.5, 2.0, 2.5, 3.0] + [0.0] * 30) == [
        (20, 25, 27, None)]
    # two steps over the threshold, on time, a third over it: no three in a row, no episode
    assert _episodes([0.0] * 20 + [9.0, 9.0, 0.0, 9.0] + [0.0] * 30) == []


def test_three_steps_in_a_row_over_the_threshold_are_conclusive_at_the_third():
    # each alone would be conclusive summed whole: the cap does not hold a far-behind rank
    # back to its sixth step
    assert _episodes([0.0] * 20 + [6.0] * 10 + [0.0] * 30) == [(20, 22, 29, None)]
    # just under the threshold: by the capped sum, at the sixth
    assert _episodes([0.0] * 20 + [5.9] * 10 + [0.0] * 30) == [(20, 25, 29, None)]


def test_a_pause_within_the_grace_is_one_episode_and_a_longer_one_two():
    pause = [0.0] * 20 + [4.0] * 10 + [0.0] * 5 + [4.0] * 10 + [0.0] * 30
    assert _episodes(pause) == [(20, 25, 44, (29, 35))]
    apart = [0.0] * 20 + [4.0] * 10 + [0.0] * 20 + [4.0] * 10 + [0.0] * 30
    assert _episodes(apart) == [(20, 25, 29, None), (50, 55, 59, None)]


def test_noise_below_the_slack_makes_no_episode_and_a_late_start_is_its_own():
    assert _episodes([0.9, -0.5] * 50) == []
    # behind from the first steps (conclusive at index 2), then on time, then again
    xs = [4.0] * 10 + [0.0] * 20 + [4.0] * 10
    assert _episodes(xs, from_start=2) == [(0, 2, 9, None), (30, 35, None, None)]
    assert len(_episodes([4.0, 4.0, 0.0, 0.0, 0.0] * 200, h=1.0, persist=1, grace=0,
                         most=5)) == 5  # at most ``most``



def test_a_burst_before_the_fault_does_not_pull_its_onset_back():
    """A rank descheduled for one step (far more than its fault's size behind), on time,
    a little behind, on time, then its fault from index 24: the onset is the fault's. Summed
    by size, the burst outweighed the on-time steps after it and the onset went back to it
    (a pipeline run on a loaded machine: onset 9 for a fault at 13)."""
    xs = [0.0] * 20 + [60.0, 0.5, 1.5, 0.5] + [8.0] * 12 + [0.0] * 30
    assert _episodes(xs) == [(24, 26, 35, None)]
    from ringwatch.analyzers._stragglers import late_since_index
    assert late_since_index([60.0, 0.5, 1.5, 0.5, 8.0, 8.0, 8.0], 1.0) == 4
    # late right before the fault (no on-time step between): its partial first step, kept
    assert late_since_index([0.0, 0.5, 3.0, 8.0, 8.0, 8.0], 1.0) == 2
    # a fault of the noise's size, an on-time step within it: the whole streak
    assert late_since_index([0.0, 1.6, 1.8, 0.5, 1.7, 1.9, 1.5], 1.0) == 1
