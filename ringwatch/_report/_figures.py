"""The report's plots from one job's rows: pure functions over the analyzers' per-step tables.

Lateness per (rank, step) is the stragglers' clock-free figure (the step's median wait less
the rank's own: how much later it came than the median rank,
:func:`~ringwatch.analyzers._stragglers.compute_step_lateness`); time in collectives is
:func:`~ringwatch.analyzers._steps.compute_step_comm`'s; bandwidth is the link analyzer's
(:func:`~ringwatch.analyzers._links.compute_group_bandwidth`). Nothing here reads a file.
"""

from __future__ import annotations

import polars as pl

from ringwatch._report._model import Band, Grid, LinePlot, Series, empty_line

#: Most columns (steps) and rows (ranks) a heatmap draws; beyond, neighbours are binned and
#: each cell shows its bin's maximum (a straggler stands out, it is not averaged away).
MAX_STEPS = 240
MAX_RANKS = 128
#: Steps either side of the onset the culprit's timeline shows.
TIMELINE_STEPS = 12
#: Most groups drawn on the bandwidth plot (slow groups first).
MAX_GROUPS = 12


def _steps_marked(events: pl.DataFrame) -> pl.DataFrame:
    """``events`` with steps, from the rhythm where the job marked none (as the analyzers)."""
    if events.height and events["step"].is_null().all():
        from ringwatch.analyzers._rhythm import assign_rhythm_steps

        return assign_rhythm_steps(events)
    return events


