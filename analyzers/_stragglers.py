"""Stragglers: the rank every other rank waits for, found from durations alone.

At a blocking collective the members leave together, so the last to arrive spends the least
time inside: a rank's *wait* at one collective is its duration minus the shortest duration
among the members, and the rank with the shortest is the last arrival. Both need no clock
shared across hosts. Per rank and step the waits are merged on the rank's own monotonic clock
(overlapping DDP buckets count once).

A straggler arrives last at most collectives while its peers wait for it, and keeps doing so
over a sliding window of steps (persistence), so one slow step is not a finding. One that
stands out from the first analysed step is *structural imbalance* (more work by design: a
pipeline stage, a bigger shard); one that starts later is a *compute straggler* (a fault).
A rank made late by its own slow transfers (the far end of a throttled link) leaves each
collective last, which is why it arrives last at the next; with ``exit_lag`` (wall clocks good
enough to compare exits: one machine, or hosts in sync) such a rank is not reported.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import polars as pl

from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._steps import _merged_ns


def compute_step_lateness(events: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, step), clock-free wait and last arrivals.

    Args:
        events: Rows of one job; only finished collectives (``ok``, with a duration) that
            every member of the group recorded, with a step, are used.

    Returns:
        Columns ``rank``, ``host``, ``step``, ``collectives``, ``wait_ns`` (time spent waiting
        for the last member, from durations), ``last_arrivals`` (collectives where this rank
        had the shortest duration), ``exit_lag_ns`` (median of how long after the first
        member this rank left, on the wall clock), sorted by step then rank.
    """
    key = ["pg", "seq"]
    df = (events.filter(~pl.col("is_p2p") & (pl.col("status") == "ok")
                        & pl.col("step").is_not_null() & pl.col("seq").is_not_null()
                        & pl.col("duration_ns").is_not_null()
                        & pl.col("mono_start_ns").is_not_null())
          .with_columns(pl.len().over(key).alias("_n"),
                        pl.col("duration_ns").min().over(key).alias("_min"),
                        (pl.col("t_end_ns") - pl.col("t_end_ns").min().over(key))
                        .alias("_exit"))
          .filter(pl.col("_n") == pl.col("pg_size"))
          .with_columns((pl.col("mono_start_ns") + pl.col("duration_ns") - pl.col("_min"))
                        .alias("_wait_end")))
    wait = _merged_ns(df.sort("rank", "step", "mono_start_ns"), "mono_start_ns", "_wait_end",
                      ["rank", "step"]).rename({"merged_ns": "wait_ns"})
    per = df.group_by("rank", "step").agg(
        pl.col("host").first(), pl.len().alias("collectives"),
        (pl.col("duration_ns") == pl.col("_min")).sum().alias("last_arrivals"),
        pl.col("_exit").median().alias("exit_lag_ns"))
    return per.join(wait, on=["rank", "step"]).select(
        "rank", "host", "step", "collectives", "wait_ns", "last_arrivals", "exit_lag_ns",
    ).sort("step", "rank")


@dataclass(frozen=True)
class WindowVerdict:
    """Who stood out in the window of steps ending at ``step`` (None: nobody)."""

    step: int
    rank: int | None
    share: float
    wait_ms: float
    peers_wait_ms: float


def _window(lat: pl.DataFrame, lo: int, hi: int, *, min_share: float,
            min_peer_wait_ms: float, exit_share: float | None) -> WindowVerdict:
    win = lat.filter(pl.col("step").is_between(lo, hi))
    per = win.group_by("rank").agg(
        (pl.col("wait_ns").median() / 1e6).alias("w"),
        (pl.col("last_arrivals").sum() / pl.col("collectives").sum()).alias("share"),
        (pl.col("exit_lag_ns").median() / 1e6).alias("x"))
    if per.height < 2:
        return WindowVerdict(hi, None, 0.0, 0.0, 0.0)
    rows = {r["rank"]: r for r in per.iter_rows(named=True)}
    late = min(rows, key=lambda r: rows[r]["w"])
    peers = statistics.median(v["w"] for r, v in rows.items() if r != late)
    me = rows[late]
    ok = (me["share"] >= min_share and peers >= min_peer_wait_ms and me["w"] < 0.5 * peers)
    if ok and exit_share is not None and me["x"] is not None:
        peers_x = statistics.median(v["x"] for r, v in rows.items()
                                    if r != late and v["x"] is not None)
        ok = me["x"] - peers_x < exit_share * peers
    return WindowVerdict(hi, late if ok else None, me["share"], me["w"], peers)


