"""The sidecar's blocked time per step: the same figures the post-mortem reads from the rows."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ringwatch.agent.sidecar._step_work import (
    StepWork,
    add_row,
    blocked_ns,
    finished_work,
    fold_before,
)
from ringwatch.analyzers._timing import with_analysis_durations
from ringwatch.analyzers._work import compute_step_work

from fakes import gpu_shaped, sidecar_steps

PIPELINE = Path(__file__).resolve().parents[1] / "data" / "pipeline"


@pytest.mark.parametrize("name", ["healthy", "strag-mid", "varyseq", "pp4-strag", "b-strag",
                                  "vb-vary"])
@pytest.mark.parametrize("shape", ["exact", "gpu", "no-async"])
def test_a_real_pipeline_jobs_blocked_time_per_step_as_post_mortem(name, shape):
    # rows of a real 8-rank dp x tp x pp job (1F1B over send/recv), fed rank by rank in the
    # order the sidecar reads them: as measured, re-timed as a GPU job reports them (device
    # durations, watchdog ends; fakes.gpu_shaped), or without the async flag (as profiler
    # traces and Flight Recorder dumps give rows)
    ev = pl.read_parquet(PIPELINE / f"{name}.parquet")
    if shape == "gpu":
        ev = gpu_shaped(ev, first_lead_ms=1)
        post_ev = with_analysis_durations(ev)
    else:
        if shape == "no-async":
            ev = ev.with_columns(pl.lit(None, pl.Boolean).alias("async_op"))
        post_ev = ev
    post = {(r, s): (step_ms, blocked_ms) for r, s, step_ms, blocked_ms, _ in
            compute_step_work(post_ev).iter_rows()}
    live = {(rank, step): (step_ns / 1e6, blocked / 1e6)
            for rank, steps in sidecar_steps(ev).items()
            for step, step_ns, blocked, _ in steps}
    assert set(live) == set(post)  # every step but each rank's last
    for key, (step_ms, blocked_ms) in post.items():
        assert live[key] == pytest.approx((step_ms, blocked_ms), abs=1e-6), key


def test_the_wait_for_asynchronous_ops_counts_once_after_the_last_own_activity():
    # a blocking op 0-10, two async ops issued at 12 and 14 completing at 30 and 40, a
    # blocking op 20-25 meanwhile: blocked 0-10, 20-25, and 25-40 waiting for the async ones
    rows = [(0, 10, False, True, False), (12, 30, True, True, False),
            (14, 40, True, True, False), (20, 25, False, True, False)]
    assert blocked_ns(rows) == 10 + 5 + 15
    assert blocked_ns([(0, 10, False, True, False), (5, 12, False, True, False)]) == 12
    assert blocked_ns([(0, 10, True, True, False)]) == 10  # issued and waited for at once
    assert blocked_ns([]) == 0
    # a blocking row timed on the device is summed apart (its interval is the host's guess);
    # it still ends the rank's own activity before the wait for the asynchronous ones
    assert blocked_ns([(0, 10, False, False, False), (12, 30, True, True, False)]) == 30 - 12


def test_an_asynchronous_receive_is_waited_for_before_the_rank_goes_on():
    # batch_isend_irecv: an isend and an irecv issued at 0 and 1, the receive's data in at
    # 20 (waited for), work 20-50, a second pair issued at 50 and 51, in at 60, the sends
    # done at 2 and 52: blocked 1-20 and 51-60, not the work between
    rows = [(0, 2, True, True, False), (1, 20, True, True, True),
            (50, 52, True, True, False), (51, 60, True, True, True)]
    assert blocked_ns(rows) == 19 + 9
    # the same rows post-mortem
    ev = pl.DataFrame({
        "rank": [0] * 5, "step": [0, 0, 0, 0, 1], "idx": list(range(5)),
        "op": ["send", "recv", "send", "recv", "send"], "async_op": [True] * 5,
        "mono_start_ns": [0, 1, 50, 51, 100], "mono_end_ns": [2, 20, 52, 60, 101]})
    got = compute_step_work(with_analysis_durations(
        ev.with_columns(pl.col("op").cast(pl.Categorical),
                        (pl.col("mono_end_ns") - pl.col("mono_start_ns")).alias("duration_ns"))))
    assert got.filter(pl.col("step") == 0)["blocked_ms"].to_list() == [pytest.approx(28e-6)]


def test_a_step_is_given_once_folded_with_its_next_steps_begin():
    work: dict[int, StepWork] = {}
    for step, start in ((0, 100), (0, 150), (1, 300), (2, 500)):
        add_row(work, step, {"mono_start_ns": start, "mono_end_ns": start + 20,
                             "async_op": False})
        fold_before(work, step)
    # step 0 is folded (two steps on), step 1 not yet: only step 0, lasting to step 1's begin
    assert finished_work(work, 10) == [(0, 200, 40, {})]
    assert work[0].rows == [] and work[1].rows


@pytest.mark.parametrize("rows", [1, 3000, 7000])
def test_a_whole_log_by_slices_of_ranks_gives_the_one_pass(monkeypatch, rows):
    # a real batched pipeline (asynchronous receives), sorted by rank as the reader gives it:
    # slices of whole ranks (zero-copy), each summed alone, concatenate to the one pass
    from ringwatch.analyzers import _work

    ev = with_analysis_durations(pl.read_parquet(PIPELINE / "b-strag.parquet")).sort(
        "rank", "idx")
    want = compute_step_work(ev)
    monkeypatch.setattr(_work, "SLICE_ROWS", rows)
    got = compute_step_work(ev)
    assert want.height == 8 * 40 - 8 and got.equals(want)
    # rows in no order (not as the reader gives them): one pass, sorted where it must be
    assert compute_step_work(ev.sample(fraction=1.0, shuffle=True, seed=rows)).equals(want)
