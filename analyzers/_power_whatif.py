"""What-if: the step-time cost of a power cap, and how many nodes fit in a power budget.

**A cap of ``c`` watts per GPU** (:func:`estimate_cap_cost`). First-order model, stated so it
can be argued with:

1. Only compute phases pay. Communication phases draw well under a cap that matters (they
   wait on the network) and keep their length.
2. A compute phase whose mean power ``P`` exceeds ``c`` must lower its clocks until it draws
   ``c``. Power above the GPU's floor (``P_idle``: its lowest observed power, the 1st
   percentile of its series) scales as the clock ratio to the power ``alpha``:
   ``P(f) = P_idle + (P - P_idle) * (f / f0) ** alpha``. So the clock ratio it needs is
   ``r = ((c - P_idle) / (P - P_idle)) ** (1 / alpha)``.
3. A compute-bound phase's length scales as ``1 / r``; the step grows by
   ``compute_s * (1 / r - 1)``. Memory-bound work slows less, so this is an upper bound of
   the cost for the given ``alpha``.

``alpha = 1`` (clock alone, voltage fixed) gives the largest slowdown; with voltage following
the clock (DVFS) dynamic power goes as ``f * V**2`` and ``alpha`` approaches 3: both ends are
reported. The model's premise is checked against the data where it can be
(:func:`check_cap_model`): a GPU held down by its limit draws its limit, so the time it drew
the limit in force is the time the model says it was held down, and the power-cap violation
counter says how long it really was.

**Oversubscription in POLCA's manner** (:func:`estimate_oversubscription`): ``N`` nodes fit a
budget ``B`` when the probability that their summed power exceeds ``B`` is at most
``epsilon``. Each node's power is distributed as measured (mean ``mu``, ``1 - epsilon``
quantile ``q``) and nodes are correlated with coefficient ``rho`` (their synchrony): the sum
has mean ``N mu`` and a spread that grows as ``sqrt(rho N**2 + (1 - rho) N)`` times one node's
(its standard deviation's factor for equicorrelated nodes). The sum's ``1 - epsilon`` quantile
is taken as ``N mu + sqrt(rho N**2 + (1 - rho) N) * (q - mu)``: exact at ``rho = 1`` (every
node at its own quantile at once: ``N q``) and the normal approximation of a sum of many
independent nodes at ``rho = 0`` (``q - mu`` standing for ``z * sigma``, read from the measured
distribution rather than assumed). ``N`` is the largest with that quantile within ``B``. A
synchronous training job (``rho`` near 1) gets ``B / q``, its nodes' peaks adding up;
unsynchronised inference (``rho`` near 0) gets more, its bursts averaging out. ``rho`` is the
measured correlation between nodes where the data has several, else between the GPUs of one
node (the same job's nodes swing as its GPUs do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True)
class CapCost:
    """The modelled cost of a cap of ``cap_w`` per GPU.

    Attributes:
        cap_w: The cap (W per GPU).
        steps: (rank, step) pairs modelled.
        capped_share: Share of them whose compute phase drew more than the cap.
        step_s: The job's mean step time now (s).
        added_s_per_step: Added time per step, the mean over steps of the slowest rank's
            added time (the job waits for it): for ``alpha`` = 1 (the bound) and 3.
        cost_share: ``added_s_per_step`` (alpha 1) over ``step_s``.
        alpha: The exponents modelled, ``(1.0, 3.0)``.
    """

    cap_w: float
    steps: int
    capped_share: float
    step_s: float
    added_s_per_step: tuple[float, float]
    cost_share: float
    alpha: tuple[float, float] = (1.0, 3.0)


def _added_s(compute_s, compute_w, cap_w, idle_w, alpha):
    over = compute_w > cap_w
    ratio = np.ones_like(compute_w)
    denom = np.maximum(compute_w - idle_w, 1e-9)
    ratio[over] = np.clip((cap_w - idle_w[over]) / denom[over], 1e-3, 1.0) ** (1 / alpha)
    return compute_s * (1 / ratio - 1), over


def estimate_cap_cost(step_energy: pl.DataFrame, cap_w: float, *,
                      idle_w: dict[tuple[str, int], float] | None = None,
                      levels: pl.DataFrame | None = None) -> CapCost:
    """The step-time cost of capping every GPU at ``cap_w`` (module docstring's model).

    Args:
        step_energy: :func:`~ringwatch.analyzers._power_phase.compute_step_energy`.
        cap_w: Cap per GPU (W).
        idle_w: ``(host, gpu)`` -> floor power (W); default: each GPU's lowest phase power.
        levels: :func:`~ringwatch.analyzers._power_phase.fit_phase_power`: each rank's
            fitted compute and communication power stands for every step's (the per-step
            split blurs phases shorter than the counter's resolution towards the step's mean,
            which hides what a cap would cut).
    """
    se = step_energy.filter(pl.col("compute_power_w").is_not_null())
    if levels is not None:
        fit = levels.filter(pl.col("compute_fit_w").is_not_null()).select(
            "rank", "compute_fit_w", "comm_fit_w")
        se = se.join(fit, on="rank", how="inner").with_columns(
            pl.col("compute_fit_w").alias("compute_power_w"),
            pl.col("comm_fit_w").alias("comm_power_w"))
    if se.is_empty():
        return CapCost(cap_w, 0, 0.0, 0.0, (0.0, 0.0), 0.0)
    if idle_w is None:
        floor = se.group_by("host", "gpu").agg(pl.min_horizontal(
            pl.col("comm_power_w").min(), pl.col("compute_power_w").min()).alias("idle"))
        idle_w = {(h, g): w for h, g, w in floor.iter_rows()}
    idle = np.array([idle_w.get((h, g), 0.0) for h, g in se.select("host", "gpu").iter_rows()])
    cs, cw = se["compute_s"].to_numpy(), se["compute_power_w"].to_numpy()
    added = []
    over = None
    for a in (1.0, 3.0):
        add, over = _added_s(cs, cw, cap_w, idle, a)
        per_step = se.select("step").with_columns(pl.Series("a", add)).group_by("step").agg(
            pl.col("a").max())
        added.append(float(per_step["a"].mean()))
    step_s = float(se.group_by("step").agg(pl.col("step_s").max())["step_s"].mean())
    return CapCost(cap_w=cap_w, steps=se.height, capped_share=float(over.mean()),
                   step_s=step_s, added_s_per_step=(added[0], added[1]),
                   cost_share=added[0] / step_s if step_s else 0.0)


def check_cap_model(step_energy: pl.DataFrame, slow: pl.DataFrame,
                    fast: pl.DataFrame | None = None, *,
                    tolerance: float = 0.05) -> pl.DataFrame:
    """The model's premise against the power-cap violation counter, where the data has one.

    The model says a GPU held down by a limit draws that limit. So the time a GPU spent at
    the limit in force (within ``tolerance`` under it: the power manager keeps the GPU just
    below) is the time it predicts held down; the counter says how long it really was. Power
    is the instantaneous field where the data has it (a step mean or a 100 ms energy interval
    straddling a phase boundary falls under the limit), else the energy intervals'.

    Args:
        step_energy: :func:`~ringwatch.analyzers._power_phase.compute_step_energy` (the span
            of each GPU's steps is compared).
        slow: The slow frame (limits in force over time, violation counters).
        fast: The fast frame, for the instantaneous field.
        tolerance: Share under the limit still counted as at it.

    Returns:
        ``host``, ``gpu``, ``predicted_share`` (share of the span at the limit),
        ``observed_share`` (the counter's ``power_share`` over the span; null where the GPU
        has no counter).
    """
    from ringwatch.analyzers._power import compute_energy_intervals
    from ringwatch.analyzers._power_headroom import compute_throttle

    rows = []
    lim = slow.select("host", "gpu", "t_ns", "power_limit_enforced_mw").drop_nulls().sort(
        "t_ns")
    for (h, g), d in step_energy.group_by("host", "gpu"):
        mine = lim.filter((pl.col("host") == h) & (pl.col("gpu") == g)).select(
            "t_ns", (pl.col("power_limit_enforced_mw") / 1e3).alias("limit_w"))
        if mine.is_empty():
            continue
        span = (int(d["t_start_ns"].min()), int(d["t_end_ns"].max()))
        pts = None
        if fast is not None:
            pts = fast.filter((pl.col("host") == h) & (pl.col("gpu") == g)
                              & pl.col("t_ns").is_between(*span)
                              & pl.col("power_instant_mw").is_not_null()).select(
                "t_ns", (pl.col("power_instant_mw") / 1e3).alias("p"), pl.lit(1.0).alias("w"))
        if pts is None or pts.is_empty():
            src = fast if fast is not None else pl.DataFrame()
            iv = compute_energy_intervals(src.filter((pl.col("host") == h)
                                                     & (pl.col("gpu") == g))) \
                if not src.is_empty() else pl.DataFrame()
            if iv.is_empty():
                continue
            pts = iv.filter(pl.col("t_start_ns").is_between(*span)).select(
                pl.col("t_start_ns").alias("t_ns"), pl.col("power_w").alias("p"),
                (pl.col("t_end_ns") - pl.col("t_start_ns")).cast(pl.Float64).alias("w"))
        # the limit is read at ~1 Hz: a change happened somewhere between two readings, so
        # the tightest of the readings around a sample could have been in force
        pts = pts.sort("t_ns").join_asof(mine, on="t_ns", strategy="backward").join_asof(
            mine.rename({"limit_w": "_next"}), on="t_ns", strategy="forward").with_columns(
            pl.min_horizontal("limit_w", "_next").alias("limit_w"))
        at = pts.filter(pl.col("p") >= (1 - tolerance) * pl.col("limit_w"))["w"].sum()
        obs = compute_throttle(slow.filter((pl.col("host") == h) & (pl.col("gpu") == g)),
                               start_ns=span[0], end_ns=span[1])
        rows.append((h, g, float(at / pts["w"].sum()) if pts.height else 0.0,
                     None if obs.is_empty() else obs["power_share"][0]))
    return pl.DataFrame(rows, schema={"host": pl.Utf8, "gpu": pl.Int64,
                                      "predicted_share": pl.Float64,
                                      "observed_share": pl.Float64}, orient="row").sort(
        "host", "gpu")


@dataclass(frozen=True)
class Oversubscription:
    """How many nodes like the measured ones fit a budget.

    Attributes:
        budget_w: The budget ``B``.
        epsilon: Allowed probability of the nodes' sum exceeding it.
        node_limit_w: One node's summed enforced limits.
        node_mean_w, node_std_w: The measured node power's mean and standard deviation.
        rho: Correlation between nodes used.
        nodes_nameplate: ``floor(B / node_limit_w)``: provisioned at the limits.
        nodes_synchronous: ``floor(B / q(1 - epsilon))``: every node at its own high
            quantile at once (rho = 1).
        nodes: The estimate at the measured ``rho``.
        gain: ``nodes / nodes_nameplate - 1``.
    """

    budget_w: float
    epsilon: float
    node_limit_w: float | None
    node_mean_w: float
    node_std_w: float
    rho: float
    nodes_nameplate: int | None
    nodes_synchronous: int
    nodes: int
    gain: float | None


def _fits(n: int, mu: float, excess: float, rho: float, budget: float) -> bool:
    return n * mu + excess * math.sqrt(rho * n * n + (1 - rho) * n) <= budget


def estimate_oversubscription(node_power_w: np.ndarray, *, rho: float, budget_w: float,
                              epsilon: float = 0.01, node_limit_w: float | None = None
                              ) -> Oversubscription:
    """Nodes that fit ``budget_w`` at violation probability ``epsilon`` (module docstring).

    Args:
        node_power_w: One node's summed power over time (a grid's node sum).
        rho: Correlation between nodes (0: independent, 1: in step).
        budget_w: The budget (W).
        epsilon: Allowed violation probability.
        node_limit_w: The node's summed enforced limits, for the nameplate count.
    """
    p = np.asarray(node_power_w, dtype=float)
    mu, sd = float(p.mean()), float(p.std())
    rho = min(1.0, max(0.0, rho))
    q = float(np.quantile(p, 1 - epsilon))
    sync = int(budget_w // q) if q > 0 else 0
    lo, hi = 0, max(1, int(budget_w // max(mu, 1e-9)) + 1)  # the mean alone bounds it
    while lo < hi:  # the largest n that fits: fits(n) is monotone in n
        mid = (lo + hi + 1) // 2
        if _fits(mid, mu, max(q - mu, 0.0), rho, budget_w):
            lo = mid
        else:
            hi = mid - 1
    plate = int(budget_w // node_limit_w) if node_limit_w else None
    return Oversubscription(budget_w=budget_w, epsilon=epsilon, node_limit_w=node_limit_w,
                            node_mean_w=mu, node_std_w=sd, rho=rho, nodes_nameplate=plate,
                            nodes_synchronous=sync, nodes=lo,
                            gain=(lo / plate - 1) if plate else None)


__all__ = ["CapCost", "Oversubscription", "check_cap_model", "estimate_cap_cost",
           "estimate_oversubscription"]
