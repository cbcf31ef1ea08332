"""Phase-resolved power: each rank's GPU energy split between computing and communicating.

A rank's *communication* time is the union of its collectives' host intervals
(``t_start_ns``..``t_end_ns``, wall clock, overlapping ones once); the rest of each step is
*compute* (forward, backward not hidden under transfers, optimizer, data loading). A step spans
from the end of the rank's previous step's last collective to the end of its own last one, so
consecutive steps tile the run. Steps come from the ``step`` column or, where the job marks
none, from the rhythm (:func:`~ringwatch.analyzers._rhythm.assign_rhythm_steps`): a step is then
one iteration of the collective pattern.

The rank's GPU power is the piecewise-constant power of its energy counter
(:func:`~ringwatch.analyzers._power.compute_energy_intervals`). On the union of the counter's
update times and the phase boundaries both are constant, so the energy of any phase of any step
is an exact integral: a cumulative sum over those pieces, read at the step's boundaries. The
counter's resolution (~100 ms on an H200) blurs phases shorter than it: each piece of energy
goes to the phase it overlaps, in proportion, so the split is exact only for phases long
against the counter's update interval (``resolution_s``, stated with every result).

Which GPU is a rank's: the GPU whose NVML index is its ``local_rank`` on its host (one GPU per
rank, ``cuda:LOCAL_RANK``), unless a ``gpu_of`` map says otherwise.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ringwatch.analyzers._steps import _merged_ns


def rank_gpus(events: pl.DataFrame, gpu_of: dict[int, tuple[str, int]] | None = None
              ) -> pl.DataFrame:
    """``rank``, ``host``, ``gpu``: each rank's GPU (``gpu_of`` or its ``local_rank``)."""
    ranks = events.group_by("rank").agg(pl.col("host").first(),
                                        pl.col("local_rank").drop_nulls().first())
    rows = []
    for r, host, local in ranks.iter_rows():
        h, g = (gpu_of or {}).get(r, (host, local))
        if g is not None:
            rows.append((r, h, int(g)))
    return pl.DataFrame(rows, schema={"rank": pl.Int32, "host": pl.Utf8, "gpu": pl.Int64},
                        orient="row").sort("rank")


