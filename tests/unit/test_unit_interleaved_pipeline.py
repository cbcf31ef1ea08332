"""Pipelines shaped as Megatron-LM runs them: interleaved (virtual stages, the send/recv pairs
close into a ring) and batched (``batch_isend_irecv``, receives issued asynchronously and
waited for at once). Real runs in ``tests/data/pipeline/`` (``vpp-*``, ``vb-*``, ``b-*``:
see its README)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ringwatch._analyze import analyze_events
from ringwatch.analyzers._layout import infer_layout, stages_from_pairs
from ringwatch.analyzers._policy import split_hiccups
from ringwatch.analyzers._work import compute_step_work
from ringwatch.service._jobs import Jobs

from pushes import WALL, rank_push

DATA = Path(__file__).resolve().parents[1] / "data" / "pipeline"
PP4 = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 3}


def _run(name: str) -> pl.DataFrame:
    return pl.read_parquet(DATA / f"{name}.parquet")


def _findings(ev: pl.DataFrame):
    return split_hiccups(analyze_events(ev, now_ns=int(ev["t_end_ns"].max())))[0]


RING = [(0, 2), (2, 4), (4, 6), (6, 0)]
FIRST = {0: "send", 2: "recv", 4: "recv", 6: "recv"}


def test_a_ring_is_opened_at_its_lightest_pair_and_read_from_the_rank_that_sends_first():
    # 2 chunks: the last stage's pair with the first carries half the others' messages
    counts = {(0, 2): 16, (2, 4): 16, (4, 6): 16, (0, 6): 8}
    stage, notes = stages_from_pairs([0, 2, 4, 6], RING, FIRST, counts)
    assert stage == {0: 0, 2: 1, 4: 2, 6: 3} and notes == ()
    # the same ring numbered the other way round
    stage, _ = stages_from_pairs([0, 2, 4, 6], RING, {0: "recv", 2: "recv", 4: "recv",
                                                      6: "send"}, counts)
    assert stage == {6: 0, 4: 1, 2: 2, 0: 3}


@pytest.mark.parametrize("counts", [None, {(0, 2): 16, (2, 4): 16, (4, 6): 16, (0, 6): 16},
                                    {(0, 2): 160, (2, 4): 160, (4, 6): 159, (0, 6): 152}])
def test_a_ring_whose_pairs_carry_alike_is_no_pipeline(counts):
    # context parallel's ring attention, or a ring told without its counts; one pair 5%
    # lighter (steps still in flight) is no cut either
    stage, notes = stages_from_pairs([0, 2, 4, 6], RING, FIRST, counts)
    assert set(stage.values()) == {0} and "no chain" in notes[0]


@pytest.mark.parametrize("name", ["vpp-strag", "vpp-laststage", "vb-healthy", "vb-vary",
                                  "vb-strag0"])
def test_an_interleaved_pipeline_of_four_stages_is_read_from_its_ring(name):
    lay = infer_layout(_run(name))
    assert (lay.dp, lay.tp, lay.pp) == (2, 1, 4) and lay.stage == PP4
    assert lay.replica == {r: r % 2 for r in range(8)}  # a replica is its ring of ranks


def test_the_live_service_reads_the_same_stages_from_the_agents_counts():
    from ringwatch.service._analysis import live_stages

    ev = _run("vb-healthy")
    p2p = ev.filter(pl.col("is_p2p"))
    first = dict(p2p.sort("idx").group_by("rank", maintain_order=True)
                 .agg(pl.col("op").cast(pl.Utf8).first()).iter_rows())
    jobs = Jobs()
    for (rank,), mine in p2p.partition_by("rank", as_dict=True).items():
        points = [("ringwatch.p2p.count", n, {"ringwatch.p2p.peer": int(peer),
                                              "ringwatch.p2p.first_op": first[rank]})
                  for peer, n in mine.group_by("peer").len().iter_rows()]
        assert jobs.ingest(rank_push("j", int(rank), points), WALL) == 0
    assert live_stages(jobs.snapshot("j")) == PP4


def test_an_asynchronous_receive_waited_for_is_blocked_time_not_work():
    ev = _run("b-strag")
    assert ev.filter(pl.col("is_p2p"))["async_op"].all()  # every send and receive batched
    w = compute_step_work(ev).filter(pl.col("step").is_between(5, 14))  # before the onset
    per = dict(w.group_by("rank").agg(pl.col("work_ms").median()).iter_rows())
    # every rank works alike: the receives' waits (the pipeline's bubbles) are not work
    assert max(per.values()) < 1.3 * min(per.values())
    blocking_recv = pl.when(pl.col("op") == "recv").then(False).otherwise(pl.col("async_op"))
    before = dict(compute_step_work(ev.with_columns(blocking_recv.alias("async_op")))
                  .filter(pl.col("step").is_between(5, 14))
                  .group_by("rank").agg(pl.col("work_ms").median()).iter_rows())
    assert per == pytest.approx(before, rel=0.1)  # as if each had been a blocking receive


@pytest.mark.parametrize("name,victim,onset", [("vpp-strag", 5, 16), ("vb222-strag", 6, 16),
                                               ("b-strag", 5, 16), ("vb-strag0", 2, 0)])
def test_a_straggler_is_named_alone_in_interleaved_and_batched_pipelines(name, victim, onset):
    (f,) = _findings(_run(name))
    assert (f.kind, f.cls, f.ranks) == ("straggler", "compute straggler", (victim,))
    if onset:  # mid-run: the onset, and detected within 3 steps of it
        assert abs(f.since_step - onset) <= 2 and f.detected_step - onset <= 3
    else:
        assert f.since_step <= 3
    assert "replay" in " ".join(f.evidence)


def test_an_interleaved_pipelines_heavier_last_stage_is_structural_imbalance():
    (f,) = _findings(_run("vpp-laststage"))
    assert (f.kind, f.cls, f.ranks) == ("imbalance", "structural imbalance", (6, 7))
    assert "stage 3" in f.evidence[0]


def test_healthy_and_varying_lengths_in_a_batched_interleaved_pipeline():
    assert _findings(_run("vb-healthy")) == ()
    fs = _findings(_run("vb-vary"))
    assert fs and {(f.kind, f.cls) for f in fs} == {("imbalance", "workload imbalance")}
