"""A group's slow steps as episodes: when its link went bad, and whether it recovered.

A group is slow from the first step of ``persist`` slow steps in a row. Its episode goes on
while slow steps keep coming: fewer than ``persist`` steps that are not slow between two slow
ones are the same episode (a link that flaps, or a bad link's step that happened to go
through), and ``persist`` of them in a row after its last slow step end it. An episode that
ended within ``transient_steps`` steps of its start, with the job going on, is *transient*: a
burst of load on the hosts whose cores the transfers share (Gloo's transfers are CPU work),
not a link to repair, and it is reported as a hiccup, as a rank that fell behind for a few
steps and caught up is (:mod:`~ringwatch.analyzers._policy`). One still on at the end of the
data, or that lasted longer, is a finding, with its end where it had one. So is one that is
*severe*: its first ``persist`` slow steps fell, at their median, twice as far as the bar (in
log terms: by the square of the factor that makes a step slow). A burst of load slows the
transfers within a few times their noise; a link that collapses for a few steps is an event
to report. A send/recv direction (``pg`` ``p2p ...``) is never severe: its time is the
fastest receive's, which holds the wait for a late sender (a pipeline stage with a few long
batches makes its neighbour's receives wait many times the transfer), so how far it fell
says nothing of the link.

Live, an open episode that is not severe is held back while it may still end as a transient
one (:func:`undecided`): still on ``n`` steps after its first means slow in one of its last
``persist`` steps, so it has lasted at least ``n - persist + 1`` steps. A severe one is shown
as soon as it is slow.

Steps are counted as the group's steps seen, not by their numbers: a log that keeps one step
in ten (sampled steps) or skips some judges its episodes on the steps it has.
"""

from __future__ import annotations

import polars as pl

#: The class of a slow link's episode that ended within a few steps (a hiccup).
TRANSIENT_LINK_CLASS = "transient slow link"


def slow_episodes(df: pl.DataFrame, *, persist: int, transient_steps: int) -> pl.DataFrame:
    """Per group, its slow episode.

    Args:
        df: ``pg``, ``step``, ``MBps``, ``usual_MBps``, ``slow_below`` and ``_slow`` (bool),
            sorted by pg then step.
        persist: Slow steps in a row that make an episode; steps not slow in a row that end
            it.
        transient_steps: An episode that ended within this many steps is transient.

    Returns:
        One row per group with an episode (its lasting one: still on, else the longest, the
        latest of equals; where all ended within ``transient_steps``, the longest): ``pg``,
        ``since_step`` (the first step of its first ``persist`` slow steps in a row),
        ``detected_step`` (their last), ``last_slow_step``, ``until_step`` (its last slow
        step where ``persist`` steps followed it, else null: still on), ``severe`` and
        ``transient`` (bool), ``slow_MBps`` (the median of its steps from ``since_step`` to
        its last slow one), ``newest_step`` (the group's newest step in ``df``) and
        ``on_steps`` (the group's steps from ``since_step`` to its newest, both counted).
    """
    df = df.with_columns(pl.int_range(pl.len()).over("pg").alias("_n"),
                         pl.len().over("pg").alias("_of"))
    slow = df.filter(pl.col("_slow"))
    if slow.is_empty():
        return _empty(df)
    # episodes: a slow step after ``persist`` or more steps that are not slow starts one
    gap = pl.col("_n") - pl.col("_n").shift(1).over("pg") - 1
    slow = slow.with_columns(
        (gap.is_null() | (gap >= persist)).cast(pl.Int32).cum_sum().over("pg").alias("_ep"),
        # runs of slow steps in a row: the step's place less its place among the slow ones
        (pl.col("_n") - pl.int_range(pl.len()).over("pg")).alias("_run"))
    runs = (slow.group_by("pg", "_ep", "_run")
            .agg(pl.col("step").min().alias("since_step"), pl.len().alias("_len"),
                 pl.col("_n").min().alias("_since_n"),
                 pl.col("step").sort().get(persist - 1, null_on_oob=True)
                 .alias("detected_step"),
                 # the fall of its first ``persist`` steps against the bar, squared
                 (pl.col("usual_MBps").first()
                  >= pl.col("MBps").sort_by("step").head(persist).median()
                  * pl.col("slow_below").first() ** 2).alias("severe"))
            .with_columns(pl.col("severe") & ~pl.col("pg").cast(pl.Utf8).str.starts_with("p2p "))
            .filter(pl.col("_len") >= persist)
            .sort("since_step").group_by("pg", "_ep", maintain_order=True).first())
    if runs.is_empty():
        return _empty(df)
    ends = slow.group_by("pg", "_ep").agg(pl.col("step").max().alias("last_slow_step"),
                                          pl.col("_n").max().alias("_last_n"),
                                          pl.col("_of").first())
    newest = df.group_by("pg").agg(pl.col("step").max().alias("newest_step"))
    eps = runs.join(ends, on=["pg", "_ep"]).with_columns(
        (pl.col("_of") - 1 - pl.col("_last_n") >= persist).alias("_ended"))
    eps = eps.with_columns(
        pl.when(pl.col("_ended")).then(pl.col("last_slow_step")).alias("until_step"),
        (pl.col("_ended") & ~pl.col("severe")
         & (pl.col("_last_n") - pl.col("_since_n") + 1 < transient_steps))
        .alias("transient"),
        (pl.col("_of") - pl.col("_since_n")).alias("on_steps"))
    level = (df.join(eps.select("pg", "_ep", "since_step", "last_slow_step"), on="pg")
             .filter(pl.col("step").is_between(pl.col("since_step"), pl.col("last_slow_step")))
             .group_by("pg", "_ep").agg(pl.col("MBps").median().alias("slow_MBps")))
    eps = eps.join(level, on=["pg", "_ep"], how="left").join(newest, on="pg", how="left")
    # each group's lasting episode (one still on first, else the longest, the latest of
    # equals); where all were transient, the longest, for the hiccups
    return (eps.sort("pg", "transient", pl.col("until_step").is_not_null(),
                     pl.col("_last_n") - pl.col("_since_n"), "since_step",
                     descending=[False, False, False, True, True])
            .group_by("pg", maintain_order=True).first()
            .select("pg", "since_step", "detected_step", "last_slow_step", "until_step",
                    "severe", "transient", "slow_MBps", "newest_step", "on_steps"))


def _empty(df: pl.DataFrame) -> pl.DataFrame:
    return pl.DataFrame(schema={"pg": df.schema["pg"], "since_step": pl.Int64,
                                "detected_step": pl.Int64, "last_slow_step": pl.Int64,
                                "until_step": pl.Int64, "severe": pl.Boolean,
                                "transient": pl.Boolean, "slow_MBps": pl.Float64,
                                "newest_step": pl.Int64, "on_steps": pl.Int64})


def undecided(*, persist: int, transient_steps: int) -> pl.Expr:
    """Over :func:`slow_episodes`' rows: whether an episode still on may yet end as a
    transient one (not severe, and at the group's newest step it may have lasted fewer than
    ``transient_steps`` of its steps: slow in one of its last ``persist``)."""
    return (pl.col("until_step").is_null() & ~pl.col("severe").fill_null(False)
            & (pl.col("on_steps") - persist + 1 < transient_steps))


__all__ = ["TRANSIENT_LINK_CLASS", "slow_episodes", "undecided"]
