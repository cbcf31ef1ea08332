"""Mixture-of-experts skew: the rank whose experts receive too many tokens, from all-to-all.

An expert-parallel MoE layer sends each token to the rank that hosts its expert with an
all-to-all (dispatch) and back with a second one (combine). Every rank sends about its own
batch, so the byte counts are even on the sending side; a hot expert (a router that sends it a
large share of the tokens) shows on the receiving side: its rank's dispatch brings in, and its
combine sends back, several times the bytes of its peers' (``nbytes`` is the larger of what a
rank sends and what it receives). Its experts then compute on more tokens, so it comes last
to the combine and every other member waits for it.

Per (group, rank, step), :func:`compute_a2a_load` gives the rank's all-to-all bytes against
the group's median member (``share``) and how long the others waited for it at those
all-to-alls (``lag_ms``: the median member's wait minus its own, clock-free from durations).
:func:`detect_moe_skew` names a rank whose share stays above ``a2a_skew_ratio`` in most steps
as ``IMBALANCE (hot expert)``: workload imbalance from routing, not a fault of the rank. Its
cost is the lag it adds per step against its own steps without skew, what balancing the
router would save. The lateness detectors see the same rank late and would call it a straggler;
:func:`explain_by_skew` folds such findings into the hot-expert one.
"""

from __future__ import annotations

import polars as pl

from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS as _D

A2A_OPS = ("all_to_all", "all_to_all_single")
HOT_EXPERT_CLASS = "hot expert"


def compute_a2a_load(events: pl.DataFrame) -> pl.DataFrame:
    """Per (pg, rank, step): all-to-all bytes, their share of the median member's and the lag.

    Only finished all-to-alls that every member of the group recorded, with a step, a
    sequence number, a duration and a size, are used.

    Returns:
        Columns ``pg``, ``rank``, ``host``, ``step``, ``a2a`` (collectives), ``nbytes``,
        ``share`` (its bytes over the median member's, summed over the step's all-to-alls)
        and ``lag_ms`` (summed over them: the median member's wait minus its own; positive
        when the others waited for it), sorted by pg, rank, step.
    """
    cols = ["rank", "host", "pg", "seq", "step", "op", "is_p2p", "pg_size", "status",
            "nbytes", "duration_ns"]
    if any(c not in events.columns for c in cols):
        return pl.DataFrame()
    rows = (events.lazy().select(cols)
            .filter(pl.col("op").cast(pl.Utf8).is_in(A2A_OPS) & ~pl.col("is_p2p")
                    & (pl.col("status") == "ok") & pl.col("step").is_not_null()
                    & pl.col("seq").is_not_null() & pl.col("nbytes").is_not_null()
                    & pl.col("duration_ns").is_not_null())
            .with_columns(pl.len().over("pg", "seq").alias("_n"))
            .filter(pl.col("_n") == pl.col("pg_size"))
            .with_columns((pl.col("duration_ns") - pl.col("duration_ns").min().over("pg", "seq"))
                          .alias("_wait"),
                          pl.col("nbytes").median().over("pg", "seq").alias("_mid_bytes"))
            .with_columns((pl.col("_wait").median().over("pg", "seq") - pl.col("_wait"))
                          .alias("_lag"))
            .group_by("pg", "rank", "step")
            .agg(pl.col("host").first(), pl.len().alias("a2a"),
                 pl.col("nbytes").sum(),
                 (pl.col("nbytes").sum() / pl.col("_mid_bytes").sum().clip(lower_bound=1))
                 .alias("share"),
                 (pl.col("_lag").sum() / 1e6).alias("lag_ms"))
            .collect())
    return rows.with_columns(pl.col("pg").cast(pl.Utf8), pl.col("host").cast(pl.Utf8)
                             ).sort("pg", "rank", "step")


