"""Each rank's usual delay, following slow drift without absorbing a fault.

A rank's usual delay starts as its mean over the job's first steps
(:func:`~ringwatch.analyzers._symmetry.usual_delay`). From then on each step moves it toward
the step's delay by ``1 / drift_steps`` of the difference, the difference clipped to the
CUSUM's threshold: an exponentially weighted mean with a time constant of ``drift_steps``
steps. It stands still while the rank is *out of control*: its CUSUM of excess lateness (Page's
test, as :func:`~ringwatch.analyzers._stragglers.compute_straggler_scores` sums it) has passed
the threshold and it came late (by more than the slack) in one of its last ``persist + 1``
steps. As the baseline's, the usual in force is never below zero.

So a drift the usual keeps up with (lagging by less than about half the slack: up to
``slack / (2 drift_steps)`` per step, one noise unit over 400 steps by default) never sums
to a straggler, while a change larger than the slack is summed past the threshold in a few
steps, during which it moves the usual by at most ``threshold / drift_steps`` noise units a
step, and then holds it still for as long as it lasts: a fault that persists stays a finding.
When it ends (``persist + 1`` steps in a row on time) the usual moves again. The price: a
lasting change smaller than the slack, which the CUSUM would catch only by chance, is taken
for drift and followed within a few ``drift_steps``; a drift faster than the usual can follow
is summed like a fault.

Whether a step moves the usual depends only on the steps before it, so on a healthy rank
(always in control) it is a plain mean. The feedback (the usual decides which steps are late,
the late steps stop the usual) makes this a scan over steps; it runs once per step, vectorised
over ranks: its cost grows with the steps of the longest rank, not with the ranks.
"""

from __future__ import annotations

import numpy as np
import polars as pl

#: The state a rank's usual carries from one step to the next (columns of a ``usual`` frame:
#: the mean delay, its CUSUM, its steps since its last late one, its usual compute ratio).
STATE_COLUMNS = ("usual_ms", "state_cusum_ms", "quiet", "usual_compute_ratio")
#: Largest change of the compute ratio one step feeds its mean.
RATIO_CLIP = 1.0


def follow_usual(rank: np.ndarray, delay_ms: np.ndarray, ratio: np.ndarray,
                 start: tuple[np.ndarray, ...], judged: np.ndarray, may_move: np.ndarray, *,
                 slack_ms: float, threshold_ms: float, drift_steps: int,
                 persist: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]:
    """The usual delay and compute ratio in force at each row, and each rank's state after it.

    Args:
        rank: Per row, its rank; the rows of a rank together, in step order.
        delay_ms: Per row, the rank's delay (NaN: unknown, the state is kept).
        ratio: Per row, the rank's time outside collectives over the step's median rank's
            (NaN: unknown); its usual follows drift alike (the busy signal's reference).
        start: Per row, its rank's state before its first row (:data:`STATE_COLUMNS`): the
            usual delay (NaN: the rank has none), its CUSUM, its steps since its last late
            step and its usual compute ratio.
        judged: Per row, whether the rank has a usual there (the step counts).
        may_move: Per row, whether the step may move the usual (after the baseline).
        slack_ms: A step later than the usual by more than this is late; the CUSUM's allowance.
        threshold_ms: The CUSUM's threshold, and the largest difference a step feeds the mean.
        drift_steps: Time constant of the means, in steps (0: the usual never moves).
        persist: Out of control: the CUSUM past the threshold with a late step among the last
            ``persist + 1``.

    Returns:
        ``((usual, ratio), state)``: per row, the usual delay the step is judged against (the
        mean, at least 0) and the usual compute ratio; and the state after the step.
    """
    n = rank.shape[0]
    out = np.maximum(np.asarray(start[0], dtype=np.float64), 0.0)
    out_ratio = np.array(start[3], dtype=np.float64)
    state = tuple(np.array(a, dtype=t) for a, t in zip(
        start, (np.float64, np.float64, np.int64, np.float64), strict=True))
    if n == 0:
        return (out, out_ratio), state
    firsts = np.flatnonzero(np.r_[True, rank[1:] != rank[:-1]])
    ri = np.repeat(np.arange(firsts.size), np.diff(np.r_[firsts, n]))
    nth = np.arange(n) - firsts[ri]  # the row's place among its rank's rows
    order = np.argsort(nth, kind="stable")
    bounds = np.searchsorted(nth[order], np.arange(int(nth.max()) + 2))
    u, c, q, g = (a[firsts].copy() for a in state)
    rate = 1.0 / drift_steps if drift_steps > 0 else 0.0
    for j in range(bounds.size - 1):
        idx = order[bounds[j]:bounds[j + 1]]
        r = ri[idx]
        uu, cc, qq, gg = u[r], c[r], q[r], g[r]
        x = delay_ms[idx]
        in_force = np.maximum(uu, 0.0)
        out[idx], out_ratio[idx] = in_force, gg
        e = x - in_force
        known = ~np.isnan(e) & judged[idx]
        move = known & may_move[idx] & ~((cc >= threshold_ms) & (qq <= persist))
        if rate and move.any():
            u[r[move]] = uu[move] + rate * np.clip((x - uu)[move], -threshold_ms, threshold_ms)
            dg = ratio[idx] - gg
            moved = move & ~np.isnan(dg)
            g[r[moved]] = gg[moved] + rate * np.clip(dg[moved], -RATIO_CLIP, RATIO_CLIP)
        c[r] = np.where(known, np.maximum(cc + np.where(known, e, 0.0) - slack_ms, 0.0), cc)
        q[r] = np.where(known & (e > slack_ms), 0, qq + known)
        for a, b in zip(state, (u, c, q, g), strict=True):
            a[idx] = b[r]
    return (out, out_ratio), state


