"""Who does more work per step than its symmetric peers, which role is the bottleneck by design,
and whether the extra work wanders from rank to rank: from each rank's *unblocked* time.

A rank's step lasts from its first communication of a step to its first of the next. Within it,
the time blocked in communication (a blocking collective, a receive, a wait: rows not issued
asynchronously) is time it waited for someone; the rest is its own work (compute, host code,
launching). On a pipeline this is the figure that reads the job right: a slow stage's
neighbours block in their receives, so their work stays what it was, while the slow rank's work
grows. Lateness at collectives alone (:mod:`ringwatch.analyzers._stragglers`) would blame the
neighbours too: blocked in a receive, they come late to their own data-parallel all-reduce.

Compared within the rank's *role* (its pipeline stage: :mod:`ringwatch.analyzers._layout`),
whose ranks do the same work by construction:

* **straggler**: a rank whose work exceeds its role's median by more than the job's noise in
  most steps, from the first step or from a later onset (a one-sided CUSUM, as the lateness
  detector's);
* **structural imbalance**: a role whose median work stays above the other roles' (a heavier
  last stage), named with its cost per step;
* **workload imbalance**: ranks of a role whose work differs by a lot from step to step while
  no one rank is the one behind (sequence lengths, expert routing), with its size.

A job whose every collective is asynchronous (DDP's gradient buckets: the wait for them is in
the backward pass, not in a row) shows every rank's work as its whole step, alike on all ranks:
this analyzer finds nothing there and the lateness detector does the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._steps import SLICE_ROWS, _merged_ns, _sorted_by, rank_row_ranges
from ringwatch.analyzers._stragglers import HICCUP_CLASS, late_since_index
from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS as _D

#: Columns this analyzer reads besides those of ``ANALYZED_COLUMNS``.
WORK_COLUMNS = ("async_op",)


def blocking(events: pl.DataFrame) -> pl.Expr:
    """Whether a row blocked its rank: not issued asynchronously. Where the rows do not say
    (profiler traces, Flight Recorder dumps), a receive or a collective blocks (what comes
    next needs its data) and a send does not (as an isend)."""
    sent = pl.col("op") == "send"  # a categorical compares as it is: no string per row
    if "async_op" not in events.columns:
        return ~sent
    return pl.coalesce(~pl.col("async_op"), ~sent)


def compute_step_work(events: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, step): ``step_ms`` (first communication of the step to the first of the
    next, the rank's monotonic clock), ``blocked_ms`` (time in blocking communication, overlaps
    once) and ``work_ms`` (the difference). Rows not timed by the host (``host_timed``:
    device durations, watchdog ends; :mod:`ringwatch.analyzers._timing`) add their device
    durations to the blocked time where they block (receives always: on the device the
    next kernel needs the data; one group's kernels run one after the other), and nothing
    without one. Empty without steps."""
    # everything is per (rank, step): a whole log goes by row ranges of whole ranks
    # (zero-copy slices), so the sorts and joins over ten million rows are never held at once
    ranges = rank_row_ranges(events, SLICE_ROWS)
    if ranges is None:
        return _step_work(events)
    return pl.concat([_step_work(events.slice(at, n)) for at, n in ranges])


