"""Headroom: the enforced power limit minus what the GPUs really draw at their peaks, and the
time the clocks were held down for power or heat.

Per GPU the headroom is its enforced limit (the tightest in force over the window: out-of-band
limits included) minus a high quantile of its power; per node and per job, the sum of the
limits minus the same quantile of the *summed* power (GPUs that peak together use the headroom
together; GPUs that take turns leave some). Power is each GPU's series on one shared grid
(:func:`~ringwatch.analyzers._power.compute_power_grid`: the energy counter's, at its own
resolution), so the quantiles are time-weighted and a node's sum adds readings of the same
instant. Where the instantaneous field exists its own quantiles are given beside (a point
sensor catches shorter peaks than a 100 ms energy average).

Per phase, each grid cell of a GPU counts as communication when its rank had a collective in
flight for more than half of the cell, else as compute.

Time throttled comes from the cumulative NVML violation counters (``throttle_<reason>_ns``):
their increase over the window over its length. ``power`` is the power-cap policy and
``board_limit`` the board's; ``thermal`` the thermal one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ringwatch.analyzers._findings import Finding

#: Violation counters that mean "held down for power" and "for heat".
POWER_REASONS = ("power", "board_limit")
THERMAL_REASONS = ("thermal",)


@dataclass(frozen=True)
class PowerThresholds:
    """The power family's settings, one object for every power analyzer.

    Attributes:
        quantiles: Power quantiles the headroom is taken at (0.99 and 0.999).
        min_headroom_share: A GPU, node or job whose headroom at the highest quantile is under
            this share of its limit runs at its limit: a ``power_headroom`` finding.
        throttled_share: Share of a window's time held down for power or heat that makes a
            GPU throttled (in a finding, and for a straggler's late steps).
        clock_drop: A step whose median SM clock is this share under the GPU's usual (its
            median over the run) had its clocks down.
        band_hz: The band whose share of the power's variance is reported (utility
            specifications watch 0.1 to a few Hz); cut at the data's Nyquist frequency.
        min_band_cycles: The band's low edge needs this many of its cycles in the data.
        epsilon: Violation probability of the oversubscription estimate.
        budget_share: A domain's budget as a share of its nodes' summed limits, when no
            budget is given (1.0: provisioned at nameplate).
    """

    quantiles: tuple[float, ...] = (0.99, 0.999)
    min_headroom_share: float = 0.05
    throttled_share: float = 0.05
    clock_drop: float = 0.05
    band_hz: tuple[float, float] = (0.1, 2.0)
    min_band_cycles: float = 3.0
    epsilon: float = 0.01
    budget_share: float = 1.0


#: The documented defaults.
DEFAULT_THRESHOLDS = PowerThresholds()


def _q_name(q: float) -> str:
    return f"p{q * 100:g}".replace(".", "_")


def _limits(slow: pl.DataFrame) -> dict[str, float]:
    lim = slow.filter(pl.col("power_limit_enforced_mw").is_not_null()).group_by("host", "gpu").agg(
        (pl.col("power_limit_enforced_mw").min() / 1e3).alias("limit_w"))
    return {f"{h}/{g}": w for h, g, w in lim.iter_rows()}


def _row(scope: str, name: str, limit_w: float | None, p: np.ndarray, qs, extra=None) -> dict:
    row = {"scope": scope, "name": name, "limit_w": limit_w,
           "mean_w": float(p.mean()) if len(p) else None,
           "max_w": float(p.max()) if len(p) else None, "samples": len(p)}
    for q in qs:
        v = float(np.quantile(p, q)) if len(p) else None
        row[f"{_q_name(q)}_w"] = v
        row[f"headroom_{_q_name(q)}_w"] = None if v is None or limit_w is None else limit_w - v
    row.update(extra or {})
    return row


def compute_headroom(grid: pl.DataFrame, slow: pl.DataFrame, *,
                     thresholds: PowerThresholds = DEFAULT_THRESHOLDS,
                     fast: pl.DataFrame | None = None,
                     phases: dict[str, np.ndarray] | None = None) -> pl.DataFrame:
    """Headroom per GPU, node and job over the grid's span.

    Args:
        grid: :func:`~ringwatch.analyzers._power.compute_power_grid` (restrict its rows to
            a window to get that window's headroom).
        slow: The slow frame (limits).
        thresholds: Quantiles to report.
        fast: The fast frame, for the instantaneous field's own quantiles per GPU.
        phases: ``host/gpu`` -> bool array over the grid's rows (True: communication), from
            :func:`grid_phases`; adds ``compute`` and ``comm`` rows per GPU and for the job.

    Returns:
        Columns ``scope`` (``gpu``, ``node``, ``job``, or ``gpu:compute``/``gpu:comm``/
        ``job:compute``/``job:comm``), ``name`` (``host/gpu``, the host, or ``job``),
        ``limit_w``, ``mean_w``, ``max_w``, ``samples``, and per quantile ``pXX_w`` and
        ``headroom_pXX_w``; ``instant_pXX_w`` for GPUs with the instantaneous field.
    """
    qs = thresholds.quantiles
    limits = _limits(slow)
    cols = [c for c in grid.columns if c != "t_ns"]
    rows = []
    inst = {}
    if fast is not None:
        for (h, g), d in fast.filter(pl.col("power_instant_mw").is_not_null()).group_by(
                "host", "gpu"):
            if len(grid):
                d = d.filter(pl.col("t_ns").is_between(grid["t_ns"][0], grid["t_ns"][-1]))
            inst[f"{h}/{g}"] = d["power_instant_mw"].to_numpy() / 1e3
    for c in cols:
        p = grid[c].to_numpy()
        extra = {f"instant_{_q_name(q)}_w": float(np.quantile(inst[c], q))
                 for q in qs if c in inst and len(inst[c])}
        rows.append(_row("gpu", c, limits.get(c), p, qs, extra))
        if phases is not None and c in phases:
            m = phases[c]
            rows.append(_row("gpu:compute", c, limits.get(c), p[~m], qs))
            rows.append(_row("gpu:comm", c, limits.get(c), p[m], qs))
    hosts = sorted({c.rsplit("/", 1)[0] for c in cols})
    for h in hosts:
        mine = [c for c in cols if c.rsplit("/", 1)[0] == h]
        lim = [limits.get(c) for c in mine]
        rows.append(_row("node", h, None if None in lim else sum(lim),
                         grid.select(pl.sum_horizontal(mine)).to_series().to_numpy(), qs,
                         {"gpus": len(mine)}))
    if cols:
        lim = [limits.get(c) for c in cols]
        total = grid.select(pl.sum_horizontal(cols)).to_series().to_numpy()
        job_limit = None if None in lim else sum(lim)
        rows.append(_row("job", "job", job_limit, total, qs, {"gpus": len(cols)}))
        if phases is not None and all(c in phases for c in cols):
            # a cell is the job's compute when most of its GPUs compute in it
            comm = np.mean([phases[c] for c in cols], axis=0) > 0.5
            rows.append(_row("job:compute", "job", job_limit, total[~comm], qs))
            rows.append(_row("job:comm", "job", job_limit, total[comm], qs))
    return pl.DataFrame(rows)


def compute_window_headroom(grid: pl.DataFrame, slow: pl.DataFrame, *, window_s: float,
                            thresholds: PowerThresholds = DEFAULT_THRESHOLDS) -> pl.DataFrame:
    """The least headroom over consecutive windows of ``window_s`` (a budget is violated in
    its worst minute, not on average).

    Returns:
        Per ``scope`` (``gpu``, ``node``, ``job``) and ``name``: ``windows`` (full windows of
        the grid), ``worst_start_ns`` (the window with the least headroom at the highest
        quantile), ``limit_w`` and, per quantile, ``worst_headroom_pXX_w`` and
        ``median_headroom_pXX_w`` (over windows). Empty when the grid holds no full window.
    """
    if len(grid) < 2:
        return pl.DataFrame()
    dt = (grid["t_ns"][1] - grid["t_ns"][0]) / 1e9
    cells = max(2, int(round(window_s / dt)))
    parts = [compute_headroom(grid.slice(i, cells), slow, thresholds=thresholds).with_columns(
        pl.lit(int(grid["t_ns"][i])).alias("start_ns"))
        for i in range(0, len(grid) - cells + 1, cells)]
    if not parts:
        return pl.DataFrame()
    qs = [_q_name(q) for q in thresholds.quantiles]
    top = f"headroom_{qs[-1]}_w"
    df = pl.concat(parts, how="diagonal_relaxed")
    return df.group_by("scope", "name", maintain_order=True).agg(
        pl.len().alias("windows"), pl.col("start_ns").sort_by(top).first().alias(
            "worst_start_ns"), pl.col("limit_w").min(),
        *(pl.col(f"headroom_{q}_w").min().alias(f"worst_headroom_{q}_w") for q in qs),
        *(pl.col(f"headroom_{q}_w").median().alias(f"median_headroom_{q}_w") for q in qs))


def grid_phases(grid: pl.DataFrame, events: pl.DataFrame, gpus: pl.DataFrame
                ) -> dict[str, np.ndarray]:
    """``host/gpu`` -> True where the GPU's rank spent more than half of the grid cell in
    collectives (``gpus``: :func:`~ringwatch.analyzers._power_phase.rank_gpus`)."""
    from ringwatch.analyzers._power_phase import _cumulative, _union

    if len(grid) < 2:
        return {}
    t = grid["t_ns"].to_numpy()
    edges = np.concatenate([t, [t[-1] + (t[-1] - t[-2])]])
    out = {}
    ev = events.select("rank", "t_start_ns", "t_end_ns").drop_nulls()
    for r, h, g in gpus.iter_rows():
        mine = ev.filter(pl.col("rank") == r)
        us, ue = _union(mine["t_start_ns"].to_numpy(), mine["t_end_ns"].to_numpy())
        share = np.diff(_cumulative(edges, us, ue)) / np.diff(edges)
        out[f"{h}/{g}"] = share > 0.5
    return out


def compute_throttle(slow: pl.DataFrame, *, start_ns: int | None = None,
                     end_ns: int | None = None) -> pl.DataFrame:
    """Per GPU, the share of the window its clocks were held down, per reason.

    Returns:
        Columns ``host``, ``gpu``, ``window_s`` (between its first and last slow sample in
        the window), one ``<reason>_share`` per ``throttle_<reason>_ns`` counter (its
        increase over the window, over ``window_s``; a counter that went backwards was reset
        and counts from its reset), ``power_share`` (the largest of the power reasons) and
        ``thermal_share``.
    """
    df = slow
    if start_ns is not None:
        df = df.filter(pl.col("t_ns") >= start_ns)
    if end_ns is not None:
        df = df.filter(pl.col("t_ns") <= end_ns)
    reasons = [c for c in df.columns if c.startswith("throttle_") and c.endswith("_ns")]
    incr = [pl.col(c).diff().clip(lower_bound=0).sum().alias(c) for c in reasons]
    per = df.sort("t_ns").group_by("host", "gpu", maintain_order=True).agg(
        ((pl.col("t_ns").max() - pl.col("t_ns").min()) / 1e9).alias("window_s"), *incr)
    shares = [(pl.col(c) / 1e9 / pl.col("window_s")).clip(upper_bound=1.0).alias(
        c.removeprefix("throttle_").removesuffix("_ns") + "_share") for c in reasons]
    per = per.select("host", "gpu", "window_s", *shares)

    def worst(names) -> pl.Expr:
        have = [f"{n}_share" for n in names if f"{n}_share" in per.columns]
        return pl.max_horizontal(have) if have else pl.lit(None, pl.Float64)

    return per.with_columns(worst(POWER_REASONS).alias("power_share"),
                            worst(THERMAL_REASONS).alias("thermal_share")).sort("host", "gpu")


def detect_power_headroom(headroom: pl.DataFrame, throttle: pl.DataFrame, *,
                          thresholds: PowerThresholds = DEFAULT_THRESHOLDS,
                          synthetic: bool = False) -> tuple[Finding, ...]:
    """``power_headroom`` findings: a GPU, node or job that runs at its limit (headroom at
    the highest quantile under ``min_headroom_share`` of the limit), or a GPU held down for
    power or heat more than ``throttled_share`` of the time."""
    q = _q_name(max(thresholds.quantiles))
    tag = " (synthetic data)" if synthetic else ""
    out = []
    rated = (headroom.filter(pl.col("scope").is_in(["gpu", "node", "job"]))
             if "scope" in headroom.columns else headroom.clear())
    for r in rated.iter_rows(named=True):
        h = r[f"headroom_{q}_w"]
        if h is None or r["limit_w"] is None or h >= thresholds.min_headroom_share * r["limit_w"]:
            continue
        host = r["name"].rsplit("/", 1)[0] if r["scope"] == "gpu" else r["name"]
        out.append(Finding(
            kind="power_headroom", cls=f"{r['scope']} at its power limit", ranks=(),
            hosts=() if r["scope"] == "job" else (host,),
            confidence=min(1.0, 0.5 + 0.5 * (1 - max(h, 0) / (
                thresholds.min_headroom_share * r["limit_w"]))),
            evidence=(f"{r['scope']} {r['name']}: {q} power {r[f'{q}_w']:.0f} W against a "
                      f"limit of {r['limit_w']:.0f} W: {h:.0f} W headroom{tag}",)))
    for r in throttle.iter_rows(named=True):
        held = {k: r[f"{k}_share"] for k in ("power", "thermal") if r.get(f"{k}_share")}
        bad = {k: v for k, v in held.items() if v >= thresholds.throttled_share}
        if bad:
            out.append(Finding(
                kind="power_headroom", cls="throttled GPU", ranks=(), hosts=(r["host"],),
                confidence=min(1.0, max(bad.values()) / (2 * thresholds.throttled_share)),
                evidence=tuple(f"GPU {r['host']}/{r['gpu']} held down for {k} "
                               f"{v:.0%} of {r['window_s']:.0f} s{tag}"
                               for k, v in bad.items())))
    return tuple(out)


__all__ = ["DEFAULT_THRESHOLDS", "POWER_REASONS", "THERMAL_REASONS", "PowerThresholds",
           "compute_headroom", "compute_throttle", "compute_window_headroom",
           "detect_power_headroom", "grid_phases"]