def usual_in_force(df: pl.DataFrame, *, gate: int, slack_ms: float, threshold_ms: float,
                   drift_steps: int, persist: int) -> pl.DataFrame:
    """``usual_ms`` and ``usual_compute_ratio`` in force at each row (the first null before
    ``gate``), following drift where ``_moves`` (:func:`follow_usual`), and the state after
    it: ``usual_after_ms``, ``state_cusum_ms``, ``quiet``, ``ratio_after``. ``df``: rows
    sorted by rank then step, with ``_n``, ``delay_ms``, ``compute_ratio`` and each rank's
    starting state (:data:`STATE_COLUMNS`; nulls: none)."""
    judged = pl.col("_n") >= gate
    nan = float("nan")
    start = (pl.col("usual_ms").fill_null(nan), pl.col("state_cusum_ms").fill_null(0.0),
             pl.col("quiet").fill_null(persist + 1).cast(pl.Int64),
             pl.col("usual_compute_ratio").fill_null(1.0).fill_nan(1.0))
    a = df.select(pl.col("rank").fill_null(-1).alias("r"),
                  pl.col("delay_ms").fill_null(nan).alias("d"),
                  pl.col("compute_ratio").fill_null(nan).alias("g"),
                  *(e.alias(f"s{i}") for i, e in enumerate(start)),
                  judged.alias("j"), (judged & pl.col("_moves")).alias("m"))
    g, start_g = a["g"].to_numpy(), a["s3"].to_numpy()  # a ratio over a median of 0: unknown
    g = np.where(np.isfinite(g), g, np.nan)
    start_g = np.where(np.isfinite(start_g), start_g, 1.0)
    (in_force, ratio), (usual, cusum, quiet, ratio_after) = follow_usual(
        a["r"].to_numpy(), a["d"].to_numpy(), g,
        (*(a[f"s{i}"].to_numpy() for i in range(3)), start_g), a["j"].to_numpy(),
        a["m"].to_numpy(),
        slack_ms=slack_ms, threshold_ms=threshold_ms, drift_steps=drift_steps,
        persist=persist)
    return df.with_columns(
        pl.when(judged).then(pl.Series(in_force).fill_nan(None)).alias("usual_ms"),
        pl.Series("usual_compute_ratio", ratio),
        pl.Series(usual).fill_nan(None).alias("usual_after_ms"),
        pl.Series("state_cusum_ms", cusum), pl.Series("quiet", quiet),
        pl.Series("ratio_after", ratio_after))


__all__ = ["STATE_COLUMNS", "follow_usual", "usual_in_force"]