def _step_work(events: pl.DataFrame) -> pl.DataFrame:
    """:func:`compute_step_work` of some whole ranks' rows."""
    from ringwatch.analyzers._timing import HOST_TIMED, host_timed

    # only the columns used: a filter of the whole frame copies every column
    cols = [c for c in ("rank", "step", "op", "async_op", "mono_start_ns", "mono_end_ns",
                        "duration_ns", HOST_TIMED) if c in events.columns]
    rows = events.select(cols).filter(pl.col("step").is_not_null()
                                      & pl.col("mono_start_ns").is_not_null())
    starts = (rows.group_by("rank", "step").agg(pl.col("mono_start_ns").min().alias("_s"))
              .sort("rank", "step")
              .with_columns((pl.col("_s").shift(-1).over("rank") - pl.col("_s"))
                            .alias("_dur")))
    host = host_timed(rows)
    # on the device a receive blocks, waited for at once or not: what comes next needs it;
    # a row timed there ends, as far as the host can place it, its device duration after
    # its issue
    rows = rows.with_columns(
        (blocking(rows) | (~host & (pl.col("op") == "recv"))).alias("_blk"),
        host.alias("_host"),
        pl.when(host).then(pl.col("mono_end_ns"))
        .otherwise(pl.col("mono_start_ns") + pl.col("duration_ns")).alias("_end"))
    device = (rows.filter(pl.col("_blk") & ~pl.col("_host"))
              .group_by("rank", "step").agg(pl.col("duration_ns").sum().alias("_dev")))
    done = rows.filter(pl.col("_end").is_not_null() & (pl.col("_end") >= pl.col("mono_start_ns")))
    blk = (done.filter(pl.col("_blk") & pl.col("_host"))
           .select("rank", "step", "mono_start_ns", pl.col("_end").alias("mono_end_ns")))
    # A rank waits for its asynchronous ops: for the step's (DDP's buckets, isends) before
    # the step ends, for an asynchronous receive (batch_isend_irecv) before its data is used.
    # From its last own activity before such an op completes (its last issue, or the end of
    # its last blocking op) to that completion, it is blocked.
    waits = _async_waits(done)
    blk = pl.concat([blk, waits], how="vertical_relaxed").sort("rank", "step", "mono_start_ns")
    busy = (_merged_ns(blk, "mono_start_ns", "mono_end_ns", ["rank", "step"])
            .join(device, on=["rank", "step"], how="full", coalesce=True)
            .select("rank", "step", (pl.col("merged_ns").fill_null(0)
                                     + pl.col("_dev").fill_null(0)).alias("merged_ns")))
    return (starts.filter(pl.col("_dur").is_not_null() & (pl.col("_dur") > 0))
            .join(busy, on=["rank", "step"], how="left")
            .with_columns(pl.col("merged_ns").fill_null(0))
            .select(pl.col("rank").cast(pl.Int32), "step",
                    (pl.col("_dur") / 1e6).alias("step_ms"),
                    (pl.col("merged_ns") / 1e6).alias("blocked_ms"),
                    ((pl.col("_dur") - pl.col("merged_ns")).clip(lower_bound=0) / 1e6)
                    .alias("work_ms"))
            .sort("rank", "step"))


def _async_waits(done: pl.DataFrame) -> pl.DataFrame:
    """(rank, step, mono_start_ns, mono_end_ns): the waits for asynchronous ops of
    :func:`compute_step_work` (``done``: its finished rows with ``_blk`` and ``_end``)."""
    last = (done.filter(~pl.col("_blk")).group_by("rank", "step")
            .agg(pl.col("_end").max().alias("_t")))
    recvs = (done.filter(~pl.col("_blk") & (pl.col("op") == "recv"))
             .select("rank", "step", pl.col("_end").alias("_t")))
    by = ["rank", "step"]
    targets = pl.concat([last, recvs], how="vertical_relaxed").unique().sort(*by, "_t")
    if targets.is_empty():
        return pl.DataFrame(schema={"rank": done.schema["rank"], "step": done.schema["step"],
                                    "mono_start_ns": pl.Int64, "mono_end_ns": pl.Int64})
    # the rank's last own activity up to each row's issue, within the step; rows as the
    # reader gives them (by rank, in issue order) need no sort
    free = done.select(*by, pl.col("mono_start_ns").alias("_t"), "_blk", "_end")
    if not _sorted_by(free, [*by, "_t"]):
        free = free.sort(*by, "_t")
    free = free.select(*by, "_t", pl.when(pl.col("_blk")).then(pl.col("_end"))
                       .otherwise(pl.col("_t")).cum_max().over(by).alias("_free"))
    # an as-of join needs its key sorted within each group of ``by``: both are
    return (targets.join_asof(free, on="_t", by=by, strategy="backward",
                              check_sortedness=False)
            .filter(pl.col("_free").is_not_null() & (pl.col("_t") > pl.col("_free")))
            .select("rank", "step", pl.col("_free").cast(pl.Int64).alias("mono_start_ns"),
                    pl.col("_t").cast(pl.Int64).alias("mono_end_ns")))


