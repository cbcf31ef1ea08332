"""A straggler hidden for a few steps by a disturbance is one episode, not two: post-mortem,
live whatever a push carries, and in the service's findings (one id, one onset).

A fault that persists stays a finding: when another rank stalls, or a burst of noise lands,
the straggler may be on time for a few steps. Ended after ``persist + 1`` such steps, it
would come back as a new episode with a later onset, and the service would resolve the
finding and open another one.
"""

from __future__ import annotations

import polars as pl
import pytest
from test_unit_stragglers import job

from ringwatch.analyzers import Thresholds, detect_stragglers
from ringwatch.analyzers._online import OnlineWindow
from ringwatch.analyzers._policy import split_hiccups, split_undecided
from ringwatch.analyzers._stragglers import HICCUP_CLASS

GRACE = Thresholds().grace_steps


def _paused(steps=200, pause=range(100, 105), onset=30):
    return job(steps=steps, onset=onset, late=1, late_ms=15, on_time=set(pause))


def _key(f):
    return (f.kind, f.cls, f.ranks, f.since_step, f.detected_step, f.until_step)


def test_a_pause_shorter_than_the_grace_is_one_episode():
    (f,) = detect_stragglers(_paused())
    assert (f.cls, f.ranks, f.since_step, f.until_step) == ("compute straggler", (1,), 30,
                                                            None)
    assert f.detected_step == 32  # the first detection, not the one after the pause
    assert any("one episode" in e for e in f.evidence), f.evidence


def test_without_the_grace_the_pause_splits_it():
    # what the grace is for: one step of grace, and the same data reads as two episodes
    first, second = detect_stragglers(_paused(), grace_steps=1)
    # its last late step: 99, or 100 where the time it computed before step 100's first
    # collective still counts
    assert first.since_step == 30 and first.until_step in (99, 100)
    assert second.since_step == 105 and second.until_step is None


def test_a_pause_longer_than_the_grace_is_a_new_episode():
    first, second = detect_stragglers(_paused(pause=range(100, 100 + 2 * GRACE)))
    assert first.since_step == 30 and first.until_step in (99, 100)
    assert second.since_step == 100 + 2 * GRACE and second.until_step is None
    assert first.cls == second.cls == "compute straggler"


def test_an_end_is_told_from_a_pause_only_once_the_grace_has_passed():
    # late to step 189; the data goes on 6 steps (less than the grace): still on
    (f,) = detect_stragglers(job(steps=196, onset=30, late=1, late_ms=15,
                                 on_time=set(range(190, 196))))
    assert f.until_step is None
    # ... and 20 steps: it ended at its last late step
    (f,) = detect_stragglers(job(steps=210, onset=30, late=1, late_ms=15,
                                 on_time=set(range(190, 210))))
    assert f.until_step == 189


def test_a_hiccup_does_not_lend_its_onset_to_the_fault_after_it():
    # late 5 steps (a hiccup), on time 4, then late to the end: the fault's onset is its own
    ev = job(steps=120, onset=40, late=1, late_ms=15, on_time={45, 46, 47, 48})
    hiccup, fault = detect_stragglers(ev)
    assert (hiccup.cls, hiccup.since_step, hiccup.until_step) == (HICCUP_CLASS, 40, 44)
    assert (fault.cls, fault.since_step, fault.until_step) == ("compute straggler", 49, None)


def _shown(ev, chunk):
    """Each round's stragglers of a window fed ``chunk`` steps at a time, as the service
    shows them (hiccups apart, young ones held back)."""
    w, out = OnlineWindow(keep_steps=40), []
    for lo in range(0, ev["step"].max() + 1, chunk):
        w.add(ev.filter(pl.col("step").is_between(lo, lo + chunk - 1)))
        got = tuple(f for f in w.findings(now_ns=0) if f.kind == "straggler")
        got, _ = split_undecided(split_hiccups(got)[0], newest_step=lo + chunk - 1)
        out.append(tuple(_key(f) for f in got))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 60])
def test_live_the_pause_never_closes_the_finding(chunk):
    ev = _paused()
    (whole,) = detect_stragglers(ev)
    rounds = _shown(ev, chunk)
    first = next(i for i, fs in enumerate(rounds) if fs)
    # from its first showing to the end (far past the 40-step window and the pause), every
    # round shows the post-mortem's finding and nothing else
    assert all(fs == (_key(whole),) for fs in rounds[first:]), rounds[first:]


def test_the_service_keeps_one_id_across_the_pause(tmp_path):
    from ringwatch.service._service import Service, ServiceConfig

    from pushes import WALL
    from pushes import agent_push as _push

    svc = Service(ServiceConfig(state_dir=tmp_path))
    seen = set()
    for lo in range(0, 200, 3):
        steps = range(lo, min(200, lo + 3))
        svc.jobs.ingest(_push("p", late_rank=3, late_from=30, steps=steps,
                              on_time=range(100, 105)), WALL)
        svc.analyze_once()
        seen |= {(t.id, t.finding.since_step)
                 for t in svc.store.current("p", state="open")}
    assert len(seen) == 1, seen
    assert svc.store.current("p", state="resolved") == []