def _onset(lat: pl.DataFrame, rank: int, lo: int, hi: int) -> int:
    """First step in ``lo..hi`` from which ``rank`` waits less than half its peers' median
    two steps running (``hi`` if never)."""
    w = lat.filter(pl.col("step").is_between(lo, hi))
    peers = w.filter(pl.col("rank") != rank).group_by("step").agg(pl.col("wait_ns").median())
    me = w.filter(pl.col("rank") == rank).select("step", pl.col("wait_ns").alias("me"))
    flags = (me.join(peers, on="step").sort("step")
             .select("step", (pl.col("me") < 0.5 * pl.col("wait_ns")).alias("f")))
    steps, f = flags["step"].to_list(), flags["f"].to_list()
    for i in range(len(f) - 1):
        if f[i] and f[i + 1]:
            return steps[i]
    return hi


def detect_stragglers(events: pl.DataFrame, *, window_steps: int = 10, persist: int = 3,
                      warmup_steps: int = 2, min_share: float = 0.5,
                      min_peer_wait_ms: float = 3.0,
                      exit_lag: bool = True, exit_share: float = 0.25) -> tuple[Finding, ...]:
    """Ranks that their peers wait for, window after window.

    Args:
        events: Rows of one job.
        window_steps: Steps per sliding window.
        persist: Consecutive windows a rank must stand out in to be reported.
        warmup_steps: Leading steps left out (DDP's first steps differ).
        min_share: Share of its collectives a straggler must arrive last at.
        min_peer_wait_ms: Median wait per step its peers must have.
        exit_lag: Rule out ranks late from their own slow transfers by comparing exit times
            on the wall clock (off when the hosts' clocks are not in sync).
        exit_share: How much later than its peers (as a share of their wait) a straggler may
            leave collectives.

    Returns:
        At most one :class:`Finding` per rank: ``imbalance`` when it stood out from the first
        window, ``straggler`` (class ``compute straggler``) when it started later;
        ``since_step`` is where its run of windows starts and ``gain_s_per_step`` is its peers'
        median wait per step there (what the job would save if it arrived like them).
    """
    lat = compute_step_lateness(events).filter(pl.col("step") >= warmup_steps)
    if lat.is_empty():
        return ()
    steps = sorted(set(lat["step"].to_list()))
    first = steps[0]
    verdicts = [_window(lat, s - window_steps + 1, s, min_share=min_share,
                        min_peer_wait_ms=min_peer_wait_ms,
                        exit_share=exit_share if exit_lag else None)
                for s in steps if s - window_steps + 1 >= first]
    hosts = dict(lat.select("rank", "host").unique("rank").iter_rows())
    findings: dict[int, Finding] = {}
    run: list[WindowVerdict] = []
    for v in verdicts + [WindowVerdict(-1, None, 0.0, 0.0, 0.0)]:
        if run and v.rank == run[0].rank:
            run.append(v)
            continue
        if run and len(run) >= persist and run[0].rank not in findings:
            r = run[0].rank
            from_start = run[0].step - window_steps + 1 <= first
            start = first if from_start else _onset(lat, r, run[0].step - window_steps + 1,
                                                    run[0].step)
            gain = statistics.median(w.peers_wait_ms for w in run) / 1e3
            findings[r] = Finding(
                kind="imbalance" if from_start else "straggler",
                cls="structural imbalance" if from_start else "compute straggler",
                ranks=(r,), hosts=(hosts.get(r),) if hosts.get(r) else (),
                confidence=min(1.0, len(run) / (2 * persist)),
                since_step=start, gain_s_per_step=gain,
                detected_step=run[min(persist, len(run)) - 1].step,
                evidence=(f"rank {r} arrived last at {run[0].share:.0%} of collectives in "
                          f"steps {start}-{run[0].step}; its peers waited "
                          f"{run[0].peers_wait_ms:.1f} ms per step, it waited "
                          f"{run[0].wait_ms:.1f} ms",
                          f"stood out in {len(run)} consecutive windows of {window_steps} "
                          f"steps (steps {start}-{run[-1].step})",
                          "from the first analysed step: more work by design, or a straggler "
                          "from the start" if from_start else
                          f"not before step {start}: a change on this rank"))
        run = [v] if v.rank is not None else []
    return tuple(sorted(findings.values(), key=lambda f: f.since_step or 0))