def reported_steps(work: pl.DataFrame) -> pl.DataFrame:
    """``work`` up to the newest step every rank has reported. Live, ranks report their
    steps as they finish them, some a step or two after their peers: a step that only part of
    a stage has reported yet would read as replicas that differ (workload imbalance)."""
    if work.is_empty():
        return work
    newest = work.group_by("rank").agg(pl.col("step").max())["step"].min()
    return work.filter(pl.col("step") <= newest)


def detect_work_findings(events: pl.DataFrame | None, roles: pl.DataFrame, *,
                         warmup_steps: int = _D.warmup_steps,
                         baseline_steps: int = _D.baseline_steps,
                         floor_ms: float = _D.work_floor_ms,
                         floor_share: float = _D.work_floor_share,
                         threshold: float = _D.cusum_threshold,
                         slack: float = _D.cusum_slack, persist: int = _D.persist_steps,
                         start_share: float = _D.work_start_share,
                         role_share: float = _D.role_share,
                         wander_share: float = _D.wander_share,
                         min_gain_share: float = _D.min_gain_share,
                         grace_steps: int = _D.grace_steps,
                         transient_steps: int = _D.transient_steps,
                         hosts: dict[int, str] | None = None,
                         work: pl.DataFrame | None = None) -> tuple[Finding, ...]:
    """Stragglers, structural and workload imbalance from the ranks' unblocked time.

    Args:
        events: Rows of one job (with ``async_op``); None with ``work`` (the what-if is
            then the step less the extra work, not a replay).
        roles: ``rank``, ``role`` (:meth:`~ringwatch.analyzers._layout.Layout.peers_frame`).
        warmup_steps: Leading steps (seen) left out.
        baseline_steps: Steps (seen) after the warm-up that give the noise and show a rank
            behind from the start.
        floor_ms, floor_share: Least noise: the larger of ``floor_ms`` and ``floor_share``
            of the job's median step (a job that quiet does not flag a tenth of a ms; a job
            of 2 ms steps is not judged on 2 ms).
        threshold, slack, persist: The CUSUM, as the lateness detector's: excess over the
            role's median above ``slack`` x noise in ``persist`` of the last ``persist + 1``
            steps, summed past ``threshold`` x noise.
        start_share: A rank over its role's median by more than ``threshold`` x noise in this
            share of the baseline steps is behind from the start.
        role_share: A role whose median work exceeds the other roles' by this share of the
            step (and ``threshold`` x noise) is the bottleneck by design.
        wander_share: Within a role, replicas whose work spreads (max minus min, median over
            steps) by this share of the step, with no replica on top far more often than
            chance would put it, and (with tensor-parallel groups) whose peers move together,
            are workload imbalance (:func:`_wandering`).
        min_gain_share: Least extra work of a straggler, as a share of the job's step.
        grace_steps: A straggler's episode ends once this many steps went by after its last
            step behind (before that an end cannot be told from a pause: still on); one
            behind again within them is the same episode (:func:`work_episodes`).
        transient_steps: An episode that ended within this many steps is a hiccup
            (:data:`~ringwatch.analyzers._stragglers.HICCUP_CLASS`), as the lateness
            detector's.
        hosts: ``rank -> host`` for the findings.
        work: :func:`compute_step_work`'s frame when it comes from elsewhere (the agents sum
            it per step for the live service).
    """
    work = compute_step_work(events) if work is None else work
    if work.is_empty():
        return ()
    hosts = hosts or {}
    work = work.join(roles, on="rank", how="left").with_columns(pl.col("role").fill_null(0))
    work = work.with_columns((pl.col("step").rank("dense") - 1).alias("_n"))
    work = work.filter(pl.col("_n") >= warmup_steps).with_columns(pl.col("_n") - warmup_steps)
    if work.is_empty():
        return ()
    step_ms = float(work["step_ms"].median())
    work = work.with_columns(
        pl.col("work_ms").median().over("step", "role").alias("_role_ms"),
        pl.len().over("step", "role").alias("_peers"))
    # against its peers' median: with one peer, the stage's median is the pair's mean, half
    # way to the rank itself
    work = work.with_columns(((pl.col("work_ms") - pl.col("_role_ms"))
                              * pl.when(pl.col("_peers") == 2).then(2.0).otherwise(1.0))
                             .alias("excess_ms"))
    head = work.filter((pl.col("_n") < baseline_steps) & (pl.col("_peers") > 1))
    # a robust spread (1.4826 x the median absolute deviation): a rank behind from the start
    # is in these steps too, and must not widen the noise it is judged against
    mad = head.select((pl.col("excess_ms") - pl.col("excess_ms").median()).abs().median()
                      ).item() if head.height > 1 else None
    noise = max(floor_ms, floor_share * step_ms, 0.0 if mad is None else 1.4826 * float(mad))
    out: list[Finding] = []
    named = set()
    for f in _behind(events, work, noise, threshold=threshold, slack=slack, persist=persist,
                     start_share=start_share, baseline_steps=baseline_steps, hosts=hosts,
                     least_ms=min_gain_share * step_ms, grace_steps=grace_steps,
                     transient_steps=transient_steps):
        named.add(f.ranks[0])
        out.append(f)
    out += _bottleneck_role(work, noise, step_ms, threshold=threshold, share=role_share,
                            hosts=hosts)
    # the replicas of a named straggler are left out whole (its tensor-parallel peers wait
    # for it: their work is not theirs to judge)
    gone = work.filter(pl.col("rank").is_in(list(named)))["replica"].unique().implode()
    out += _wandering(work.filter(~pl.col("replica").is_in(gone)), noise, step_ms,
                      share=wander_share, threshold=threshold, hosts=hosts)
    return tuple(out)


