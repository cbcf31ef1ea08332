"""The step table: per (rank, group, step), a rank's collectives in that group, summed.

It is what each node's agent sums as it reads its ranks' logs (``StepTotals`` in
``ringwatch.agent.sidecar._rank_tail``) and streams to the service, which judges the links
on it (``ringwatch.service._analysis.step_frame``). ``ringwatch analyze`` sums the rows of
a log the same way before it judges them, so the two read one table: the same group
bandwidth per step, the same slow steps, the same onset.

Per rank, group and step (collectives only, send/recv apart; finished ones: ``ok`` or
``unknown``): their count and bytes, and the time the rank spent inside at least one of them
(*busy*). Overlapping collectives (a DDP job's gradient buckets in flight together) count
once; a collective timed on the device (a kernel's duration on its stream: one group's
kernels run one after another) adds its duration; one whose end only the NCCL watchdog saw
adds nothing (:mod:`~ringwatch.analyzers._timing`). Each total is one row shaped as a
collective (``op`` ``"step"``, ``seq`` the step, ``duration_ns`` the busy time from the first
start), so the bandwidth pass (:func:`~ringwatch.analyzers._links.compute_group_bandwidth`)
takes the least busy member of each group's step as its transfer time, as it takes the
shortest member of a collective.
"""

from __future__ import annotations

import polars as pl

from ringwatch._schema import polars_schema
from ringwatch.analyzers._steps import SLICE_ROWS, _merged_ns, rank_row_ranges, running_reach
from ringwatch.analyzers._timing import HOST_TIMED

#: The ``op`` of a step total's row.
STEP_OP = "step"

#: A step total's columns: those of a collective the analyzers read, typed as in a log.
_COLUMNS = ("rank", "local_rank", "host", "idx", "pg", "pg_ranks", "pg_size", "group_rank",
            "seq", "op", "is_p2p", "peer", "nbytes", "status", "t_start_ns", "t_end_ns",
            "mono_start_ns", "mono_end_ns", "duration_ns", "step")
_SCHEMA = {c: polars_schema()[c] for c in _COLUMNS}
#: A (rank, group)'s columns, the same on each of its rows: a total takes its first row's.
_GROUP = ("local_rank", "host", "pg_ranks", "pg_size", "group_rank")
#: The columns of :func:`_sums`.
_SUMS = ("rank", "pg", "step", *_GROUP, "nbytes", "t_start_ns", "t_end_ns", "duration_ns")


def is_step_table(events: pl.DataFrame) -> bool:
    """Whether ``events`` are step totals already (the service's rows), not collectives."""
    if "op" not in events.columns or events.is_empty():
        return False
    ops = events["op"].unique()  # a few distinct ops: no string per row of a large log
    return ops.len() == 1 and str(ops[0]) == STEP_OP


def step_rows(events: pl.DataFrame) -> pl.DataFrame:
    """The step table of ``events`` (rows of one job, durations as the analyzers read them:
    :func:`~ringwatch.analyzers._timing.with_analysis_durations`), one row per rank, group
    and step, in the columns of a collective (see the module); sorted by rank, step, idx."""
    events = _with_columns(events)
    # a whole log by row ranges of whole ranks (zero-copy slices of the frame): every total
    # is one rank's, and a filtered copy of ten million rows' columns was ~1 GB beside them
    ranges = rank_row_ranges(events, SLICE_ROWS)
    sums = pl.concat([_sums(events)] if ranges is None else [
        _sums(events.slice(at, n)) for at, n in ranges])
    if sums.is_empty():
        return pl.DataFrame(schema=_SCHEMA)
    index = pl.col("pg").cast(pl.Utf8).rank("dense").cast(pl.Int64) - 1  # for ``idx``
    return (_as_collectives(sums).with_columns((pl.col("step") * 1024 + index).alias("idx"))
            .select(_COLUMNS).sort("rank", "step", "idx"))


def step_totals(events: pl.DataFrame) -> pl.DataFrame:
    """The step table's rows of ``events`` that hold whole ranks, less ``idx`` and in no
    set order: what the link pass reads of a log range by range (``analyze``), never holding
    the whole table (hundreds of MB at ten million rows)."""
    return _as_collectives(_sums(_with_columns(events))).select(c for c in _COLUMNS
                                                                  if c != "idx")


def _with_columns(events: pl.DataFrame) -> pl.DataFrame:
    """``events`` with every column of the table (null where it has none)."""
    missing = [pl.lit(None, _SCHEMA[c]).alias(c) for c in _COLUMNS if c not in events.columns]
    return events.with_columns(missing) if missing else events


def _as_collectives(sums: pl.DataFrame) -> pl.DataFrame:
    """Totals of :func:`_sums` with the columns of a finished collective (see the module)."""
    return sums.with_columns(
        pl.col("step").alias("seq"), pl.lit(STEP_OP).alias("op"),
        pl.lit(False).alias("is_p2p"), pl.lit(None, pl.Int32).alias("peer"),
        pl.lit("ok").alias("status"), pl.col("t_start_ns").alias("mono_start_ns"),
        (pl.col("t_start_ns") + pl.col("duration_ns")).alias("mono_end_ns"))


