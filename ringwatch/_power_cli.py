"""``ringwatch power LOG_DIR|RECORDING ...``: power headroom, phases, swing and what-ifs.

A thin command over :func:`ringwatch.analyzers._power_report.analyze_power`: it reads NVML
recordings (``ringwatch agent --record``) and, when a log folder is given, the job's rows, and
prints a summary (or ``--json``). A log folder without a recording can be analyzed with
``--synthetic``: readings are then generated to follow its ranks' phases and every line says
so.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_parsers(sub) -> None:
    """Register ``ringwatch power``."""
    p = sub.add_parser(
        "power", help="power headroom, phase power, swing and what-ifs from NVML recordings",
        description="Analyze NVML recordings (ringwatch agent --record): power per GPU from the "
        "energy counter, headroom (limit minus p99/p99.9) per GPU, node and job, time "
        "throttled, swing and synchrony; with a job's logs, power while computing and while "
        "in collectives, energy per step, throttled stragglers and a power-cap what-if.")
    p.add_argument("paths", nargs="+", metavar="LOG_DIR|RECORDING",
                   help="recordings (.jsonl.gz) and/or one job's log folder (recordings in "
                   "it are used too)")
    p.add_argument("--job", help="job id within the log folder (default: the latest)")
    p.add_argument("--synthetic", action="store_true",
                   help="no recording: generate readings that follow the ranks' phases "
                   "(labelled synthetic everywhere)")
    p.add_argument("--cap-w", type=float, help="per-GPU power cap of the what-if, W "
                   "(default 90%% of the enforced limit)")
    p.add_argument("--budget-w", type=float, help="power budget of the oversubscription "
                   "estimate, W (default: 100 nodes at their limits)")
    p.add_argument("--window-s", type=float, default=60.0,
                   help="window of the worst-window headroom, seconds (default 60)")
    p.add_argument("--epsilon", type=float, default=0.01,
                   help="allowed probability of exceeding the budget (default 0.01)")
    p.add_argument("--min-headroom-share", type=float, default=0.05,
                   help="headroom under this share of the limit is a finding (default 0.05)")
    p.add_argument("--throttled-share", type=float, default=0.05,
                   help="time share held down for power/heat that counts as throttled "
                   "(default 0.05)")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    p.set_defaults(func=cmd_power)


def _inputs(paths: list[str], job: str | None):
    """``(recordings, log_dir)`` from the command line's paths."""
    from ringwatch.collectors._recording import load_recording
    from ringwatch.collectors._types import CollectorError

    recs, log_dir = [], None
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            recs.append(load_recording(path))
        elif path.is_dir():
            if log_dir is not None:
                raise ValueError("one log folder at a time")
            log_dir = path
            for f in sorted(path.rglob("*.jsonl.gz")):
                try:
                    recs.append(load_recording(f))
                except CollectorError:
                    continue
        else:
            raise FileNotFoundError(f"{raw}: no such file or folder")
    return recs, log_dir


def cmd_power(args) -> int:
    import polars as pl

    from ringwatch.analyzers._policy import split_hiccups
    from ringwatch.analyzers._power import recording_frames
    from ringwatch.analyzers._power_headroom import PowerThresholds
    from ringwatch.analyzers._power_report import analyze_power
    from ringwatch.analyzers._power_throttle import attribute_throttling
    from ringwatch.analyzers._stragglers import detect_stragglers

    recs, log_dir = _inputs(args.paths, args.job)
    events = None
    if log_dir is not None:
        from ringwatch._logs import LogError, read_events

        try:
            events = read_events(log_dir, args.job)
        except LogError as exc:
            if not recs:
                raise ValueError(str(exc)) from exc
    if not recs:
        if not args.synthetic or events is None:
            raise ValueError(f"{', '.join(args.paths)}: no NVML recording (record one with "
                             "`ringwatch agent --record FILE`, or pass --synthetic with a "
                             "log folder to generate readings that follow its ranks' phases)")
        from ringwatch.collectors._synthetic_power import phase_recordings

        recs = phase_recordings(events)
    synthetic = any(r.origin != "nvml" for r in recs)
    frames = [recording_frames(r) for r in recs]
    fast = pl.concat([f for f, _ in frames], how="diagonal_relaxed")
    slow = pl.concat([s for _, s in frames], how="diagonal_relaxed")
    th = PowerThresholds(epsilon=args.epsilon, min_headroom_share=args.min_headroom_share,
                         throttled_share=args.throttled_share)
    report = analyze_power(fast, slow, events, synthetic=synthetic, thresholds=th,
                           cap_w=args.cap_w, budget_w=args.budget_w,
                           window_s=args.window_s)
    stragglers = ()
    if events is not None and not events.is_empty():
        found, _ = split_hiccups(detect_stragglers(events))
        stragglers = attribute_throttling(tuple(f for f in found if f.kind == "straggler"),
                                          events, fast, slow, thresholds=th,
                                          synthetic=synthetic)
    if args.json:
        d = report.to_dict()
        d["findings"] += [f.to_dict() for f in stragglers]
        d["sources"] = [{"host": r.host, "origin": r.origin, "complete": r.complete}
                        for r in recs]
        print(json.dumps(d, indent=1, default=str))
        return 0
    for line in summary_lines(report, recs, stragglers):
        print(line)
    return 0


def _w(v) -> str:
    return "-" if v is None else f"{v:.0f} W"


