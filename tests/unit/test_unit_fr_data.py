"""Real Flight Recorder dumps (tests/data/fr, see its README): read and attributed as made."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from ringwatch._analyze import analyze_job
from ringwatch.inputs import open_sources

DATA = Path(__file__).resolve().parents[1] / "data" / "fr"
MANIFEST = json.loads((DATA / "scenarios.json").read_text())["scenarios"]


def as_dumped(name: str, tmp_path: Path) -> Path:
    """A copy of a scenario's dumps with their files' times as the job wrote them (git keeps no
    modification time, and a dump's time is its file's)."""
    dst = tmp_path / name
    shutil.copytree(DATA / name, dst)
    for f, ns in MANIFEST[name]["mtime_ns"].items():
        os.utime(dst / f, ns=(ns, ns))
    return dst


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_real_dumps_name_the_culprit_and_no_innocent_at_top_confidence(name, tmp_path):
    want = MANIFEST[name]
    opened = open_sources([as_dumped(name, tmp_path)])
    assert opened.unreadable == []
    (src,) = opened.sources
    assert src.kind == "flight recorder dumps" and src.problems == []
    assert sorted(src.ranks) == want["dumps"]
    report = analyze_job(src)
    fs = report["_findings"]
    if not want["culprits"]:  # dumped on demand mid-run: collectives in flight, no hang
        ev = src.events()
        assert ev.filter(pl.col("status") == "pending")["rank"].n_unique() == 4
        assert fs == (), [f.headline() for f in fs]
        return
    best = max(f.confidence for f in fs)
    top = {r for f in fs if f.confidence == best for r in f.ranks}
    assert best == 1.0 and top == set(want["culprits"]), [f.headline() for f in fs]
    assert fs[0].cls == want["cls"], fs[0]
    # the job's watchdog dumped 3 s into the stall: so the dumps say
    stalls = [float(m.group(1)) for f in fs for e in f.evidence
              if (m := re.search(r"for ([0-9.]+) s at their dumps", e))]
    assert all(2.9 <= s < 6 for s in stalls), stalls
    assert stalls or want["cls"] in ("rank not running", "mismatched collective")


def test_both_formats_of_one_scenario_read_alike():
    for name in ("block", "kill"):
        a = open_sources([DATA / f"{name}-pickle"]).sources[0].events()
        b = open_sources([DATA / f"{name}-json"]).sources[0].events()
        for ev in (a, b):
            assert set(ev["backend"]) == {"gloo"} and ev["t_issue_ns"].null_count() == 0
            assert ev["t_end_ns"].null_count() == ev.height  # Gloo: no completion times
        # separate runs: the same shape of record, not the same times
        shape = ["rank", "pg", "seq", "op", "status", "dtype", "nbytes"]
        assert a.select(shape).equals(b.select(shape)) or name == "kill", name


def test_real_gloo_dumps_as_pytorch_lays_them_out():
    from ringwatch._flight_recorder import load_dump

    d = load_dump(DATA / "block-pickle" / "nccl_trace_rank_0")
    j = load_dump(DATA / "block-json" / "nccl_trace_rank_0")
    assert d["version"] == j["version"] == "2.10"
    # Gloo's recorder: one pg_config entry named "" (here: the world's ranks)
    assert d["pg_config"] == j["pg_config"] == {"": {"desc": "", "name": "",
                                                     "ranks": "[0, 1, 2, 3]"}}
    assert isinstance(d["entries"][0]["process_group"], tuple)
    assert isinstance(j["entries"][0]["process_group"], list)
    assert d["entries"][0]["time_discovered_started_ns"] is None
    assert j["entries"][0]["time_discovered_started_ns"] == 0
    status_p = next(iter(d["pg_status"].values()))
    status_j = next(iter(j["pg_status"].values()))
    assert isinstance(status_p["last_completed_collective"], int)
    assert isinstance(status_j["last_completed_collective"], str)
    ev = open_sources([DATA / "stuck-pickle"]).sources[0].events()
    pend = ev.filter(pl.col("status") == "pending").group_by("rank").agg(pl.col("op").first())
    assert dict(pend.iter_rows())[3] == "broadcast"
