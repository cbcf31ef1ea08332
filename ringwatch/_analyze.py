"""``ringwatch analyze``: run the analyzers over a job's logs and print the findings.

Hangs (per-group frontier), stragglers and imbalance (who the others wait for, from
durations) and slow communication (groups whose transfer bandwidth dropped, and the hosts
they share).
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime, timezone
from pathlib import Path

# The columns analyze_events reads (hangs, stragglers, slow links, clock offsets, rhythm
# steps): a post-mortem pass reads only these (10M rows: 4.4 instead of 7.7 GB, 14 instead of
# 22 s, benchmarks/scale.py). An analyzer that starts reading another column fails loudly
# (ColumnNotFoundError) in the tests that run `ringwatch analyze` on real logs.
ANALYZED_COLUMNS = ("rank", "local_rank", "host", "idx", "pg", "pg_ranks", "pg_size",
                    "group_rank", "seq", "op", "is_p2p", "peer", "nbytes", "status",
                    "t_start_ns", "t_end_ns", "mono_start_ns", "mono_end_ns", "duration_ns",
                    "step")
#: Passes a progress bar counts (rhythm and hangs, stragglers, slow links, clock offsets, and
#: the page's plots when asked for).
PASSES = 5


def analyze_events(events, *, now_ns: int, last_seen_ns: dict[int, int] | None = None,
                   min_stall_s: float | None = None, min_gain_share: float | None = None,
                   progress=None, dumped_ns: dict[int, int] | None = None,
                   layout=None, thresholds=None, info: dict | None = None) -> tuple:
    """Every analyzer over one job's rows (a whole log or an online window): the findings.

    Args:
        events: Rows of one job (``JobLogs.events(include_pending=True)``).
        now_ns: Wall clock the stall of a hang is measured up to.
        last_seen_ns: ``rank -> newest flush`` heartbeats, when known.
        min_stall_s: How long a group must be stuck to be a hang (overrides the
            thresholds'; by default 5 s or 10 of the job's usual steps, whichever is longer).
        min_gain_share: Least what-if gain of a straggler, as a share of the job's step
            time (overrides the thresholds'; by default 5%; 0 keeps every straggler).
        progress: ``progress(what, done, total)`` before each pass (see
            :mod:`ringwatch._report._progress`).
        dumped_ns: ``rank -> wall ns`` of each rank's Flight Recorder dump when the rows come
            from dumps: hangs are then attributed from the dumps alone
            (:func:`~ringwatch.analyzers._fr_hangs.detect_dump_hangs`).
        layout: The job's :class:`~ringwatch.analyzers._layout.Layout` (default: inferred
            from the rows). With a pipeline, stragglers and imbalance come from each rank's
            unblocked time against its stage's (:mod:`ringwatch.analyzers._work`): lateness
            at collectives would blame a slow stage's neighbours, blocked in their receives.
        thresholds: The analyzers' :class:`~ringwatch.analyzers._thresholds.Thresholds`
            (default: :data:`~ringwatch.analyzers._thresholds.DEFAULT_THRESHOLDS`).
        info: A dict that gets what the pass decided about the job: ``warmup_steps`` (the
            leading steps left out of the baselines) and ``steps_from_rhythm`` (the job
            marked no steps: they are the rhythm's iterations).
    """
    import polars as pl

    from ringwatch.analyzers import detect_hangs, detect_slow_links, detect_stragglers
    from ringwatch.analyzers._findings import with_local_ranks
    from ringwatch.analyzers._links import explain_by_links
    from ringwatch.analyzers._moe import A2A_OPS, detect_moe_skew, explain_by_skew
    from ringwatch.analyzers._rhythm import assign_rhythm_steps, unmarked
    from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS

    th = thresholds or DEFAULT_THRESHOLDS

    def stage(i: int, what: str) -> None:
        if progress is not None:
            progress(f"analysing: {what}", i, PASSES)

    if unmarked(events):  # no step marks (every row at one step, or none): the rhythm's
        stage(0, "the rhythm's steps")
        events = assign_rhythm_steps(events)  # iterations are the steps
        if info is not None:
            info["steps_from_rhythm"] = True
    th = th.for_job(events)  # a longer warm-up where the job's first steps are far slower
    if info is not None:
        info["warmup_steps"] = th.warmup_steps
    stage(1, "hangs")
    if dumped_ns is not None:
        from ringwatch.analyzers._fr_hangs import detect_dump_hangs

        findings = detect_dump_hangs(events, dumped_ns=dumped_ns)
    else:
        from ringwatch.analyzers._hangs import stall_threshold_s

        findings = detect_hangs(events, now_ns=now_ns, last_seen_ns=last_seen_ns,
                                min_stall_s=stall_threshold_s(events, min_stall_s, th),
                                silent_s=th.silent_s)
    from ringwatch.analyzers._policy import significant

    share = th.min_gain_share if min_gain_share is None else min_gain_share
    stage(2, "stragglers")
    if layout is None:
        from ringwatch.analyzers._layout import infer_layout

        layout = infer_layout(events)
    # ranks of one stage are compared with one another (a slow one is a straggler, from the
    # first step or later); stages may differ by design
    if layout.pp > 1:  # a pipeline: judged by unblocked work (the lateness detector's
        # verdicts, all stragglers and imbalance, would blame a slow stage's neighbours)
        from ringwatch.analyzers._work import detect_work_findings

        hosts = {int(r): str(h) for r, h in events.select("rank", "host").unique("rank")
                 .iter_rows() if r is not None and h is not None}
        stragglers = detect_work_findings(events, layout.peers_frame(), hosts=hosts,
                                          **th.work_args())
    else:
        stragglers = detect_stragglers(events, **th.straggler_args(), stage=layout.stage)
    # the distinct ops only: a cast of every row's op is a string column of millions
    if "op" in events.columns and events["op"].unique().cast(pl.Utf8).is_in(A2A_OPS).any():
        # expert parallel: a hot expert's rank is late because its experts get too many
        # tokens, not a straggler (analyzers/_moe.py)
        stragglers = explain_by_skew(stragglers, detect_moe_skew(events, **th.moe_args()))
    stage(3, "slow links")
    findings += significant(explain_by_links(stragglers, detect_slow_links(
        events, **th.link_args())), events, share)
    local = dict(events.select("rank", "local_rank").unique("rank").iter_rows()) \
        if "local_rank" in events.columns else {}
    return with_local_ranks(findings, local)


def with_probe(findings: tuple, probe_doc: dict) -> tuple:
    """``findings`` plus a probe's, a passive slow-communication finding narrowed to the
    hosts the probe names among its suspects (the probe's matrix tells a host from its
    group-mates, the passive evidence cannot)."""
    from dataclasses import replace

    from ringwatch.analyzers._probe import detect_probe_links, read_probe_matrix

    pm = read_probe_matrix(probe_doc)
    probed = detect_probe_links(pm.bw_MBps, pm.hosts, lat_us=pm.lat_us, ranks=pm.ranks,
                                best=pm.bw_best_MBps)
    named = {h for f in probed for h in f.hosts}
    out = []
    for f in findings:
        both = [h for h in f.hosts if h in named]
        if f.kind == "slow_link" and len(f.hosts) > 1 and both:
            f = replace(f, hosts=tuple(both), confidence=min(1.0, 2 * f.confidence),
                        evidence=f.evidence + (f"the probe names {', '.join(both)} among "
                                               "the suspects",))
        out.append(f)
    return tuple(out) + probed


def with_power(findings: tuple, events, recordings) -> tuple:
    """``findings`` read against the job's GPU recordings: a straggler whose GPU was held
    down in its late steps becomes a ``throttled straggler``, and the power analyzers'
    ``power_headroom`` findings join (labelled synthetic where a recording was generated).
    See docs/power.md."""
    import polars as pl

    from ringwatch.analyzers._power import recording_frames
    from ringwatch.analyzers._power_report import analyze_power
    from ringwatch.analyzers._power_throttle import attribute_throttling

    synthetic = any(r.origin != "nvml" for r in recordings)
    frames = [recording_frames(r) for r in recordings]
    fast = pl.concat([f for f, _ in frames], how="diagonal_relaxed")
    slow = pl.concat([s for _, s in frames], how="diagonal_relaxed")
    plain = events.with_columns(pl.col(pl.Categorical).cast(pl.Utf8))
    findings = attribute_throttling(findings, plain, fast, slow, synthetic=synthetic)
    power = analyze_power(fast, slow, plain, synthetic=synthetic)
    return tuple(findings) + tuple(power.findings)


def analyze_job(job, *, online: bool = False, min_stall_s: float | None = None,
                probe: dict | None = None, plots: bool = False, recordings=(),
                progress=None, layout: str | None = None, thresholds=None) -> dict:
    """Findings of every analyzer over one job's logs.

    Post-mortem (default) the stall of a hang is measured up to the agents' newest write;
    ``online`` measures it up to now. ``probe``: a ``ringwatch probe`` result (loaded JSON)
    over the job's hosts, see :func:`with_probe`. Transient stragglers (ranks that fell
    behind for a few steps and caught up) are ``hiccups``, apart from the findings
    (:func:`~ringwatch.analyzers._policy.split_hiccups`).

    ``plots``: add ``_plots``, the report page's plots (:mod:`ringwatch._report`), with
    ``recordings`` (loaded ``ringwatch agent --record`` files) aligned on the job's steps.
    ``progress``: ``progress(what, done, total)`` as files are read and passes run.
    ``layout``: a declared layout (``tp=4,pp=2,dp=2``), else inferred from the groups.
    ``thresholds``: the analyzers' :class:`~ringwatch.analyzers._thresholds.Thresholds`;
    the report's ``thresholds`` lists those that differ from the defaults.
    """
    from ringwatch.analyzers._timing import TIMING_COLUMNS, with_analysis_durations

    # the device's durations, or none where only the watchdog saw the end, folded into
    # duration_ns as soon as read (analyzers/_timing.py)
    from ringwatch.analyzers._work import WORK_COLUMNS

    read = {"columns": [*ANALYZED_COLUMNS, *TIMING_COLUMNS, *WORK_COLUMNS],
            "categorical": True}
    dumps = getattr(job, "kind", None) == "flight recorder dumps"
    if dumps:  # hangs from dumps alone also compare the members' dtypes and sizes
        from ringwatch.analyzers._fr_hangs import DUMP_COLUMNS

        read["columns"] += [c for c in DUMP_COLUMNS if c not in ANALYZED_COLUMNS]
    if progress is not None and getattr(job, "kind", None) == "ringwatch logs":
        read["progress"] = lambda done, total: progress(
            f"reading {job.job_id}'s files" if done < total
            else f"decoding {job.job_id}'s rows", done, total)
    elif progress is not None:
        progress(f"reading {job.job_id} ({getattr(job, 'kind', '?')})", 0, None)
    events = with_analysis_durations(job.events(include_pending=True, **read))
    seen = job.last_write_ns()
    if online or not seen:
        now_ns = time.time_ns()
    else:
        now_ns = max(seen.values())
    from ringwatch.analyzers import estimate_clock_offsets
    from ringwatch.analyzers._layout import infer_layout, parse_layout
    from ringwatch.analyzers._policy import split_hiccups

    lay = infer_layout(events) if layout is None else parse_layout(layout, len(job.ranks))
    info: dict = {}
    findings, hiccups = split_hiccups(
        analyze_events(events, now_ns=now_ns, last_seen_ns=seen, min_stall_s=min_stall_s,
                       progress=progress, dumped_ns=seen if dumps else None, layout=lay,
                       thresholds=thresholds, info=info))
    held = _recorder_held(job)
    if held:
        findings = tuple(_with_held(f, held) for f in findings)
    if probe is not None:
        findings = with_probe(findings, probe)
    if recordings:
        findings = with_power(findings, events, recordings)
    if progress is not None:
        progress("analysing: host clock offsets", PASSES - 1, PASSES)
    clocks = [{"host": h, "offset_ns": o, "error_ns": e} for h, o, e in
              estimate_clock_offsets(events).select("host", "offset_ns", "error_ns").iter_rows()]
    extra = {}
    if plots:
        from ringwatch._report import job_plots

        if progress is not None:
            progress("plots for the page", PASSES, PASSES)
        extra["_plots"] = job_plots(events, findings, hiccups, probe=probe,
                                    recordings=recordings)
    return {"job_id": job.job_id, "kind": getattr(job, "kind", "ringwatch logs"),
            "path": str(job.path), "ranks": sorted(job.ranks),
            "collectives": events.height, "as_of_ns": now_ns, "clock_offsets": clocks,
            "layout": {"dp": lay.dp, "tp": lay.tp, "pp": lay.pp, "source": lay.source,
                       "stages": {str(r): s for r, s in sorted(lay.stage.items())}
                       if lay.pp > 1 else None, "notes": list(lay.notes),
                       "text": lay.describe()},
            "findings": [f.to_dict() for f in findings], "_findings": findings,
            "hiccups": [f.to_dict() for f in hiccups], "_hiccups": hiccups,
            "thresholds": thresholds.changed() if thresholds is not None else {},
            "warmup_steps": info.get("warmup_steps"),
            "steps_from_rhythm": info.get("steps_from_rhythm", False),
            "recorder_held": held, "unreadable": list(job.problems), **extra}


def _recorder_held(job) -> list[int]:
    """The ranks whose agent's last flush found the recorder held: the main thread stopped
    inside one of ringwatch's hooks (``meta.json``'s ``recorder_held``; logs only)."""
    meta = getattr(job, "meta", None)
    if meta is None:
        return []
    return sorted(r for r, m in meta().items() if isinstance(m, dict)
                  and m.get("recorder_held") is True)


HELD_LINE = ("its agent's last flush found the recorder held (the main thread stopped inside "
             "one of ringwatch's hooks): its rows since its last full flush were not written, "
             "and where it stopped is read from its peers")


def _with_held(f, held: list[int]):
    """A hang on a rank whose recorder was held, with a line saying so."""
    if f.kind != "hang" or not set(f.ranks) & set(held):
        return f
    ranks = sorted(set(f.ranks) & set(held))
    return dataclasses.replace(f, evidence=(*f.evidence, f"rank(s) {ranks}: {HELD_LINE}"))


def _when(ns: int | None) -> str:
    if ns is None:
        return "?"
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def when_parts(f, *, until: bool = False) -> list[str]:
    """A finding's confidence and when it was seen, as the reports print them (``until``:
    with the step it ended at, where it ended)."""
    when = [f"confidence {f.confidence:.2f}"]
    if f.since_step is not None:
        when.append(f"since step {f.since_step}")
    if until and f.until_step is not None:
        when.append(f"until step {f.until_step}")
    if f.detected_step is not None:
        when.append(f"detected at step {f.detected_step}")
    if f.since_ns is not None:
        when.append(_when(f.since_ns))
    return when


def context_lines(report: dict) -> list[str]:
    """What the pass read the job as, before its findings: steps from the rhythm, a longer
    warm-up, thresholds that are not the defaults, the parallel layout (both report forms)."""
    from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS

    lines = []
    if report.get("steps_from_rhythm"):
        lines.append("steps: the job marks none (no optimizer step, no mark_step); they are "
                     "the iterations of the rhythm of its collectives, numbered from 0")
    least = (report.get("thresholds") or {}).get("warmup_steps",
                                                 DEFAULT_THRESHOLDS.warmup_steps)
    if (report.get("warmup_steps") or 0) > least:
        lines.append(f"warm-up: the first {report['warmup_steps']} steps (far slower than the "
                     "job's usual step) are left out of the baselines")
    if report.get("thresholds"):
        lines.append("thresholds (not the defaults): " + ", ".join(
            f"{k}={v}" for k, v in sorted(report["thresholds"].items())))
    if report.get("recorder_held"):
        lines.append(f"recorder held: rank(s) {report['recorder_held']}: {HELD_LINE}")
    lay = report.get("layout")
    if lay and (lay["pp"] > 1 or lay["tp"] > 1 or lay["source"] == "declared"):
        lines.append(f"layout: {lay['text']}")
    return lines


def report_lines(report: dict) -> list[str]:
    kind = report.get("kind", "ringwatch logs")
    lines = [f"job {report['job_id']}"
             + ("" if kind == "ringwatch logs" else f" ({kind}, {report['path']})")
             + f": {len(report['ranks'])} rank(s), "
             f"{report['collectives']} collective rows, as of {_when(report['as_of_ns'])}"]
    lines += context_lines(report)
    clocks = report.get("clock_offsets", [])
    others = [c for c in clocks if c["error_ns"] != 0]
    if others:
        ref = next(c["host"] for c in clocks if c["error_ns"] == 0)
        lines.append(f"host clocks against {ref}'s: " + ", ".join(
            f"{c['host']} {c['offset_ns'] / 1e6:+.2f} ms"
            + (f" (±{c['error_ns'] / 1e6:.2f})" if c["error_ns"] is not None else " (windows "
               "disagree)") for c in others))
    bad = report.get("unreadable") or []
    if bad:
        lines.append(f"{len(bad)} file(s) could not be read (left out of the analysis):")
        lines += [f"  {line}" for line in bad]
    findings = report["_findings"]
    if not findings:
        lines.append("no findings: no group is stuck, no rank or group slows the job beyond "
                     "its noise")
        return lines + hiccup_lines(report.get("_hiccups", ()))
    lines.append(f"{len(findings)} finding(s):")
    for f in findings:
        when = when_parts(f, until=True)
        if f.gain_s_per_step is not None:
            when.append(f"fixing it saves ~{f.gain_s_per_step * 1e3:.1f} ms per step")
        lines.append(f"  {f.headline()}  ({', '.join(when)})")
        lines += [f"      {e}" for e in f.evidence]
    return lines + hiccup_lines(report.get("_hiccups", ()))


def hiccup_lines(hiccups) -> list[str]:
    """A tally of the transient stragglers per rank and of the transient slow links per group:
    how often, when, what they cost."""
    out = []
    ranks = [f for f in hiccups if f.kind == "straggler"]
    if ranks:
        out.append(f"{len(ranks)} hiccup(s), ranks that fell behind for a few steps and caught "
                   "up (not findings; one that recurs is worth a look):")
        out += _tally(ranks, lambda f: f.ranks[0], lambda rank, f: f"rank {rank}" + (
            f" on {f.hosts[0]}" if f.hosts else ""))
    links = [f for f in hiccups if f.kind == "slow_link"]
    if links:
        out.append(f"{len(links)} link hiccup(s), groups whose transfers slowed for a few steps "
                   "and recovered (not findings: a burst of load on their hosts; one that "
                   "recurs is worth a `ringwatch probe`):")
        out += _tally(links, lambda f: f.pg or "", lambda pg, f: (
            f"send/recv {pg[4:].replace('>', ' -> ')}" if pg.startswith("p2p ") else
            f"pg {pg}") + f" (hosts {', '.join(f.hosts)})")
    return out


def _tally(hiccups, key, name) -> list[str]:
    """One line per ``key`` of ``hiccups``: the most frequent first, with each one's steps."""
    per: dict = {}
    for f in hiccups:
        per.setdefault(key(f), []).append(f)
    out = []
    for k, fs in sorted(per.items(), key=lambda kv: (-len(kv[1]), str(kv[0]))):
        spans = ", ".join(f"steps {f.since_step}-{f.until_step}"
                          + (f" (~{f.gain_s_per_step * 1e3:.1f} ms per step)"
                             if f.gain_s_per_step is not None else "") for f in fs)
        out.append(f"  {name(k, fs[0])}: {len(fs)}x, {spans}")
    return out