def _behind(events: pl.DataFrame, work: pl.DataFrame, noise: float, *, threshold: float,
            slack: float, persist: int, start_share: float, baseline_steps: int,
            hosts: dict[int, str], least_ms: float, grace_steps: int,
            transient_steps: int, min_steps: int = 8) -> list[Finding]:
    """Ranks whose work exceeds their role's: from the start, or since an onset (CUSUM);
    each of a rank's episodes (:func:`work_episodes`), one that ended with its last step (a
    hiccup where it lasted fewer than ``transient_steps``, as the lateness detector's)."""
    k, h = slack * noise, threshold * noise
    df = work.filter(pl.col("_peers") > 1).sort("rank", "step")
    if df.is_empty():
        return []
    steps_ms = work.group_by("step").agg(pl.col("step_ms").median())
    c = (pl.col("excess_ms").clip(upper_bound=step_cap(k, h, persist)) - k
         ).cum_sum().over("rank")
    df = df.with_columns(c.alias("_c"))
    df = df.with_columns((pl.col("_c") - pl.col("_c").cum_min().over("rank")
                          .clip(upper_bound=0.0)).alias("cusum_ms"),
                         (pl.col("excess_ms") > k).cast(pl.Int32)
                         .rolling_sum(persist + 1, min_samples=1).over("rank").alias("_hits"),
                         (pl.col("excess_ms") >= h).cast(pl.Int32)
                         .rolling_sum(persist, min_samples=1).over("rank").alias("_far"))
    # the few ranks behind at all, picked for the whole job at once (10,000 ranks: no loop)
    per = df.group_by("rank").agg(
        (pl.col("excess_ms") > h).filter(pl.col("_n") < baseline_steps).mean().alias("_early"),
        (pl.col("_n") < baseline_steps).sum().alias("_head"),
        (((pl.col("cusum_ms") >= h) & (pl.col("_hits") >= persist))
         | (pl.col("_far") >= persist)).any().alias("_hit"))
    behind = per.filter(((pl.col("_head") >= persist) & (pl.col("_early") >= start_share))
                        | pl.col("_hit"))["rank"]
    df = df.filter(pl.col("rank").is_in(behind.implode()))
    out = []
    for (rank,), mine in df.partition_by("rank", as_dict=True, maintain_order=True).items():
        steps, xs = mine["step"].to_list(), mine["excess_ms"].fill_null(0.0).to_list()
        head = mine.filter(pl.col("_n") < baseline_steps)
        early = head.height >= persist and (head["excess_ms"] > h).mean() >= start_share
        for ep in work_episodes(xs, k=k, h=h, persist=persist, grace=grace_steps,
                                from_start=persist - 1 if early else None):
            since, detected = steps[ep.since], steps[ep.detected]
            until = None if ep.until is None else steps[ep.until]
            last = steps[-1] if until is None else until
            run = mine.filter(pl.col("step").is_between(since, last))
            if until is None and run.height < min_steps:  # a few steps at the data's end:
                continue                                  # not yet a fault
            transient = until is not None and run.height < transient_steps
            extra = float(run["excess_ms"].median())
            now_ms = float(steps_ms.filter(pl.col("step").is_between(since, last))
                           ["step_ms"].median())
            if extra <= max(k, least_ms):  # real, but not worth a finding
                continue
            role = int(mine["role"][0])
            peers = int(mine["_peers"].max()) - 1
            peer_ranks = sorted(int(r) for r in work.filter((pl.col("role") == role)
                                                            & (pl.col("rank") != rank))
                                ["rank"].unique())
            how = ("from the job's first steps" if ep.since == 0 and early else
                   f"since step {since}") + ("" if until is None else f" to step {until}")
            out.append(Finding(
                kind="straggler", cls=HICCUP_CLASS if transient else "compute straggler",
                ranks=(int(rank),),
                hosts=(hosts[rank],) if rank in hosts else (), since_step=int(since),
                detected_step=int(detected), until_step=until,
                confidence=min(1.0, 0.5 + extra / (4 * threshold * noise)) * (
                    0.5 if transient else 1),
                gain_s_per_step=extra / 1e3,
                evidence=(f"rank {rank} worked {extra:.1f} ms per step longer than the median "
                          f"of its {peers} symmetric peer(s) (role {role}: same stage, same "
                          f"work by construction) {how} (job noise {noise:.1f} ms)",
                          "time not blocked in communication: its peers and pipeline "
                          "neighbours wait for it, it waits for no one",
                          *(() if ep.paused is None else (
                              f"on time after step {steps[ep.paused[0]]}, behind again from "
                              f"step {steps[ep.paused[1]]} (within {grace_steps} steps): one "
                              "episode, a disturbance hid it",)),
                          *(() if transient else (_what_if_line(
                              events, int(rank), peer_ranks, int(since), now_ms, extra,
                              until),)))))
    return out


