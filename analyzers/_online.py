"""The analyzers over a stream of rows, with bounded memory: one job's online window.

:class:`OnlineWindow` keeps the newest ``keep_steps`` steps of a job's rows (a row seen again,
a pending collective that has finished since, replaces the older copy) and runs the same
pure analyzers as the post-mortem pass over them. What the post-mortem pass reads from the
job's first steps (each rank's usual delay, the job's noise, each group's usual bandwidth) is
taken once, when the first ``warmup_steps + baseline_steps`` steps are in, and kept: later
windows compare against the job's start, not against a window that may hold nothing but the
fault. Memory is the window (``keep_steps`` x the rows of a step) plus a row per rank and per
group; nothing grows with the job's length.

The caller owns the clock (``now_ns``) and the transport; the window does no I/O.
"""

from __future__ import annotations

import polars as pl

from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._hangs import detect_hangs
from ringwatch.analyzers._links import (
    compute_group_bandwidth,
    detect_slow_links,
    explain_by_links,
    usual_bandwidth,
)
from ringwatch.analyzers._stragglers import (
    compute_step_lateness,
    compute_straggler_scores,
    detect_stragglers,
    usual_delay,
)


class OnlineWindow:
    """One job's newest rows and the baselines of its first steps.

    Args:
        keep_steps: Steps kept (at least ``warmup_steps + baseline_steps``).
        warmup_steps, baseline_steps: As in the post-mortem analyzers.
        keep_unstepped: Rows without a step kept per rank (the newest).
    """

    def __init__(self, *, keep_steps: int = 64, warmup_steps: int = 2,
                 baseline_steps: int = 20, keep_unstepped: int = 256):
        if keep_steps < warmup_steps + baseline_steps:
            raise ValueError(f"keep_steps {keep_steps}: at least warmup_steps + "
                             f"baseline_steps ({warmup_steps + baseline_steps})")
        self.keep_steps, self.warmup_steps = keep_steps, warmup_steps
        self.baseline_steps, self.keep_unstepped = baseline_steps, keep_unstepped
        self.rows: pl.DataFrame | None = None
        self.usual_delay: pl.DataFrame | None = None  # rank, usual_ms
        self.noise_ms: float | None = None
        self.usual_bw: pl.DataFrame | None = None  # pg, usual_MBps
        self.baseline_until: int | None = None  # last step of the frozen baseline
        #: The first step seen: the baseline is the steps after it (a window opened on a job
        #: already at step 500 baselines on 500.., not on steps it never saw).
        self.first_step: int | None = None
        #: Structural imbalance, judged once on the baseline steps (a later window whose
        #: first steps are all after a fault's onset would call the fault "structural").
        self.imbalance: tuple[Finding, ...] = ()
        self.dropped_rows = 0

    def add(self, rows: pl.DataFrame) -> None:
        """Take new rows (any ranks, any order); a ``(rank, idx)`` seen before is replaced."""
        if rows.is_empty():
            return
        low = rows["step"].min()
        if low is not None and self.baseline_until is None:
            self.first_step = low if self.first_step is None else min(low, self.first_step)
        if self.rows is None:
            merged = rows
        else:
            merged = pl.concat([self.rows.join(rows.select("rank", "idx"), on=["rank", "idx"],
                                               how="anti"), rows], how="vertical_relaxed")
        self.rows = self._trim(merged.sort("rank", "idx"))
        self._freeze_baselines()

    def _trim(self, df: pl.DataFrame) -> pl.DataFrame:
        n = df.height
        top = df["step"].max()
        if top is not None:
            keep = (pl.col("step") > top - self.keep_steps) | (pl.col("status") == "pending")
            if self.baseline_until is None:  # the first steps are still needed
                keep = keep | (pl.col("step") <= (self.first_step or 0) + self.warmup_steps
                               + self.baseline_steps)
            unstepped = pl.col("step").is_null() & (
                pl.int_range(pl.len()).reverse().over("rank") < self.keep_unstepped)
            df = df.filter(keep.fill_null(False) | unstepped)
        self.dropped_rows += n - df.height
        return df

    def _freeze_baselines(self) -> None:
        if self.baseline_until is not None or self.rows is None:
            return
        first = self.first_step or 0
        last = first + self.warmup_steps + self.baseline_steps - 1
        top = self.rows["step"].max()
        if top is None or top <= last:  # wait until every rank is past the baseline
            return
        if self.rows.group_by("rank").agg(pl.col("step").max())["step"].min() <= last:
            return
        head = self.rows.filter(pl.col("step") <= last)
        # the analyzers count their warm-up from step 0: shift the head so it starts there
        lat = compute_step_lateness(head).with_columns(pl.col("step") - first)
        scores = compute_straggler_scores(lat, warmup_steps=self.warmup_steps,
                                          baseline_steps=self.baseline_steps)
        if scores.is_empty():
            return
        self.noise_ms = float(scores["noise_ms"][0])
        base = scores.filter(pl.col("step") < self.warmup_steps + self.baseline_steps)
        self.usual_delay = usual_delay(base)
        self.imbalance = tuple(
            f for f in detect_stragglers(head, warmup_steps=self.warmup_steps,
                                         baseline_steps=self.baseline_steps)
            if f.kind == "imbalance")
        self.usual_bw = usual_bandwidth(
            compute_group_bandwidth(head).with_columns(pl.col("step") - first),
            baseline_steps=self.baseline_steps)
        self.baseline_until = last

    def findings(self, *, now_ns: int, last_seen_ns: dict[int, int] | None = None,
                 min_stall_s: float | None = None) -> tuple[Finding, ...]:
        """Every analyzer over the window, as of ``now_ns``."""
        if self.rows is None:
            return ()
        ev = self.rows
        out = detect_hangs(ev, now_ns=now_ns, last_seen_ns=last_seen_ns,
                           min_stall_s=min_stall_s)
        if self.baseline_until is None:
            return out  # not enough steps yet for a usual, nor to call anything structural
        stragglers = tuple(f for f in detect_stragglers(
            ev, warmup_steps=self.warmup_steps, baseline_steps=self.baseline_steps,
            usual=self.usual_delay, noise_ms=self.noise_ms) if f.kind != "imbalance")
        stragglers += self.imbalance
        links = detect_slow_links(ev, baseline_steps=self.baseline_steps, usual=self.usual_bw)
        return out + explain_by_links(stragglers, links)


__all__ = ["OnlineWindow"]