def cmd_analyze(args) -> int:
    """Every source under ``args.paths``, analysed; one report each.

    Exit 1 (one line) when nothing there could be read. ``--json`` prints the report of a
    single source as one object (files no reader could use in its ``unreadable``); several
    sources give ``{"reports": [...], "unreadable": [...]}``. ``--html FILE`` also writes
    the reports as one self-contained page. On a terminal the summary is a coloured table
    and a progress bar shows on stderr; piped, the plain lines of :func:`report_lines`.
    """
    import sys

    from ringwatch._report import progress_for
    from ringwatch.inputs import open_sources

    thresholds = thresholds_from_args(args)  # a bad one is answered before any reading
    opened = open_sources(args.paths, args.job)
    if not opened.sources:
        where = ", ".join(str(p) for p in args.paths)
        print(f"ringwatch analyze: nothing ringwatch reads under {where} (ringwatch logs, "
              "Flight Recorder dumps, profiler traces or a collective table)", file=sys.stderr)
        for line in opened.unreadable:
            print(f"  {line}", file=sys.stderr)
        return 1
    probe = None
    if args.probe:
        probe = json.loads(Path(args.probe).read_text())
    recordings = _recordings(getattr(args, "gpu_recording", None) or [])
    html = getattr(args, "html", None)
    reports = []
    with progress_for(sys.stderr) as progress:
        for source in opened.sources:
            report = analyze_job(source, online=args.online, min_stall_s=args.min_stall_s,
                                 probe=probe, plots=html is not None, recordings=recordings,
                                 progress=progress, layout=getattr(args, "layout", None),
                                 thresholds=thresholds)
            if len(opened.sources) == 1:
                report["unreadable"] = opened.unreadable + report["unreadable"]
            reports.append(report)
    if html is not None:
        from ringwatch._report import write_html

        write_html(html, reports, unreadable=opened.unreadable if len(reports) > 1 else [])
        print(f"ringwatch analyze: report written to {html}", file=sys.stderr)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in reports]
    if args.json:
        doc = public[0] if len(public) == 1 else {"reports": public,
                                                  "unreadable": opened.unreadable}
        print(json.dumps(doc, indent=1))
        return 0
    if sys.stdout.isatty():
        from ringwatch._report._term import print_reports

        print_reports(reports, opened.unreadable if len(reports) > 1 else [])
        return 0
    lines: list[str] = []
    if len(reports) > 1 and opened.unreadable:
        lines.append(f"{len(opened.unreadable)} file(s) could not be read:")
        lines += [f"  {line}" for line in opened.unreadable]
    for i, report in enumerate(reports):
        if i:
            lines.append("")
        lines += report_lines(report)
    print("\n".join(lines))
    return 0


