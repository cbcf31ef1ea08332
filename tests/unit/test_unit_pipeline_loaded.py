"""Pipelines on a loaded host and without tensor parallelism, on real runs
(``tests/data/pipeline/``, see its README): a burst of a few steps is no straggler, a stage of
two ranks names its straggler, replicas without tensor-parallel groups are judged across
their stages."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import ringwatch.analyzers._work as work_mod
from ringwatch._analyze import analyze_events
from ringwatch.analyzers._layout import chains_from_pairs, infer_layout
from ringwatch.analyzers._policy import split_hiccups

DATA = Path(__file__).resolve().parents[1] / "data" / "pipeline"


def _findings(name: str):
    ev = pl.read_parquet(DATA / f"{name}.parquet")
    return split_hiccups(analyze_events(ev, now_ns=int(ev["t_end_ns"].max())))[0]


def _keys(found) -> list[tuple]:
    return sorted((f.kind, f.cls, f.ranks) for f in found)


def test_a_burst_on_a_loaded_host_is_no_straggler(monkeypatch):
    """A healthy 2x2x2 job beside a busy loop: rank 3 worked 2-5 noise units longer in a few
    steps of 10-19 (descheduled), between steps on time. Each step's excess capped in the
    sum, no finding; summed whole, it was a compute straggler."""
    assert _findings("loaded-burst") == ()
    monkeypatch.setattr(work_mod, "step_cap", lambda k, h, persist: float("inf"))
    (f,) = _findings("loaded-burst")
    assert (f.kind, f.cls, f.ranks) == ("straggler", "compute straggler", (3,))


def test_a_pipeline_without_tensor_parallel_groups_takes_its_chains_as_replicas():
    lay = infer_layout(pl.read_parquet(DATA / "pp4-strag.parquet"))
    assert (lay.dp, lay.tp, lay.pp) == (2, 1, 4)
    assert lay.stage == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 3}
    assert lay.replica == {0: 0, 2: 0, 4: 0, 6: 0, 1: 1, 3: 1, 5: 1, 7: 1}
    assert chains_from_pairs([(0, 2), (2, 4), (1, 3), (9, 9)]) == {0: 0, 1: 1, 2: 0, 3: 1,
                                                                   4: 0, 9: 2}
    assert chains_from_pairs([]) == {}


def test_a_straggler_in_a_stage_of_two_is_named():
    """dp 2 x pp 4: rank 3 (stage 1) did 2x the work from step 25. With one peer, the stage's
    median is the pair's mean: the rank is judged against its peer. It was a structural
    imbalance of stage 1 from step 2 (the stage's median rose), which it is not: its other
    rank works as before."""
    (f,) = _findings("pp4-strag")
    assert (f.kind, f.cls, f.ranks) == ("straggler", "compute straggler", (3,))
    assert 25 <= f.since_step <= 27 and f.until_step is None
    assert "median of its 1 symmetric peer(s)" in f.evidence[0]
    # its extra work is against its peer, not half of it against the pair's mean
    assert f.gain_s_per_step > 0.02


def test_replicas_without_tensor_parallel_groups_are_judged_across_stages(monkeypatch):
    """dp 2 x pp 4 on a loaded host. Batches of varying length make each replica's four
    stages work longer alike: workload imbalance on every stage. Noise on one host does not:
    no finding on the healthy run, where the spread alone (two ranks per stage, each its own
    replica) made a workload imbalance of every stage."""
    found = _findings("pp4-varyseq")
    assert _keys(found) == [("imbalance", "workload imbalance", r)
                            for r in ((0, 1), (2, 3), (4, 5), (6, 7))]
    assert all("each replica's ranks on every stage moved together" in f.evidence[0]
               for f in found)
    assert _findings("pp4-loaded") == ()
    monkeypatch.setattr(work_mod, "_chain_ratio", lambda work: None)
    assert {f.cls for f in _findings("pp4-loaded")} == {"workload imbalance"}


@pytest.mark.parametrize("name", ["healthy", "strag-mid", "laststage", "varyseq"])
def test_the_two_by_two_by_two_runs_read_as_before(name):
    """The 2x2x2 runs' tensor-parallel replicas are unchanged by chains."""
    want = {"healthy": [], "strag-mid": [("straggler", "compute straggler", (5,))],
            "laststage": [("imbalance", "structural imbalance", (4, 5, 6, 7))],
            "varyseq": [("imbalance", "workload imbalance", (0, 1, 2, 3)),
                        ("imbalance", "workload imbalance", (4, 5, 6, 7))]}[name]
    assert _keys(_findings(name)) == want