@dataclass(frozen=True)
class Episode:
    """A rank's run of extra work, as indices into its steps: ``since`` (the onset),
    ``detected`` (the step that made it conclusive), ``until`` (its last step behind, None
    while it may still be on) and ``paused`` (``(last step behind, first one again)`` where a
    disturbance hid it for a while)."""

    since: int
    detected: int
    until: int | None
    paused: tuple[int, int] | None = None


def work_episodes(xs: list[float], *, k: float, h: float, persist: int, grace: int,
                  from_start: int | None = None, most: int = 16) -> list[Episode]:
    """A rank's episodes of extra work in its excess over its role (``xs``, one per step).

    Each is found by a one-sided CUSUM (Page's: excess above ``k`` summed past ``h``, with
    ``persist`` steps above ``k`` among the last ``persist + 1``) restarted after the previous
    episode; ``from_start`` (the index it is conclusive at) opens one at the first step. The
    onset is the lateness detector's (:func:`~ringwatch.analyzers._stragglers.late_since_index`):
    the late streak the sum ends with, then the change point of a shift of its size. An episode
    ends at its last step above ``k`` before ``persist + 1`` steps in a row at or below it;
    with fewer than ``grace`` steps after that end, or none, it is still on (an end cannot
    be told from a pause yet). One conclusive again within ``grace`` steps of the end is the
    same episode. At most ``most`` episodes.
    """
    out: list[Episode] = []
    pos = 0
    while pos < len(xs) and len(out) < most:
        if from_start is not None and pos == 0:
            since, detected = 0, from_start
        else:
            detected = _conclusive(xs, pos, k=k, h=h, persist=persist)
            if detected is None:
                break
            # the onset as the lateness detector reads it: the late streak the sum ends
            # with, then the change point of a shift of its size within it (not walked back
            # over noise)
            since = pos + late_since_index(xs[pos:detected + 1], k,
                                           xs[detected + 1:detected + 2 + persist])
        until = _last_behind(xs, detected, k=k, persist=persist)
        if until is not None and len(xs) - 1 - until < grace:
            until = None  # too few steps after it to tell an end from a pause
        prev = out[-1] if out else None
        if prev is not None and prev.until is not None and since - prev.until <= grace:
            out[-1] = Episode(prev.since, prev.detected, until, (prev.until, since))
        else:
            out.append(Episode(since, detected, until))
        if until is None:
            break
        pos = until + 1
    return out