def add_threshold_args(parser) -> None:
    """``--thresholds FILE`` and ``--threshold NAME=VALUE`` (``ringwatch analyze``, ``serve``)."""
    parser.add_argument("--thresholds", metavar="FILE", help="the analyzers' thresholds from "
                        "a TOML file (top level or a [thresholds] table; names in "
                        "docs/thresholds.md)")
    parser.add_argument("--threshold", action="append", metavar="NAME=VALUE",
                        help="set one threshold (repeatable, after --thresholds), e.g. "
                        "cusum_threshold=8 or min_stall_s=120; 'default' puts one back")


def thresholds_from_args(args):
    """The thresholds ``--thresholds FILE`` and ``--threshold NAME=VALUE`` (in that order)
    give, over the defaults; None when neither is used. A bad one is a one-line error."""
    from ringwatch._config import ConfigError
    from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS, ThresholdError

    files, items = getattr(args, "thresholds", None), getattr(args, "threshold", None) or []
    if not files and not items:
        return None
    try:
        th = DEFAULT_THRESHOLDS.with_file(files) if files else DEFAULT_THRESHOLDS
        return th.with_assignments(items)
    except ThresholdError as exc:
        raise ConfigError(str(exc)) from exc


def _recordings(paths: list[str]) -> list:
    """``ringwatch agent --record`` files, loaded (a bad one is a one-line error)."""
    from ringwatch._config import ConfigError
    from ringwatch.collectors._recording import load_recording
    from ringwatch.collectors._types import CollectorError

    out = []
    for p in paths:
        try:
            out.append(load_recording(p))
        except (OSError, CollectorError) as exc:
            raise ConfigError(f"--gpu-recording {p}: {exc}") from exc
    return out