def compute_rank_phases(events: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, step): the step's wall-clock span and its communication intervals.

    Returns:
        Columns ``rank``, ``step``, ``t_start_ns``, ``t_end_ns`` (the step's span: from the
        previous step's end; the first step from its first collective's start) and
        ``comm_ns`` (time with a collective in flight inside the span), sorted by rank, step.
    """
    from ringwatch.analyzers._rhythm import assign_rhythm_steps, unmarked

    df = events.select("rank", "step", "idx", "pg", "op", "nbytes", "peer", "mono_start_ns",
                       "mono_end_ns", "t_start_ns", "t_end_ns")
    if unmarked(df):
        df = assign_rhythm_steps(df)
    df = df.filter(pl.col("step").is_not_null() & pl.col("t_start_ns").is_not_null()
                   & pl.col("t_end_ns").is_not_null())
    spans = (df.group_by("rank", "step").agg(pl.col("t_start_ns").min().alias("_first"),
                                             pl.col("t_end_ns").max().alias("t_end_ns"))
             .sort("rank", "step")
             .with_columns(pl.col("t_end_ns").shift(1).over("rank").alias("_prev")))
    spans = spans.with_columns(pl.coalesce("_prev", "_first").alias("t_start_ns"))
    comm = _merged_ns(df.sort("rank", "step", "t_start_ns"), "t_start_ns", "t_end_ns",
                      ["rank", "step"]).rename({"merged_ns": "comm_ns"})
    return spans.join(comm, on=["rank", "step"], how="left").select(
        "rank", "step", "t_start_ns", "t_end_ns", pl.col("comm_ns").fill_null(0)
    ).sort("rank", "step")


def _union(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(starts):
        return starts.astype(np.int64), ends.astype(np.int64)
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    reach = np.maximum.accumulate(e)
    new = np.concatenate([[True], s[1:] > reach[:-1]])
    idx = np.flatnonzero(new)
    return s[idx], np.maximum.reduceat(reach, idx) if len(idx) else e[:0]


def _cumulative(t: np.ndarray, us: np.ndarray, ue: np.ndarray) -> np.ndarray:
    """Time covered by the union ``[us, ue)`` before each of ``t`` (ns)."""
    if not len(us):
        return np.zeros(len(t))
    lens = ue - us
    cum = np.concatenate([[0], np.cumsum(lens)])
    j = np.searchsorted(us, t, side="right") - 1
    jj = np.clip(j, 0, max(len(us) - 1, 0))
    inside = np.clip(t - us[jj], 0, lens[jj])
    return np.where(j >= 0, cum[jj] + inside, 0).astype(np.float64)


def split_rank_energy(intervals: pl.DataFrame, comm_starts: np.ndarray, comm_ends: np.ndarray,
                      at_ns: np.ndarray) -> dict[str, np.ndarray]:
    """Cumulative energy, communication energy and covered time of one GPU at ``at_ns``.

    Args:
        intervals: One GPU's :func:`compute_energy_intervals` rows.
        comm_starts, comm_ends: Its rank's communication intervals (ns, any order, may
            overlap).
        at_ns: Times to read the cumulative figures at (sorted).

    Returns:
        ``energy_j``, ``comm_energy_j``, ``covered_s`` (time with power data) and
        ``comm_covered_s`` (of it, in communication): cumulative from the first interval, one
        value per ``at_ns``; differences between two times are the figures of that span.
    """
    return split_energy(intervals["t_start_ns"].to_numpy(), intervals["t_end_ns"].to_numpy(),
                        intervals["power_w"].to_numpy(), comm_starts, comm_ends, at_ns)


def split_energy(a: np.ndarray, b: np.ndarray, p: np.ndarray, comm_starts: np.ndarray,
                 comm_ends: np.ndarray, at_ns: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`split_rank_energy` on arrays: intervals ``[a, b)`` of power ``p`` (W)."""
    us, ue = _union(np.asarray(comm_starts), np.asarray(comm_ends))
    lo, hi = (a[0], b[-1]) if len(a) else (0, 0)
    inner = us[(us > lo) & (us < hi)], ue[(ue > lo) & (ue < hi)]
    cuts = np.sort(np.concatenate([a, b, *inner]))
    cuts = cuts[np.concatenate([[True], np.diff(cuts) != 0])] if len(cuts) else cuts
    mid = (cuts[:-1] + cuts[1:]) / 2
    k = np.searchsorted(a, mid, side="right") - 1
    has = (k >= 0) & (mid < b[np.clip(k, 0, None)])  # a reset gap has no data
    dt = np.diff(cuts) / 1e9
    pw = np.where(has, p[np.clip(k, 0, None)], 0.0)
    comm_t = np.diff(_cumulative(cuts, us, ue)) / 1e9
    z = np.zeros(1)
    cum = {"energy_j": np.concatenate([z, np.cumsum(pw * dt)]),
           "comm_energy_j": np.concatenate([z, np.cumsum(pw * comm_t)]),
           "covered_s": np.concatenate([z, np.cumsum(np.where(has, dt, 0.0))]),
           "comm_covered_s": np.concatenate([z, np.cumsum(np.where(has, comm_t, 0.0))])}
    return {k_: np.interp(at_ns, cuts, v) for k_, v in cum.items()}