def detect_moe_skew(events: pl.DataFrame, *, warmup_steps: int = _D.warmup_steps,
                    skew_ratio: float = _D.a2a_skew_ratio,
                    hot_share: float = _D.a2a_hot_share, persist: int = _D.persist_steps,
                    min_gain_share: float = _D.min_gain_share) -> tuple[Finding, ...]:
    """Ranks whose all-to-all bytes stay ``skew_ratio`` times their group's median member's.

    Args:
        events: Rows of one job.
        warmup_steps: Leading steps (seen) left out.
        skew_ratio: A step is skewed for a rank whose share is at least this.
        hot_share: A rank is hot from the first of ``persist`` skewed steps in a row after
            which at least this share of its steps are skewed, to the end of the data (or to
            its last skewed step, when ``persist`` steps in a row without skew end it).
        persist: See ``hot_share``.
        min_gain_share: A hot rank costs the job at least this share of a step (its lag
            over its own steps without skew), or it is the job's noise.

    Returns:
        One ``imbalance`` finding of class ``hot expert`` per hot rank (the largest group's
        evidence), with ``since_step``, ``until_step`` and ``gain_s_per_step`` (what
        balancing would save per step).
    """
    from ringwatch.analyzers._hangs import typical_step_s

    load = compute_a2a_load(events)
    if load.is_empty():
        return ()
    load = load.with_columns((pl.col("step").rank("dense") - 1).alias("_n"))
    load = load.filter(pl.col("_n") >= warmup_steps)
    if load.is_empty():
        return ()
    step_s = typical_step_s(events)
    out = []
    for (pg, rank), mine in load.group_by("pg", "rank", maintain_order=True):
        found = _hot_run(mine.sort("step"), skew_ratio=skew_ratio, hot_share=hot_share,
                         persist=persist)
        if found is None:
            continue
        since, until, hot, cold = found
        gain_ms = max(0.0, float(hot["lag_ms"].median())
                      - (float(cold["lag_ms"].median()) if cold.height else 0.0))
        if step_s and gain_ms < min_gain_share * step_s * 1e3:
            continue
        share = float(hot["share"].median())
        out.append(Finding(
            kind="imbalance", cls=HOT_EXPERT_CLASS, ranks=(int(rank),),
            hosts=(hot["host"][0],) if hot["host"][0] else (), pg=str(pg),
            since_step=since, detected_step=int(hot["step"][min(persist, hot.height) - 1]),
            until_step=until, confidence=min(1.0, 0.5 + 0.25 * (share - skew_ratio) / skew_ratio
                                             + 0.5 * min(1.0, hot.height / (4 * persist))),
            gain_s_per_step=gain_ms / 1e3,
            evidence=(f"rank {rank}'s all-to-alls in pg {pg} carried {share:.1f}x the bytes of "
                      f"the group's median member in {hot.height} steps from step {since} "
                      f"({cold.height} steps without skew): the experts it hosts receive "
                      "too many tokens",
                      f"the others waited {gain_ms:.1f} ms per step longer for it at those "
                      "all-to-alls: balancing the router (or moving experts) would save "
                      "about that")))
    # one finding per rank: its largest skew
    best: dict[int, Finding] = {}
    for f in out:
        if f.ranks[0] not in best or f.gain_s_per_step > best[f.ranks[0]].gain_s_per_step:
            best[f.ranks[0]] = f
    return tuple(sorted(best.values(), key=lambda f: (f.since_step or 0, f.ranks)))


def _hot_run(mine: pl.DataFrame, *, skew_ratio: float, hot_share: float, persist: int):
    """``(since, until, hot steps, steps without skew)`` of a rank's skew episode, or None."""
    skewed = (mine["share"] >= skew_ratio).to_list()
    steps = mine["step"].to_list()
    n = len(skewed)
    start = next((i for i in range(n - persist + 1) if all(skewed[i:i + persist])
                  and sum(skewed[i:]) >= hot_share * (n - i)), None)
    if start is None:
        return None
    last, quiet, ended = start, 0, False
    for j in range(start, n):  # it ends after more than persist steps in a row without skew
        if skewed[j]:
            last, quiet = j, 0
        else:
            quiet += 1
            if quiet > persist:
                ended = True
                break
    hot = pl.Series([start <= i <= last and skewed[i] for i in range(n)])
    return (steps[start], steps[last] if ended else None, mine.filter(hot),
            mine.filter(~pl.Series(skewed)))


def explain_by_skew(findings: tuple, skew: tuple[Finding, ...]) -> tuple:
    """``findings`` with the stragglers and imbalance of a hot-expert rank folded into its
    hot-expert finding (the rank is late because its experts get too many tokens), and the
    hot-expert findings added."""
    hot = {f.ranks[0] for f in skew}
    keep = tuple(f for f in findings if not (f.kind in ("straggler", "imbalance")
                                             and len(f.ranks) == 1 and f.ranks[0] in hot))
    return keep + tuple(skew)


__all__ = ["A2A_OPS", "HOT_EXPERT_CLASS", "compute_a2a_load", "detect_moe_skew",
           "explain_by_skew"]
