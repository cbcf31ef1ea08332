"""A straggler that outlasts the online window stays one finding, with the post-mortem's onset:
as the window slides past it, whatever a push carries, and across a restart of the service.

The rows are a real run (``tests/data/long/``): 4 Gloo ranks on 2 emulated hosts, 400 steps,
rank 2 doing twice the work from step 40 to the end.
"""

from __future__ import annotations

import json

import polars as pl
import pytest

from ringwatch.analyzers._online import GRACE_STEPS, OnlineWindow
from ringwatch.analyzers._policy import split_hiccups, split_undecided
from ringwatch.service._service import Service, ServiceConfig
from ringwatch.service._windows import WindowStates

from longruns import analyzed
from pushes import WALL
from pushes import agent_push as _push


def _key(f):
    return (f.kind, f.cls, f.ranks, f.since_step, f.detected_step, f.until_step)


@pytest.fixture(scope="module")
def run():
    return analyzed("straggler-work-400.parquet")


def _rounds(ev, now, chunk: int, *, restart_at: int | None = None, restore: bool = True):
    """Each round's straggler findings of a window fed ``chunk`` steps at a time, as the
    service shows them (hiccups apart, young ones held back); at ``restart_at`` the window is
    replaced by a new one, given the old one's state through JSON when ``restore``."""
    w, out = OnlineWindow(), []
    for lo in range(0, ev["step"].max() + 1, chunk):
        if restart_at is not None and lo == restart_at:
            saved = json.loads(json.dumps(w.state()))
            w = OnlineWindow()
            if restore:
                w.restore(saved)
        w.add(ev.filter(pl.col("step").is_between(lo, lo + chunk - 1)))
        got = tuple(f for f in w.findings(now_ns=now) if f.kind in ("straggler", "imbalance"))
        got, _ = split_undecided(split_hiccups(got)[0], newest_step=lo + chunk - 1)
        out.append((lo + chunk - 1, tuple(_key(f) for f in got)))
    return out


def test_the_post_mortem_names_the_straggler_from_its_onset(run):
    _, _, found = run
    (f,) = found
    assert (f.kind, f.cls, f.ranks, f.until_step) == ("straggler", "compute straggler", (2,),
                                                       None)
    assert 40 <= f.since_step <= 43


@pytest.mark.parametrize("chunk", [1, 7, 60])
def test_it_stays_open_to_the_end_with_the_same_onset_whatever_a_push_carries(run, chunk):
    ev, now, (whole,) = run
    rounds = _rounds(ev, now, chunk)
    shown = [i for i, (_, fs) in enumerate(rounds) if fs]
    assert shown, "never shown"
    # from its first showing to the last step (400, far past the 64-step window), every round
    # shows it, as the post-mortem does
    assert all(fs == (_key(whole),) for _, fs in rounds[shown[0]:])
    assert rounds[shown[0]][0] <= whole.detected_step + 8 + chunk


@pytest.mark.parametrize("chunk,restart_at", [(1, 200), (60, 180), (7, 203)])
def test_a_window_restored_mid_fault_keeps_the_straggler(run, chunk, restart_at):
    ev, now, (whole,) = run
    rounds = _rounds(ev, now, chunk, restart_at=restart_at)
    after = [fs for last, fs in rounds if last >= restart_at]
    # a just-reopened window may be too young to score for a step or two, never longer than
    # the grace an episode is remembered for; then the same finding, never "imbalance"
    young = next(i for i, fs in enumerate(after) if fs)
    assert young * chunk < GRACE_STEPS
    assert all(fs == (_key(whole),) for fs in after[young:])


def test_without_its_state_a_window_reopened_mid_fault_loses_the_onset(run):
    # what the saved state is for: re-baselined on the fault, the window cannot tell the
    # straggler's onset any more (it reports nothing, or a later onset)
    ev, now, (whole,) = run
    rounds = _rounds(ev, now, 1, restart_at=200, restore=False)
    assert all(fs != (_key(whole),) for last, fs in rounds if last >= 200)


GOOD = {"version": 1, "first_step": 0, "baseline_until": 21, "noise_ms": 2.0,
        "usual_delay": [{"rank": 0, "usual_ms": 0.5, "usual_compute_ratio": 1.0}],
        "usual_bw": None, "imbalance": [], "episodes": [[2, 41, 43, 100]]}


@pytest.mark.parametrize("change", [{"version": 2}, {"first_step": "x"}, {"noise_ms": -1},
                                    {"imbalance": [[1]]}, {"episodes": [[1]]},
                                    {"usual_delay": [{"rank": "a"}]}, {"episodes": None},
                                    {"usual_bw": [{"pg": "1", "usual_MBps": -3.0}]},
                                    {"usual_bw": [{"pg": "1", "usual_MBps": 9.0,
                                                   "spread_log": float("nan")}]}])
def test_restore_refuses_what_is_not_a_window_state(change):
    w = OnlineWindow()
    w.restore(GOOD)
    assert w.baseline_until == 21 and w.episodes == {2: (41, 43, None)}
    w = OnlineWindow()
    with pytest.raises(ValueError):
        w.restore({**GOOD, **change})
    assert w.baseline_until is None and w.episodes == {}  # nothing taken


def test_a_state_from_before_the_bandwidth_spread_is_taken_with_none():
    w = OnlineWindow()
    w.restore({**GOOD, "usual_bw": [{"pg": "1", "usual_MBps": 9.0}]})
    assert w.usual_bw.rows() == [("1", 9.0, None)]  # judged on the ratio alone
    w.restore({**GOOD, "usual_bw": [{"pg": "1", "usual_MBps": 9.0, "spread_log": 0.4}]})
    assert w.state()["usual_bw"] == [{"pg": "1", "usual_MBps": 9.0, "spread_log": 0.4}]


