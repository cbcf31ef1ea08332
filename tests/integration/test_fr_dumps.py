"""Flight Recorder dumps of real Gloo jobs with injected faults, made live and read by
``ringwatch analyze``: the culprit named at top confidence, no innocent rank there.

Two scenarios (a blocked rank, pickle; a killed rank, JSON), 4 ranks, 10 steps, ringwatch not
attached: the hangs are attributed from the dumps alone. About 30 s each on 2 cores.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from ringwatch.cluster import ClusterSpec, run_cluster

from jobtools import REPO, ringwatch_cmd

PREFIX = "nccl_trace_rank_"


def run_with_dumps(run_dir, fault: str, fmt: str):
    fr = run_dir / "fr"
    args = ["--fr-dump", str(fr / PREFIX), "--fr-dump-after-s", "3", "--fault-in-job", fault]
    if fmt == "json":
        args.append("--fr-json")
    spec = ClusterSpec(run_dir=run_dir, nproc=4, hosts=1, netns="off", steps=10, attach=False,
                       timeout_s=90, job_args=tuple(args))
    result = run_cluster(spec)
    assert result.leftovers == []
    return fr


def analyze(fr) -> dict:
    p = subprocess.run(ringwatch_cmd("analyze", str(fr), "--json"), capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.parametrize(("fault", "fmt", "dumps", "cls"), [
    ("block:2@4", "pickle", [0, 1, 2, 3], "never arrived"),
    ("kill:2@4", "json", [0, 1, 3], "rank not running"),
])
def test_hang_culprit_named_from_live_dumps_alone(tmp_path, fault, fmt, dumps, cls):
    fr = run_with_dumps(tmp_path / "run", fault, fmt)
    names = sorted(p.name for p in fr.iterdir())
    assert names == [f"{PREFIX}{r}" for r in dumps], names
    head = (fr / f"{PREFIX}0").read_bytes()[:1]
    assert head == (b"{" if fmt == "json" else b"\x80")  # PyTorch's own bytes
    report = analyze(fr)
    assert report["kind"] == "flight recorder dumps" and report["ranks"] == dumps
    assert report["unreadable"] == []
    fs = report["findings"]
    best = max(f["confidence"] for f in fs)
    named = {r for f in fs if f["confidence"] == best for r in f["ranks"]}
    assert best == 1.0 and named == {2}, fs
    assert fs[0]["cls"] == cls and fs[0]["pg"] == "0", fs[0]
