"""Throttling as a straggler's cause, and the synthetic readings that follow ranks' phases."""

from __future__ import annotations

import random

import polars as pl
import pytest

from ringwatch.analyzers._power import compute_energy_intervals, recording_frames
from ringwatch.analyzers._power_phase import (
    compute_step_energy,
    fit_phase_power,
    summarize_phase_power,
)
from ringwatch.analyzers._power_throttle import attribute_throttling
from ringwatch.analyzers._stragglers import STRAGGLER_CLASSES, THROTTLED_CLASS, detect_stragglers
from ringwatch.collectors._synthetic_power import PhasePowerModel, phase_recordings

from fakes import frame, row

MS = 1_000_000


def job(steps=50, *, onset=25, late=1, late_ms=40.0, ranks=4, seed=0):
    """Two hosts of two ranks; per step 150 ms of compute then one all-reduce that every
    member leaves 60 ms after the last arrives; from ``onset`` rank ``late`` computes
    ``late_ms`` longer (its peers wait for it)."""
    rng = random.Random(seed)
    rows, t = [], 0
    for step in range(steps):
        starts = {r: t + int((150 + rng.uniform(0, 2)) * MS) for r in range(ranks)}
        if late is not None and step >= onset:
            starts[late] += int(late_ms * MS)
        end = max(starts.values()) + 60 * MS
        for r in range(ranks):
            x = row(r, step, step + 1, pg_ranks=f"0-{ranks - 1}", step=step,
                    mono_start_ns=starts[r], mono_end_ns=end)
            x["host"], x["local_rank"] = f"host{r // 2}", r % 2
            rows.append(x)
        t = end
    return frame(rows)


def frames(recs):
    fr = [recording_frames(r) for r in recs]
    return (pl.concat([f for f, _ in fr]),
            pl.concat([s for _, s in fr], how="diagonal_relaxed"))


def test_a_straggler_whose_gpu_was_held_down_is_a_throttled_straggler():
    ev = job()
    onset_ns = ev.filter(pl.col("step") == 25)["t_start_ns"].min()
    fast, slow = frames(phase_recordings(ev, PhasePowerModel(throttle={1: (onset_ns, 2**62)})))
    found = detect_stragglers(ev)
    assert [(f.cls, f.ranks) for f in found] == [("compute straggler", (1,))]
    (f,) = attribute_throttling(found, ev, fast, slow)
    assert f.cls == THROTTLED_CLASS and THROTTLED_CLASS in STRAGGLER_CLASSES
    assert any("held down for power" in e for e in f.evidence), f.evidence
    assert any("SM clock fell to 1350 MHz from 1980 MHz" in e for e in f.evidence)
    assert f.evidence[: len(found[0].evidence)] == found[0].evidence  # kept, then extended


def test_a_straggler_on_a_healthy_gpu_keeps_its_class():
    ev = job()
    fast, slow = frames(phase_recordings(ev))
    found = detect_stragglers(ev)
    assert attribute_throttling(found, ev, fast, slow) == found


def test_a_gpu_throttled_with_all_its_peers_is_no_cause_of_one_straggler():
    ev = job()
    onset_ns = ev.filter(pl.col("step") == 25)["t_start_ns"].min()
    everyone = {r: (onset_ns, 2**62) for r in range(4)}
    fast, slow = frames(phase_recordings(ev, PhasePowerModel(throttle=everyone)))
    found = detect_stragglers(ev)
    assert [f.cls for f in attribute_throttling(found, ev, fast, slow)] == ["compute straggler"]


def test_synthetic_readings_follow_the_ranks_phases_and_say_so():
    ev = job(late=None)
    recs = phase_recordings(ev)
    assert [r.host for r in recs] == ["host0", "host1"]
    assert all(r.origin == "synthetic" for r in recs)
    fast, _ = frames(recs)
    se = compute_step_energy(compute_energy_intervals(fast), ev)
    # every (rank, step) in collectives exactly as long as its rows say
    comm = (ev.group_by("rank", "step").agg(((pl.col("t_end_ns") - pl.col("t_start_ns"))
                                             .sum() / 1e9).alias("rows_s")))
    j = se.join(comm, on=["rank", "step"])
    assert j.height == se.height > 150
    assert (j["comm_s"] - j["rows_s"]).abs().max() < 1e-6
    # the levels: the fit comes closer than the plain split; the 60 ms phase is pulled
    # towards the mean by the counter's timing (known to 25 ms), the 150 ms one within 8%
    fit = fit_phase_power(compute_energy_intervals(fast), ev).sort("rank")
    split = summarize_phase_power(se)["rank"].sort("rank")
    model = PhasePowerModel()
    for f, s in zip(fit.iter_rows(named=True), split.iter_rows(named=True), strict=True):
        assert f["compute_fit_w"] == pytest.approx(model.compute_w, rel=0.08)
        assert abs(f["compute_fit_w"] - model.compute_w) < abs(s["compute_power_w"]
                                                              - model.compute_w)
        assert abs(f["comm_fit_w"] - model.comm_w) < abs(s["comm_power_w"] - model.comm_w)
        assert f["comm_fit_w"] < 0.5 * f["compute_fit_w"]


def test_a_synthetic_recording_file_replays_as_synthetic(tmp_path):
    from ringwatch.collectors._recording import ReplayClient, load_recording
    from ringwatch.collectors._synthetic_power import write_phase_recordings

    paths = write_phase_recordings(job(steps=10, late=None), tmp_path)
    assert [p.name for p in paths] == ["host0.synthetic.jsonl.gz", "host1.synthetic.jsonl.gz"]
    rec = load_recording(paths[0])
    assert rec.origin == "synthetic" and ReplayClient(rec).source == "replay:synthetic"
    assert len(rec.fast[0][0]) == len(phase_recordings(job(steps=10, late=None))[0].fast[0][0])


def test_the_cap_model_premise_against_the_violation_counter():
    from ringwatch.analyzers._power_whatif import check_cap_model

    ev = job()
    onset_ns = ev.filter(pl.col("step") == 25)["t_start_ns"].min()
    fast, slow = frames(phase_recordings(ev, PhasePowerModel(throttle={1: (onset_ns, 2**62)})))
    se = compute_step_energy(compute_energy_intervals(fast), ev)
    check = {(r["host"], r["gpu"]): r for r in check_cap_model(se, slow, fast).iter_rows(
        named=True)}
    held = check[("host0", 1)]  # rank 1's GPU, its limit lowered to 420 W from step 25
    assert held["observed_share"] > 0.3
    assert held["predicted_share"] == pytest.approx(held["observed_share"], abs=0.06)
    for key in (("host0", 0), ("host1", 0), ("host1", 1)):
        assert check[key]["predicted_share"] == 0 and check[key]["observed_share"] == 0
