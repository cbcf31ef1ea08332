"""Throttling as a root cause: a straggler whose GPU was held down while it was late.

A rank that computes longer than its peers may do so because its GPU ran slower: clocks held
down by its power cap, by heat, or by the board. NVML says so in two ways, both in a recording:
the cumulative violation counters (time held down, per reason, at ~1 Hz) and the SM clock (at
~20 Hz). For each straggler (not a hiccup, not structural imbalance) its late steps
(``since_step`` to ``until_step`` or the end) are mapped to wall-clock time on its rank, and
its GPU's figures there are compared with the same GPU before it fell behind and with its
peers' GPUs over the same time:

- *held down*: its power or thermal violation time is at least ``throttled_share`` of the
  late span and at least twice its peers' median there (GPUs all held down alike slow every
  rank alike: no cause of one straggler);
- *clocks down*: its median SM clock in the late span is at least ``clock_drop`` under its own
  median before, and its peers' clocks did not fall by half as much.

Either makes it a ``throttled straggler`` (:data:`~ringwatch.analyzers._stragglers.THROTTLED_CLASS`)
with the figures as evidence; otherwise the finding is returned as it was.
"""

from __future__ import annotations

from dataclasses import replace

import polars as pl

from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._power_headroom import (
    DEFAULT_THRESHOLDS,
    PowerThresholds,
    compute_throttle,
)
from ringwatch.analyzers._power_phase import compute_rank_phases, rank_gpus
from ringwatch.analyzers._stragglers import HICCUP_CLASS, THROTTLED_CLASS


def _clock(fast: pl.DataFrame, host: str, gpu: int, a: int, b: int) -> float | None:
    v = fast.filter((pl.col("host") == host) & (pl.col("gpu") == gpu)
                    & pl.col("t_ns").is_between(a, b))["sm_clock_mhz"].drop_nulls()
    return float(v.median()) if len(v) else None


def _held(slow: pl.DataFrame, host: str, gpu: int, a: int, b: int) -> dict[str, float]:
    t = compute_throttle(slow.filter((pl.col("host") == host) & (pl.col("gpu") == gpu)),
                         start_ns=a, end_ns=b)
    if t.is_empty() or not t["window_s"][0]:
        return {}
    return {k: t[f"{k}_share"][0] for k in ("power", "thermal")
            if t[f"{k}_share"][0] is not None}


def gpu_throttle_evidence(fast: pl.DataFrame, slow: pl.DataFrame, host: str, gpu: int,
                          late: tuple[int, int], before: tuple[int, int] | None,
                          peers: list[tuple[str, int]], *,
                          thresholds: PowerThresholds = DEFAULT_THRESHOLDS
                          ) -> tuple[str, ...]:
    """Evidence lines that GPU ``host/gpu`` was held down over ``late`` (wall ns), or ``()``.

    Args:
        fast, slow: The power frames (:func:`~ringwatch.analyzers._power.recording_frames`).
        late: The late steps' span; ``before``: a span of the same GPU before them.
        peers: The other ranks' GPUs, compared over ``late``.
    """
    lines = []
    own = _held(slow, host, gpu, *late)
    peer_held = [_held(slow, h, g, *late) for h, g in peers]
    for reason in ("power", "thermal"):
        v = own.get(reason)
        if v is None:
            continue
        others = sorted(p.get(reason) or 0.0 for p in peer_held)
        med = others[len(others) // 2] if others else 0.0
        if v >= thresholds.throttled_share and v >= 2 * med:
            lines.append(f"GPU {host}/{gpu} held down for {reason} {v:.0%} of its late steps' "
                         f"time (peers' median {med:.0%}; NVML violation counter)")
    now = _clock(fast, host, gpu, *late)
    usual = _clock(fast, host, gpu, *before) if before else None
    if now is not None and usual:
        drop = 1 - now / usual
        peer_drops = []
        for h, g in peers:
            pn = _clock(fast, h, g, *late)
            pu = _clock(fast, h, g, *before) if before else None
            if pn is not None and pu:
                peer_drops.append(1 - pn / pu)
        med = sorted(peer_drops)[len(peer_drops) // 2] if peer_drops else 0.0
        if drop >= thresholds.clock_drop and med < drop / 2:
            lines.append(f"its SM clock fell to {now:.0f} MHz from {usual:.0f} MHz "
                         f"({drop:.0%} down; peers' median {med:.0%})")
    return tuple(lines)


def attribute_throttling(findings: tuple[Finding, ...], events: pl.DataFrame,
                         fast: pl.DataFrame, slow: pl.DataFrame, *,
                         thresholds: PowerThresholds = DEFAULT_THRESHOLDS,
                         gpu_of: dict[int, tuple[str, int]] | None = None,
                         warmup_steps: int = 2,
                         synthetic: bool = False) -> tuple[Finding, ...]:
    """``findings`` with each straggler whose GPU was held down during its late steps made a
    ``throttled straggler``, its evidence extended (module docstring); the rest unchanged.

    Args:
        findings: The straggler analyzer's (or any) findings.
        events: The job's rows.
        fast, slow: Power frames covering the job's nodes.
        thresholds: ``throttled_share`` and ``clock_drop``.
        gpu_of: ``rank -> (host, gpu)`` where a rank's GPU is not its ``local_rank``.
        warmup_steps: Steps left out of the "before" span.
        synthetic: The power frames were generated: every evidence line added says so.
    """
    targets = [f for f in findings if f.kind == "straggler" and f.cls != HICCUP_CLASS
               and f.since_step is not None and len(f.ranks) == 1]
    if not targets:
        return findings
    phases = compute_rank_phases(events)
    gpus = {r: (h, g) for r, h, g in rank_gpus(events, gpu_of).iter_rows()}
    out = []
    for f in findings:
        if f not in targets or f.ranks[0] not in gpus:
            out.append(f)
            continue
        r = f.ranks[0]
        mine = phases.filter(pl.col("rank") == r)
        last = f.until_step if f.until_step is not None else mine["step"].max()
        late = mine.filter(pl.col("step").is_between(f.since_step, last))
        prior = mine.filter(pl.col("step").is_between(warmup_steps, f.since_step - 1))
        if late.is_empty():
            out.append(f)
            continue
        span = (int(late["t_start_ns"].min()), int(late["t_end_ns"].max()))
        before = None if prior.is_empty() else (int(prior["t_start_ns"].min()),
                                                int(prior["t_end_ns"].max()))
        peers = [v for k, v in gpus.items() if k != r and v != gpus[r]]
        lines = gpu_throttle_evidence(fast, slow, *gpus[r], span, before, peers,
                                      thresholds=thresholds)
        if synthetic:
            lines = tuple(f"{x} (synthetic data)" for x in lines)
        out.append(replace(f, cls=THROTTLED_CLASS, evidence=(*f.evidence, *lines))
                   if lines else f)
    return tuple(out)


__all__ = ["attribute_throttling", "gpu_throttle_evidence"]