def summary_lines(report, recs, stragglers=()) -> list[str]:
    """The terminal summary of a :class:`~ringwatch.analyzers._power_report.PowerReport`."""
    tag = " [SYNTHETIC readings: generated, not measured]" if report.synthetic else ""
    out = [f"power: {len(report.sampling)} GPU(s) on {len({r.host for r in recs})} host(s)"
           f"{tag}"]
    for s in report.sampling:
        moves = (f"energy counter moves every {s.energy_update_s * 1e3:.0f} ms "
                 f"({s.repeated_share:.0%} of samples repeat)" if s.energy_update_s
                 else f"source {s.source}")
        out.append(f"  sampling {s.host}/{s.gpu}: {s.sample_hz:.1f} Hz, {moves}: resolved "
                   f"to {s.resolution_s * 1e3:.0f} ms, nothing above {s.nyquist_hz:.1f} Hz"
                   + (f"; {s.wraps} wrap(s), {s.resets} reset(s)" if s.wraps or s.resets
                      else ""))
    qs = [c.removeprefix("headroom_").removesuffix("_w") for c in report.headroom.columns
          if c.startswith("headroom_")]
    out.append(f"headroom (enforced limit minus {' / '.join(qs)} power){tag}:")
    for r in report.headroom.iter_rows(named=True):
        figs = "  ".join(f"{q} {_w(r[f'{q}_w'])} (headroom {_w(r[f'headroom_{q}_w'])})"
                         for q in qs)
        out.append(f"  {r['scope']:<12} {r['name']:<14} limit {_w(r['limit_w'])}  mean "
                   f"{_w(r['mean_w'])}  {figs}")
    if not report.headroom_window.is_empty():
        q = qs[-1]
        out.append(f"  worst {report.window_s:g} s window (least {q} headroom):")
        for r in report.headroom_window.iter_rows(named=True):
            out.append(f"  {r['scope']:<12} {r['name']:<14} {_w(r[f'worst_headroom_{q}_w'])}"
                       f" (median window {_w(r[f'median_headroom_{q}_w'])}, "
                       f"{r['windows']} windows)")
    for r in report.throttle.iter_rows(named=True):
        out.append(f"  throttled {r['host']}/{r['gpu']}: power {r['power_share'] or 0:.1%}, "
                   f"thermal {r['thermal_share'] or 0:.1%} of {r['window_s']:.0f} s")
    if report.phases:
        out.append("phases (energy counter split by each rank's collectives; fit: least "
                   "squares over the counter's intervals):")
        fit = {r["rank"]: r for r in report.phases["fit"].iter_rows(named=True)}
        for r in report.phases["rank"].iter_rows(named=True):
            f = fit.get(r["rank"], {})
            out.append(f"  rank {r['rank']} ({r['host']}/{r['gpu']}): computing "
                       f"{_w(r['compute_power_w'])}, in collectives {_w(r['comm_power_w'])} "
                       f"(fit {_w(f.get('compute_fit_w'))} / {_w(f.get('comm_fit_w'))}), "
                       f"{r['comm_share']:.0%} of its time in collectives, "
                       f"{r['energy_per_step_j']:.1f} J per step")
        for r in report.phases["node"].iter_rows(named=True):
            out.append(f"  node {r['host']}: {r['energy_per_step_j']:.1f} J per step "
                       f"({r['ranks']} GPU(s))")
        j = report.phases["job"].row(0, named=True)
        out.append(f"  job: {j['energy_per_step_j']:.1f} J per iteration over {j['ranks']} "
                   f"GPU(s) ({j['steps']} steps)")
    for s in report.swing:
        band = (f"{s.band_hz[0]:.2g}-{s.band_hz[1]:.2g} Hz band {s.band_share:.0%} of the "
                f"variance (RMS {s.band_rms_w:.0f} W)" if s.band_hz else "band above Nyquist")
        per_step = (f", per step {s.step_peak_to_trough_w:.0f} W"
                    if s.step_peak_to_trough_w is not None else "")
        sync = (f"; GPUs correlate {s.correlation:.2f}, synchrony {s.synchrony:.2f}"
                if s.synchrony is not None else "")
        out.append(f"swing {s.scope} {s.name}: peak-to-trough {s.peak_to_trough_w:.0f} W"
                   f"{per_step}, ramps up to +{s.ramp_up_max_w_per_s:.0f} / "
                   f"-{s.ramp_down_max_w_per_s:.0f} W/s, {band}"
                   + (f", dominant {s.dominant_hz:.2g} Hz" if s.dominant_hz else "") + sync)
    for c, how in ((report.cap, "per-step split"), (report.cap_fit, "fitted phase levels")):
        if c is None:
            continue
        out.append(f"what-if cap {c.cap_w:.0f} W per GPU ({how}): {c.capped_share:.0%} of "
                   f"steps' compute above it; +{c.added_s_per_step[0] * 1e3:.1f} ms per step "
                   f"({c.cost_share:.1%} of {c.step_s * 1e3:.0f} ms) at most, "
                   f"+{c.added_s_per_step[1] * 1e3:.1f} ms with voltage scaling")
    for r in report.cap_check.iter_rows(named=True):
        obs = "-" if r["observed_share"] is None else f"{r['observed_share']:.1%}"
        out.append(f"  model at the limit, {r['host']}/{r['gpu']}: predicted held down "
                   f"{r['predicted_share']:.1%}, power violation counter {obs}")
    o = report.oversubscription
    if o:
        out.append(f"oversubscription (budget {o.budget_w / 1e3:.1f} kW, violation "
                   f"probability {o.epsilon:g}, node correlation {o.rho:.2f}): {o.nodes} "
                   f"nodes like this one fit (in step: {o.nodes_synchronous}; at nameplate: "
                   f"{o.nodes_nameplate}){tag}")
    findings = (*report.findings, *stragglers)
    out.append(f"findings: {len(findings)}" + tag)
    for f in findings:
        out.append(f"  {f.headline()}")
        out.extend(f"    {e}" for e in f.evidence)
    return out
