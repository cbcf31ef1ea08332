"""A job's warm-up, from its own step times: the leading steps that take far longer than its
usual step (compilation, autotuning, caches and allocators filling, the first collectives
setting up their connections).

Every baseline (a rank's usual lateness, the job's noise, a group's usual bandwidth) leaves the
warm-up out. A fixed count (``Thresholds.warmup_steps``, 2) covers DDP's first iteration; a job
compiled with ``torch.compile`` or autotuned on its first steps can take ten times its usual
step for several steps, and its ranks finish that at different times: read as baseline, that
inflates the noise (a later straggler goes unseen) or calls a rank that compiled slower
"imbalance". The rule reads the first ``warmup_steps + baseline_steps`` steps only, so the
live window (which freezes its baselines as soon as it has them) and the post-mortem pass
agree.
"""

from __future__ import annotations

import polars as pl

from ringwatch.analyzers._steps import step_firsts

#: A step within this many times the job's usual step is a usual one; two in a row end the
#: warm-up.
USUAL_RATIO = 1.5


def step_durations_ms(events: pl.DataFrame) -> list[float]:
    """Per step seen, in order: the median over ranks of the time from the step's first
    collective to the next step's (each rank on its own monotonic clock). The last step,
    with no next one, is left out."""
    firsts = step_firsts(events)
    if firsts.is_empty():
        return []
    same = pl.col("rank").eq_missing(pl.col("rank").shift(-1))
    firsts = firsts.with_columns(
        pl.when(same).then(pl.col("mono_start_ns").shift(-1) - pl.col("mono_start_ns"))
        .otherwise(None).alias("_d"))
    per = (firsts.filter(pl.col("_d").is_not_null()).group_by("step")
           .agg((pl.col("_d").median() / 1e6).alias("ms")).sort("step"))
    return per["ms"].to_list()


def leading_warmup_steps(events: pl.DataFrame, *, least: int, baseline_steps: int,
                         slow_ratio: float) -> int:
    """Leading steps (seen) to leave out of every baseline: at least ``least``, and up to the
    last of the job's first steps that took more than ``slow_ratio`` times the median step of
    its first ``least + baseline_steps`` steps, before two steps in a row within
    :data:`USUAL_RATIO` of it (a slow step after usual ones is a hiccup, not warm-up; at most
    ``baseline_steps``: a job slow for that long from its start is slow, not warming up)."""
    durations = step_durations_ms(events)[: least + baseline_steps]
    if len(durations) < least + baseline_steps:
        return least  # too few steps to tell: the fixed count
    usual = sorted(durations)[len(durations) // 2]
    n = calm = 0
    for i, ms in enumerate(durations[:baseline_steps]):
        if ms > slow_ratio * usual:
            n, calm = i + 1, 0
        elif ms <= USUAL_RATIO * usual:
            calm += 1
            if calm == 2:  # two usual steps in a row: the warm-up is over
                break
    return max(least, n)


__all__ = ["leading_warmup_steps", "step_durations_ms"]
