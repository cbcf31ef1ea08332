"""Ranks late from a job's first steps, judged by symmetry; and each rank's usual lateness.

Ranks of one pipeline stage (tensor-parallel peers, data-parallel replicas; without a pipeline,
every rank) do the same work by construction. A rank late in most of the job's first steps
while the other ranks of its stage are not is a straggler from the start, measured against its
peers' usual; one whose whole stage is late with it, or that has no peer, differs by design
(structural imbalance). Used by :func:`ringwatch.analyzers._stragglers.detect_stragglers` and,
when its baselines freeze, by the online window.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

import polars as pl


def usual_delay(head: pl.DataFrame, *, min_steps: int = 1) -> pl.DataFrame:
    """``rank``, ``usual_ms``, ``usual_compute_ratio``: each rank's mean delay over ``head``
    (rows with ``delay_ms`` and ``compute_ratio``, a job's first steps), at least 0, and its
    median compute ratio there (1 when unknown); ranks with fewer than ``min_steps`` rows
    left out."""
    ratio = (pl.col("compute_ratio").median() if "compute_ratio" in head.columns
             else pl.lit(None, pl.Float64))
    return (head.group_by("rank").agg(
        pl.col("delay_ms").mean().clip(lower_bound=0.0).alias("usual_ms"),
        ratio.fill_null(1.0).fill_nan(1.0).alias("usual_compute_ratio"),
        pl.len().alias("_n")).filter(pl.col("_n") >= min_steps).drop("_n"))


def _imbalanced(scores: pl.DataFrame, *, baseline_steps: int, imbalance_noise: float,
                min_delay_ms: float) -> pl.DataFrame:
    """Ranks late in most of the job's first steps: ``rank``, ``host``, ``delay_ms``
    (median), ``late_share`` (steps where it waited least), ``first_step``, ``last_step``."""
    head = scores.filter(pl.col("step").rank("dense") <= baseline_steps)  # steps seen
    by = ["step", "island"] if "island" in head.columns else ["step"]
    least = head.filter(pl.col("wait_ms") == pl.col("wait_ms").min().over(by))
    share = least.group_by("rank").agg(pl.len().alias("_late"))
    n = head["step"].n_unique()
    if "in_baseline" in head.columns:  # a rank that rose within them is not late from the
        rose = head.filter(~pl.col("in_baseline"))["rank"].unique().implode()  # first ones
        head = head.filter(~pl.col("rank").is_in(rose))
    per = head.group_by("rank").agg(
        pl.col("host").first(), pl.col("delay_ms").median(),
        pl.col("step").min().alias("first_step"), pl.col("step").max().alias("last_step"))
    noise = scores["noise_ms"][0]
    return (per.join(share, on="rank", how="left")
            .with_columns((pl.col("_late").fill_null(0) / n).alias("late_share"))
            .filter((pl.col("late_share") >= 0.5)
                    & (pl.col("delay_ms") >= max(min_delay_ms, imbalance_noise * noise)))
            .drop("_late").sort("rank"))


def judge_first_steps(scores: pl.DataFrame, stage: Mapping[int, int] | None, *,
                      baseline_steps: int, imbalance_noise: float,
                      min_delay_ms: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The ranks late from the job's first steps (``scores``), split by symmetry: ``(structural
    imbalance, stragglers from the start)`` as :func:`split_by_symmetry` gives them."""
    if scores.is_empty():
        return split_by_symmetry(scores, scores.select("rank"), stage,
                                 baseline_steps=baseline_steps, margin_ms=0.0)
    late = _imbalanced(scores, baseline_steps=baseline_steps, imbalance_noise=imbalance_noise,
                       min_delay_ms=min_delay_ms)
    margin = max(min_delay_ms, imbalance_noise * scores["noise_ms"][0])
    return split_by_symmetry(scores, late, stage, baseline_steps=baseline_steps,
                             margin_ms=margin)


def split_by_symmetry(scores: pl.DataFrame, late: pl.DataFrame,
                      stage: Mapping[int, int] | None, *, baseline_steps: int,
                      margin_ms: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Ranks late from the first steps (``late``: :func:`_imbalanced`), told apart by symmetry.

    A rank whose usual delay (its mean over the first ``baseline_steps`` steps of ``scores``)
    exceeds the median of its stage's other ranks' by ``margin_ms`` or more does the same work
    as they do, slower: a straggler from the start. Otherwise its stage is late with it, or it
    has no peer (a stage of one rank): by design.

    Args:
        scores: :func:`compute_straggler_scores` output.
        late: Ranks late from the first steps (``rank`` and any other columns).
        stage: ``rank -> pipeline stage`` (:class:`~ringwatch.analyzers._layout.Layout`);
            None: no pipeline, every rank is one class.
        baseline_steps: Steps (seen) of the usual.
        margin_ms: Least excess over the peers' usual that makes a straggler.

    Returns:
        ``(structural, from_peers)``: the rows of ``late`` that stay structural imbalance,
        and per straggler from the start ``rank``, ``usual_ms``, ``usual_compute_ratio``
        (its peers' medians, to measure it against: ``usual_from_peers``) and
        ``own_usual_ms``.
    """
    empty = pl.DataFrame(schema={"rank": pl.Int64, "usual_ms": pl.Float64,
                                 "usual_compute_ratio": pl.Float64,
                                 "own_usual_ms": pl.Float64})
    if late.is_empty():
        return late, empty
    head = scores.filter(pl.col("step").rank("dense") <= baseline_steps)
    if "in_baseline" in head.columns:  # a rank that rose within them: its steps before
        head = head.filter(pl.col("in_baseline"))
    usual = {int(r): (u, c) for r, u, c in usual_delay(head).iter_rows()}
    fixed, keep = [], []
    for r in late["rank"].to_list():
        peers = symmetric_peers(r, usual, stage)
        if not peers or r not in usual:
            keep.append(r)
            continue
        peer_ms = statistics.median(usual[q][0] for q in peers)
        if usual[r][0] - peer_ms < margin_ms:
            keep.append(r)
            continue
        fixed.append({"rank": r, "usual_ms": peer_ms,
                      "usual_compute_ratio": statistics.median(usual[q][1] for q in peers),
                      "own_usual_ms": usual[r][0]})
    return (late.filter(pl.col("rank").is_in(keep)),
            pl.DataFrame(fixed, schema=empty.schema) if fixed else empty)


def symmetric_peers(rank: int, ranks, stage: Mapping[int, int] | None) -> list[int]:
    """The ranks among ``ranks`` that do ``rank``'s work by construction: the others of its
    pipeline stage (every other rank without a pipeline; none for a rank with no stage)."""
    if stage is None:
        return [q for q in ranks if q != rank]
    mine = stage.get(rank, -1 - rank)
    return [q for q in ranks if q != rank and stage.get(q, -1 - q) == mine]


__all__ = ["judge_first_steps", "split_by_symmetry", "symmetric_peers", "usual_delay"]