def compute_step_energy(intervals: pl.DataFrame, events: pl.DataFrame, *,
                        gpu_of: dict[int, tuple[str, int]] | None = None) -> pl.DataFrame:
    """Per (rank, step): its GPU's energy, split between computing and communicating.

    Args:
        intervals: :func:`~ringwatch.analyzers._power.compute_energy_intervals` of the
            node(s) the ranks ran on (wall-clock times).
        events: The job's rows (``ringwatch.read_events``).
        gpu_of: ``rank -> (host, gpu)`` where a rank's GPU is not its ``local_rank``.

    Returns:
        Columns ``rank``, ``host``, ``gpu``, ``step``, ``t_start_ns``, ``t_end_ns``,
        ``step_s``, ``comm_s``, ``compute_s``, ``energy_j``, ``comm_energy_j``,
        ``compute_energy_j``, ``power_w``, ``comm_power_w``, ``compute_power_w`` (null where
        the phase had no time) and ``covered`` (share of the step with power data); only
        steps fully covered by power data, sorted by rank, step.
    """
    steps = compute_rank_phases(events)
    gpus = rank_gpus(events, gpu_of)
    ev = events.select("rank", "t_start_ns", "t_end_ns").drop_nulls()
    out = []
    for r, host, gpu in gpus.iter_rows():
        iv = intervals.filter((pl.col("host") == host) & (pl.col("gpu") == gpu))
        st = steps.filter(pl.col("rank") == r)
        if iv.is_empty() or st.is_empty():
            continue
        mine = ev.filter(pl.col("rank") == r)
        t0, t1 = st["t_start_ns"].to_numpy(), st["t_end_ns"].to_numpy()
        cum = split_rank_energy(iv, mine["t_start_ns"].to_numpy(), mine["t_end_ns"].to_numpy(),
                                np.concatenate([t0, t1]))
        n = len(t0)
        d = {k: v[n:] - v[:n] for k, v in cum.items()}
        out.append(st.with_columns(
            pl.lit(host).alias("host"), pl.lit(gpu, pl.Int64).alias("gpu"),
            pl.Series("energy_j", d["energy_j"]),
            pl.Series("comm_energy_j", d["comm_energy_j"]),
            pl.Series("_cov", d["covered_s"]), pl.Series("comm_s", d["comm_covered_s"])))
    if not out:
        return pl.DataFrame(schema={c: t for c, t in _SCHEMA})
    df = pl.concat(out).with_columns(((pl.col("t_end_ns") - pl.col("t_start_ns")) / 1e9)
                                     .alias("step_s"))
    df = df.with_columns((pl.col("_cov") / pl.col("step_s")).alias("covered")).filter(
        pl.col("covered") >= 0.999)
    compute_s = pl.col("step_s") - pl.col("comm_s")
    compute_e = pl.col("energy_j") - pl.col("comm_energy_j")
    return df.select(
        "rank", "host", "gpu", "step", "t_start_ns", "t_end_ns", "step_s", "comm_s",
        compute_s.alias("compute_s"), "energy_j", "comm_energy_j",
        compute_e.alias("compute_energy_j"), (pl.col("energy_j") / pl.col("step_s")).alias(
            "power_w"),
        pl.when(pl.col("comm_s") > 0).then(pl.col("comm_energy_j") / pl.col("comm_s"))
        .alias("comm_power_w"),
        pl.when(compute_s > 0).then(compute_e / compute_s).alias("compute_power_w"),
        "covered").sort("rank", "step")


_SCHEMA = (("rank", pl.Int32), ("host", pl.Utf8), ("gpu", pl.Int64), ("step", pl.Int64),
           ("t_start_ns", pl.Int64), ("t_end_ns", pl.Int64), ("step_s", pl.Float64),
           ("comm_s", pl.Float64), ("compute_s", pl.Float64), ("energy_j", pl.Float64),
           ("comm_energy_j", pl.Float64), ("compute_energy_j", pl.Float64),
           ("power_w", pl.Float64), ("comm_power_w", pl.Float64),
           ("compute_power_w", pl.Float64), ("covered", pl.Float64))


