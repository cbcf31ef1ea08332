"""The power analyzers and ``ringwatch power`` on the real H200 recording and its job's logs
(``tests/data/h200``: one GPU, 20 Hz, a DDP job on NCCL)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import ringwatch
from ringwatch._cli import main
from ringwatch.analyzers._power import compute_energy_intervals, recording_frames
from ringwatch.analyzers._power_phase import compute_step_energy, split_rank_energy
from ringwatch.analyzers._power_report import analyze_power
from ringwatch.collectors._recording import load_recording

DATA = Path(__file__).parents[1] / "data" / "h200"
REC = DATA / "nvml-ddp-nccl.jsonl.gz"
LOGS = DATA / "logs" / "train-nccl-idle"


@pytest.fixture(scope="module")
def h200():
    fast, slow = recording_frames(load_recording(REC))
    return fast, slow, ringwatch.read_events(LOGS)


def test_the_real_counter_moves_every_100_ms_so_nothing_above_5_hz(h200):
    fast, slow, events = h200
    r = analyze_power(fast, slow, events)
    (s,) = r.sampling
    assert s.sample_hz == pytest.approx(20.0, rel=0.01)
    assert s.energy_update_s == pytest.approx(0.1, rel=0.01)
    assert s.repeated_share == pytest.approx(0.5, abs=0.02)
    assert s.source == "energy" and s.nyquist_hz == pytest.approx(5.0, rel=0.01)
    assert all(sw.nyquist_hz <= s.nyquist_hz * 1.001 for sw in r.swing)
    assert all(sw.band_hz is None or sw.band_hz[1] <= sw.nyquist_hz for sw in r.swing)


def test_headroom_of_the_real_gpu_is_its_limit_minus_its_quantiles(h200):
    fast, slow, events = h200
    r = analyze_power(fast, slow, events)
    gpu = r.headroom.filter(pl.col("scope") == "gpu").row(0, named=True)
    assert gpu["limit_w"] == 700.0  # the recording's enforced limit
    iv = compute_energy_intervals(fast)
    assert gpu["p99_w"] <= iv["power_w"].max() + 1e-6  # no cell above the highest interval
    assert gpu["headroom_p99_w"] == pytest.approx(700.0 - gpu["p99_w"])
    # the instantaneous field's own quantile: its 99th percentile, as numpy computes it
    inst = fast["power_instant_mw"].to_numpy() / 1e3
    assert gpu["instant_p99_w"] <= inst.max() and gpu["instant_p99_w"] > gpu["mean_w"]
    assert r.throttle["power_share"][0] == 0.0  # never power-capped in this run


def test_energy_per_step_adds_up_to_the_counter_over_the_job(h200):
    fast, _, events = h200
    iv = compute_energy_intervals(fast)
    se = compute_step_energy(iv, events)
    assert se.height == 150  # the job's 150 steps, each covered by the recording
    first, last = se["t_start_ns"].min(), se["t_end_ns"].max()
    cum = split_rank_energy(iv, np.array([], np.int64), np.array([], np.int64),
                            np.array([first, last]))
    assert se["energy_j"].sum() == pytest.approx(cum["energy_j"][1] - cum["energy_j"][0])
    # the steps tile the job: their lengths add up to its span
    assert se["step_s"].sum() == pytest.approx((last - first) / 1e9)
    # host-side NCCL intervals end when the watchdog notices (~65 ms late, README): the
    # rank's rows put most of each step in collectives
    assert 0.4 < se["comm_s"].sum() / se["step_s"].sum() < 0.8


def test_ringwatch_power_on_the_real_recording(capsys):
    assert main(["power", str(REC), str(LOGS)]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" not in out
    assert "energy counter moves every 100 ms (50% of samples repeat)" in out
    for scope in ("gpu ", "node ", "job "):
        assert any(line.strip().startswith(scope) and "headroom" in line
                   for line in out.splitlines()), scope
    assert "J per step" in out and "oversubscription" in out
    assert main(["power", str(REC), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["synthetic"] is False and d["sampling"][0]["source"] == "energy"
    assert {r["scope"] for r in d["headroom"]} == {"gpu", "node", "job"}


def test_ringwatch_power_wants_a_recording_or_synthetic(tmp_path, capsys):
    assert main(["power", str(LOGS)]) == 1
    assert "no NVML recording" in capsys.readouterr().err
    assert main(["power", str(LOGS), "--synthetic"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("[SYNTHETIC readings: generated, not measured]")
    labelled = [x for x in out.splitlines() if x.startswith(("headroom", "oversubscription",
                                                              "findings"))]
    assert len(labelled) == 3 and all("SYNTHETIC" in x for x in labelled)
