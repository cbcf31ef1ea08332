"""Rhythm inference from the sequence of collectives alone."""

from __future__ import annotations

import random

import numpy as np
import polars as pl

from ringwatch.analyzers._rhythm import compute_iteration_times, infer_rhythm

from fakes import frame, row

MS = 1_000_000


class Seq:
    """One rank's collectives, laid out in time: ``add`` appends one after ``gap_ms``."""

    def __init__(self):
        self.rows, self.t, self.step = [], 0, 0

    def add(self, op="all_reduce", nbytes=400, gap_ms=1.0, dur_ms=2.0, pg="0", peer=None):
        self.t += int(gap_ms * MS)
        r = row(0, len(self.rows), len(self.rows) + 1, op, pg=pg, nbytes=nbytes,
                is_p2p=peer is not None, peer=peer, step=self.step,
                mono_start_ns=self.t, mono_end_ns=self.t + int(dur_ms * MS))
        self.rows.append(r)
        self.t += int(dur_ms * MS)

    def iteration(self, sigs, boundary_ms=50.0):
        for k, (op, nbytes) in enumerate(sigs):
            self.add(op, nbytes, gap_ms=boundary_ms if k == 0 else 1.0)
        self.step += 1

    def frame(self):
        return frame(self.rows)


ITER = [("all_reduce", 1000), ("all_reduce", 2000), ("all_gather", 500), ("broadcast", 64)]


def test_period_slots_and_iterations():
    s = Seq()
    for _ in range(20):
        s.iteration(ITER)
    rh = infer_rhythm(s.frame())
    assert rh.found and rh.period == 4 and len(rh.starts) == 20 and rh.interludes == 0
    assert [x[1:3] for x in rh.slots] == [("all_reduce", 1000), ("all_reduce", 2000),
                                          ("all_gather", 500), ("broadcast", 64)]
    assert rh.starts[:3] == (0, 4, 8) and rh.steps_agree is True


def test_identical_buckets_take_the_period_from_the_gaps():
    # Six equal DDP buckets per iteration: the signatures repeat every collective; the long
    # gap before each iteration's first bucket gives the period (also what gradient
    # accumulation looks like: the buckets come once per K micro-batches).
    s = Seq()
    for _ in range(15):
        s.iteration([("all_reduce", 4096)] * 6)
    rh = infer_rhythm(s.frame())
    assert rh.found and rh.period == 6 and len(rh.starts) == 15


def test_warm_up_and_an_evaluation_interlude_are_skipped():
    s = Seq()
    s.add("broadcast", 9999)  # DDP's init broadcasts
    s.add("all_gather", 8)
    for _ in range(10):
        s.iteration(ITER)
    for _ in range(5):  # evaluation: other collectives
        s.add("all_reduce", 4, gap_ms=5)
    for _ in range(10):
        s.iteration(ITER)
    rh = infer_rhythm(s.frame())
    assert rh.found and rh.period == 4 and len(rh.starts) == 20
    assert rh.interludes == 2 + 5
    assert rh.starts[0] == 2 and rh.starts[10] == 2 + 40 + 5


def test_pipeline_warm_up_and_cool_down_around_a_steady_state():
    # A pipeline stage: a few extra sends/recvs at the start and end (warm-up and cool-down),
    # then the steady send/recv/all_reduce pattern in between.
    s = Seq()
    for _ in range(3):
        s.add("send", 128, peer=1)
    for _ in range(20):
        s.add("recv", 128, gap_ms=40, peer=1)
        s.add("send", 128, peer=1)
        s.add("all_reduce", 2048)
        s.step += 1
    for _ in range(3):
        s.add("recv", 128, peer=1)
    rh = infer_rhythm(s.frame())
    assert rh.found and rh.period == 3 and len(rh.starts) == 20
    assert [x[1] for x in rh.slots] == ["recv", "send", "all_reduce"]


def test_no_rhythm_is_said_so():
    rng = random.Random(1)
    s = Seq()
    for _ in range(60):
        s.add(rng.choice(["all_reduce", "broadcast", "all_gather"]), rng.choice([4, 8, 16, 32]))
    rh = infer_rhythm(s.frame())
    assert not rh.found and "no repeating pattern" in rh.reason
    assert not infer_rhythm(Seq().frame()).found


def test_iteration_times_per_rank():
    s = Seq()
    for _ in range(8):
        s.iteration(ITER, boundary_ms=50)
    ev = s.frame()
    ev = pl.concat([ev, ev.with_columns(pl.lit(1, pl.Int32).alias("rank"))])
    it = compute_iteration_times(ev)
    assert it.height == 16 and sorted(set(it["rank"].to_list())) == [0, 1]
    r0 = it.filter(pl.col("rank") == 0)
    # an iteration: 50 ms boundary + 4 collectives of 2 ms + 3 gaps of 1 ms = 61 ms
    assert r0["iteration_ns"].drop_nulls().to_list() == [61 * MS] * 7


def test_a_row_without_time_does_not_blank_the_gaps():
    s = Seq()
    s.add("unknown", None)  # a placeholder recovered without a time
    s.rows[0]["mono_start_ns"] = s.rows[0]["mono_end_ns"] = None
    s.rows[0]["t_start_ns"] = s.rows[0]["t_end_ns"] = s.rows[0]["duration_ns"] = None
    for _ in range(12):
        s.iteration([("all_reduce", 4096)] * 6)  # the period must come from the gaps
    rh = infer_rhythm(s.frame())
    assert rh.found and rh.period == 6 and len(rh.starts) == 12 and rh.interludes == 1


