"""Stragglers: the rank every other rank waits for, found from durations alone.

At a blocking collective the members leave together, so the last to arrive spends the least
time inside: a rank's *wait* at one collective is its duration minus the shortest duration
among the members, and the rank with the shortest is the last arrival. Both need no clock
shared across hosts. Per rank and step the waits are merged on the rank's own monotonic clock
(overlapping DDP buckets count once).

Per step, a rank's *delay* is the step's median wait minus its own: how much longer the
others sat in collectives than it did, i.e. how late it came. A healthy rank's delay hovers
around zero, now and then large when it happens to arrive last (the job's noise,
``noise_ms``, is its pooled standard deviation); a straggler's jumps by the time it costs the
job, step after step. Each rank's delay is compared with its own usual (its mean over the
job's first ``baseline_steps`` steps, never below zero) and the excess is summed in a
one-sided CUSUM (Page's test), so a large change is found in one or two steps and a small one
in a few more, while single slow steps (noise spikes) do not add up. A straggler is a rank
whose CUSUM passes ``threshold`` times the noise with its excess above ``slack`` times the
noise in at least ``persist`` of its last ``persist + 1`` steps (3 of 4 by default).

Where the job is noisy (many ranks sharing few cores, a busy network) a straggler's delay can
be about the size of the noise, and the sum takes many steps. A second signal, on the rank's
own clock, confirms it sooner: its time *outside* collectives per step (forward, optimizer,
data loading: :func:`compute_outside_ns`) against the step's median over ranks. A rank late
(delay above its usual) in ``persist`` steps in a row while computing ``busier`` (1.5) times
its peers' median, and that much more than its own usual ratio, with the extra time
explaining at least half of its lateness, is a compute straggler at once: a rank that
computes longer and is waited for.

A rank late in most of the job's first ``baseline_steps`` steps is judged by *symmetry*
(:mod:`ringwatch.analyzers._symmetry`): ranks of one pipeline stage (tensor-parallel peers,
data-parallel replicas) do the same work by construction, so one that is late from the start
while its stage's other ranks are not is a **straggler** from the first step judged: its usual
is its peers' and the sum above runs against that. Where its whole stage is late with it, or it has
no peer to compare with, the difference is by design (a heavier stage): *structural
imbalance*, not a fault. Without a pipeline every rank is one class.

A rank made late by its own slow transfers (the far end of a throttled link) also leaves each
collective last: its durations are not the shortest, so its delay does not rise. A rank late
to one of its groups only because another of its groups transfers slowly (tensor-parallel
all-reduces over a slow link delay the data-parallel ones) is on time at that other group, so
it is not a compute straggler either (:func:`compute_group_lateness`): the link analyzer
reports the slow group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl

from ringwatch.analyzers._drift import usual_in_force
from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._lateness import (
    compute_group_lateness,
    compute_outside_ns,
    compute_step_lateness,
)
from ringwatch.analyzers._rises import lasting_rises
from ringwatch.analyzers._sorted import recent_count, run_first, streak
from ringwatch.analyzers._steps import SLICE_ROWS, _slices
from ringwatch.analyzers._symmetry import judge_first_steps, symmetric_peers, usual_delay
from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS as _D

#: The class of a straggler that ended within ``transient_steps`` of its start.
HICCUP_CLASS = "transient straggler"
#: The class of a straggler whose GPU was held down (power, heat, clocks) in its late steps:
#: given by :func:`ringwatch.analyzers._power_throttle.attribute_throttling` from NVML data.
THROTTLED_CLASS = "throttled straggler"
#: Episodes of one rank reported, at most (the first ones; hiccups count).
_MAX_EPISODES = 16
#: Every class a straggler finding can have.
STRAGGLER_CLASSES = ("compute straggler", HICCUP_CLASS, THROTTLED_CLASS)


def _noise_ms(delay: pl.DataFrame, floor_ms: float) -> float:
    """The spread of a healthy rank's delay: the standard deviation of each rank's delays
    around its own mean, pooled over ranks, at least ``floor_ms``. Not a robust spread on
    purpose: a healthy job's last arrival rotates, so a rank's delay is near zero most steps
    and large in a few, and those few are what a straggler must stand out from."""
    if delay.is_empty():
        return floor_ms
    dev = delay.select((pl.col("delay_ms") - pl.col("delay_ms").mean().over("rank")).pow(2)
                       .mean().sqrt())
    value = dev.item()
    return floor_ms if value is None else max(floor_ms, float(value))


def compute_straggler_scores(lat: pl.DataFrame, *, warmup_steps: int = _D.warmup_steps,
                             baseline_steps: int = _D.baseline_steps,
                             min_baseline_steps: int = _D.min_baseline_steps,
                             slack: float = _D.cusum_slack,
                             threshold: float = _D.cusum_threshold,
                             floor_ms: float = _D.noise_floor_ms,
                             persist: int = _D.persist_steps,
                             busier: float = _D.busier_ratio,
                             usual: pl.DataFrame | None = None,
                             noise_ms: float | None = None,
                             usual_from_peers: pl.DataFrame | None = None,
                             drift_steps: int = _D.drift_steps,
                             drift_from_step: int | None = None,
                             drift_state: bool = False,
                             rise_noise: float = _D.imbalance_noise) -> pl.DataFrame:
    """Per (rank, step), how late the rank came and how far that is from its usual.

    Args:
        lat: Output of :func:`compute_step_lateness`.
        warmup_steps: Leading steps left out (DDP's first steps differ).
        baseline_steps: Steps of the rolling "usual" and of the job's first steps (the noise).
        min_baseline_steps: Steps a rank needs behind it before it has a usual.
        slack: Excess below ``slack`` x noise is noise (the CUSUM's allowance).
        threshold: CUSUM level, in noise units, that makes a straggler.
        floor_ms: Least noise assumed (ms): a job that quiet does not flag 0.1 ms.
        persist: Steps with excess above slack needed among the last ``persist + 1``.
        busier: A step where a rank came late (excess above 0) while its time outside
            collectives was at least this many times the step's median over ranks (and
            its own usual ratio), longer than that median by enough to explain half of its
            lateness at least, is *busy*; ``persist`` busy steps in a row make a
            straggler without waiting for the CUSUM (``busy_run``).
        usual: ``rank``, ``usual_ms`` (and ``usual_compute_ratio``, ``state_cusum_ms``,
            ``quiet``): each rank's usual delay and compute ratio, when known from earlier data
            (an online window passes what the job's steps before it gave, with the state of
            the usual's drift: :mod:`ringwatch.analyzers._drift`); by default from the first
            ``baseline_steps`` steps here (the delay's mean, at least 0; the ratio's median).
        noise_ms: The job's noise, when known from earlier data; by default the pooled
            standard deviation of the delays in the first ``baseline_steps`` steps here.
        usual_from_peers: ``rank``, ``usual_ms``, ``usual_compute_ratio`` that replace the
            usual of those ranks (stragglers from the start, measured against their
            symmetric peers: :mod:`ringwatch.analyzers._symmetry`).
        drift_steps: The usual follows slow drift with this time constant in steps, from
            the step after the baseline on (:mod:`ringwatch.analyzers._drift`); 0 keeps it.
        drift_from_step: The first step that may move the usual, where ``usual`` is given
            (by default its first step here).
        drift_state: Add the drift's state after each step (the columns below).
        rise_noise: Where the usual comes from these rows, a rank that rose within the
            baseline steps by this many noise units has only its steps before the rise in
            its baseline (:mod:`ringwatch.analyzers._rises`).

    Returns:
        Columns ``rank``, ``host``, ``step``, ``wait_ms``, ``median_wait_ms`` (the step's
        median over ranks), ``delay_ms`` (that minus ``wait_ms``), ``usual_ms`` (the rank's
        usual delay in force at the step: see ``usual``, ``drift_steps``; null until
        ``min_baseline_steps``), ``excess_ms``, ``cusum_ms``, ``run_start`` (first step of the
        current excess run), ``hits`` (steps of the last ``persist + 1`` with excess above
        slack), ``noise_ms``, ``score`` (``cusum_ms`` over the threshold: 1 or more with
        ``persist`` hits is a straggler), ``compute_ms`` (time outside collectives),
        ``compute_ratio`` (that over the step's median), ``usual_compute_ratio`` and
        ``busy_run`` (busy steps in a row up to this one), and with ``drift_state``
        ``usual_after_ms``, ``state_cusum_ms``, ``quiet`` and ``ratio_after`` (the drift's
        state after the step: what a later window starts from), ``in_baseline`` (the row
        is one of its rank's baseline steps, before any rise); sorted by rank then step.
        Empty without steps past the warm-up.
    """
    # Steps are counted in steps seen, not by their numbers: a job resumed at step 50,000,
    # or one that numbers its steps 0, 10, 20..., has its warm-up and baseline in its first
    # steps all the same. The warm-up is left out where the baselines come from these rows.
    df = lat.with_columns((pl.col("step").rank("dense") - 1).alias("_n"))
    if usual is None:
        df = df.filter(pl.col("_n") >= warmup_steps).with_columns(pl.col("_n") - warmup_steps)
    df = df.with_columns((pl.col("wait_ns") / 1e6).alias("wait_ms"),
                         (pl.col("compute_ns") / 1e6).alias("compute_ms"))
    if df.is_empty():
        return df.drop("_n")
    # the step's median rank among the ranks it shares groups with (one island in training;
    # each independent serving replica its own)
    by = ["step", "island"] if "island" in df.columns else ["step"]
    df = df.with_columns(pl.col("wait_ms").median().over(by).alias("median_wait_ms"),
                         pl.col("compute_ms").median().over(by).alias("_median_compute"))
    df = df.with_columns((pl.col("compute_ms") / pl.col("_median_compute")).fill_nan(None)
                         .alias("compute_ratio"))
    df = df.with_columns((pl.col("median_wait_ms") - pl.col("wait_ms")).alias("delay_ms")
                         ).sort("rank", "step")
    if usual is None:  # each rank's baseline steps: its first ones, before any rise
        rises = lasting_rises(df.filter(pl.col("_n") < baseline_steps), floor_ms=floor_ms,
                              min_baseline_steps=min_baseline_steps, persist=persist,
                              rise_noise=rise_noise)
        df = df.join(rises, on="rank", how="left", maintain_order="left").with_columns(
            ((pl.col("_n") < baseline_steps) & (pl.col("rose_step").is_null()
                                                | (pl.col("step") < pl.col("rose_step"))))
            .alias("in_baseline")).drop("rose_step")
    else:
        df = df.with_columns(pl.lit(False).alias("in_baseline"))
    head = df.filter(pl.col("in_baseline"))
    noise = _noise_ms(head, floor_ms) if noise_ms is None else noise_ms
    if usual is None:
        usual = usual_delay(head, min_steps=min_baseline_steps)
        gate = min_baseline_steps  # a usual from these very rows needs some steps first
        moves = pl.col("_n") >= baseline_steps  # the usual follows drift after the baseline
    else:
        gate = 0
        moves = pl.lit(True) if drift_from_step is None else pl.col("step") >= drift_from_step
    # the drift's state where the caller has none: nulls, which usual_in_force fills
    state = ("usual_compute_ratio", "state_cusum_ms", "quiet")
    usual = usual.select("rank", "usual_ms", *(
        pl.col(c) if c in usual.columns else pl.lit(None, pl.Float64).alias(c) for c in state))
    df = df.with_columns(moves.alias("_moves"))
    if usual_from_peers is not None and not usual_from_peers.is_empty():
        fixed = usual_from_peers.select(pl.col("rank").cast(usual["rank"].dtype), "usual_ms",
                                        "usual_compute_ratio", *(pl.lit(None, pl.Float64)
                                                                 .alias(c) for c in state[1:]))
        usual = pl.concat([usual.join(fixed.select("rank"), on="rank", how="anti"), fixed],
                          how="vertical_relaxed")
    # The rest is per rank: a whole log goes by slices of ranks (windows over millions of
    # (rank, step) rows hold several copies of them).
    slices = None if df["rank"].null_count() else _slices(df, "rank", SLICE_ROWS // 4)
    args = dict(gate=gate, noise=noise, slack=slack, threshold=threshold, floor_ms=floor_ms,
                persist=persist, busier=busier, drift_steps=drift_steps,
                drift_state=drift_state)
    if slices is None:
        return _rank_scores(df, usual, **args)
    return pl.concat([_rank_scores(df.filter(pl.col("rank").is_between(lo, hi)), usual, **args)
                      for lo, hi in slices])


def _rank_scores(df: pl.DataFrame, usual: pl.DataFrame, *, gate: int, noise: float,
                 slack: float, threshold: float, floor_ms: float, persist: int,
                 busier: float, drift_steps: int, drift_state: bool) -> pl.DataFrame:
    """:func:`compute_straggler_scores` from each rank's usual on (rows of whole ranks)."""
    k, h = slack * noise, threshold * noise
    df = usual_in_force(df.join(usual, on="rank", how="left", maintain_order="left"), gate=gate,
                        slack_ms=k, threshold_ms=h, drift_steps=drift_steps, persist=persist)
    df = df.with_columns((pl.col("delay_ms") - pl.col("usual_ms")).alias("excess_ms"))
    # Page's CUSUM S_t = max(0, S_t-1 + x_t - k), as C_t - min(0, min_s<=t C_s).
    c = (pl.col("excess_ms") - k).fill_null(0.0).cum_sum().over("rank")
    df = df.with_columns(c.alias("_c"))
    df = df.with_columns((pl.col("_c") - pl.col("_c").cum_min().over("rank").clip(upper_bound=0.0)
                          ).alias("cusum_ms"))
    hit = (pl.col("excess_ms") > k).fill_null(False)
    # late, and computing longer than its peers: by a share, and by enough to explain at
    # least half of its lateness (a rank late for another reason is left to the sum)
    extra = pl.col("compute_ms") - pl.col("_median_compute")
    busy = ((pl.col("excess_ms") > 0) & (pl.col("compute_ratio") >= busier * pl.col(
        "usual_compute_ratio").fill_null(1.0).clip(lower_bound=1.0))
        & (extra >= floor_ms) & (extra >= 0.5 * pl.col("delay_ms"))).fill_null(False)
    # sorted by rank then step: per-rank counts and runs as whole-column passes (_sorted)
    df = df.with_columns(
        recent_count(hit, persist + 1).alias("hits"), streak(busy).alias("busy_run"),
        run_first("step", pl.col("cusum_ms") > 0).cast(df.schema["step"]).alias("run_start"),
        pl.lit(noise).alias("noise_ms"), (pl.col("cusum_ms") / h).alias("score"))
    return df.select("rank", "host", "step", "wait_ms", "median_wait_ms", "delay_ms",
                     "usual_ms", "excess_ms", "cusum_ms", "run_start", "hits", "noise_ms",
                     "score", "compute_ms", "compute_ratio", "usual_compute_ratio", "busy_run",
                     "in_baseline", *(("usual_after_ms", "state_cusum_ms", "quiet", "ratio_after")
                       if drift_state else ()),
                     *(["island"] if "island" in df.columns else []))


def _late_since(run: pl.DataFrame, k: float, tail: Sequence[float] = ()) -> int:
    """The first step of the change the run ends with.

    First the late streak that ends at the run's last step: going back from it over late
    steps (excess above ``k``), one on-time step at a time allowed between two late ones.
    Then, within the streak, the change point of a shift of the streak's own size (its median
    excess, ``tail`` included: the excess of the few steps after the run's last, where the
    data has them): the latest step from which the steps above half that size outnumber
    those below it most, to the end (a sign test: each step counts one, whatever its size).
    A late step of noise (one or two noise units) before a fault many units large counts
    against it, so the onset is not walked back over it; a fault of noise's size keeps the
    whole streak. Nor is it walked back over a burst: a rank descheduled for one step on a
    shared host comes many times its fault's size late once, then on time, and summed by its
    size that one step outweighed the on-time steps after it (heavy tails, not Gaussian
    noise). Late steps right before that point, with no on-time step between, are kept: a
    slowdown that lands mid-step makes a smaller first excess.
    """
    return run["step"][late_since_index(run["excess_ms"].fill_null(0.0).to_list(), k, tail)]


def late_since_index(xs: Sequence[float], k: float, tail: Sequence[float] = ()) -> int:
    """:func:`_late_since` over a run's excess alone (one per step): the onset's index."""
    late = [x > k for x in xs]
    i = len(xs) - 1
    first = i
    while first > 0:
        if late[first - 1]:
            first -= 1
        elif first > 1 and late[first - 2]:
            first -= 2
        else:
            break
    streak = sorted([*xs[first:], *(0.0 if x is None else x for x in tail)])
    ref = max(k, streak[len(streak) // 2] / 2)
    best, since, total = None, i, 0
    for j in range(i, first - 1, -1):  # counts from the end; the latest of equal maxima
        total += (xs[j] > ref) - (xs[j] < ref)
        if best is None or total > best:
            best, since = total, j
    while since > first and late[since - 1]:  # late right before it: the change's first,
        since -= 1                            # partial steps (it can land mid-step)
    return since


def _what_if(events: pl.DataFrame, first: int, last: int, delay_ms: float, rank: int,
             peers: list[int]) -> tuple[str, ...]:
    """The job's step time over ``first..last`` and what it would be with ``rank`` working
    like its ``peers``: by replay of the steps' dependencies
    (:mod:`ringwatch.analyzers._replay`), else the step less ``delay_ms`` (every rank waiting
    for all of it)."""
    from ringwatch.analyzers._hangs import step_s_between
    from ringwatch.analyzers._replay import before_clause, replay_fixed_step_ms

    step_s = step_s_between(events, first, last + 1)
    if step_s is None:
        return ()
    now = step_s * 1e3
    fixed = replay_fixed_step_ms(events, rank, peers, first, last + 1)
    before = before_clause(events, first)
    if fixed is not None:
        return (f"the job's step took {now:.0f} ms; ~{fixed:.0f} ms with this rank working "
                f"like its peers (replay of the steps' dependencies; "
                f"{max(0.0, now - fixed) / now:.0%} faster){before}",)
    return (f"the job's step took {now:.0f} ms; ~{max(0.0, now - delay_ms):.0f} ms if this "
            f"rank arrived like its peers ({delay_ms / now:.0%} faster){before}",)


def _from_start_line(rank: int, peers_ms: Mapping[int, float]) -> tuple[str, ...]:
    if rank not in peers_ms:
        return ()
    return (f"late from the job's first steps while the other ranks of its stage, which do "
            f"the same work, were not (their usual delay {peers_ms[rank]:.1f} ms): a "
            "straggler from the start, measured against them",)


def _change_lines(r: dict, threshold: float, persist: int) -> tuple[str, ...]:
    """Why the change is on this rank: its summed excess, its time outside collectives."""
    out = []
    if r["score"] >= 1.0:
        out.append(f"excess summed to {r['cusum_ms']:.0f} ms, over {threshold:g}x the noise: "
                   "a change on this rank, its peers wait for it")
    if r["compute_ratio"] is not None and r["busy_run"] >= 1:
        out.append(f"it spent {r['compute_ms']:.0f} ms per step outside collectives, "
                   f"{r['compute_ratio']:.1f}x the median rank (usually "
                   f"{r['usual_compute_ratio']:.1f}x)"
                   + (f", late in each of its last {r['busy_run']} steps: it computes longer"
                      if r["busy_run"] >= persist else ""))
    return tuple(out)


def scaled_floors_ms(events: pl.DataFrame, floor_ms: float, min_delay_ms: float, *,
                     floor_share: float = _D.noise_floor_share,
                     delay_share: float = _D.min_delay_share) -> tuple[float, float]:
    """``(floor_ms, min_delay_ms)`` scaled down with a fast job's step (µs collectives, ms
    steps): 2 ms of noise and 3 ms of delay are nothing in a 100 ms step, everything in a
    2 ms one. Each becomes its share of the job's typical step where that is less."""
    from ringwatch.analyzers._hangs import typical_step_s

    step_s = typical_step_s(events)
    if step_s is None:
        return floor_ms, min_delay_ms
    return (min(floor_ms, floor_share * step_s * 1e3),
            min(min_delay_ms, delay_share * step_s * 1e3))


def detect_stragglers(events: pl.DataFrame, *, warmup_steps: int = _D.warmup_steps,
                      baseline_steps: int = _D.baseline_steps,
                      min_baseline_steps: int = _D.min_baseline_steps,
                      slack: float = _D.cusum_slack, threshold: float = _D.cusum_threshold,
                      floor_ms: float = _D.noise_floor_ms,
                      floor_share: float = _D.noise_floor_share,
                      persist: int = _D.persist_steps, busier: float = _D.busier_ratio,
                      imbalance_noise: float = _D.imbalance_noise,
                      min_delay_ms: float = _D.min_delay_ms,
                      delay_share: float = _D.min_delay_share,
                      transient_steps: int = _D.transient_steps,
                      usual: pl.DataFrame | None = None,
                      noise_ms: float | None = None,
                      imbalance: bool = True,
                      stage: Mapping[int, int] | None = None,
                      drift_steps: int = _D.drift_steps,
                      drift_from_step: int | None = None,
                      grace_steps: int = _D.grace_steps,
                      ongoing: Mapping[int, tuple[int, int | None]] | None = None
                      ) -> tuple[Finding, ...]:
    """Ranks their peers wait for: a change (straggler) or there from the start (imbalance).

    Args:
        events: Rows of one job (a whole log or an online window).
        warmup_steps, baseline_steps, min_baseline_steps, slack, threshold, floor_ms,
            persist, busier, usual, noise_ms, drift_steps, drift_from_step: See
            :func:`compute_straggler_scores`.
        imbalance_noise: A rank whose median delay over the first ``baseline_steps`` steps is
            this many times the noise (and at least ``min_delay_ms``), while it waited least
            in half of them or more, is structural imbalance.
        min_delay_ms: Least delay (ms) worth a finding. It and ``floor_ms`` shrink to
            ``delay_share`` and ``floor_share`` of the job's step where those are less.
        transient_steps: A straggler whose excess ended within this many steps of its start
            (the logs go on without it) is a ``transient straggler``: a hiccup, not a rank to
            replace.
        grace_steps: A straggler (not a hiccup) whose excess stops and that is conclusive
            again within this many steps of its last late step is the same episode: a
            disturbance hid it (another rank stalled, a burst of noise), the fault went on.
            So it ends only when the data goes on this many steps past its last late step
            without it; until then it is still on (``until_step`` None), as a live reader
            sees it.
        ongoing: ``rank -> (since_step, detected_step)`` of episodes known to be on before
            the first step of ``events`` (an online window's memory): a rank's first episode
            that starts with the rows is that one, with its onset, never a hiccup (its run
            is cut by the window, not short).
        imbalance: Judge structural imbalance on the first steps of ``events``. An online
            window passes False: its first steps are only the oldest it still holds (a
            straggler that outlasts the window would turn into "imbalance" there); it judges
            imbalance once, on the job's own first steps, and passes their ``usual``.
        stage: ``rank -> pipeline stage``, the symmetry classes
            (:mod:`ringwatch.analyzers._symmetry`): a rank late from the start is a straggler
            when its stage's other ranks are not late, structural imbalance when they are.
            None: no pipeline, one class.

    Returns:
        One :class:`Finding` per episode of a rank (one that ended, a hiccup too, does not
        hide a later one), in order of onset: ``imbalance`` (class
        ``structural imbalance``, since the first step) or ``straggler`` (class ``compute
        straggler``) with ``since_step`` (the step its excess began), ``detected_step`` (the
        step that made it conclusive: its CUSUM passed the threshold, or it came late while
        busier than its peers for ``persist`` steps in a row), ``until_step`` (its last step,
        when it ended) and ``gain_s_per_step`` (how much longer its peers waited than it did
        per step since then: what the job would save if it arrived like them).
    """
    first_step = events["step"].min()
    floor_ms, min_delay_ms = scaled_floors_ms(events, floor_ms, min_delay_ms,
                                              floor_share=floor_share, delay_share=delay_share)
    lat = compute_step_lateness(events)
    scores = compute_straggler_scores(
        lat, warmup_steps=warmup_steps, baseline_steps=baseline_steps,
        min_baseline_steps=min_baseline_steps, slack=slack, threshold=threshold,
        floor_ms=floor_ms, persist=persist, busier=busier, usual=usual, noise_ms=noise_ms,
        drift_steps=drift_steps, drift_from_step=drift_from_step, rise_noise=imbalance_noise)
    if scores.is_empty():
        return ()
    noise = scores["noise_ms"][0]
    findings = []
    imb, from_start = judge_first_steps(
        scores if imbalance else scores.clear(), stage, baseline_steps=baseline_steps,
        imbalance_noise=imbalance_noise, min_delay_ms=min_delay_ms)
    if not from_start.is_empty():  # measured against their peers from the first steps on
        scores = compute_straggler_scores(
            lat, warmup_steps=warmup_steps, baseline_steps=baseline_steps,
            min_baseline_steps=min_baseline_steps, slack=slack, threshold=threshold,
            floor_ms=floor_ms, persist=persist, busier=busier, usual=usual,
            noise_ms=noise_ms, usual_from_peers=from_start, drift_steps=drift_steps,
            drift_from_step=drift_from_step, rise_noise=imbalance_noise)
    peers_ms = dict(from_start.select("rank", "usual_ms").iter_rows())
    for r in imb.iter_rows(named=True):
        findings.append(Finding(
            kind="imbalance", cls="structural imbalance", ranks=(r["rank"],),
            hosts=(r["host"],) if r["host"] else (), since_step=r["first_step"],
            detected_step=r["last_step"],
            confidence=min(1.0, r["delay_ms"] / (2 * imbalance_noise * noise)),
            gain_s_per_step=r["delay_ms"] / 1e3,
            evidence=(f"rank {r['rank']} came {r['delay_ms']:.1f} ms per step after the "
                      f"median rank in steps {r['first_step']}-{r['last_step']} (noise "
                      f"{noise:.1f} ms) and waited least in {r['late_share']:.0%} of them",
                      "from the job's first steps, with its stage's other ranks late too "
                      "or none to compare with: more work by design (a heavier stage)")))
    summed = ((pl.col("score") >= 1.0) & (pl.col("hits") >= persist)
              & (pl.col("excess_ms") > slack * noise))
    busy = pl.col("busy_run") >= persist
    hit = scores.filter((summed | busy) & (pl.col("delay_ms") >= min_delay_ms)
                        & ~pl.col("rank").is_in(imb["rank"].implode())
                        ).with_columns(busy.alias("_busy"))

    def episode(r: dict, mine: pl.DataFrame, resumes: Finding | None = None,
                carried: tuple[int, int | None] | None = None
                ) -> tuple[Finding | None, int | None]:
        """The finding of the late streak that hit row ``r`` of the rank (``mine``) made
        conclusive (None where another group's transfers explain it), and its last step;
        with ``resumes``, the episode it carries on after a pause; with ``carried``, the
        episode known to be on before the rows, which it carries on when it starts with
        them (its late steps before them, and a pause of up to the grace, cut away)."""
        # the late streak the sum ends with; a busy run counts from its first step
        steps = mine["step"]  # counted in steps seen, whatever their numbers
        at = steps.search_sorted(r["step"])
        first_busy = steps[max(0, at - r["busy_run"] + 1)] if r["busy_run"] >= 1 \
            else r["step"] + 1  # no busy run: after this step
        start = r["run_start"]
        if start is None or start > r["step"]:  # no sum running at this step: a busy run
            start = first_busy
        since = _late_since(mine.filter(pl.col("step").is_between(start, r["step"])),
                            slack * noise, mine["excess_ms"][at + 1:at + 2 + persist].to_list())
        if r["_busy"]:
            since = start = min(since, first_busy)
        judged = mine.filter(pl.col("usual_ms").is_not_null())["step"].min()
        if r["rank"] in peers_ms and judged is not None and since <= judged:
            # before its usual was judged: late by its peers' usual, from its first step on
            since = start = _late_since(mine.filter(pl.col("step") <= since).with_columns(
                (pl.col("delay_ms") - peers_ms[r["rank"]]).alias("excess_ms")), slack * noise)
        # It ends at its last late step before persist + 1 steps in a row without one;
        # still on at the end of the data: until None. Late: over the noise, or a busy step
        # (a straggler named by its compute time may never have passed the noise), and
        # never before the step that made it conclusive.
        late = (pl.col("excess_ms") > slack * noise) | (pl.col("busy_run") >= 1)
        ended = mine.filter(
            (pl.col("step") > r["step"])
            & (late.cast(pl.Int32).rolling_sum(persist + 1, min_samples=1) == 0))
        until = None
        if not ended.is_empty():
            last_late = mine.filter(
                pl.col("step").is_between(r["step"], ended["step"].min() - 1) & late
            )["step"].max()
            until = r["step"] if last_late is None else int(last_late)
        pause = None
        if resumes is not None:  # the same fault, back after a pause
            pause = (resumes.until_step, since)
            since, first_detected = resumes.since_step, resumes.detected_step
        elif carried is not None and first_step is not None \
                and since <= first_step + warmup_steps + 2 + grace_steps:
            # the rows' first late streak: the episode they began in the middle of
            since, first_detected = carried[0], carried[1]
        else:
            first_detected, carried = r["step"], None
        # What it costs: its median delay over all it has shown (the first late steps may
        # be partial: the slowdown can land mid-step)
        end = mine["step"].max() if until is None else until
        run = mine.filter(pl.col("step").is_between(since, end))
        if run.is_empty():  # an onset carried from beyond this streak's end: the streak's own
            run = mine.filter(pl.col("step").is_between(r["step"], end))
        delay = float(run["delay_ms"].median() or 0.0)
        # counted from the late streak (since), as a live reader counts it while it lasts
        # (split_undecided): both call the same episodes hiccups
        transient = until is not None and run.height < transient_steps and carried is None
        if not transient and until is not None \
                and mine.filter(pl.col("step") > until).height < grace_steps:
            # too few steps after it to tell an end from a pause: still on
            until = None
            run = mine.filter(pl.col("step") >= since)
        groups = compute_group_lateness(events, [r["rank"]], start, r["step"],
                                        min_delay_ms=min_delay_ms)
        on_time = groups.filter(~pl.col("late"))
        if not on_time.is_empty() and on_time.height < groups.height:
            return None, until  # late to some groups only: another group's transfers
        return Finding(
            kind="straggler", cls=HICCUP_CLASS if transient else "compute straggler",
            ranks=(r["rank"],),
            hosts=(r["host"],) if r["host"] else (), since_step=since,
            detected_step=first_detected, until_step=until,
            confidence=min(1.0, max(0.5 + 0.5 * (r["score"] - 1.0), 0.6 if r["_busy"] else 0)
                           ) * (0.5 if transient else 1),
            gain_s_per_step=delay / 1e3,
            evidence=(f"rank {r['rank']} came {delay:.1f} ms per step after the median rank "
                      f"in steps {since}-{run['step'].max()} (usually "
                      f"{r['usual_ms']:.1f} ms; job noise {noise:.1f} ms)",
                      *_from_start_line(r["rank"], peers_ms),
                      *_change_lines(r, threshold, persist),
                      *(() if pause is None else (
                          f"on time after step {pause[0]}, late again from step {pause[1]} "
                          f"(conclusive at step {r['step']}, within {grace_steps} steps): "
                          "one episode, a disturbance hid it",)),
                      *(() if transient else _what_if(
                          events, since, int(run["step"].max()), delay, r["rank"],
                          symmetric_peers(r["rank"], sorted(lat["rank"].unique()), stage))))
        ), until

    # Per rank each of its episodes in turn: one that ended (a hiccup too) does not hide a
    # later one; the first that lasts to the end of the data is the last
    for (rank,), rows in hit.sort("rank", "step").partition_by(
            "rank", as_dict=True, maintain_order=True).items():
        mine, after, n, last = scores.filter(pl.col("rank") == rank), None, 0, None
        steps = mine["step"]
        for r in rows.iter_rows(named=True):
            if after is not None and r["step"] <= after:
                continue
            # the rank's last finding goes on when this one comes within the grace of its end
            # (a hiccup never does)
            resumes = last if last is not None and last.cls != HICCUP_CLASS and (
                steps.search_sorted(r["step"]) - steps.search_sorted(last.until_step)
                <= grace_steps) else None
            found, after = episode(r, mine, resumes, None if n else (ongoing or {}).get(rank))
            if found is not None and resumes is not None:
                findings[-1] = found  # the same episode, after a pause
            else:
                findings += [] if found is None else [found]
                n += 1
            last = found or last
            if after is None or n >= _MAX_EPISODES:
                break
    return tuple(sorted(findings, key=lambda f: (f.since_step or 0, f.ranks)))


__all__ = ["HICCUP_CLASS", "STRAGGLER_CLASSES", "THROTTLED_CLASS", "compute_group_lateness",
           "compute_outside_ns", "compute_step_lateness", "compute_straggler_scores",
           "detect_stragglers", "late_since_index", "scaled_floors_ms", "usual_delay"]
