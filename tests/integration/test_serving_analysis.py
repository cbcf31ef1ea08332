"""The analyzers on real serving jobs (``cluster/_serving.py``, 4 Gloo ranks on 2 emulated
hosts, no optimizer and no step marks: the steps come from the rhythm): a healthy
tensor-parallel decode job has no finding, a slowed decode rank is named a straggler from its
onset, and a hot MoE expert's rank is named as such, not as a straggler.

The same cases, several runs each, are scored in ``benchmarks/serving.py``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ringwatch._analyze import analyze_job
from ringwatch._logs import open_job
from ringwatch.cluster import leftovers, run_cluster
from ringwatch.cluster._cli import add_cluster_flags, fault_from_args, spec_from_args
from ringwatch.cluster._run import read_slowed_step

STEPS = 60


def _run(tmp_path: Path, flags: list[str], job: tuple[str, ...]):
    p = argparse.ArgumentParser()
    add_cluster_flags(p, nproc=4, hosts=2, steps=STEPS, fault="none", at_step=20)
    args = p.parse_args(["--nproc", "4", "--hosts", "2", "--netns", "off",
                         "--steps", str(STEPS), *flags])
    result = run_cluster(spec_from_args(args, tmp_path / "run", job), fault_from_args(args))
    assert result.ok, result
    assert leftovers() == {}
    report = analyze_job(open_job(result.log_dir, result.job_id))
    return result, report["_findings"]


DECODE = ("--workload", "decode", "--step-sleep-ms", "20")


def test_a_healthy_decode_job_has_no_finding(tmp_path):
    _, found = _run(tmp_path, ["--tp", "2"], DECODE)
    assert found == ()


def test_a_slowed_decode_rank_is_named_from_its_onset(tmp_path):
    victim = 2
    result, found = _run(tmp_path, ["--tp", "2", "--fault", "straggler", "--straggler-mode",
                                     "work", "--victim-rank", str(victim), "--at-step", "30"],
                         DECODE)
    slowed = read_slowed_step(result.run_dir / "steps", victim)
    assert slowed is not None
    (f,) = found
    assert (f.kind, f.cls, f.ranks) == ("straggler", "compute straggler", (victim,))
    # the rhythm's iterations are the decode steps: the onset in the job's own step numbers
    assert abs(f.since_step - slowed) <= 3, (f.since_step, slowed)


def test_a_hot_expert_is_named_not_a_straggler(tmp_path):
    hot_rank = 1
    _, found = _run(tmp_path, [], ("--workload", "moe", "--layers", "4", "--step-sleep-ms",
                                   "20", "--hot-expert", str(hot_rank), "--hot-share", "0.5",
                                   "--hot-from-step", "25"))
    (f,) = found
    assert (f.kind, f.cls, f.ranks) == ("imbalance", "hot expert", (hot_rank,))
    assert f.gain_s_per_step > 0
    assert "carried" in f.evidence[0] and "balancing" in f.evidence[1]
