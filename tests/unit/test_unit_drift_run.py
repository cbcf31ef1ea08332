"""A rank that drifts slowly is followed, not flagged; its later fault is found from its onset,
post-mortem and live alike, whatever a push carries and across a restart.

The rows are a real run (``tests/data/long/``): 4 Gloo ranks on 2 emulated hosts, 2,000 steps,
rank 1's host work growing by 4 µs a step (8 ms by the end, ~2x the job's noise), then twice
the work from step 1600 to the end.
"""

from __future__ import annotations

import json

import polars as pl
import pytest

from ringwatch.analyzers import Thresholds
from ringwatch.analyzers._online import OnlineWindow
from ringwatch.analyzers._policy import split_hiccups, split_undecided
from ringwatch.analyzers._stragglers import (
    compute_step_lateness,
    compute_straggler_scores,
    scaled_floors_ms,
)

from longruns import analyzed

RUN = "drift-then-straggler-2000.parquet"
ONSET = 1600


def _key(f):
    return (f.kind, f.cls, f.ranks, f.since_step, f.until_step)


@pytest.fixture(scope="module")
def run():
    return analyzed(RUN)


def test_the_drift_is_followed_and_the_fault_named_from_its_onset(run):
    _, _, found = run
    (f,) = found
    assert (f.kind, f.cls, f.ranks, f.until_step) == ("straggler", "compute straggler", (1,),
                                                       None)
    assert ONSET <= f.since_step <= ONSET + 3 and f.detected_step <= f.since_step + 3


def test_a_usual_kept_from_the_start_takes_the_drift_for_stragglers(run):
    # what following the drift is for: the same rows against the first steps' usual
    _, _, kept = analyzed(RUN, thresholds=Thresholds(drift_steps=0))
    early = [f for f in kept if f.ranks == (1,) and f.since_step < ONSET - 100]
    assert early, kept


def _post_mortem_usual(ev) -> pl.DataFrame:
    """Rank, step and the usual after it, as ``ringwatch analyze`` follows it."""
    th = Thresholds()
    args = th.straggler_args()
    floor, _ = scaled_floors_ms(ev, args["floor_ms"], args["min_delay_ms"],
                                floor_share=args["floor_share"],
                                delay_share=args["delay_share"])
    scores = compute_straggler_scores(
        compute_step_lateness(ev), warmup_steps=th.for_job(ev).warmup_steps, floor_ms=floor,
        drift_state=True)
    return scores.select("rank", "step", "usual_after_ms")


def _feed(ev, now, chunk: int, restart_at: int | None = None):
    """A window fed ``chunk`` steps at a time (replaced through its JSON state at
    ``restart_at``): its straggler findings from the onset on, as the service shows them."""
    w, shown = OnlineWindow(), []
    for lo in range(0, ev["step"].max() + 1, chunk):
        if lo == restart_at:
            saved = json.loads(json.dumps(w.state()))
            w = OnlineWindow()
            w.restore(saved)
        w.add(ev.filter(pl.col("step").is_between(lo, lo + chunk - 1)))
        if lo + chunk > ONSET - 200:
            got = tuple(f for f in w.findings(now_ns=now) if f.kind in ("straggler",
                                                                          "imbalance"))
            got, _ = split_undecided(split_hiccups(got)[0], newest_step=lo + chunk - 1)
            shown.append((lo + chunk - 1, tuple(_key(f) for f in got)))
    return w, shown


@pytest.mark.parametrize("chunk,restart_at", [(10, None), (60, None), (10, 1200)])
def test_live_follows_the_same_drift_and_keeps_the_fault_open(run, chunk, restart_at):
    ev, now, (whole,) = run
    w, shown = _feed(ev, now, chunk, restart_at)
    # nothing before the fault; from its first showing to the end, the post-mortem's finding
    assert all(not fs for last, fs in shown if last < ONSET)
    first = next(i for i, (_, fs) in enumerate(shown) if fs)
    assert shown[first][0] <= whole.detected_step + 8 + chunk
    assert all(fs == (_key(whole),) for _, fs in shown[first:])
    # the usual the window carries is the post-mortem's at the same step: exactly, or after
    # a restart (which loses the drift over the steps the old window held) close to it,
    # where it had drifted far from the baseline's
    pm = _post_mortem_usual(ev)
    now_ms = pm.filter(pl.col("step") == w.drift_step)
    live = w.usual_delay.select("rank", pl.col("usual_ms").alias("live"))
    both = now_ms.join(live, on="rank")
    assert both.height == 4
    gap = (both["usual_after_ms"] - both["live"]).abs()
    if restart_at is None:
        assert gap.max() < 1e-9
    else:
        start = pm.filter((pl.col("rank") == 1) & (pl.col("step") == 30))["usual_after_ms"]
        drifted = abs(float(both.filter(pl.col("rank") == 1)["usual_after_ms"][0] - start[0]))
        assert drifted > 4.0  # ms: the drift is real
        assert gap.max() < 0.05 * drifted


def test_the_service_saves_the_drift_as_it_goes(run, tmp_path):
    from ringwatch.service._windows import WindowStates

    ev, _, _ = run
    states, w = WindowStates(tmp_path), OnlineWindow()
    saved = []
    for lo in range(0, 600, 10):
        w.add(ev.filter(pl.col("step").is_between(lo, lo + 9)))
        states.save("job", w)
        (path,) = (tmp_path / "windows").glob("*.json")
        saved.append(json.loads(path.read_text())["state"]["drift_step"])
    # written when the drift has moved on by a window's length, not only at the freeze
    moved = [s for s in saved if s is not None]
    assert len(set(moved)) >= 600 // w.keep_steps - 2
    assert max(moved) >= 600 - 2 * w.keep_steps - 10
