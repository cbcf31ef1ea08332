"""Rhythm: the iteration structure of a job, from its sequence of collectives alone.

Every training iteration issues the same collectives in the same order, so one rank's
sequence of signatures (group, op, bytes; for point-to-point also the peer) repeats with a
period. The smallest period of the signatures can be a fraction of the iteration when an
iteration repeats one signature (equal DDP buckets): then the iteration is the multiple of it
at which the time gaps repeat too — one gap per iteration (forward pass, data loading) is far
longer than the gaps between the collectives inside it. Warm-up iterations before the rhythm
settles, and interludes (evaluation, checkpoints) that break it, are skipped by matching the
template iteration by iteration. When nothing repeats, it says so.

Step marks (``step`` column), when the job has them, give the answer directly and are
preferred: :func:`infer_rhythm` uses them only to check itself (``steps_agree``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

MIN_REPEATS = 3  # iterations needed to call it a rhythm
MIN_MATCH = 0.75  # share of positions (past the first third) that repeat at the period
MIN_GAP_RATIO = 3.0  # iteration gap vs the gaps inside an iteration
GAP_CHANCE = 0.05  # how likely a boundary phase of long gaps may be by chance, at most


@dataclass(frozen=True)
class Rhythm:
    """One rank's iteration structure.

    Attributes:
        found: Whether a rhythm was found; if not, ``reason`` says why.
        period: Collectives per iteration.
        slots: Signature of each slot, ``(pg, op, nbytes, peer)``.
        starts: ``idx`` of the first collective of every matched iteration.
        interludes: Collectives outside any matched iteration (warm-up, evaluation, ...).
        steps_agree: With step marks: whether each iteration lies within one step (None
            without marks).
    """

    found: bool
    reason: str = ""
    period: int = 0
    slots: tuple[tuple, ...] = ()
    starts: tuple[int, ...] = field(default_factory=tuple)
    interludes: int = 0
    steps_agree: bool | None = None


def _smallest_period(codes: np.ndarray, max_period: int) -> int:
    """The smallest period of the signatures past the warm-up, or 0."""
    tail = codes[len(codes) // 3:]
    for p in range(1, min(max_period, len(tail) // MIN_REPEATS) + 1):
        if float(np.mean(tail[:-p] == tail[p:])) >= MIN_MATCH:
            return p
    return 0


def _steady(codes: np.ndarray, base: int) -> tuple[int, int]:
    """The longest stretch ``[a, b)`` in which every collective repeats ``base`` later."""
    same = np.concatenate([codes[:-base] == codes[base:], [False]])
    best, run_start = (0, 0), None
    for i, ok in enumerate(same):
        if ok and run_start is None:
            run_start = i
        elif not ok and run_start is not None:
            if i - run_start > best[1] - best[0]:
                best = (run_start, i)
            run_start = None
    a, b = best
    return a, min(len(codes), b + base)


def _gap_period(tail: np.ndarray, base: int, max_period: int) -> int:
    """The smallest multiple of ``base`` at which one phase's gaps stand out, beyond what
    chance gives a job whose long gaps fall anywhere."""
    long_ns = MIN_GAP_RATIO * max(float(np.median(tail)), 1e3)
    share = float(np.mean(tail >= long_ns))  # of gaps long wherever they fall
    tested = 0  # phases looked at so far: each was a chance to stand out
    for p in range(base, max_period + 1, base):
        n = len(tail) // p
        if n < MIN_REPEATS:
            break
        tested += p
        blocks = tail[: n * p].reshape(n, p)
        # The boundary phase must be long in (nearly) every iteration, not on average: at
        # half the true period, a phase mixing boundaries with inside gaps has a high median.
        low = np.percentile(blocks, 10, axis=0)
        k = int(np.argmax(low))
        if low[k] < long_ns:
            continue
        # A loaded host's stalls make some gaps long at random: over a few long blocks, some
        # phase of some period is long in all of them by chance. How likely that is, with
        # every phase of every period tried so far, must be small.
        hits = int(np.sum(blocks[:, k] >= long_ns))
        if tested * _at_least(hits, n, share) <= GAP_CHANCE:
            return p
    return base


def _at_least(k: int, n: int, q: float) -> float:
    """P(at least ``k`` of ``n`` independent events of probability ``q`` each)."""
    from math import exp, lgamma, log

    if k <= 0 or q >= 1.0:
        return 1.0
    if q <= 0.0:
        return 0.0
    return min(1.0, sum(exp(lgamma(n + 1) - lgamma(j + 1) - lgamma(n - j + 1) + j * log(q)
                            + (n - j) * log(1 - q)) for j in range(k, n + 1)))


def _mask_rare_sizes(sig: list[tuple]) -> list[tuple]:
    """Signatures with the size left out where that exact signature is rare (under a
    quarter of its (group, op, peer)'s rows): the varying sizes of a batch that changes step
    by step match one another, a fixed one (a count exchange) stays apart."""
    from collections import Counter

    full = Counter(sig)
    kind = Counter((g, o, p) for g, o, _, p in sig)
    return [(g, o, n if full[(g, o, n, p)] * 4 >= kind[(g, o, p)] else None, p)
            for g, o, n, p in sig]


def _size_change_period(sig: list[tuple], a: int, b: int, base: int,
                        max_period: int) -> tuple[int, int] | None:
    """``(period, first boundary)`` from where the sizes change in ``[a, b)``: the greatest
    common divisor of the distances between changes, when it is a multiple of ``base`` that
    at least ``MIN_REPEATS`` changes show; else None."""
    from math import gcd

    at = [j for j in range(max(a, 1), b) if sig[j] != sig[j - 1]]
    if len(at) < MIN_REPEATS:
        return None
    g = 0
    for x, y in zip(at, at[1:], strict=False):
        g = gcd(g, y - x)
    if g <= base or g % base or g > max_period:
        return None
    return g, at[0] % g


def infer_rhythm(rows: pl.DataFrame, *, max_period: int = 4096) -> Rhythm:
    """The rhythm of one rank's collectives.

    The signatures carry the sizes; where that finds no rhythm, or one that leaves more than
    a warm-up unmatched (sizes that vary step by step: continuous batching, MoE routing,
    variable sequence lengths), rare sizes become "any size", then all sizes, and the
    iteration boundaries come from where the sizes change (:func:`_size_change_period`); the
    rhythm that matches the most collectives is kept.

    Args:
        rows: One rank's rows (any status), with ``idx``, ``pg``, ``op``, ``nbytes``,
            ``peer``, ``mono_start_ns``, ``mono_end_ns`` and ``step``.
        max_period: Longest iteration considered, in collectives.
    """
    df = rows.sort("idx")
    if df.height < MIN_REPEATS:
        return Rhythm(False, f"only {df.height} collective(s)")
    sig = df.select("pg", "op", "nbytes", "peer").rows()
    # Rows recovered without a time (a placeholder from the Flight Recorder) take their
    # neighbour's, so one of them does not blank every gap after it.
    t0 = df["mono_start_ns"].fill_null(strategy="forward").fill_null(strategy="backward")
    start = t0.to_numpy().astype(float)
    end = df["mono_end_ns"].fill_null(t0).to_numpy().astype(float)
    gaps = np.concatenate([[0.0], np.maximum(start[1:] - np.maximum.accumulate(end)[:-1], 0)])
    gaps = np.nan_to_num(gaps)
    tried = []
    for keys in (sig, _mask_rare_sizes(sig), [(g, o, None, p) for g, o, _, p in sig]):
        rh = _rhythm_of(df, sig, keys, gaps, max_period, sized=keys is sig)
        if rh.found and rh.interludes <= 2 * rh.period:  # a warm-up at most
            return rh
        tried.append(rh)
    found = [rh for rh in tried if rh.found]
    return min(found, key=lambda rh: rh.interludes) if found else tried[0]


def _rhythm_of(df: pl.DataFrame, sig: list[tuple], keys: list[tuple], gaps: np.ndarray,
               max_period: int, *, sized: bool) -> Rhythm:
    """The rhythm of one rank's signatures ``keys`` (``sig`` with its sizes, or masked)."""
    table: dict[tuple, int] = {}
    codes = np.array([table.setdefault(k, len(table)) for k in keys])
    base = _smallest_period(codes, max_period)
    if not base:
        return Rhythm(False, f"no repeating pattern of collectives ({df.height} collectives, "
                      f"{len(set(sig))} distinct)")
    a, b = _steady(codes, base)  # clear of warm-up and interludes
    period = _gap_period(gaps[a:b], base, max_period) if base < max_period else base
    first, by_size = 0, None
    if not sized:  # where the sizes change is an iteration boundary (a batch's size holds
        # for its whole iteration): their spacing gives the period and its phase
        by_size = _size_change_period(sig, a, b, base, max_period)
        # sizes change at boundaries: the iteration divides their spacing. A period of gaps
        # that is a multiple of it may be the step of several micro-batches of their own
        # sizes; one that neither divides it nor is a multiple of it is contradicted by them
        if by_size is not None and (by_size[0] > period or (
                by_size[0] % period and period % by_size[0])):
            period, first = by_size
        else:
            by_size = None
    # Template: the most common signature at each slot, phased so that slot 0 follows the
    # longest gap (the iteration boundary), or the first change of sizes.
    n = (b - a) // period
    if n < 1:
        return Rhythm(False, f"no steady stretch of {period} collectives")
    block = codes[a: a + n * period].reshape(n, period)
    phase_gaps = np.percentile(gaps[a: a + n * period].reshape(n, period), 10, axis=0)
    shift = (first - a) % period if by_size is not None else (
        int(np.argmax(phase_gaps)) if period > 1 else 0)
    modes = [int(np.bincount(block[:, k]).argmax()) for k in range(period)]
    template = np.array(modes[shift:] + modes[:shift])
    starts, i, skipped = [], first, first
    while i + period <= len(codes):
        if np.array_equal(codes[i: i + period], template):
            starts.append(i)
            i += period
        else:
            skipped += 1
            i += 1
    skipped += len(codes) - i
    if len(starts) < MIN_REPEATS:
        return Rhythm(False, f"a pattern of {period} repeats only {len(starts)} time(s)")
    inverse = {v: k for k, v in table.items()}
    idx = df["idx"].to_list()
    agree = None
    steps = df["step"].to_list()
    if any(s is not None for s in steps):
        agree = all(len({steps[j] for j in range(s, s + period)}) == 1 for s in starts)
    return Rhythm(True, period=period, slots=tuple(inverse[int(c)] for c in template),
                  starts=tuple(idx[s] for s in starts), interludes=skipped,
                  steps_agree=agree)


def compute_iteration_times(events: pl.DataFrame) -> pl.DataFrame:
    """Per rank and iteration (as :func:`infer_rhythm` finds them on that rank): the start
    of the iteration's first collective and the time to the next iteration's start.

    Returns:
        Columns ``rank``, ``iteration`` (0-based among matched ones), ``first_idx``,
        ``start_ns`` (rank's monotonic clock), ``iteration_ns`` (to the next matched
        iteration, so an interlude in between counts in; null for the last), sorted by rank
        then iteration. Ranks without a rhythm are left out.
    """
    out = []
    for _, rows in events.group_by("rank"):
        rh = infer_rhythm(rows)
        if not rh.found:
            continue
        firsts = rows.filter(pl.col("idx").is_in(list(rh.starts))).sort("idx")
        out.append(firsts.select(
            pl.col("rank"), pl.int_range(pl.len()).alias("iteration"),
            pl.col("idx").alias("first_idx"), pl.col("mono_start_ns").alias("start_ns"),
            (pl.col("mono_start_ns").shift(-1) - pl.col("mono_start_ns")).alias(
                "iteration_ns")))
    if not out:
        return pl.DataFrame(schema={"rank": pl.Int32, "iteration": pl.Int64,
                                    "first_idx": pl.Int64, "start_ns": pl.Int64,
                                    "iteration_ns": pl.Int64})
    return pl.concat(out).sort("rank", "iteration")


def unmarked(events: pl.DataFrame) -> bool:
    """Whether the job marked no steps: no rank's rows carry more than one step number. A
    job with no optimizer and no step marks (a custom loop, a serving engine) has every row
    at one step (the agent's counter never moves: 0), or none."""
    if events.is_empty():
        return False
    most = events.group_by("rank").agg(pl.col("step").drop_nulls().n_unique())["step"].max()
    return most is None or most <= 1


def assign_rhythm_steps(events: pl.DataFrame) -> pl.DataFrame:
    """``events`` with ``step`` filled from the rhythm where the job marked no steps.

    Each rank's rows from the start of matched iteration ``i`` to the start of the next get
    step ``i`` (interludes included in the iteration before them; rows before the first
    matched iteration, the warm-up, stay null). Ranks of one job issue the same collectives,
    so iteration ``i`` is the same work on every rank. A rank whose rows carry more than one
    step number marked its steps; its rows, and those of ranks without a rhythm, are left as
    they are. One step number on every row of a rank is no mark (see :func:`unmarked`).
    """
    out = []
    events = events.with_row_index("_row")
    for _, rows in events.group_by("rank", maintain_order=True):
        if rows["step"].drop_nulls().n_unique() > 1:
            out.append(rows)
            continue
        rh = infer_rhythm(rows)
        if not rh.found:
            out.append(rows)
            continue
        rows = rows.sort("idx")
        pos = np.searchsorted(np.asarray(rh.starts), rows["idx"].to_numpy(), side="right") - 1
        step = pl.Series("step", pos, dtype=pl.Int64)
        out.append(rows.with_columns(
            pl.when(step >= 0).then(step).otherwise(None).cast(rows["step"].dtype)
            .alias("step")))
    if not out:
        return events.drop("_row")
    return pl.concat(out, how="vertical_relaxed").sort("_row").drop("_row")
