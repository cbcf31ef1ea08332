"""GPU power against the job's steps, from ``ringwatch agent --record`` recordings.

A recording's readings are in ns since it started (``started_wall_ns`` on the agent host's
wall clock); the job's steps start when their first collective started (``t_start_ns``, the
ranks' wall clocks). Both are host wall clocks, so they line up as well as the hosts' clocks
are synchronised (NTP: milliseconds), which is finer than a step. Pure: recordings in,
plots out.
"""

from __future__ import annotations

import bisect
import statistics

from ringwatch._report._model import LinePlot, Series, empty_line

#: Seconds of readings kept either side of the job's steps.
MARGIN_S = 1.0
#: Most points of one GPU's line over the job (every k-th reading beyond).
MAX_POINTS = 2000
#: Bins of the within-step profile.
PHASE_BINS = 20
#: Most step boundaries marked on the whole-job plot.
MAX_MARKS = 24
#: Most ranks drawn on the per-step plot (the culprit first).
MAX_RANK_LINES = 8


def _power_w(r) -> float | None:
    if r is None:
        return None
    mw = r.power_instant_mw if r.power_instant_mw is not None else r.power_average_mw
    return None if mw is None else mw / 1e3


def gpu_power_samples(recording) -> dict[str, list[tuple[int, float]]]:
    """``"host gpuN" -> [(wall ns, W), ...]`` of one recording (readings without power left
    out)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for gpu in recording.gpus:
        times, readings = recording.fast.get(gpu.index, ([], []))
        rows = [(recording.started_wall_ns + t, w) for t, r in zip(times, readings, strict=True)
                if (w := _power_w(r)) is not None]
        if rows:
            out[f"{recording.host} gpu{gpu.index}"] = rows
    return out


def _fmt_s(ns: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%H:%M:%S")


def power_plots(recordings, steps: list[tuple[int, int]], events=None,
                culprit: int | None = None) -> tuple[LinePlot, ...]:
    """Power over the job, within a step and per step; ``()`` without recordings.

    Args:
        recordings: Loaded recordings (:class:`~ringwatch.collectors._recording.Recording`).
        steps: ``(step, wall ns of its start)``, by step (:func:`step_starts_ns`).
        events: The job's rows, for the per-step energy of each rank's GPU (none: that plot
            is left out).
        culprit: A rank to highlight on the per-step plot.
    """
    if not recordings:
        return ()
    per_step = () if events is None else (step_power_plot(recordings, events, culprit),)
    return _sample_plots(recordings, steps) + per_step


def _sample_plots(recordings, steps: list[tuple[int, int]]) -> tuple[LinePlot, ...]:
    keys = (("power", "GPU power over the job's steps", "seconds since the first step", "W"),
            ("power-step", "GPU power within a step (mean over the job's steps)",
             "ms into the step", "W (mean)"))
    samples: dict[str, list[tuple[int, float]]] = {}
    for rec in recordings:
        samples.update(gpu_power_samples(rec))

    def empty(why: str) -> tuple[LinePlot, ...]:
        return tuple(empty_line(*k, why) for k in keys)

    if not samples:
        return empty("the recording(s) hold no power reading (power not supported, or GPUs "
                     "lost)")
    if len(steps) < 2:
        return empty("the job has fewer than two steps with a start time: nothing to align "
                     "the readings on")
    starts = [t for _, t in steps]
    lengths = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    step_ns = statistics.median(lengths)
    lo, hi = starts[0] - MARGIN_S * 1e9, starts[-1] + step_ns + MARGIN_S * 1e9
    inside = {k: [(t, w) for t, w in v if lo <= t <= hi] for k, v in samples.items()}
    inside = {k: v for k, v in inside.items() if v}
    if not inside:
        span = [t for v in samples.values() for t, _ in v]
        return empty(f"the recording(s) ({_fmt_s(min(span))} to {_fmt_s(max(span))} UTC) do "
                     f"not overlap the job's steps ({_fmt_s(starts[0])} to "
                     f"{_fmt_s(int(hi))} UTC)")
    t0 = starts[0]
    series = []
    for name, rows in sorted(inside.items()):
        every = max(1, -(-len(rows) // MAX_POINTS))
        rows = rows[::every]
        series.append(Series(name, tuple(round((t - t0) / 1e9, 4) for t, _ in rows),
                             tuple(round(w, 2) for _, w in rows)))
    pick = max(1, -(-len(steps) // MAX_MARKS))
    marks = tuple((round((t - t0) / 1e9, 4), f"step {s}") for s, t in steps[::pick])
    n = sum(len(v) for v in inside.values())
    whole = LinePlot(*keys[0], tuple(series), marks=marks,
                     note=f"{n} reading(s) of {len(inside)} GPU(s); steps {steps[0][0]} to "
                          f"{steps[-1][0]} (a marker every {pick} step(s)); aligned on wall "
                          "time")
    return whole, _phase_profile(keys[1], inside, steps, step_ns)


def _phase_profile(key, inside, steps, step_ns: float) -> LinePlot:
    """Mean power by time into the step, over every step (the last step's length is the
    median's)."""
    starts = [t for _, t in steps]
    ends = starts[1:] + [starts[-1] + int(step_ns)]
    width = step_ns / PHASE_BINS
    series = []
    for name, rows in sorted(inside.items()):
        bins: list[list[float]] = [[] for _ in range(PHASE_BINS)]
        for t, w in rows:
            i = bisect.bisect_right(starts, t) - 1
            if i < 0 or t >= ends[i]:
                continue
            b = int((t - starts[i]) / width)
            if b < PHASE_BINS:
                bins[b].append(w)
        xs = tuple(round((b + 0.5) * width / 1e6, 3) for b in range(PHASE_BINS))
        ys = tuple(round(statistics.fmean(v), 2) if v else None for v in bins)
        if any(y is not None for y in ys):
            series.append(Series(name, xs, ys))
    if not series:
        return empty_line(*key, "no reading fell within a step")
    return LinePlot(*key, tuple(series),
                    note=f"{PHASE_BINS} bins of the median step ({step_ns / 1e6:.1f} ms); "
                         "readings past a step's median length left out")




def step_power_plot(recordings, events, culprit: int | None = None) -> LinePlot:
    """Each rank's GPU power per step from the energy counter, and the median rank's power
    while computing and while communicating
    (:func:`~ringwatch.analyzers._power_phase.compute_step_energy`)."""
    import polars as pl

    from ringwatch.analyzers._power import compute_energy_intervals, recording_frames
    from ringwatch.analyzers._power_phase import compute_step_energy

    key = ("power-per-step", "GPU power per step, from the energy counter", "training step",
           "W (step mean)")
    frames = [recording_frames(r)[0] for r in recordings]
    fast = pl.concat(frames, how="diagonal_relaxed") if frames else None
    if fast is None or fast.is_empty():
        return empty_line(*key, "the recording(s) hold no energy reading")
    se = compute_step_energy(compute_energy_intervals(fast), events)
    if se.is_empty():
        hosts = sorted(set(fast["host"].unique().to_list()))
        return empty_line(*key, "no step of a rank whose GPU is in the recording(s) is "
                          f"covered by its readings (recorded hosts: {', '.join(hosts)}; a "
                          "rank's GPU is its local rank on its host)")
    ranks = sorted(se["rank"].unique().to_list(), key=lambda r: (r != culprit, r))
    series = []
    for r in ranks[:MAX_RANK_LINES]:
        one = se.filter(pl.col("rank") == r).sort("step")
        series.append(Series(f"rank {r} ({one['host'][0]} gpu{one['gpu'][0]})",
                             tuple(float(s) for s in one["step"]),
                             tuple(None if v is None else round(v, 2)
                                   for v in one["power_w"].to_list()),
                             highlight=r == culprit))
    med = se.group_by("step").agg(pl.col("compute_power_w").median(),
                                  pl.col("comm_power_w").median()).sort("step")
    xs = tuple(float(s) for s in med["step"])
    for col, name in (("compute_power_w", "computing (median rank)"),
                      ("comm_power_w", "in collectives (median rank)")):
        series.append(Series(name, xs, tuple(None if v is None else round(v, 2)
                                             for v in med[col].to_list())))
    note = ("energy over time of each step, split between the rank's collectives and the "
            "rest; steps fully covered by readings")
    if len(ranks) > MAX_RANK_LINES:
        note += f"; {len(ranks) - MAX_RANK_LINES} more rank(s) not drawn"
    return LinePlot(*key, tuple(series), note=note)


__all__ = ["gpu_power_samples", "power_plots", "step_power_plot"]