def step_cap(k: float, h: float, persist: int) -> float:
    """The most one step's excess counts for in the sum: ``k + h / (2 persist)``, so that no
    fewer than ``2 persist`` steps behind make a straggler by the sum.

    Work on a shared host comes in bursts: a rank descheduled for a few steps works two or
    five times the noise longer in them, then as before (heavy tails, not the Gaussian noise
    the median absolute deviation measures). Summed whole, three such steps were conclusive;
    capped (a winsorised CUSUM), a burst counts as what it is, a few steps behind, while a
    rank behind step after step reaches the threshold as before, a few steps later. A rank
    far behind in ``persist`` steps in a row is conclusive sooner (:func:`_conclusive`)."""
    return k + h / (2 * persist)


def _conclusive(xs: list[float], pos: int, *, k: float, h: float,
                persist: int) -> int | None:
    """The first index from ``pos`` where the CUSUM started there (each step's excess capped
    at :func:`step_cap`) is conclusive, or that ends ``persist`` steps in a row each behind
    by ``h`` or more: each alone would be conclusive summed whole, and a burst on a shared
    host (a few steps, two to five noise units) is not that far behind that long."""
    cap = step_cap(k, h, persist)
    total, recent, far = 0.0, [], 0
    for i in range(pos, len(xs)):
        total = max(0.0, total + min(xs[i], cap) - k)
        recent = [*recent[-persist:], xs[i] > k]
        far = far + 1 if xs[i] >= h else 0
        if (total >= h and sum(recent) >= persist) or far >= persist:
            return i
    return None


def _last_behind(xs: list[float], detected: int, *, k: float, persist: int) -> int | None:
    """The last index from ``detected`` above ``k`` before ``persist + 1`` in a row at or
    below it; None where the data ends first."""
    last, calm = detected, 0
    for i in range(detected + 1, len(xs)):
        if xs[i] > k:
            last, calm = i, 0
        else:
            calm += 1
            if calm == persist + 1:
                return last
    return None


def _what_if_line(events: pl.DataFrame, rank: int, peers: list[int], since: int,
                  now_ms: float, extra: float, until: int | None = None) -> str:
    """The step time with the rank fixed: by replay of the steps' dependency graph
    (:mod:`ringwatch.analyzers._replay`), else the step less its extra work."""
    from ringwatch.analyzers._replay import before_clause, replay_fixed_step_ms

    fixed = None if events is None else replay_fixed_step_ms(events, rank, peers, since, until)
    span = "since then" if until is None else f"in steps {since}-{until}"
    before = "" if events is None else before_clause(events, since)
    if fixed is not None:
        return (f"the job's step took {now_ms:.0f} ms {span}; ~{fixed:.0f} ms with this "
                f"rank working like its peers (replay of the steps' dependencies){before}")
    return (f"the job's step took {now_ms:.0f} ms {span}; ~{now_ms - extra:.0f} ms with "
            f"this rank working like its peers (if every rank waits for all of it){before}")


