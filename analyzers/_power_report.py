"""Everything the power analyzers say about a set of NVML samples (and, when given, the job
that ran on them), in one frozen result: what ``ringwatch power`` prints and a report can draw.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._power import (
    GpuSampling,
    compute_energy_intervals,
    compute_power_grid,
    compute_sampling,
)
from ringwatch.analyzers._power_headroom import (
    DEFAULT_THRESHOLDS,
    PowerThresholds,
    compute_headroom,
    compute_throttle,
    compute_window_headroom,
    detect_power_headroom,
    grid_phases,
)
from ringwatch.analyzers._power_phase import (
    compute_rank_phases,
    compute_step_energy,
    fit_phase_power,
    rank_gpus,
    summarize_phase_power,
)
from ringwatch.analyzers._power_swing import Swing, compute_swing, job_step_spans
from ringwatch.analyzers._power_whatif import (
    CapCost,
    Oversubscription,
    check_cap_model,
    estimate_cap_cost,
    estimate_oversubscription,
)

#: The default budget of the oversubscription estimate: this many nodes at nameplate.
NAMEPLATE_NODES = 100


@dataclass(frozen=True)
class PowerReport:
    """The power analysis of one set of samples.

    Attributes:
        synthetic: The samples were generated, not measured (said in every output).
        sampling: Per GPU, how it was sampled (:class:`GpuSampling`).
        headroom: :func:`compute_headroom` rows.
        headroom_window: :func:`compute_window_headroom` rows (the worst ``window_s``).
        window_s: The window of ``headroom_window``.
        throttle: :func:`compute_throttle` rows.
        swing: Per node and for the job (:class:`Swing`).
        phases: ``rank``/``node``/``job`` frames of :func:`summarize_phase_power` and
            ``fit`` (:func:`fit_phase_power`); empty without a job.
        cap: The cap what-if, when a cap was asked for (or the model at 90% of the
            limit where none was).
        cap_fit: The same from each rank's fitted phase levels (:func:`fit_phase_power`).
        cap_check: :func:`check_cap_model` rows (empty without a job).
        oversubscription: The POLCA-style estimate from the first node's power.
        findings: ``power_headroom`` findings (and, from the caller, throttled stragglers).
    """

    synthetic: bool
    sampling: tuple[GpuSampling, ...]
    headroom: pl.DataFrame
    headroom_window: pl.DataFrame
    window_s: float
    throttle: pl.DataFrame
    swing: tuple[Swing, ...]
    phases: dict[str, pl.DataFrame]
    cap: CapCost | None
    cap_fit: CapCost | None
    cap_check: pl.DataFrame
    oversubscription: Oversubscription | None
    findings: tuple[Finding, ...]

    def to_dict(self) -> dict:
        """Plain JSON-able form (frames as lists of rows)."""
        def rows(df: pl.DataFrame) -> list[dict]:
            return df.to_dicts()

        return {"synthetic": self.synthetic,
                "sampling": [asdict(s) for s in self.sampling],
                "headroom": rows(self.headroom), "throttle": rows(self.throttle),
                "headroom_window": rows(self.headroom_window), "window_s": self.window_s,
                "swing": [asdict(s) for s in self.swing],
                "phases": {k: rows(v) for k, v in self.phases.items()},
                "cap": asdict(self.cap) if self.cap else None,
                "cap_fit": asdict(self.cap_fit) if self.cap_fit else None,
                "cap_check": rows(self.cap_check),
                "oversubscription": asdict(self.oversubscription)
                if self.oversubscription else None,
                "findings": [f.to_dict() for f in self.findings]}


def analyze_power(fast: pl.DataFrame, slow: pl.DataFrame, events: pl.DataFrame | None = None,
                  *, synthetic: bool = False, thresholds: PowerThresholds = DEFAULT_THRESHOLDS,
                  cap_w: float | None = None, budget_w: float | None = None,
                  window_s: float = 60.0,
                  gpu_of: dict[int, tuple[str, int]] | None = None) -> PowerReport:
    """Run every power analyzer over ``fast``/``slow`` (and ``events``, the job's rows, for
    the phase-resolved figures).

    Args:
        fast, slow: :func:`~ringwatch.analyzers._power.recording_frames` (several nodes
            concatenated).
        events: The job's rows, or None for the samples alone.
        synthetic: Label every output synthetic.
        thresholds: The power family's settings.
        cap_w: Per-GPU cap of the what-if (default: 90% of the lowest enforced limit).
        budget_w: Budget of the oversubscription estimate (default: :data:`NAMEPLATE_NODES`
            nodes at their summed limits).
        window_s: Window of the worst-window headroom (s).
        gpu_of: ``rank -> (host, gpu)`` where a rank's GPU is not its ``local_rank``.
    """
    sampling = compute_sampling(fast)
    grid = compute_power_grid(fast, sampling=sampling)
    throttle = compute_throttle(slow)
    intervals = compute_energy_intervals(fast)
    phases: dict[str, pl.DataFrame] = {}
    spans = None
    gmask = None
    cap_check = pl.DataFrame()
    step_energy = None
    if events is not None and not events.is_empty():
        rp = compute_rank_phases(events)
        spans = job_step_spans(rp)
        gmask = grid_phases(grid, events, rank_gpus(events, gpu_of))
        step_energy = compute_step_energy(intervals, events, gpu_of=gpu_of)
        if not step_energy.is_empty():
            phases = summarize_phase_power(step_energy)
            phases["fit"] = fit_phase_power(intervals, events, gpu_of=gpu_of)
    headroom = compute_headroom(grid, slow, thresholds=thresholds, fast=fast, phases=gmask)
    limits = {(h, g): w / 1e3 for h, g, w in slow.group_by("host", "gpu").agg(
        pl.col("power_limit_enforced_mw").min()).drop_nulls().iter_rows()}
    cap = cap_fit = None
    if step_energy is not None and not step_energy.is_empty():
        cap_check = check_cap_model(step_energy, slow, fast,
                                    tolerance=thresholds.min_headroom_share)
        if cap_w is None and limits:
            cap_w = 0.9 * min(limits.values())
        if cap_w is not None:
            cap = estimate_cap_cost(step_energy, cap_w)
            if "fit" in phases:
                cap_fit = estimate_cap_cost(step_energy, cap_w, levels=phases["fit"])
    swing = compute_swing(grid, step_spans=spans, thresholds=thresholds)
    over = None
    nodes = [s for s in swing if s.scope == "node"]
    if nodes and grid.height:
        host = nodes[0].name
        cols = [c for c in grid.columns if c != "t_ns" and c.rsplit("/", 1)[0] == host]
        node_power = grid.select(pl.sum_horizontal(cols)).to_series().to_numpy()
        node_limit = sum(limits.get((host, int(c.rsplit("/", 1)[1])), np.nan) for c in cols)
        node_limit = None if np.isnan(node_limit) else node_limit
        if len(nodes) > 1:  # correlation between nodes where there are several
            mat = np.vstack([grid.select(pl.sum_horizontal(
                [c for c in grid.columns if c.rsplit("/", 1)[0] == n.name])).to_series()
                .to_numpy() for n in nodes])
            c = np.corrcoef(mat)
            rho = float(np.nanmean(c[np.triu_indices_from(c, 1)]))
        else:
            rho = nodes[0].correlation if nodes[0].correlation is not None else 1.0
        budget = budget_w or (NAMEPLATE_NODES * (node_limit or float(node_power.max())))
        over = estimate_oversubscription(node_power, rho=rho, budget_w=budget,
                                         epsilon=thresholds.epsilon, node_limit_w=node_limit)
    findings = detect_power_headroom(headroom, throttle, thresholds=thresholds,
                                     synthetic=synthetic)
    window = compute_window_headroom(grid, slow, window_s=window_s, thresholds=thresholds)
    return PowerReport(synthetic=synthetic, sampling=sampling, headroom=headroom,
                       headroom_window=window, window_s=window_s, throttle=throttle,
                       swing=swing, phases=phases, cap=cap, cap_fit=cap_fit,
                       cap_check=cap_check, oversubscription=over, findings=findings)


__all__ = ["NAMEPLATE_NODES", "PowerReport", "analyze_power"]
