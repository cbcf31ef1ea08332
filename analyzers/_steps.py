"""Per-step collective rhythm of each rank: the figures a person can read at a glance.

A rank that arrives last at a blocking collective waits least, so a compute straggler shows
*less* collective time per step than its peers, and its peers show more. Time *in* collectives
also grows for everyone when the straggler is paused inside one (or the network slows), so the
sharper figure is the *wait*: how long a rank sat in a collective that some member of its group
had not entered yet (:func:`compute_step_wait`).
"""

from __future__ import annotations

import polars as pl

from ringwatch.analyzers._memo import per_frame


@per_frame
def step_firsts(events: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, step): ``mono_start_ns``, the rank's first collective start of the step on
    its own monotonic clock; sorted by rank then step. Once per frame: the job's step time
    and its warm-up both read it."""
    def firsts(df: pl.DataFrame) -> pl.DataFrame:
        return (df.lazy().select("rank", "step", "mono_start_ns")
                .filter(pl.col("step").is_not_null() & pl.col("mono_start_ns").is_not_null())
                .group_by("rank", "step").agg(pl.col("mono_start_ns").min())
                .collect().sort("rank", "step"))

    # a whole log by row ranges of whole ranks (zero-copy slices of the frame): the group-by's
    # table over ten million rows was ~200 MB beside the frame
    ranges = rank_row_ranges(events, SLICE_ROWS)
    if ranges is None:
        return firsts(events)
    return pl.concat([firsts(events.slice(at, n)) for at, n in ranges])


def rank_row_ranges(events: pl.DataFrame, rows: int) -> list[tuple[int, int]] | None:
    """``(offset, length)`` row ranges of about ``rows`` rows each, that hold whole ranks,
    in order, where the frame is sorted by rank with no null one (as the logs' reader gives
    it: by rank, then idx); None when it fits one range or is not so sorted."""
    if events.height <= rows:
        return None
    rank = events["rank"]
    if rank.null_count() or not rank.is_sorted():
        return None
    out, at = [], 0
    while at < events.height:
        end = min(at + rows, events.height)
        if end < events.height:  # up to the end of the rank at ``end``
            end = int(rank.search_sorted(rank[end], side="right"))
        out.append((at, end - at))
        at = end
    return out


def _merged_ns(df: pl.DataFrame, start: str, end: str, by: list[str]) -> pl.DataFrame:
    """Length of the union of the ``[start, end]`` intervals per ``by`` group (overlaps once).

    ``df`` must be sorted by ``by`` then ``start``. Returns ``by`` columns and ``merged_ns``.
    """
    df = df.select(*by, start, end)
    if (df.is_empty() or df[start].null_count() or df[end].null_count()
            or not df.select((pl.col(end) >= pl.col(start)).all()).item()
            or not _sorted_by(df, by)):
        return _merged_ns_over(df, start, end, by)
    # Whole-column passes instead of windows per group (``over`` is 10-40x slower with
    # millions of (rank, step) groups). A new run starts where the start passes every
    # earlier end of the group (their running maximum: running_reach).
    g = pl.col("_g")
    df = running_reach(df.with_columns(pl.struct(by).rle_id().alias("_g")), "_g", end)
    # Intervals are not reversed (checked above), so a run reaches as far as the running
    # maximum at its last row, and starts at its first row's start.
    new_run = (g != g.shift(1)).fill_null(True) | (pl.col(start) > pl.col("_reach").shift(1))
    runs = df.with_columns(pl.when(new_run).then(pl.col(start)).forward_fill().alias("_s0"),
                           new_run.shift(-1).fill_null(True).alias("_last"))
    runs = runs.filter("_last").select(g, *by, (pl.col("_reach") - pl.col("_s0")).alias("_len"))
    return runs.group_by("_g").agg(*(pl.col(c).first() for c in by),
                                   pl.col("_len").sum().alias("merged_ns")).drop("_g")


def running_reach(df: pl.DataFrame, group: str, end: str) -> pl.DataFrame:
    """``df`` (contiguous groups of ``group``, no null ``end``) with ``_reach``: the
    largest ``end`` among each row and the rows before it in its group. A doubling scan of
    whole columns: after the pass at ``shift`` each row holds the maximum of its
    ``2 * shift`` last rows of the group."""
    g = pl.col(group)
    df = df.with_columns(pl.col(end).alias("_reach"))
    shift = 1
    while shift < df.height:
        same = g == g.shift(shift)
        if not df.select(same.any()).item():
            break  # no group is longer than ``shift``: every row holds its running maximum
        df = df.with_columns(pl.when(same).then(pl.max_horizontal(
            "_reach", pl.col("_reach").shift(shift))).otherwise(pl.col("_reach")))
        shift *= 2
    return df


def sorted_by(df: pl.DataFrame, *by: str) -> pl.DataFrame:
    """``df`` sorted by ``by``: as it is where it already is (a log's rows come in each
    rank's order: checking is a whole-column pass, a sort copies every column)."""
    return df if _sorted_by(df, list(by)) else df.sort(*by)


def _sorted_by(df: pl.DataFrame, by: list[str]) -> bool:
    """Whether ``df`` is sorted by ``by`` (ascending, no nulls): its groups are contiguous."""
    if df.select(pl.any_horizontal(pl.col(by).is_null()).any()).item():
        return False
    ok = pl.lit(True)
    for c in reversed(by):
        prev = pl.col(c).shift(1)
        ok = (pl.col(c) > prev) | ((pl.col(c) == prev) & ok)
    return bool(df.select(ok.slice(1).all()).item())


def _merged_ns_over(df: pl.DataFrame, start: str, end: str, by: list[str]) -> pl.DataFrame:
    """:func:`_merged_ns` with window expressions: any row order within ``by``, nulls,
    reversed intervals (an end before its start)."""
    reach = pl.col(end).cum_max().shift(1).over(by)
    df = df.with_columns(((pl.col(start) > reach).fill_null(True))
                         .cast(pl.Int32).cum_sum().over(by).alias("_run"))
    runs = df.group_by(*by, "_run").agg((pl.col(end).max() - pl.col(start).min()).alias("_len"))
    return runs.group_by(*by).agg(pl.col("_len").sum().alias("merged_ns"))


def _complete_collectives(df: pl.DataFrame, *cols: pl.Expr) -> pl.DataFrame:
    """Collective rows (no point-to-point) whose every group member recorded the same
    ``(pg, seq)``, with ``cols`` (computed over each collective's members) added."""
    # One filter, not two: a group of (pg, seq, is_p2p) with a seq and no point-to-point is
    # exactly a group of (pg, seq) among the collective rows, and every filter of a wide
    # frame copies all its columns (gigabytes at ten million rows).
    key = ["pg", "seq", "is_p2p"]
    return (df.with_columns(pl.len().over(key).alias("_n"), *(c.over(key) for c in cols))
            .filter(~pl.col("is_p2p") & pl.col("seq").is_not_null()
                    & (pl.col("_n") == pl.col("pg_size"))))


#: Rows a whole-log pass holds at once: the per-step passes over more rows than this run
#: over slices of steps (or of ranks), whose small per-(rank, step) or per-(pg, step)
#: results concatenate to the whole. Their working set (filters, windows, sorts) grows with
#: the rows held: ten million rows at once took ~1.5 GB over the frame itself.
SLICE_ROWS = 1_000_000

_KEY = ["pg", "seq", "is_p2p"]
#: The rows that can be collectives of :func:`_collective_stats` (no point-to-point, a seq):
#: a slice filtered with it joins no rows it would drop.
COLLECTIVE = ~pl.col("is_p2p") & pl.col("seq").is_not_null()


def _slices(df: pl.DataFrame, col: str, rows: int) -> list[tuple[int, int]] | None:
    """Inclusive ``col`` ranges of about ``rows`` rows each (whole values: a value's rows
    stay in one range), in order; None when the frame fits one."""
    if df.height <= rows:
        return None
    counts = df.group_by(col).len().drop_nulls(col).sort(col)
    out: list[tuple[int, int]] = []
    lo, held = None, 0
    for value, n in counts.iter_rows():
        if lo is None:
            lo = value
        held += n
        if held >= rows:
            out.append((lo, value))
            lo, held = None, 0
    if lo is not None:
        out.append((lo, counts[col][-1]))
    return out if len(out) > 1 else None


def _collective_stats(events: pl.DataFrame, keep: pl.Expr, *cols: pl.Expr) -> pl.DataFrame:
    """Per collective ``(pg, seq, is_p2p)`` of the rows ``keep`` selects (collectives only,
    with a seq): ``_n`` (rows) and ``cols``, what :func:`_complete_collectives` computes per
    row, as a table of one row per collective (a slice of steps joins it: a collective whose
    members recorded different steps is still counted whole), with the steps its members
    marked it with (``_s0`` to ``_s1``: a slice joins only the collectives it can hold)."""
    # point-to-point rows and rows without a seq left out before grouping, not after (a
    # pipeline's sends and receives are a third of its rows)
    rows = keep & COLLECTIVE

    def stats(where: pl.Expr) -> pl.DataFrame:
        return (events.lazy().filter(rows & where).group_by(_KEY)
                .agg(pl.len().alias("_n"), *cols, pl.col("step").min().alias("_s0"),
                     pl.col("step").max().alias("_s1")).collect())

    # a whole log by slices of groups (a group's collectives are its own): one table of
    # millions of collectives took ~600 MB to build, slices of a million rows ~200 MB
    group = pl.col("pg").to_physical() if isinstance(events.schema["pg"], pl.Categorical) \
        else pl.col("pg")
    slices = _slices(events.select(group.alias("_pg")), "_pg", SLICE_ROWS)
    if slices is None:
        return stats(pl.lit(True))
    nulls = [stats(group.is_null())] if events["pg"].null_count() else []  # no slice has them
    return pl.concat([stats(group.is_between(pl.lit(lo), pl.lit(hi))) for lo, hi in slices]
                     + nulls)


def _complete_in_slice(df: pl.DataFrame, stats: pl.DataFrame,
                       steps: tuple[int, int] | None = None) -> pl.DataFrame:
    """:func:`_complete_collectives` of a slice of the rows, the per-collective figures from
    ``stats`` (:func:`_collective_stats` of all of them): the same rows, in the same order,
    with the same columns. ``steps``: the slice's (inclusive), when it is a slice of steps:
    only the collectives marked with one of them are joined (a hash table of the job's
    millions of collectives, built again for every slice, cost more than the join)."""
    if steps is not None:
        stats = stats.filter((pl.col("_s1") >= steps[0]) & (pl.col("_s0") <= steps[1]))
    stats = stats.drop("_s0", "_s1")
    if _one_key(df, stats):  # a join on one integer: a third less time than on three keys
        key = _collective_key()
        joined = (df.with_columns(key).join(stats.with_columns(key).drop(_KEY), on="_key",
                                            how="inner", maintain_order="left").drop("_key"))
    else:
        joined = df.join(stats, on=_KEY, how="inner", maintain_order="left")
    return joined.filter(pl.col("_n") == pl.col("pg_size"))


#: A collective's number within its group fits these low bits of :func:`_collective_key`.
_SEQ_BITS = 40


def _collective_key() -> pl.Expr:
    """One Int64 per collective: the group's dictionary code above its ``seq`` (null for a
    point-to-point row or one without a seq: the statistics have none of those)."""
    code = pl.col("pg").to_physical().cast(pl.Int64)
    return (pl.when(~pl.col("is_p2p")).then(code * (1 << _SEQ_BITS) + pl.col("seq"))
            .alias("_key"))


def _one_key(df: pl.DataFrame, stats: pl.DataFrame) -> bool:
    """Whether :func:`_collective_key` names each collective of ``df`` and ``stats`` alike:
    groups dictionary-encoded (as ``ringwatch analyze`` reads them; codes are shared by
    every frame) and numbers within its bits."""
    if not all(isinstance(f.schema["pg"], pl.Categorical) for f in (df, stats)):
        return False
    for seq in (df["seq"], stats["seq"]):
        if seq.len() > seq.null_count() and not (0 <= seq.min() and seq.max() < 1 << _SEQ_BITS):
            return False
    return True


def compute_step_comm(events: pl.DataFrame) -> pl.DataFrame:
    """Collective time per (rank, step) from the ``step`` column.

    Args:
        events: Rows of one job (``ringwatch.read_events``); rows without a step are ignored.

    Returns:
        Columns ``rank``, ``step``, ``collectives`` (count), ``comm_ns`` (time with at least
        one collective in flight, overlaps counted once), ``comm_sum_ns`` (sum of the
        host-side durations of the finished ones), ``span_ns`` (first start to last end of the
        step's collectives), all on the rank's monotonic clock; sorted by step then rank.
    """
    df = (events.filter(pl.col("step").is_not_null() & pl.col("mono_start_ns").is_not_null())
          .sort("rank", "step", "mono_start_ns"))
    end = pl.col("mono_end_ns").fill_null(pl.col("mono_start_ns"))
    # Overlapping collectives (DDP's buckets are in flight together) count once.
    busy = _merged_ns(df.with_columns(end.alias("_end")), "mono_start_ns", "_end",
                      ["rank", "step"]).rename({"merged_ns": "comm_ns"})
    per = df.group_by("rank", "step").agg(
        pl.len().alias("collectives"),
        pl.col("duration_ns").filter(pl.col("status") == "ok").sum().alias("comm_sum_ns"),
        (end.max() - pl.col("mono_start_ns").min()).alias("span_ns"))
    return per.join(busy, on=["rank", "step"]).select(
        "rank", "step", "collectives", "comm_ns", "comm_sum_ns", "span_ns").sort("step", "rank")


def compute_step_wait(events: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, step), time spent waiting for the last member of a collective to arrive.

    For every collective that all members of its group recorded (point-to-point left out), a
    member waits from its own start until the latest start among the members. The wait of a
    rank in a step is the union of those intervals (overlapping collectives count once). A
    compute straggler arrives last, so its wait is near zero while its peers' wait is the
    time they lose to it; a slow network makes collectives longer but not later, so it leaves
    the wait alone. Starts are compared across ranks on the host wall clock (``t_start_ns``):
    exact on one machine, as good as the hosts' clock sync (NTP/PTP) across machines.

    Args:
        events: Rows of one job (``ringwatch.read_events``); rows without a step, a seq or a
            start are ignored, as are collectives that some member did not record.

    Returns:
        Columns ``rank``, ``step``, ``collectives`` (counted ones), ``wait_ns``,
        ``last_arrivals`` (collectives this rank entered last, ties to every latest) and
        ``exit_lag_ns`` (median over the step's collectives of how long after the first
        member to leave this rank left: a rank made late by its own slow transfers leaves
        last, a compute straggler leaves with the others), sorted by step then rank.
    """
    df = _complete_collectives(
        events.filter(pl.col("step").is_not_null() & pl.col("t_start_ns").is_not_null()),
        pl.col("t_start_ns").max().alias("_last"),
        pl.col("t_end_ns").min().alias("_first_exit"))
    df = df.with_columns((pl.col("t_end_ns") - pl.col("_first_exit")).alias("_exit"))
    wait = _merged_ns(df.sort("rank", "step", "t_start_ns"), "t_start_ns", "_last",
                      ["rank", "step"]).rename({"merged_ns": "wait_ns"})
    per = df.group_by("rank", "step").agg(
        pl.len().alias("collectives"),
        (pl.col("t_start_ns") == pl.col("_last")).sum().alias("last_arrivals"),
        pl.col("_exit").median().alias("exit_lag_ns"))
    return per.join(wait, on=["rank", "step"]).select(
        "rank", "step", "collectives", "wait_ns", "last_arrivals", "exit_lag_ns",
    ).sort("step", "rank")


def pivot_step_comm(step_comm: pl.DataFrame, *, value: str = "comm_ns") -> pl.DataFrame:
    """``step`` rows by ``rank`` columns of one value of :func:`compute_step_comm`."""
    wide = step_comm.pivot(on="rank", index="step", values=value, sort_columns=True)
    return wide.rename({c: f"rank{c}" for c in wide.columns if c != "step"}).sort("step")


def phase_masks(onset_step: int | None, *, warmup_steps: int = 2,
                settle_steps: int = 1) -> tuple[pl.Expr, pl.Expr]:
    """Filters on ``step`` for the phases before and after a change at ``onset_step``.

    "Before" leaves out the first ``warmup_steps`` (DDP's first steps differ); "after" starts
    ``settle_steps`` past the onset (the change lands mid-step) and is empty without an onset.
    """
    step = pl.col("step")
    if onset_step is None:
        return step >= warmup_steps, pl.lit(False)
    return (step >= warmup_steps) & (step < onset_step), step >= onset_step + settle_steps


def compute_phase_comm(step_comm: pl.DataFrame, onset_step: int | None, *,
                       warmup_steps: int = 2, settle_steps: int = 1,
                       value: str = "comm_ns") -> pl.DataFrame:
    """Each rank's median collective time per step before and after a change at ``onset_step``.

    Args:
        step_comm: Output of :func:`compute_step_comm`.
        onset_step: First step of the new phase (``None``: everything is "before").
        warmup_steps: Leading steps left out of "before" (DDP's first steps differ).
        settle_steps: Steps after ``onset_step`` left out of "after" (the change lands mid-step).
        value: Which column of ``step_comm`` to compare.

    Returns:
        Columns ``rank``, ``before_ns``, ``after_ns`` (null when that phase has no step),
        ``change_ns`` (after - before) and ``steps_before`` / ``steps_after``; sorted by rank.
    """
    before, after = phase_masks(onset_step, warmup_steps=warmup_steps,
                                settle_steps=settle_steps)
    out = step_comm.group_by("rank").agg(
        pl.col(value).filter(before).median().alias("before_ns"),
        pl.col(value).filter(after).median().alias("after_ns"),
        before.sum().alias("steps_before"), after.sum().alias("steps_after"))
    return out.with_columns((pl.col("after_ns") - pl.col("before_ns")).alias("change_ns")).select(
        "rank", "before_ns", "after_ns", "change_ns", "steps_before", "steps_after").sort("rank")


__all__ = ["compute_phase_comm", "compute_step_comm", "compute_step_wait", "phase_masks",
           "pivot_step_comm"]
