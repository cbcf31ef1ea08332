"""A group's usual bandwidth: its first steps, up to a fall that lasts.

The usual is the median of a group's first ``baseline_steps`` steps and its noise the robust
spread of their logarithm. A link that slows within those steps (a job of 30 steps whose link
goes bad at its twelfth; a service's window that starts a few steps before a fault) would
otherwise be absorbed by them: its slow steps widen the spread until the bar for a slow step
is ten times below the usual, and with more than half of them slow the usual itself is slow.

So each group's baseline steps are fitted with two levels, the first up to a step and the
second from it to the last baseline step (a fall that lasts; a dip that recovers within them
fits no second level below the first), at the split that leaves the smallest sum of absolute
residuals. Where the second level is below the first by as much as makes a slow step (the
ratio, and ``noise`` times the spread of the residuals about the two levels), with at least
``min_baseline_steps`` before it and ``persist`` from it, at most one step before it as
slow (a group whose bandwidth swings between two levels from its first steps on has no
healthy "before" to judge against) and at most one step from it as fast as the fastest but
one before it (a short run's transfers on a loaded machine's cores drift apart by as much,
but stay mingled; a link gone bad slows every step after it), the usual is the median of the
steps before the split and the noise that residual spread: the slow steps are then judged
against the steps before them, as a fault after the baseline is.
"""

from __future__ import annotations

import math

import polars as pl

from ringwatch.analyzers._shifts import MAD_SCALE, lasting_shifts
from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS as _D


def usual_bandwidth(bw: pl.DataFrame, *, warmup_steps: int = 0,
                    baseline_steps: int = _D.baseline_steps,
                    min_baseline_steps: int = _D.min_baseline_steps,
                    ratio: float = _D.link_ratio, noise: float = _D.link_noise,
                    persist: int = _D.link_persist_steps) -> pl.DataFrame:
    """``pg``, ``usual_MBps``, ``spread_log``: each group's median bandwidth over its first
    ``baseline_steps`` steps after the job's ``warmup_steps`` (those before a lasting fall
    within them: see the module), and how much it varies from step to step (the robust
    spread, 1.4826 times the median absolute deviation, of the log bandwidth); groups with
    fewer than ``min_baseline_steps`` of them are left out."""
    bw = past_warmup(bw, warmup_steps)
    seen = pl.col("step").rank("dense").over("pg")  # steps seen, whatever their numbers
    head = (bw.filter(seen <= baseline_steps)
            .select("pg", "step", "MBps",
                    pl.col("MBps").clip(lower_bound=1e-12).log().alias("_y"),
                    (pl.col("step").rank("ordinal").over("pg") - 1).alias("_i")))
    whole = (head.with_columns((pl.col("_y") - pl.col("_y").median().over("pg")).abs()
                               .alias("_dev"))
             .group_by("pg").agg(pl.col("MBps").median().alias("usual_MBps"),
                                 (pl.col("_dev").median() * MAD_SCALE).alias("spread_log"),
                                 pl.len().alias("_n"))
             .filter(pl.col("_n") >= min_baseline_steps))
    # a fall by the ratio needs the steps to span it at least: a steady fabric's groups
    # (a few percent of noise) are not fitted
    spans = (head.group_by("pg").agg((pl.col("_y").max() - pl.col("_y").min()).alias("_span"))
             .filter(pl.col("_span") >= math.log(ratio)))
    # a fall of the log bandwidth is a rise of its negation (analyzers/_shifts.py)
    falls = lasting_shifts(
        head.join(whole.select("pg", "_n"), on="pg").join(spans.select("pg"), on="pg")
        .with_columns(-pl.col("_y")), key="pg", first=min_baseline_steps, persist=persist,
        bar=pl.max_horizontal(pl.lit(math.log(ratio)), pl.col("_spread") * noise))
    if not falls.is_empty():
        before = (head.join(falls.select("pg", "_j"), on="pg")
                  .filter(pl.col("_i") < pl.col("_j"))
                  .group_by("pg").agg(pl.col("MBps").median().alias("_usual")))
        whole = (whole.join(falls.select("pg", "_spread").join(before, on="pg"), on="pg",
                            how="left")
                 .with_columns(pl.coalesce("_usual", "usual_MBps").alias("usual_MBps"),
                               pl.coalesce("_spread", "spread_log").alias("spread_log")))
    return whole.select("pg", "usual_MBps", "spread_log").sort("pg")


def past_warmup(bw: pl.DataFrame, warmup_steps: int) -> pl.DataFrame:
    """The rows of ``bw`` after the job's first ``warmup_steps`` steps (seen, whatever their
    numbers): a job's first steps compile, allocate and connect, and their transfers are
    neither its usual nor a link's fault (the lateness detector leaves them out likewise)."""
    if warmup_steps <= 0 or bw.is_empty():
        return bw
    return bw.filter(pl.col("step").rank("dense") > warmup_steps)


__all__ = ["past_warmup", "usual_bandwidth"]
