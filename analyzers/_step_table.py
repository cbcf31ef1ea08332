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
from ringwatch.analyzers._steps import SLICE_ROWS, _merged_ns, rank_row_ranges
from ringwatch.analyzers._timing import HOST_TIMED

#: The ``op`` of a step total's row.
STEP_OP = "step"

#: A step total's columns: those of a collective the analyzers read, typed as in a log.
_COLUMNS = ("rank", "local_rank", "host", "idx", "pg", "pg_ranks", "pg_size", "group_rank",
            "seq", "op", "is_p2p", "peer", "nbytes", "status", "t_start_ns", "t_end_ns",
            "mono_start_ns", "mono_end_ns", "duration_ns", "step")
_SCHEMA = {c: polars_schema()[c] for c in _COLUMNS}


def is_step_table(events: pl.DataFrame) -> bool:
    """Whether ``events`` are step totals already (the service's rows), not collectives."""
    if "op" not in events.columns or events.is_empty():
        return False
    ops = events["op"].unique()  # a few distinct ops: no string per row of a large log
    return ops.len() == 1 and str(ops[0]) == STEP_OP


def step_rows(events: pl.DataFrame) -> pl.DataFrame:
    """The step table of ``events`` (rows of one job, durations as the analyzers read them:
    :func:`~ringwatch.analyzers._timing.with_analysis_durations`), one row per rank, group
    and step, in the columns of a collective (see the module)."""
    missing = [pl.lit(None, _SCHEMA[c]).alias(c) for c in _COLUMNS if c not in events.columns]
    if missing:
        events = events.with_columns(missing)
    # a whole log by row ranges of whole ranks (zero-copy slices of the frame): every total
    # is one rank's, and a filtered copy of ten million rows' columns was ~1 GB beside them
    ranges = rank_row_ranges(events, SLICE_ROWS)
    parts = [_sums(events)] if ranges is None else [
        _sums(events.slice(at, n)) for at, n in ranges]
    per = pl.concat(parts).with_columns(pl.col("pg").cast(pl.Utf8))
    if per.is_empty():
        return pl.DataFrame(schema=_SCHEMA)
    index = pl.col("pg").rank("dense").cast(pl.Int64) - 1  # the group's place, for ``idx``
    return per.with_columns(
        (pl.col("step") * 1024 + index).alias("idx"), pl.col("step").alias("seq"),
        pl.lit(STEP_OP).alias("op"), pl.lit(False).alias("is_p2p"),
        pl.lit(None, pl.Int32).alias("peer"), pl.lit("ok").alias("status"),
        pl.col("t_start_ns").alias("mono_start_ns"),
        (pl.col("t_start_ns") + pl.col("duration_ns")).alias("mono_end_ns"),
    ).select(_COLUMNS).sort("rank", "step", "idx")


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
          .select("rank", "pg", "step", "local_rank", "host", "pg_ranks", "pg_size",
                  "group_rank", "nbytes", "t_start_ns", "t_end_ns", "duration_ns",
                  host.alias("_host"))
          .collect())
    # the host's interval where the host timed it (the agent's: the wall clock's)
    timed = (df.lazy()
             .filter(pl.col("_host") & pl.col("duration_ns").is_not_null()
                     & pl.col("t_start_ns").is_not_null() & pl.col("t_end_ns").is_not_null()
                     & (pl.col("t_end_ns") >= pl.col("t_start_ns")))
             .select(*by, "t_start_ns", "t_end_ns").sort(*by, "t_start_ns").collect())
    busy = _merged_ns(timed, "t_start_ns", "t_end_ns", by)
    device = pl.when(~pl.col("_host")).then(pl.col("duration_ns")).fill_null(0).sum()
    per = df.group_by(by).agg(
        pl.col("local_rank").first(), pl.col("host").first(), pl.col("pg_ranks").first(),
        pl.col("pg_size").first(), pl.col("group_rank").first(),
        pl.col("nbytes").fill_null(0).sum().alias("nbytes"), device.alias("_device"),
        pl.col("t_start_ns").min(), pl.col("t_end_ns").max())
    return (per.join(busy, on=by, how="left")
            .with_columns((pl.col("merged_ns").fill_null(0) + pl.col("_device"))
                          .alias("duration_ns"))
            .filter(pl.col("t_start_ns").is_not_null())
            .drop("merged_ns", "_device"))


__all__ = ["STEP_OP", "is_step_table", "step_rows"]