def _sums(events: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, group, step) of some whole ranks' rows: the group's columns, ``nbytes``,
    ``t_start_ns``, ``t_end_ns`` and ``duration_ns`` (busy: the host's intervals merged,
    plus device durations)."""
    by = ["rank", "pg", "step"]
    host = pl.col(HOST_TIMED) if HOST_TIMED in events.columns else pl.lit(True)
    status = pl.col("status")  # a categorical compares as it is: no string per row
    # only the columns used, filtered once (a filter copies every column it holds)
    df = (events.lazy()
          .filter(~pl.col("is_p2p").fill_null(False) & pl.col("step").is_not_null()
                  & pl.col("rank").is_not_null() & pl.col("pg").is_not_null()
                  & ((status == "ok") | (status == "unknown")))
          .select(*by, *_GROUP, "nbytes", "t_start_ns", "t_end_ns", "duration_ns",
                  host.alias("_host"))
          .collect())
    # the host's interval where the host timed it (the agent's: the wall clock's)
    timed = (pl.col("_host") & pl.col("duration_ns").is_not_null()
             & pl.col("t_start_ns").is_not_null() & pl.col("t_end_ns").is_not_null()
             & (pl.col("t_end_ns") >= pl.col("t_start_ns")))
    key = _packed_key(df)
    if key is not None and df.select(timed.all()).item():
        return _sums_host_timed(df.with_columns(key))
    busy = _merged_ns(df.filter(timed).select(*by, "t_start_ns", "t_end_ns")
                      .sort(*by, "t_start_ns"), "t_start_ns", "t_end_ns", by)
    device = pl.when(~pl.col("_host")).then(pl.col("duration_ns")).fill_null(0).sum()
    per = df.group_by(by).agg(
        *(pl.col(c).first() for c in _GROUP),
        pl.col("nbytes").fill_null(0).sum().alias("nbytes"), device.alias("_device"),
        pl.col("t_start_ns").min(), pl.col("t_end_ns").max())
    return (per.join(busy, on=by, how="left")
            .with_columns((pl.col("merged_ns").fill_null(0) + pl.col("_device"))
                          .alias("duration_ns"))
            .filter(pl.col("t_start_ns").is_not_null())
            .select(_SUMS))


def _sums_host_timed(df: pl.DataFrame) -> pl.DataFrame:
    """:func:`_sums` where every row is timed by the host (an interval, its end not before
    its start) and ``_key`` names each (rank, group, step): whole-column passes over the
    rows sorted by it, no group-by or join (a third of the time)."""
    k, start, reach = pl.col("_key"), pl.col("t_start_ns"), pl.col("_reach")
    # a log's rows are in each rank's order already: a stable sort on the one key keeps
    # it (a third of the time of a sort on the start too), checked
    df = df.sort("_key", maintain_order=True)
    if not df.select(((k != k.shift(1)) | (start >= start.shift(1))).fill_null(True)
                     .all()).item():
        df = df.sort("_key", "t_start_ns")
    df = running_reach(df, "_key", "t_end_ns")
    # busy: the runs of overlapping intervals, each from its first start to the ends'
    # running maximum at its last row; bytes and busy as running sums, told apart per key
    new_run = (k != k.shift(1)).fill_null(True) | (start > reach.shift(1))
    run_len = reach - pl.when(new_run).then(start).forward_fill()
    df = df.with_columns(
        (k != k.shift(1)).fill_null(True).alias("_first"),
        (k != k.shift(-1)).fill_null(True).alias("_last"),
        pl.when(new_run.shift(-1).fill_null(True)).then(run_len).otherwise(0).cum_sum()
        .alias("_busy"), pl.col("nbytes").fill_null(0).cum_sum().alias("_bytes"))
    firsts = df.filter("_first").select("rank", "pg", "step", *_GROUP, "t_start_ns")
    lasts = df.filter("_last").select(
        (pl.col("_bytes") - pl.col("_bytes").shift(1).fill_null(0)).alias("nbytes"),
        reach.alias("t_end_ns"),
        (pl.col("_busy") - pl.col("_busy").shift(1).fill_null(0)).alias("duration_ns"))
    return pl.concat([firsts, lasts], how="horizontal").select(_SUMS)


def _packed_key(df: pl.DataFrame) -> pl.Expr | None:
    """``_key``: one Int64 per (rank, group, step), from the groups' dictionary codes (as
    ``ringwatch analyze`` reads them; a dictionary is made of names read as strings), where
    the three fit in it (a sort on one integer instead of three columns); None otherwise."""
    if df.is_empty():
        return None
    pg = pl.col("pg") if df.schema["pg"] == pl.Categorical else pl.col("pg").cast(
        pl.Categorical)  # a few distinct names: a dictionary, then its codes
    code = pg.to_physical().cast(pl.Int64)
    lo_rank, hi_rank, hi_code, lo_step, hi_step = df.select(
        pl.col("rank").min().alias("a"), pl.col("rank").max().alias("b"), code.max(),
        pl.col("step").min().alias("c"), pl.col("step").max().alias("d")).row(0)
    codes, steps = hi_code + 1, hi_step - lo_step + 1
    if (hi_rank - lo_rank + 1) * codes * steps >= 1 << 62:
        return None
    return (((pl.col("rank").cast(pl.Int64) - lo_rank) * codes + code) * steps
            + (pl.col("step") - lo_step)).alias("_key")


__all__ = ["STEP_OP", "is_step_table", "step_rows", "step_totals"]
