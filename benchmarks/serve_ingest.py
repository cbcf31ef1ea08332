"""Ingest throughput of one ``ringwatch serve``: OTLP pushes of N simulated nodes, as fast as
the service takes them, and what its analysis loop makes of the job meanwhile.

    .venv/bin/python benchmarks/serve_ingest.py                 # 64-1024 ranks, 3 runs, ~11 min
    .venv/bin/python benchmarks/serve_ingest.py --quick         # smoke run, ~30 s
    .venv/bin/python benchmarks/serve_ingest.py --json out.json # also save every number

Method
------
Pushes (built once per job size, before anything is timed). Each simulated node runs the
agent's own code path from its state to the wire: a :class:`NodeState` holding, per rank, a
:class:`RankSummary` (per-(group, op) totals, sequence frontier, step, log age) with the
:class:`StepTotals` of its last finished steps, plus by default the node's 8 GPUs and its host
reading (synthetic values, the shapes of ``collectors/_synthetic.py``), turned into points by
``agent.sidecar._points.collect_points``, into the SDK's ``MetricsData`` by
``agent.sidecar._otlp_export.metrics_data`` and into bytes by the SDK's ``encode_metrics`` ->
``SerializeToString()``: what ``OtlpPusher`` posts. The job has ``--ranks-per-node`` (8) ranks
per node and two groups per rank, each with its own process-group name as torch gives them: a
tensor-parallel group of the node's ranks (``0-7``) and a data-parallel group of the ranks with
the same local rank on every node (``3,11,19,...``: strided, so its compact form grows with the
node count; the agent sends it on a group's first step gauge of each push). A step lasts
``--step-s`` (0.5 s): each rank runs the tp group's 4 collectives early in the step and the dp
group's 4 buckets near its end, with a per-(rank, step) jitter that is the same in every push,
so every node tells the same story about the same step. As the agent does (``steps_after``),
a push carries only the finished steps not delivered yet: ``--push-interval-s / --step-s`` of
them (2 by default: the live tests' 1 s pushes), at most ``PUSH_STEPS`` (32).

Each node gets a pool of ``--pool`` pushes one push interval apart. The senders go through the
job in rounds, every node once per round, round ``r`` carrying the steps of the ``r``-th push
interval, so the service sees new steps all along: round ``r`` sends pool entry ``r mod pool``
with its step labels moved on by whole pool periods. The labels are fixed-width strings (the job
is at step 100,000+), so the move rewrites their digits in place in the encoded bytes (positions
found once; one vectorised write, well under a millisecond a push); the other values of the
entry (times, counters, sequence numbers) repeat from period to period. Before the timed part
every node sends catch-up pushes of 32 new steps each (what an agent sends after an outage)
until the service holds ``--prefill-steps`` (200: the service's ``keep_steps``) steps of every
rank, so the analysis is timed on a job in its steady state.

Load. The service runs in its own process, as deployed:
``python -m ringwatch._cli serve --otlp-listen 127.0.0.1:P --listen 127.0.0.1:Q --state-dir off
--window-s 1``, a fresh one for every run. ``--senders`` threads (4) each keep one HTTP/1.1
connection (``http.client.HTTPConnection``) and post the next (round, node) push as soon as the
previous answer is in (closed loop) for ``--seconds`` (20, after ``--warmup-s``). Every answer
must be 200 (else the exit status is 2).

Measurements, all from the service itself: accepted requests/s (``ringwatch_serve_requests_total
{code="200",protocol="http"}``) and data points/s (``ringwatch_serve_points_total``) over the
timed span; the service process's CPU (user + system from ``/proc/<pid>/stat``, all its threads)
as a share of one core, and the points per CPU-second it implies; the analysis, scraped every
0.25 s: ``ringwatch_serve_analysis_seconds{job}`` (the analyzers' part of a round, one value per
round) and ``ringwatch_serve_analysis_lag_seconds``. A round also takes the job's new rows from
its state (``Jobs.take``), which that gauge leaves out, so the whole round is read from the
rounds counter: a round starts ``window_s`` after the previous one ended, so it took the
interval between two ends minus ``window_s``. After the timed span the senders stop and the
rounds are timed again on the same state with no ingest competing for the interpreter (``idle``;
scraped every 50 ms, at least 3 rounds or 6 s, 2 rounds after 20 s), along with the service's
CPU seconds per idle round: the round's cost, whatever else runs on the machine (the wall times
spread with the load of a shared machine; this one hardly does). A scrape that fails is retried
(counted in ``failed_scrapes``).

Derived: ranks per instance at the default window. A rank sends ``P = fixed + per_step x new
steps`` points per push (both measured on the pool: the rank's counters and frontier plus its
share of the node's GPU/host/agent series, and 5 gauges x 2 groups per step), every push
interval ``I`` (the agent's default 10 s; the live tests use 1 s), ``I / step-s`` new steps. One
instance carries ``min(ingest points/s / (P / I), R_window)`` ranks, where ingest is the median
points/s over the sizes and ``R_window`` is the job size at which a whole idle round reaches
``window_s``, interpolated between the two measured sizes around it on a log-log scale (else
extrapolated along a least-squares line through all sizes). The same size by the idle round's
CPU time and by the round under full ingest are printed beside it. The ingest rate is measured
with pushes of ``--push-interval-s``; the mix of step gauges and other points changes with the
interval, so check another interval with that ``--push-interval-s`` (at 10 s: the same points/s,
see ``benchmarks/README.md``).

The benchmark's own process (senders, scrapes) shares the machine: its CPU is printed too, and
the checkout's revision heads the output (the measured code is the working tree's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from ringwatch.agent.sidecar._points import PUSH_STEPS

from _ingest_load import Layout, Pool, build_pool
from _ingest_run import measure


def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def ranks_at_window(sizes: list[int], round_s: list[float | None], window_s: float):
    """Job size at which a round takes ``window_s``: log-log interpolation between the two
    measured sizes around it, or else extrapolation of a least-squares line through all of them.
    (ranks, how) or (None, why)."""
    pts = sorted((r, t) for r, t in zip(sizes, round_s, strict=True) if t is not None and t > 0)
    if len(pts) < 2:
        return None, "fewer than two sizes with a round time"
    for (r0, t0), (r1, t1) in zip(pts, pts[1:], strict=False):
        if t0 <= window_s <= t1 and t1 > t0:
            slope = math.log(t1 / t0) / math.log(r1 / r0)
            return r0 * (window_s / t0) ** (1 / slope), \
                f"interpolated {r0}-{r1}, round ~ ranks^{slope:.2f}"
    xs = [math.log(r) for r, _ in pts]
    ys = [math.log(t) for _, t in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if slope <= 0:
        return None, "round time does not grow with the size"
    side = "below" if pts[0][1] > window_s else "above"
    return math.exp(mx + (math.log(window_s) - my) / slope), \
        f"extrapolated {side} the sizes, fit round ~ ranks^{slope:.2f}"


def _f(x, fmt: str = ".2f", width: int = 8) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{fmt}}"


def report(pools: dict[int, Pool], results: dict[int, list[dict]], *, window_s: float,
           step_s: float, intervals: tuple[float, ...]) -> dict:
    sizes = sorted(results)
    print()
    print("medians over runs; analyzers = ringwatch_serve_analysis_seconds (the analyzers' part "
          "of a round),")
    print("round = whole round from the rounds counter (snapshot copy + analyzers + store), "
          "idle = after the senders stopped,")
    print("idle cpu = the service's CPU seconds per idle round (what the round costs, whatever "
          "else runs on the machine)")
    head = (f"{'ranks':>6} {'nodes':>5} {'runs':>4} {'kB/push':>8} {'pts/push':>8} {'req/s':>7} "
            f"{'points/s':>9} {'MB/s':>6} {'serve%':>6} {'pts/cpu-s':>9} {'bench%':>6} "
            f"{'analyz s':>8} {'round s':>8} {'lag s':>6} {'idle an.':>8} {'idle rnd':>8} "
            f"{'idle cpu':>8} {'load':>5}")
    print(head)
    print("-" * len(head))
    summary = {}
    for r in sizes:
        rows, pool = results[r], pools[r]
        pps, cpu = _median(rows, "points_per_s"), _median(rows, "service_cpu_pct")
        per_cpu = statistics.median(x["points_per_s"] / (x["service_cpu_pct"] / 100)
                                    for x in rows if x["service_cpu_pct"] > 0)
        med = {k: _median(rows, k) for k in rows[0] if not isinstance(rows[0][k], dict)}
        med["points_per_cpu_s"] = per_cpu
        summary[r] = med
        print(f"{r:>6} {pool.layout.nodes:>5} {len(rows):>4} {pool.body_bytes / 1e3:>8.1f} "
              f"{pool.points_per_push:>8.0f} {med['req_per_s']:>7.1f} {pps:>9.0f} "
              f"{med['mb_per_s']:>6.1f} {cpu:>6.1f} {per_cpu:>9.0f} "
              f"{med['bench_cpu_pct']:>6.1f} {_f(med['analysis_s'])} {_f(med['round_s'])} "
              f"{_f(med['lag_s_median'], '.2f', 6)} {_f(med['idle_analysis_s'])} "
              f"{_f(med['idle_round_s'])} {_f(med['idle_round_cpu_s'])} "
              f"{med['load1']:>5.1f}")
    pool0 = pools[sizes[0]]
    ingest = statistics.median(summary[r]["points_per_s"] for r in sizes)
    r_win, how = ranks_at_window(sizes, [summary[r]["idle_round_s"] for r in sizes], window_s)
    r_win_load, how_load = ranks_at_window(sizes, [summary[r]["round_s"] for r in sizes],
                                           window_s)
    r_win_cpu, how_cpu = ranks_at_window(
        sizes, [summary[r]["idle_round_cpu_s"] for r in sizes], window_s)
    print()
    fixed = pool0.points_per_rank(0)
    per_step = pool0.points_per_rank(1) - fixed
    print(f"points per rank per push P = {fixed:.1f} + {per_step:.0f} per new step carried "
          f"({per_step:.0f} = 5 gauges x 2 groups; {fixed:.1f} = the rank's counters and "
          f"frontier, and its share of the node's GPU/host/agent series)")
    print(f"ingest: {ingest:.0f} points/s (median over sizes)")
    print(f"analysis round = window ({window_s:g} s) at: {_f(r_win, '.0f', 0)} ranks idle "
          f"({how}); {_f(r_win_cpu, '.0f', 0)} by its CPU time ({how_cpu}); "
          f"{_f(r_win_load, '.0f', 0)} under full ingest ({how_load})")
    derived = {"P_fixed": fixed, "P_per_step": per_step, "ingest_points_per_s": ingest,
               "ranks_at_window_idle": r_win, "ranks_at_window_cpu": r_win_cpu,
               "ranks_at_window_loaded": r_win_load, "intervals": {}}
    for interval in intervals:
        new_steps = min(PUSH_STEPS, interval / step_s)
        p = pool0.points_per_rank(new_steps)
        by_ingest = ingest / (p / interval)
        limits = {"ingest": by_ingest, "analysis window": r_win}
        which = min((v, k) for k, v in limits.items() if v is not None)
        derived["intervals"][f"{interval:g}"] = {
            "new_steps": new_steps, "P": p, "by_ingest": by_ingest, "by_window": r_win,
            "ranks_max": which[0], "limit": which[1]}
        print(f"push every {interval:g} s ({new_steps:g} new steps of {step_s:g} s, P = {p:.0f}):"
              f" ingest carries {by_ingest:.0f} ranks, the window {_f(r_win, '.0f', 0)}: "
              f"ranks per instance = {which[0]:.0f} (limit: {which[1]})")
    one = derived["intervals"]
    parts = ", ".join(f"{v['ranks_max']:.0f} ranks at {k} s pushes ({v['limit']})"
                      for k, v in one.items())
    print(f"\nSUMMARY: one ringwatch serve ingests {ingest:.0f} points/s "
          f"({statistics.median(summary[r]['req_per_s'] for r in sizes):.0f} node pushes/s); "
          f"its analysis round reaches the {window_s:g} s window at "
          f"{_f(r_win, '.0f', 0)} ranks; ranks per instance: {parts}")
    return {"per_size": summary, "derived": derived}


def _revision() -> str:
    """The checkout's commit, ``+changes`` when the measured code differs from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service", "agent",
                                "analyzers", "ringwatch"], cwd=root, text=True,
                               capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return (head or "unknown revision") + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    # A SIGTERM (pkill, a CI timeout) must run the `finally` that stops the service process,
    # or it outlives the benchmark and takes CPU from whatever runs next.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 64 and 128 ranks, 1 run of 5 s, 64 prefill steps (~30 s)")
    ap.add_argument("--ranks", default="64,128,256,1024", help="job sizes (default %(default)s)")
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8,
                    help="GPU series in each push (0: ranks and host only)")
    ap.add_argument("--runs", type=int, default=3, help="fresh services per size (default 3)")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed span of each run")
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--senders", type=int, default=4, help="sender threads (connections)")
    ap.add_argument("--window-s", type=float, default=1.0, help="the service's --window-s")
    ap.add_argument("--step-s", type=float, default=0.5, help="simulated step time")
    ap.add_argument("--push-interval-s", type=float, default=1.0,
                    help="simulated agent push interval: a push carries interval / step-s new "
                    "steps (default 1 s, as the live tests; the agent's default is 10 s)")
    ap.add_argument("--prefill-steps", type=int, default=200,
                    help="steps sent before timing (the service keeps 200)")
    ap.add_argument("--pool", type=int, default=2, help="pushes encoded per node")
    ap.add_argument("--pool-mb", type=int, default=256, help="memory cap of one size's pool")
    ap.add_argument("--idle-max-s", type=float, default=90.0,
                    help="longest wait for the idle analysis rounds")
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args(argv)
    if args.quick:
        args.ranks, args.runs, args.seconds, args.warmup_s = "64,128", 1, 5.0, 1.0
        args.prefill_steps, args.pool = 64, 1
    sizes = [int(x) for x in args.ranks.split(",")]
    steps_per_push = max(1, min(PUSH_STEPS, round(args.push_interval_s / args.step_s)))
    if any(r % args.ranks_per_node for r in sizes):
        ap.error("every size must be a multiple of --ranks-per-node")
    idle_min_s = 3.0 if args.quick else 6.0

    print(f"ringwatch serve ingest at {_revision()}: sizes {sizes}, {args.ranks_per_node} "
          f"ranks and {args.gpus_per_node} GPUs per node, {args.senders} senders, "
          f"{args.runs} run(s) of {args.seconds:g} s, window {args.window_s:g} s, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    pools = {}
    for r in sizes:
        pools[r] = build_pool(Layout(r // args.ranks_per_node, args.ranks_per_node),
                              pool=args.pool, steps_per_push=steps_per_push,
                              prefill_steps=args.prefill_steps, step_s=args.step_s,
                              gpus=args.gpus_per_node, max_bytes=args.pool_mb << 20)
        p = pools[r]
        print(f"  pool {r:>5} ranks: {p.layout.nodes} nodes x {len(p.pool[0])} push(es) of "
              f"{steps_per_push} new step(s), {p.body_bytes / 1e3:.1f} kB and "
              f"{p.points_per_push:.0f} points a push ({p.step_points_per_push:.0f} step "
              f"gauges), encoded in {p.build_s:.1f} s", flush=True)
    results: dict[int, list[dict]] = {r: [] for r in sizes}
    for run in range(args.runs):  # sizes interleaved: slow drifts of the machine spread out
        for r in sizes:
            res = measure(pools[r], seconds=args.seconds, senders=args.senders,
                          window_s=args.window_s, warmup_s=args.warmup_s,
                          idle_min_s=idle_min_s, idle_max_s=args.idle_max_s)
            res["run"] = run
            results[r].append(res)
            print(f"  run {run + 1} {r:>5} ranks: {res['req_per_s']:6.1f} req/s "
                  f"{res['points_per_s']:8.0f} points/s, service CPU "
                  f"{res['service_cpu_pct']:5.1f}%, analyzers {_f(res['analysis_s'], '.2f', 0)}"
                  f" s, round {_f(res['round_s'], '.2f', 0)} s, idle round "
                  f"{_f(res['idle_round_s'], '.2f', 0)} s "
                  f"({_f(res['idle_round_cpu_s'], '.2f', 0)} CPU s), lag "
                  f"{_f(res['lag_s_median'], '.2f', 0)} s, prefill {res['prefill_s']:.1f} s, "
                  f"load {res['load1']:.1f}"
                  + (f", NOT 200: {res['bad_answers']}" if res["bad_answers"] else "")
                  + (f", {res['failed_scrapes']} scrape(s) retried" if res["failed_scrapes"]
                     else ""),
                  flush=True)
    out = report(pools, results, window_s=args.window_s, step_s=args.step_s,
                 intervals=(1.0, 10.0))
    bad = sum(sum(x["bad_answers"].values()) + x["analysis_errors"]
              for rows in results.values() for x in rows)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "runs": results, **out}, indent=1, default=str))
    if bad:
        print(f"{bad:.0f} push(es) not answered 200 or analyses failed", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
