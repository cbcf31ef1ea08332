"""Power on a real local-cluster run: 4 ranks of a real Gloo DDP job on 2 hosts (labels on
loopback), rank 1 doing 3x the work from step 20. The GPUs are synthetic (this machine has
none): their power follows the ranks' real compute and communication phases, and everything
that reads them says synthetic."""

from __future__ import annotations

import json

import polars as pl
import pytest

import ringwatch
from ringwatch._cli import main
from ringwatch.analyzers import compute_step_comm
from ringwatch.analyzers._policy import split_hiccups
from ringwatch.analyzers._power import compute_energy_intervals, recording_frames
from ringwatch.analyzers._power_phase import compute_step_energy
from ringwatch.analyzers._power_throttle import attribute_throttling
from ringwatch.analyzers._stragglers import detect_stragglers
from ringwatch.cluster import ClusterSpec, FaultSpec, run_cluster
from ringwatch.collectors._synthetic_power import (
    PhasePowerModel,
    phase_recordings,
    write_phase_recordings,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    spec = ClusterSpec(run_dir=tmp_path_factory.mktemp("power") / "run", nproc=4, hosts=2,
                       steps=60, netns="off", job_args=("--batch", "64", "--step-sleep-ms", "60"))
    result = run_cluster(spec, FaultSpec(kind="straggler", rank=1, at_step=20,
                                         straggler_mode="work", factor=3.0))
    assert result.ok, result
    return result


def test_the_phase_split_matches_the_collective_timeline(run):
    ev = ringwatch.read_events(run.log_dir, run.job_id)
    fast = pl.concat([recording_frames(r)[0] for r in phase_recordings(ev)])
    se = compute_step_energy(compute_energy_intervals(fast), ev)
    # each (rank, step)'s time in collectives is the one the analyzers read from the rows:
    # the split merges the wall-clock intervals (what the GPU samples are joined on), the
    # analyzers the monotonic ones; the two clocks agree to a microsecond plus what NTP may
    # slew the wall clock by over the interval (the kernel's limit: 500 ppm)
    sc = compute_step_comm(ev)
    j = se.join(sc, on=["rank", "step"])
    assert j.height == se.height >= 4 * 55
    off = (j["comm_s"] - j["comm_ns"] / 1e9).abs() - (1e-6 + 500e-6 * j["comm_ns"] / 1e9)
    assert off.max() < 0, j.filter(off >= 0)
    # the synthetic GPUs draw more while their ranks compute than while they communicate
    per = se.group_by("rank").agg(
        (pl.col("compute_energy_j").sum() / pl.col("compute_s").sum()).alias("compute"),
        (pl.col("comm_energy_j").sum() / pl.col("comm_s").sum()).alias("comm"))
    assert (per["compute"] > per["comm"]).all(), per


def test_a_throttled_gpu_makes_the_straggler_a_throttled_straggler(run):
    ev = ringwatch.read_events(run.log_dir, run.job_id)
    truth = json.loads((run.log_dir.parent / "ground_truth.json").read_text())
    model = PhasePowerModel(throttle={1: (truth["onset_wall_ns"], 2**62)})
    frames = [recording_frames(r) for r in phase_recordings(ev, model)]
    fast = pl.concat([f for f, _ in frames])
    slow = pl.concat([s for _, s in frames], how="diagonal_relaxed")
    found, _ = split_hiccups(detect_stragglers(ev))
    assert [f.ranks for f in found if f.kind == "straggler"] == [(1,)]
    (f,) = attribute_throttling(tuple(x for x in found if x.kind == "straggler"), ev, fast,
                                slow)
    assert f.cls == "throttled straggler", f.evidence
    assert any("held down for power" in e for e in f.evidence)


def test_ringwatch_power_on_the_run_prints_headroom_labelled_synthetic(run, capsys):
    assert main(["power", str(run.log_dir), "--synthetic"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("[SYNTHETIC readings: generated, not measured]")
    rows = [x.split() for x in out if x.startswith("  ") and "headroom" in x]
    scopes = {(r[0], r[1]) for r in rows}
    assert {("gpu", "host0/0"), ("gpu", "host0/1"), ("gpu", "host1/0"), ("gpu", "host1/1"),
            ("node", "host0"), ("node", "host1"), ("job", "job")} <= scopes
    assert any("STRAGGLER (compute straggler): rank 1" in x for x in out)
    # recordings beside the logs are read, and say they are synthetic
    write_phase_recordings(ringwatch.read_events(run.log_dir, run.job_id),
                           run.log_dir / "power")
    assert main(["power", str(run.log_dir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["synthetic"] is True and {s["origin"] for s in d["sources"]} == {"synthetic"}
    assert {r["scope"] for r in d["headroom"]} >= {"gpu", "node", "job", "gpu:compute"}


def test_analyze_with_the_gpu_recordings_names_the_throttled_straggler(run, tmp_path,
                                                                       capsys):
    """`ringwatch analyze --gpu-recording` reads the same recordings as `ringwatch power`:
    the straggler whose GPU is held down from the onset is a throttled straggler there too,
    said to be synthetic; without the recordings it is a compute straggler."""
    ev = ringwatch.read_events(run.log_dir, run.job_id)
    truth = json.loads((run.log_dir.parent / "ground_truth.json").read_text())
    model = PhasePowerModel(throttle={1: (truth["onset_wall_ns"], 2**62)})
    paths = write_phase_recordings(ev, tmp_path / "power", model)
    assert main(["analyze", str(run.log_dir), "--json"]) == 0
    plain = [f for f in json.loads(capsys.readouterr().out)["findings"]
             if f["kind"] == "straggler"]
    assert [(f["ranks"], f["cls"]) for f in plain] == [([1], "compute straggler")]
    assert main(["analyze", str(run.log_dir), "--json", "--gpu-recording",
                 *map(str, paths)]) == 0
    found = [f for f in json.loads(capsys.readouterr().out)["findings"]
             if f["kind"] == "straggler"]
    assert [(f["ranks"], f["cls"]) for f in found] == [([1], "throttled straggler")]
    assert any("held down for power" in e and "synthetic" in e for e in found[0]["evidence"])
