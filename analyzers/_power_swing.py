"""Swing and synchrony: how hard and how fast the summed power of a node or a job moves.

Over the shared power grid (:func:`~ringwatch.analyzers._power.compute_power_grid`), per node
and for the job (the sum of its GPUs' columns):

- peak-to-trough: the highest minus the lowest cell, over the window and per step (a step
  needs at least two cells to have one);
- ramp rate: the change between consecutive cells over the cell (W/s), its largest rise and
  fall and its 99th percentile of magnitude;
- band power: the share of the power's variance, and its RMS (W), within ``band_hz`` (0.1 to
  2 Hz by default), cut at the grid's Nyquist frequency and at the slowest frequency with
  ``min_band_cycles`` cycles in the data; a band wholly above Nyquist is reported as ``None``,
  never guessed; plus the frequency with the most power below Nyquist;
- synchrony: the mean pairwise Pearson correlation of the GPUs' series, and the *synchrony
  coefficient* ``std(sum) / sum(std)``: 1 when every GPU swings in step (the sum swings by the
  sum of the swings, a training job), ``1/sqrt(n)`` for ``n`` independent GPUs (an inference
  fleet's bursts partly cancel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ringwatch.analyzers._power_headroom import DEFAULT_THRESHOLDS, PowerThresholds


@dataclass(frozen=True)
class Swing:
    """Swing and synchrony figures of one node or of the job (module docstring).

    Attributes:
        scope, name: ``node``/host or ``job``/``job``.
        gpus: GPUs summed.
        resolution_s, nyquist_hz: The grid's cell and the highest frequency it shows.
        mean_w, peak_to_trough_w: Mean and max minus min of the summed power.
        step_peak_to_trough_w: Median over steps of the peak-to-trough within a step (None
            without steps or with steps shorter than two cells).
        ramp_up_max_w_per_s, ramp_down_max_w_per_s, ramp_p99_w_per_s: Ramp rates.
        band_hz: The band actually measured (None: nothing of it below Nyquist).
        band_share, band_rms_w: Its share of the variance and its RMS amplitude.
        dominant_hz: The frequency with the most power (None: too short).
        correlation: Mean pairwise correlation of the GPUs (None for one GPU).
        synchrony: ``std(sum) / sum(std)`` (None for one GPU).
    """

    scope: str
    name: str
    gpus: int
    resolution_s: float
    nyquist_hz: float
    mean_w: float
    peak_to_trough_w: float
    step_peak_to_trough_w: float | None
    ramp_up_max_w_per_s: float
    ramp_down_max_w_per_s: float
    ramp_p99_w_per_s: float
    band_hz: tuple[float, float] | None
    band_share: float | None
    band_rms_w: float | None
    dominant_hz: float | None
    correlation: float | None
    synchrony: float | None


def band_power(p: np.ndarray, dt_s: float, band_hz: tuple[float, float], *,
               min_cycles: float = 3.0) -> tuple[tuple[float, float] | None, float | None,
                                                 float | None, float | None]:
    """``(band, share, rms_w, dominant_hz)`` of series ``p`` sampled every ``dt_s``.

    The periodogram of the mean-removed series (one-sided, so the bins sum to the variance);
    the band is cut to ``[max(lo, min_cycles / duration), min(hi, nyquist)]``."""
    n = len(p)
    if n < 8:
        return None, None, None, None
    x = p - p.mean()
    spec = np.abs(np.fft.rfft(x)) ** 2 / n ** 2
    spec[1:] *= 2
    if n % 2 == 0:
        spec[-1] /= 2  # the Nyquist bin is its own mirror
    f = np.fft.rfftfreq(n, dt_s)
    var = float(spec[1:].sum())
    dominant = float(f[1 + int(np.argmax(spec[1:]))]) if var > 0 else None
    nyq = 0.5 / dt_s
    lo, hi = max(band_hz[0], min_cycles / (n * dt_s)), min(band_hz[1], nyq)
    if lo >= hi:
        return None, None, None, dominant
    inband = float(spec[(f >= lo) & (f <= hi)].sum())
    return (lo, hi), (inband / var if var > 0 else 0.0), float(np.sqrt(inband)), dominant


def _synchrony(mat: np.ndarray) -> tuple[float | None, float | None]:
    if mat.shape[0] < 2:
        return None, None
    sd = mat.std(axis=1)
    live = sd > 0
    corr = None
    if live.sum() >= 2:
        c = np.corrcoef(mat[live])
        corr = float(c[np.triu_indices_from(c, 1)].mean())
    sync = float(mat.sum(axis=0).std() / sd.sum()) if sd.sum() > 0 else None
    return corr, sync


def compute_swing(grid: pl.DataFrame, *, step_spans: pl.DataFrame | None = None,
                  thresholds: PowerThresholds = DEFAULT_THRESHOLDS) -> tuple[Swing, ...]:
    """Swing and synchrony per node and for the job over the grid.

    Args:
        grid: :func:`~ringwatch.analyzers._power.compute_power_grid`.
        step_spans: ``step``, ``t_start_ns``, ``t_end_ns`` of the job's steps (e.g. the
            median over ranks of :func:`~ringwatch.analyzers._power_phase.compute_rank_phases`)
            for the per-step peak-to-trough.
        thresholds: ``band_hz`` and ``min_band_cycles``.
    """
    cols = [c for c in grid.columns if c != "t_ns"]
    if len(grid) < 2 or not cols:
        return ()
    t = grid["t_ns"].to_numpy()
    dt = float(np.median(np.diff(t))) / 1e9
    scopes = [("node", h, [c for c in cols if c.rsplit("/", 1)[0] == h])
              for h in sorted({c.rsplit("/", 1)[0] for c in cols})]
    scopes.append(("job", "job", cols))
    out = []
    for scope, name, mine in scopes:
        mat = np.vstack([grid[c].to_numpy() for c in mine])
        total = mat.sum(axis=0)
        ramp = np.diff(total) / dt
        band, share, rms, dom = band_power(total, dt, thresholds.band_hz,
                                           min_cycles=thresholds.min_band_cycles)
        step_ptt = None
        if step_spans is not None and not step_spans.is_empty():
            k = np.searchsorted(step_spans["t_start_ns"].to_numpy(), t, side="right") - 1
            inside = (k >= 0) & (t + dt * 1e9 <= step_spans["t_end_ns"].to_numpy()[np.clip(
                k, 0, None)])
            per = pl.DataFrame({"k": k[inside], "p": total[inside]}).group_by("k").agg(
                (pl.col("p").max() - pl.col("p").min()).alias("ptt"), pl.len().alias("n"))
            per = per.filter(pl.col("n") >= 2)
            step_ptt = float(per["ptt"].median()) if per.height else None
        corr, sync = _synchrony(mat)
        out.append(Swing(
            scope=scope, name=name, gpus=len(mine), resolution_s=dt, nyquist_hz=0.5 / dt,
            mean_w=float(total.mean()), peak_to_trough_w=float(total.max() - total.min()),
            step_peak_to_trough_w=step_ptt, ramp_up_max_w_per_s=float(max(ramp.max(), 0)),
            ramp_down_max_w_per_s=float(max(-ramp.min(), 0)),
            ramp_p99_w_per_s=float(np.quantile(np.abs(ramp), 0.99)), band_hz=band,
            band_share=share, band_rms_w=rms, dominant_hz=dom, correlation=corr,
            synchrony=sync))
    return tuple(out)


def job_step_spans(rank_phases: pl.DataFrame) -> pl.DataFrame:
    """``step``, ``t_start_ns``, ``t_end_ns``: each step's median span over the ranks (from
    :func:`~ringwatch.analyzers._power_phase.compute_rank_phases`)."""
    return rank_phases.group_by("step").agg(pl.col("t_start_ns").median().cast(pl.Int64),
                                            pl.col("t_end_ns").median().cast(pl.Int64)
                                            ).sort("t_start_ns")


__all__ = ["Swing", "band_power", "compute_swing", "job_step_spans"]