def step_lateness_ms(events: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, step): ``late_ms`` (the step's median wait less the rank's: > 0 came
    later than the median rank), ``wait_ms`` and ``comm_ms`` (time with a collective in
    flight), sorted by step then rank."""
    from ringwatch.analyzers import compute_step_comm, compute_step_lateness

    lat = compute_step_lateness(events)
    if lat.is_empty():
        return pl.DataFrame(schema={"rank": pl.Int64, "step": pl.Int64, "late_ms": pl.Float64,
                                    "wait_ms": pl.Float64, "comm_ms": pl.Float64})
    comm = compute_step_comm(events).select("rank", "step", (pl.col("comm_ns") / 1e6)
                                            .alias("comm_ms"))
    return (lat.with_columns((pl.col("wait_ns") / 1e6).alias("wait_ms"))
            .with_columns((pl.col("wait_ms").median().over("step") - pl.col("wait_ms"))
                          .alias("late_ms"))
            .join(comm, on=["rank", "step"], how="left")
            .select(pl.col("rank").cast(pl.Int64), pl.col("step").cast(pl.Int64), "late_ms",
                    "wait_ms", "comm_ms")
            .sort("step", "rank"))


def _bins(values: list[int], most: int) -> tuple[dict[int, int], list[str]]:
    """``value -> bin`` for sorted distinct ``values`` in at most ``most`` bins, and labels."""
    per = -(-len(values) // most) if values else 1
    index = {v: i // per for i, v in enumerate(values)}
    labels = [str(values[i]) if per == 1 else f"{values[i]}-{values[min(i + per, len(values)) - 1]}"
              for i in range(0, len(values), per)]
    return index, labels


def lateness_heatmap(late: pl.DataFrame) -> Grid:
    """Rank x step heatmap of ``late_ms`` (:func:`step_lateness_ms`)."""
    title = "How late each rank came, per step"
    args = ("lateness", title, "training step", "rank", "ms")
    if late.is_empty():
        return Grid(*args, empty="no step with a collective that every member of its group "
                    "finished: nothing to compare ranks by")
    ranks = sorted(late["rank"].unique().to_list())
    if len(ranks) < 2:
        return Grid(*args, empty="one rank: lateness compares a rank with its peers")
    steps = sorted(late["step"].unique().to_list())
    rbin, rlabels = _bins(ranks, MAX_RANKS)
    sbin, slabels = _bins(steps, MAX_STEPS)
    cells = (late.with_columns(pl.col("rank").replace_strict(rbin).alias("_r"),
                               pl.col("step").replace_strict(sbin).alias("_s"))
             .group_by("_r", "_s").agg(pl.col("late_ms").max()))
    values = [[None] * len(slabels) for _ in rlabels]
    for r, s, v in cells.iter_rows():
        values[r][s] = None if v is None else round(float(v), 3)
    note = ("ms after the median rank, from durations (no clock compared across hosts); "
            "0 or less: on time")
    if len(rlabels) < len(ranks) or len(slabels) < len(steps):
        note += f"; binned to {len(rlabels)} x {len(slabels)}, each cell the most late"
    return Grid(*args, rows=tuple(rlabels), cols=tuple(slabels),
                values=tuple(tuple(r) for r in values), note=note)


def culprit(findings) -> tuple[int, int | None, str] | None:
    """``(rank, onset step, headline)`` of the first straggler or imbalance finding."""
    for f in findings:
        if f.kind in ("straggler", "imbalance") and f.ranks:
            return f.ranks[0], f.since_step, f.headline()
    return None


def culprit_timelines(late: pl.DataFrame, findings, hiccups=()) -> tuple[LinePlot, LinePlot]:
    """The culprit's wait and time in collectives per step against its peers' (median and
    min..max) around the onset."""
    titles = (("timeline-wait", "Time spent waiting for the last member, per step",
               "wait_ms"), ("timeline-comm", "Time in collectives, per step", "comm_ms"))
    who = culprit(findings) or culprit(hiccups)
    if who is None or late.is_empty():
        why = ("no straggler or imbalance finding: no culprit to set against its peers"
               if who is None else "no step with a complete collective")
        return tuple(empty_line(k, t, "training step", "ms per step", why)
                     for k, t, _ in titles)
    rank, onset, _headline = who
    steps = sorted(late["step"].unique().to_list())
    centre = onset if onset is not None else steps[len(steps) // 2]
    window = late.filter(pl.col("step").is_between(centre - TIMELINE_STEPS,
                                                   centre + TIMELINE_STEPS))
    out = []
    for key, title, col in titles:
        mine = window.filter(pl.col("rank") == rank).sort("step")
        peers = (window.filter(pl.col("rank") != rank).group_by("step")
                 .agg(pl.col(col).median().alias("med"), pl.col(col).min().alias("lo"),
                      pl.col(col).max().alias("hi")).drop_nulls().sort("step"))
        series = []
        bands = ()
        if peers.height:
            xs = tuple(float(s) for s in peers["step"])
            bands = (Band("peers' min..max", xs, tuple(peers["lo"].to_list()),
                          tuple(peers["hi"].to_list())),)
            series.append(Series("peers' median", xs, tuple(peers["med"].to_list())))
        series.append(Series(f"rank {rank}", tuple(float(s) for s in mine["step"]),
                             tuple(mine[col].to_list()), highlight=True))
        marks = ((float(onset), f"onset (step {onset})"),) if onset is not None else ()
        n_peers = window.filter(pl.col("rank") != rank)["rank"].n_unique()
        out.append(LinePlot(key, f"{title}: rank {rank} against its {n_peers} peer(s)",
                            "training step", "ms per step", tuple(series), bands, marks,
                            note=f"steps {centre - TIMELINE_STEPS} to "
                                 f"{centre + TIMELINE_STEPS} around the onset; rank {rank} "
                                 "highlighted"))
    return out[0], out[1]


def bandwidth_plot(events: pl.DataFrame, findings=()) -> LinePlot:
    """Each group's transfer bandwidth per step (slow-link findings' groups first)."""
    from ringwatch.analyzers import compute_group_bandwidth

    title = "Transfer bandwidth of each process group, per step"
    bw = compute_group_bandwidth(events, summed=True)  # the link analyzer's figures
    if bw.is_empty():
        return empty_line("bandwidth", title, "training step", "MB/s", "no finished "
                          "collective with a size that every member of its group recorded")
    slow = [f.pg for f in findings if f.kind == "slow_link" and f.pg is not None]
    groups = bw.group_by("pg", maintain_order=True).agg(
        pl.col("pg_ranks").first(), pl.col("hosts").first(), pl.col("MBps").median())
    order = sorted(groups.iter_rows(), key=lambda g: (str(g[0]) not in slow, str(g[0])))
    shown = order[:MAX_GROUPS]
    series = []
    for pg, ranks, hosts, _ in shown:
        one = bw.filter(pl.col("pg") == pg).sort("step")
        names = str(hosts).split(",")
        where = hosts if len(names) <= 3 else f"{len(names)} hosts"
        series.append(Series(f"pg {pg} (ranks {ranks}; {where})",
                             tuple(float(s) for s in one["step"]),
                             tuple(round(float(v), 3) for v in one["MBps"]),
                             highlight=str(pg) in slow))
    note = "bytes over transfer time (the shortest member's duration, free of lateness)"
    if len(order) > len(shown):
        note += f"; {len(order) - len(shown)} more group(s) not drawn"
    return LinePlot("bandwidth", title, "training step", "MB/s", tuple(series), note=note)


def probe_matrix(doc: dict | None) -> Grid:
    """The probe's sender x receiver bandwidth matrix."""
    title = "Probe: bandwidth from each sender to each receiver"
    args = ("probe", title, "receiver", "sender", "MB/s")
    if doc is None:
        return Grid(*args, empty="no probe result given (ringwatch analyze ... --probe FILE)")
    from ringwatch.analyzers._probe import read_probe_matrix, row_labels

    try:
        pm = read_probe_matrix(doc)
    except ValueError as exc:
        return Grid(*args, empty=f"the probe result could not be used: {exc}")
    labels = tuple(row_labels(pm.hosts, pm.ranks))
    note = (f"{pm.backend}, {pm.size_bytes} B messages, {pm.repeats} repeat(s), median; "
            "the diagonal is not measured")
    return Grid(*args, rows=labels, cols=labels, values=pm.bw_MBps, low_is_bad=True, note=note)


def step_starts_ns(events: pl.DataFrame) -> list[tuple[int, int]]:
    """``(step, wall ns)`` when each step's first collective started, on any rank."""
    df = events.filter(pl.col("step").is_not_null() & pl.col("t_start_ns").is_not_null())
    if df.is_empty():
        return []
    per = df.group_by("step").agg(pl.col("t_start_ns").min()).sort("step")
    return [(int(s), int(t)) for s, t in per.iter_rows()]


def job_plots(events: pl.DataFrame, findings, hiccups=(), *, probe: dict | None = None,
              recordings=()) -> tuple:
    """Every plot of one job's report, in page order (the probe's matrix with a probe, the
    power plots with recordings)."""
    from ringwatch._report._power import power_plots

    events = _steps_marked(events)
    late = step_lateness_ms(events)
    wait, comm = culprit_timelines(late, findings, hiccups)
    extra = (probe_matrix(probe),) if probe is not None else ()
    who = culprit(findings)
    power = power_plots(recordings, step_starts_ns(events), events,
                        who[0] if who is not None else None)
    return (lateness_heatmap(late), wait, comm, bandwidth_plot(events, findings), *extra,
            *power)


__all__ = ["bandwidth_plot", "culprit", "culprit_timelines", "job_plots", "lateness_heatmap",
           "probe_matrix", "step_lateness_ms", "step_starts_ns"]