def _bottleneck_role(work: pl.DataFrame, noise: float, step_ms: float, *, threshold: float,
                     share: float, hosts: dict[int, str]) -> list[Finding]:
    """The role whose work stays above the others' (by design: a heavier stage)."""
    # the role's least busy rank each step: a stage heavier by design is heavier on every
    # rank; one rank behind (a straggler) is not its stage's design
    per = work.group_by("step", "role").agg(pl.col("work_ms").min().alias("_w"))
    if per["role"].n_unique() < 2:
        return []
    per = per.with_columns(
        (pl.col("_w") - pl.col("_w").median().over("step")).alias("_over"))
    roles = per.group_by("role").agg(pl.col("_over").median(), pl.col("_w").median(),
                                     (pl.col("_over") > 0).mean().alias("_share"))
    top = roles.sort("_over", descending=True).row(0, named=True)
    others = float(roles.filter(pl.col("role") != top["role"])["_w"].median())
    extra = top["_w"] - others
    # balanced, every stage would do the stages' mean; the pipeline runs at its slowest's pace
    if top["_w"] <= 0:  # no stage did any work outside communication: nothing to compare
        return []
    gain_ms = step_ms * (top["_w"] - float(roles["_w"].mean())) / top["_w"]
    # a role's median over its ranks and steps is far steadier than one rank's step: the
    # noise counts for the role's size, the step share is the floor
    n_role = work.filter(pl.col("role") == top["role"])["rank"].n_unique()
    if extra < max(threshold * noise / max(1.0, n_role ** 0.5), share * step_ms) \
            or top["_share"] < 0.75:
        return []
    ranks = sorted(int(r) for r in work.filter(pl.col("role") == top["role"])["rank"].unique())
    return [Finding(
        kind="imbalance", cls="structural imbalance", ranks=tuple(ranks),
        hosts=tuple(dict.fromkeys(hosts[r] for r in ranks if r in hosts)),
        since_step=int(work["step"].min()), detected_step=int(work["step"].max()),
        confidence=min(1.0, extra / (2 * max(threshold * noise, share * step_ms))),
        gain_s_per_step=gain_ms / 1e3,
        evidence=(f"stage {top['role']} (ranks {_span(ranks)}) is the bottleneck: "
                  f"{top['_w']:.1f} ms of work per step against {others:.1f} ms on the other "
                  f"stages, +{extra:.1f} ms per step, in {top['_share']:.0%} of the steps",
                  f"the pipeline runs at its pace: balanced stages would take the step from "
                  f"{step_ms:.0f} to ~{step_ms - gain_ms:.0f} ms",
                  "every rank of the stage alike, from the first steps: more work by design "
                  "(the loss, an output layer, more layers); rebalance the layers"))]