def test_a_corrupt_saved_state_is_set_aside_and_counted(tmp_path):
    states = WindowStates(tmp_path)
    w = OnlineWindow()
    states.save("job-a", w)
    (path,) = (tmp_path / "windows").glob("*.json")
    path.write_text("{not json")
    assert not states.load("job-a", OnlineWindow())
    assert states.errors == 1 and list((tmp_path / "windows").glob("*.corrupt-*"))
    assert not states.load("job-a", OnlineWindow())  # gone: a fresh window, no new error
    assert states.errors == 1


def test_a_service_killed_mid_fault_keeps_the_straggler_not_imbalance(tmp_path):
    """Two services on one state folder, the first never closed (as after kill -9): the job's
    rank 3 is late from step 30 to the end (step 299)."""
    def feed(svc, steps, per_push):
        seen = []
        for lo in range(steps.start, steps.stop, per_push):
            svc.jobs.ingest(_push("long", late_rank=3, late_from=30,
                                  steps=range(lo, min(steps.stop, lo + per_push))), WALL)
            svc.analyze_once()
            seen.append([(t.id, t.finding.kind, t.finding.ranks, t.finding.since_step)
                         for t in svc.store.current("long", state="open")])
        return seen

    first = Service(ServiceConfig(state_dir=tmp_path))
    before = feed(first, range(0, 150), 1)
    opened = before[-1]
    assert [(k, r) for _, k, r, _ in opened] == [("straggler", (3,))]
    first.store.flush()  # its open findings on disk, as its periodic flush does
    second = Service(ServiceConfig(state_dir=tmp_path))  # the first is never closed
    after = feed(second, range(150, 300), 60)
    assert all(seen == opened for seen in after)  # same id, same onset, no imbalance
    assert second.windows.errors == 0


def test_an_onset_is_refined_while_the_window_holds_the_jobs_first_steps(run):
    # A straggler from the start, first shown on a few steps where its first step behind was
    # weak, has its onset one step late; the window still holding the job's first steps reads
    # it as the whole log does once they come. A window slid past them keeps the onset it had.
    from dataclasses import replace

    from ringwatch.analyzers._findings import Finding

    ev, _, _ = run
    f = Finding(kind="straggler", cls="compute straggler", ranks=(2,), since_step=2,
                detected_step=5)
    w = OnlineWindow()
    w.add(ev.filter(pl.col("step") <= 30))
    w.episodes = {2: (3, 5, 30)}
    (g,) = w._episodes((f,))
    assert g.since_step == 2 and w.episodes[2][0] == 2
    w.rows = w.rows.filter(pl.col("step") >= 10)  # the first steps left the window
    w.episodes = {2: (3, 5, 30)}
    (g,) = w._episodes((replace(f, since_step=11),))
    assert g.since_step == 3 and w.episodes[2][0] == 3


def test_a_pipelines_step_times_are_kept_with_the_state_and_bad_ones_refused():
    from ringwatch.analyzers import _online_frames

    w = OnlineWindow(keep_steps=40)
    ranks, steps = 3000, 40  # more than a state keeps: the newest steps that fit
    w.work = pl.DataFrame({
        "rank": pl.Series([r for r in range(ranks) for _ in range(steps)], dtype=pl.Int32),
        "step": [s for _ in range(ranks) for s in range(steps)],
        "step_ms": [100.0] * (ranks * steps), "blocked_ms": [40.0] * (ranks * steps),
        "work_ms": [60.0] * (ranks * steps)})
    state = json.loads(json.dumps(w.state()))
    back = OnlineWindow(keep_steps=40)
    back.restore(state)
    kept = _online_frames.STATE_ROWS // ranks
    assert back.work.height == ranks * kept and back.work["step"].min() == steps - kept
    assert back.work.schema == w.work.schema
    for bad in ({"rank": [0], "step": [1]},  # columns missing
                {**state["work"], "step_ms": state["work"]["step_ms"][:-1]},  # ragged
                {**state["work"], "rank": [-1] * len(state["work"]["rank"])},
                {**state["work"], "work_ms": ["x"] * len(state["work"]["work_ms"])}):
        with pytest.raises(ValueError):
            OnlineWindow().restore({**state, "work": bad})


def test_the_receive_table_is_kept_with_the_state_and_bad_ones_refused():
    """A window's send/recv, a sender whose host the service never heard of included (its
    receives are no link, but the state is good), and whether its usual was taken."""
    from ringwatch.analyzers._p2p_links import RECV_SCHEMA

    w = OnlineWindow(keep_steps=40)
    w.recv = pl.DataFrame(
        {"rank": [4, 4, 5], "host": ["h1", "h1", "h1"], "peer": [0, 0, 9],
         "peer_host": ["h0", "h0", None], "step": [7, 8, 8], "receives": [4, 4, 2],
         "nbytes": [1 << 20] * 3, "duration_ns": [2_000_000, 2_500_000, 1_000_000]},
        schema=RECV_SCHEMA)
    w.p2p_frozen = True
    state = json.loads(json.dumps(w.state()))
    back = OnlineWindow(keep_steps=40)
    back.restore(state)
    assert back.recv.equals(w.recv) and back.p2p_frozen
    for bad in ({**state, "recv": {**state["recv"], "nbytes": [-1, 1, 1]}},
                {**state, "recv": {**state["recv"], "peer": [0, None, 9]}},
                {**state, "p2p_frozen": "no"}):
        with pytest.raises(ValueError):
            OnlineWindow().restore(bad)
    older = {k: v for k, v in state.items() if k not in ("recv", "p2p_frozen")}
    old = OnlineWindow(keep_steps=40)
    old.restore({**older, "baseline_until": 30})  # a state from before: no send/recv usual
    assert old.recv is None and old.p2p_frozen