def summarize_phase_power(step_energy: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Phase power and energy per step per rank, per node and for the job.

    Returns:
        ``rank``: per rank (``rank``, ``host``, ``gpu``, ``steps``, ``compute_power_w`` and
        ``comm_power_w`` (phase energy over phase time, all its steps), ``comm_share`` (of
        its time), ``energy_per_step_j`` (median)); ``node``: per host (``ranks``,
        ``energy_per_step_j``: the median over steps of the host's GPUs' summed energy,
        ``compute_power_w``/``comm_power_w``: summed over its GPUs); ``job``: one row, the
        same over every GPU (``energy_per_step_j`` is the energy of one iteration of the
        whole job).
    """
    se = step_energy

    def phases(by: list[str]) -> pl.DataFrame:
        return se.group_by(by).agg(
            (pl.col("compute_energy_j").sum() / pl.col("compute_s").sum()).alias(
                "compute_power_w"),
            (pl.col("comm_energy_j").sum() / pl.col("comm_s").sum()).alias("comm_power_w"),
            (pl.col("comm_s").sum() / pl.col("step_s").sum()).alias("comm_share"),
            pl.col("energy_j").median().alias("energy_per_step_j"),
            pl.col("step").n_unique().alias("steps"))

    per_rank = phases(["rank", "host", "gpu"]).sort("rank")
    # node and job: the sum over GPUs of the per-GPU phase power, and the energy of a step
    # summed over the GPUs that ran it
    by_step_host = se.group_by("host", "step").agg(pl.col("energy_j").sum(), pl.len().alias("n"))
    node = per_rank.group_by("host").agg(
        pl.len().alias("ranks"), pl.col("compute_power_w").sum(),
        pl.col("comm_power_w").sum()).join(
        by_step_host.filter(pl.col("n") == pl.col("n").max().over("host"))
        .group_by("host").agg(pl.col("energy_j").median().alias("energy_per_step_j")),
        on="host").sort("host")
    by_step = se.group_by("step").agg(pl.col("energy_j").sum(), pl.len().alias("n"))
    full = by_step.filter(pl.col("n") == pl.col("n").max())
    job = pl.DataFrame({
        "ranks": [per_rank.height],
        "compute_power_w": [per_rank["compute_power_w"].sum()],
        "comm_power_w": [per_rank["comm_power_w"].sum()],
        "energy_per_step_j": [full["energy_j"].median()],
        "steps": [full.height]})
    return {"rank": per_rank, "node": node, "job": job}




def fit_phase_power(intervals: pl.DataFrame, events: pl.DataFrame, *,
                    gpu_of: dict[int, tuple[str, int]] | None = None) -> pl.DataFrame:
    """Each rank's compute and communication power, resolved below the counter's resolution.

    Each energy interval of the rank's GPU inside the rank's run mixes the two phases: its
    mean power is ``P_compute * (1 - f) + P_comm * f`` with ``f`` the share of it the rank
    spent in collectives. Over many intervals, falling at every phase of the step, a least
    squares fit of that line gives both powers even where each phase is shorter than an
    interval (two levels assumed: a phase whose power varies within it gets its mean). When
    the counter changed is known only to half a read period (25 ms at 20 Hz); that error in
    ``f`` pulls the fitted levels towards the mean, most for the shorter phase (by ~30% for a
    53 ms phase in the unit test; the longer one stays within 5%).

    Returns:
        Columns ``rank``, ``host``, ``gpu``, ``intervals`` (used), ``compute_fit_w``,
        ``comm_fit_w`` and ``r2`` (share of the intervals' power variance the fit explains);
        null powers where the intervals do not mix the phases enough to separate them.
    """
    rows = []
    ev = events.select("rank", "t_start_ns", "t_end_ns").drop_nulls()
    for r, host, gpu in rank_gpus(events, gpu_of).iter_rows():
        mine = ev.filter(pl.col("rank") == r)
        if mine.is_empty():
            continue
        lo, hi = mine["t_start_ns"].min(), mine["t_end_ns"].max()
        iv = intervals.filter((pl.col("host") == host) & (pl.col("gpu") == gpu)
                              & (pl.col("t_start_ns") >= lo) & (pl.col("t_end_ns") <= hi))
        a, b = iv["t_start_ns"].to_numpy(), iv["t_end_ns"].to_numpy()
        us, ue = _union(mine["t_start_ns"].to_numpy(), mine["t_end_ns"].to_numpy())
        f = (_cumulative(b, us, ue) - _cumulative(a, us, ue)) / np.maximum(b - a, 1)
        p = iv["power_w"].to_numpy()
        comp = comm = r2 = None
        if len(p) >= 4 and f.std() > 0.05:
            x = np.column_stack([1 - f, f])
            coef, *_ = np.linalg.lstsq(x, p, rcond=None)
            comp, comm = float(coef[0]), float(coef[1])
            var = float(p.var())
            r2 = 1 - float(np.mean((p - x @ coef) ** 2)) / var if var > 0 else None
        rows.append((r, host, gpu, len(p), comp, comm, r2))
    return pl.DataFrame(rows, schema={"rank": pl.Int32, "host": pl.Utf8, "gpu": pl.Int64,
                                      "intervals": pl.Int64, "compute_fit_w": pl.Float64,
                                      "comm_fit_w": pl.Float64, "r2": pl.Float64},
                        orient="row")


__all__ = ["compute_rank_phases", "compute_step_energy", "fit_phase_power", "rank_gpus",
           "split_energy", "split_rank_energy",
           "summarize_phase_power"]