def _wandering(work: pl.DataFrame, noise: float, step_ms: float, *, share: float,
               threshold: float, hosts: dict[int, str], min_f: float = 4.0) -> list[Finding]:
    """Roles whose replicas' work differs step to step, no one replica the one behind.

    With tensor-parallel groups (the ranks that share a batch), the test is how much more the
    work differs between replicas than within them, step by step (the variance ratio of a
    one-way analysis of variance, its median over steps at least ``min_f``): a batch that is
    longer makes every rank of its replica work longer alike, noise does not. Without them,
    on a pipeline, a replica is the chain of ranks that passes one batch from stage to stage,
    and the same test runs across stages (:func:`_chain_ratio`). Otherwise each rank is its
    own replica and the spread alone is judged. Either way the replicas' spread must be
    ``share`` of the step.
    """
    out = []
    df = work.filter(pl.col("_peers") > 1)
    chains: list[float | None] = []  # across stages, once, where a role needs it
    for (role,), rows in df.partition_by("role", as_dict=True, maintain_order=True).items():
        reps = rows.group_by("step", "replica").agg(
            pl.col("work_ms").mean().alias("_m"), pl.col("work_ms").var().alias("_v"),
            pl.len().alias("_k"))
        per = reps.group_by("step").agg(
            (pl.col("_m").max() - pl.col("_m").min()).alias("_spread"),
            (pl.col("_m").max() - pl.col("_m").mean()).alias("_lost"),
            (pl.col("_m").var() * pl.col("_k").first() / pl.col("_v").mean()).alias("_f"),
            pl.col("replica").sort_by("_m").last().alias("_top"))
        if per.height < 3 or reps["replica"].n_unique() < 2:
            continue
        spread, lost = float(per["_spread"].median()), float(per["_lost"].median())
        top_share = float(per["_top"].value_counts()["count"].max()) / per.height
        shared = bool((reps["_k"] > 1).all())
        if not shared and not chains:
            chains.append(_chain_ratio(df))
        f_ratio = float(per["_f"].drop_nulls().drop_nans().median() or 0.0) if shared \
            else chains[0]
        # judged on the step (and the replicas' agreement): the job's noise is this spread
        # no one replica behind: none on top much more often than chance would put it
        top_limit = min(0.9, 1 / reps["replica"].n_unique() + 0.3)
        if spread < share * step_ms or top_share >= top_limit or (
                f_ratio is not None and f_ratio < min_f):
            continue
        ranks = sorted(int(r) for r in rows["rank"].unique())
        why = (f"its tensor-parallel peers moved together ({f_ratio:.0f}x the variance "
               "between replicas as within)" if shared else
               f"each replica's ranks on every stage moved together ({f_ratio:.0f}x the "
               "variance between replicas as within)" if f_ratio is not None else
               "its ranks' work differed alike")
        out.append(Finding(
            kind="imbalance", cls="workload imbalance", ranks=tuple(ranks),
            hosts=tuple(dict.fromkeys(hosts[r] for r in ranks if r in hosts)),
            since_step=int(rows["step"].min()), detected_step=int(rows["step"].max()),
            confidence=min(1.0, spread / (2 * share * step_ms)),
            gain_s_per_step=lost / 1e3,
            evidence=(f"in stage {role} (ranks {_span(ranks)}) the busiest replica worked "
                      f"{spread:.1f} ms per step more than the least busy one (median over "
                      f"steps; {lost:.1f} ms over the mean, what the others wait), a "
                      f"different replica from step to step (none in more than "
                      f"{top_share:.0%} of the steps); {why}",
                      "data-dependent work (sequence lengths, expert routing): balance the "
                      "batches by tokens, not a rank to replace")))
    return out


def _chain_ratio(work: pl.DataFrame) -> float | None:
    """Without tensor-parallel groups, a pipeline's replica is its chain of ranks, one per
    stage: the variance ratio of :func:`_wandering` across stages, each rank's work taken
    from its stage's mean that step (a longer batch makes every stage of its replica work
    longer alike; noise on one host does not), its median over steps. None where a replica
    has fewer than two stages here."""
    d = work.with_columns((pl.col("work_ms") - pl.col("work_ms").mean().over("step", "role"))
                          .alias("_d"))
    reps = d.group_by("step", "replica").agg(
        pl.col("_d").mean().alias("_m"), pl.col("_d").var().alias("_v"), pl.len().alias("_k"))
    if reps.is_empty() or (reps["_k"] < 2).any() or reps["replica"].n_unique() < 2:
        return None
    per = reps.group_by("step").agg(
        (pl.col("_m").var() * pl.col("_k").first() / pl.col("_v").mean()).alias("_f"))
    return float(per["_f"].drop_nulls().drop_nans().median() or 0.0)


def _span(ranks: list[int]) -> str:
    from ringwatch._schema import format_ranks

    return format_ranks(ranks)
