"""Stragglers: the rank every other rank waits for, found from durations alone.

At a blocking collective the members leave together, so the last to arrive spends the least
time inside: a rank's *wait* at one collective is its duration minus the shortest duration
among the members, and the rank with the shortest is the last arrival. Both need no clock
shared across hosts. Per rank and step the waits are merged on the rank's own monotonic clock
(overlapping DDP buckets count once).

A step *points at* a rank when that rank waited least, less than ``own_share`` of its peers'
median wait, and the peers waited ``min_peer_wait_ms`` or more. A straggler is a rank pointed
at in ``persist`` consecutive steps (so one slow step is not a finding) while its peers wait
``ratio`` times longer than they did in the steps before (a change, not the usual jitter). A
rank pointed at in most of the job's first ``baseline_steps`` steps is
*structural imbalance* (more work by design: a pipeline stage, a bigger shard), not a fault.
A rank made late by its own slow transfers (the far end of a throttled link) also leaves each
collective last: its durations are not the shortest, so it is not pointed at.
"""

from __future__ import annotations

import statistics

import polars as pl

from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._steps import _complete_collectives, _merged_ns


def compute_step_lateness(events: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, step), clock-free wait and last arrivals.

    Args:
        events: Rows of one job; only finished collectives (``ok``, with a duration) that
            every member of the group recorded, with a step, are used.

    Returns:
        Columns ``rank``, ``host``, ``step``, ``collectives``, ``wait_ns`` (time spent waiting
        for the last member, from durations) and ``last_arrivals`` (collectives where this
        rank had the shortest duration), sorted by step then rank.
    """
    df = _complete_collectives(
        events.filter((pl.col("status") == "ok") & pl.col("step").is_not_null()
                      & pl.col("duration_ns").is_not_null()
                      & pl.col("mono_start_ns").is_not_null()),
        pl.col("duration_ns").min().alias("_min"))
    df = df.with_columns((pl.col("mono_start_ns") + pl.col("duration_ns") - pl.col("_min"))
                         .alias("_wait_end"))
    wait = _merged_ns(df.sort("rank", "step", "mono_start_ns"), "mono_start_ns", "_wait_end",
                      ["rank", "step"]).rename({"merged_ns": "wait_ns"})
    per = df.group_by("rank", "step").agg(
        pl.col("host").first(), pl.len().alias("collectives"),
        (pl.col("duration_ns") == pl.col("_min")).sum().alias("last_arrivals"))
    return per.join(wait, on=["rank", "step"]).select(
        "rank", "host", "step", "collectives", "wait_ns", "last_arrivals",
    ).sort("step", "rank")


def _pointed(lat: pl.DataFrame, *, own_share: float,
             min_peer_wait_ms: float) -> list[tuple[int, int | None, float, float]]:
    """Per step (ascending): ``(step, rank it points at or None, that rank's wait ms, its
    peers' median wait ms)``."""
    out = []
    for (step,), g in sorted(lat.group_by("step"), key=lambda kv: kv[0][0]):
        w = dict(zip(g["rank"].to_list(), (g["wait_ns"] / 1e6).to_list(), strict=True))
        if len(w) < 2:
            continue
        late = min(w, key=w.get)
        peers = statistics.median(v for r, v in w.items() if r != late)
        hit = w[late] < own_share * peers and peers >= min_peer_wait_ms
        out.append((step, late if hit else None, w[late], peers))
    return out


def detect_stragglers(events: pl.DataFrame, *, persist: int = 3, baseline_steps: int = 20,
                      ratio: float = 1.3, own_share: float = 0.5,
                      min_peer_wait_ms: float = 3.0,
                      warmup_steps: int = 2) -> tuple[Finding, ...]:
    """Ranks their peers wait for, step after step.

    Args:
        events: Rows of one job.
        persist: Consecutive steps a rank must be pointed at.
        baseline_steps: Steps before a run that give the peers' usual wait.
        ratio: How much longer than usual the peers must wait during the run.
        own_share: A pointed-at rank waits less than this share of its peers' median wait.
        min_peer_wait_ms: Peers' median wait per step for a step to point at anyone.
        warmup_steps: Leading steps left out (DDP's first steps differ).

    Returns:
        At most one :class:`Finding` per rank, in order of onset: ``imbalance`` (class
        ``structural imbalance``) or ``straggler`` (class ``compute straggler``), with
        ``since_step`` (first step of the run), ``detected_step`` (the step that completed
        it) and ``gain_s_per_step`` (its peers' median wait per step in the run: what the job
        would save per step if it arrived like them).
    """
    lat = compute_step_lateness(events).filter(pl.col("step") >= warmup_steps)
    if lat.is_empty():
        return ()
    hosts = dict(lat.select("rank", "host").unique("rank").iter_rows())
    steps = _pointed(lat, own_share=own_share, min_peer_wait_ms=min_peer_wait_ms)
    findings: dict[int, Finding] = {}
    i = 0
    while i + persist <= len(steps):
        run = steps[i: i + persist]
        r = run[0][1]
        if r is None or r in findings or any(x[1] != r for x in run):
            i += 1
            continue
        # Pointed at in most of the job's first steps: there from the start, by design.
        first = steps[:baseline_steps]
        designed = i == 0 or sum(x[1] == r for x in first) >= len(first) / 2
        # The peers' usual wait: the steps before the run that did not point at this rank.
        before = [x for x in steps[:i] if x[1] != r][-baseline_steps:]
        usual = statistics.median(x[3] for x in before) if before else 0.0
        if not designed and any(x[3] < ratio * usual for x in run):
            i += 1
            continue
        peers = statistics.median(x[3] for x in run)
        mine = statistics.median(x[2] for x in run)
        start = steps[0][0] if designed else run[0][0]
        evidence = [f"rank {r} waited least in steps {run[0][0]}-{run[-1][0]}: "
                    f"{mine:.1f} ms per step, its peers {peers:.1f} ms"]
        if designed or not before:
            evidence.append("from the job's first steps: more work by design, or a "
                            "straggler from the start")
        else:
            evidence.append(f"its peers usually waited {usual:.1f} ms per step (steps "
                            f"{before[0][0]}-{before[-1][0]}): a change on this rank")
        findings[r] = Finding(
            kind="imbalance" if designed else "straggler",
            cls="structural imbalance" if designed else "compute straggler",
            ranks=(r,), hosts=(hosts[r],) if hosts.get(r) else (),
            confidence=min(1.0, peers / (2 * min_peer_wait_ms)),
            since_step=start, detected_step=run[-1][0], gain_s_per_step=peers / 1e3,
            evidence=tuple(evidence))
        i += persist
    return tuple(sorted(findings.values(), key=lambda f: f.since_step or 0))