def test_steps_from_the_rhythm_let_the_straggler_analyzer_run_without_marks():
    import polars as pl
    from test_unit_stragglers import job

    from ringwatch.analyzers import detect_stragglers
    from ringwatch.analyzers._rhythm import assign_rhythm_steps

    marked = job(steps=60, onset=30, late=1, late_ms=15)
    bare = marked.with_columns(pl.lit(None, pl.Int64).alias("step"))
    assert detect_stragglers(bare) == ()  # nothing to group the collectives by
    steps = assign_rhythm_steps(bare)
    # the iterations are the job's steps, numbered from the first one the rhythm matched
    shift = (steps["step"] - marked["step"]).drop_nulls().unique().to_list()
    assert len(shift) == 1, shift
    (f,) = detect_stragglers(steps)
    assert f.ranks == (1,) and f.since_step - shift[0] == 30
    # marks already there are kept
    assert assign_rhythm_steps(marked)["step"].to_list() == marked["step"].to_list()


def test_gradient_accumulation_makes_one_iteration_of_its_micro_batches():
    # FSDP-like with 4 micro-batches per optimizer step: each micro-batch gathers the
    # parameters (2 all_gathers) and reduce-scatters the gradients; a loss all_reduce and a
    # grad-norm all_reduce close the step. The period is the whole step, not a micro-batch.
    micro = [("all_gather", 4096), ("all_gather", 4096), ("reduce_scatter", 8192)]
    step = micro * 4 + [("all_reduce", 4), ("all_reduce", 8)]
    s = Seq()
    for _ in range(12):
        s.iteration(step)
    rh = infer_rhythm(s.frame())
    assert rh.found and rh.period == len(step) == 14
    assert len(rh.starts) == 12 and rh.steps_agree is True


def test_a_job_whose_every_row_carries_step_0_is_read_by_its_rhythm():
    # zero-code attach on a loop with no optimizer and no marks: the agent's step counter
    # never moves, every row says step 0; that is no mark, and the rhythm gives the steps
    import polars as pl
    from test_unit_stragglers import job

    from ringwatch._analyze import analyze_events
    from ringwatch.analyzers._rhythm import unmarked

    marked = job(steps=60, onset=30, late=1, late_ms=15)
    zero = marked.with_columns(pl.lit(0, pl.Int64).alias("step"))
    assert unmarked(zero) and not unmarked(marked)
    assert unmarked(marked.with_columns(pl.lit(None, pl.Int64).alias("step")))
    found = [f for f in analyze_events(zero, now_ns=int(zero["t_end_ns"].max()))
             if f.kind == "straggler"]
    assert [f.ranks for f in found] == [(1,)]
    (whole,) = [f for f in analyze_events(marked, now_ns=int(marked["t_end_ns"].max()))
                if f.kind == "straggler"]
    # the rhythm numbers iterations from the first one it matched: the onset is the same
    # iteration, up to that shift
    assert abs(found[0].since_step - whole.since_step) <= 2


def _decode(stalls: dict[int, float]) -> Seq:
    """A decode loop of 6 layers (12 collectives a step, no pause between steps), its batch
    (every collective's size) changing each step; collective ``i`` starts after
    ``stalls[i]`` ms instead of 2 (the host descheduled the rank there)."""
    rng = random.Random(4)
    s = Seq()
    for _ in range(60):
        nbytes = 1024 * rng.randint(1, 15)
        for _ in range(12):
            s.add("all_reduce", nbytes, gap_ms=stalls.get(len(s.rows), 2.0))
        s.step += 1
    return s


def test_stalls_that_line_up_by_chance_make_no_period_of_gaps():
    # A loaded host stalls the rank at random; three stalls 205 collectives apart are one
    # phase of a period of 205 that is long in every one of its 3 blocks. Over every phase of
    # every period tried, that is chance: the period is the steps' (where the sizes change).
    stalls = {i: 40.0 for i in (50, 255, 460)}
    rng = random.Random(5)
    stalls.update({rng.randrange(720): 40.0 for _ in range(12)})
    rh = infer_rhythm(_decode(stalls).frame())
    assert rh.found and rh.period == 12 and len(rh.starts) >= 55, (rh.period, len(rh.starts))


def test_a_period_of_gaps_the_size_changes_contradict_is_not_the_iteration():
    from ringwatch.analyzers._rhythm import _rhythm_of

    s = _decode({i: 40.0 for i in (50, 255, 460)})
    df = s.frame().sort("idx")
    sig = df.select("pg", "op", "nbytes", "peer").rows()
    gaps = np.zeros(df.height)
    gaps[[50, 255, 460]] = 40 * MS  # a phase long in each of its blocks, as if certain
    gaps[gaps == 0] = 2 * MS
    rh = _rhythm_of(df, sig, [(g, o, None, p) for g, o, _, p in sig], gaps, 4096, sized=False)
    assert rh.found and rh.period == 12, rh.period


def test_stalls_that_line_up_by_chance_on_fixed_sizes_make_no_period():
    # No size changes to go by: 12 distinct collectives a step, no pause between steps, the
    # host stalling the rank at 4% of the collectives at random. Three stalls 204 apart are
    # one phase long in all 3 blocks of a period of 204: chance, over the phases tried.
    rng = random.Random(6)
    stalls = {rng.randrange(720) for _ in range(30)} | {50, 254, 458}
    s = Seq()
    for _ in range(60):
        for k in range(12):
            s.add("all_reduce", 64 * (k + 1), gap_ms=40.0 if len(s.rows) in stalls else 2.0)
        s.step += 1
    rh = infer_rhythm(s.frame())
    assert rh.found and rh.period == 12, rh.period
