"""Scale benchmark: the analyzers over an online window and a post-mortem pass, on synthetic logs.

Cases, each run in a fresh Python process so that its peak memory (``ru_maxrss``) is its own:

* ``window-healthy``, ``window-straggler``, ``window-hang``: one online window of ``--ranks``
  ranks x ``--slots`` collectives each (1M rows by default), already in memory as a polars
  frame, passed to ``ringwatch._analyze.analyze_events``: one warm-up call, then the median
  of ``--repeats`` timed calls. The straggler is late from two thirds of the window on; the
  hang stops the job three steps before the window's end; every agent's heartbeat is a minute
  after the last row.
* ``postmortem``: ``--events`` rows (10M by default) of ``--pm-ranks`` ranks, with a straggler
  from a third of the job and a hang three steps before its end, written as the agent lays
  logs out on disk (per-rank segment files, ``pending.parquet``, ``meta.json``); then
  ``--pm-repeats`` fresh processes each read them with the real reader
  (``open_job(dir).events(include_pending=True)``), take the agents' heartbeats and run
  ``analyze_events``: ``ringwatch analyze`` without its extras (clock offsets, a probe).
  The wall time counts from opening the logs to the findings.
* ``postmortem-analyzed``: the same, reading only :data:`ANALYZED_COLUMNS` (the reader's
  ``columns=``) with the strings as categoricals (``categorical=True``), as ``ringwatch
  analyze`` reads; its findings must equal the full read's.

The injected culprits are checked against the findings and printed; a fault the analyzers do
not find is reported as such (exit status 2), never tuned away: the generator is a scale
generator (``synthetic.py``), detection is claimed from real runs (``scenarios.py``).

    .venv/bin/python benchmarks/scale.py                 # full sizes
    .venv/bin/python benchmarks/scale.py --quick         # smoke run, small sizes
    .venv/bin/python benchmarks/scale.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ``postmortem-analyzed`` reads only the columns analyze_events uses, as `ringwatch analyze`
# does; ``postmortem`` reads them all. Their findings are compared.
from ringwatch._analyze import ANALYZED_COLUMNS

HERE = Path(__file__).resolve().parent
WINDOW_TARGET_S = 1.0
PM_TARGET_S = 20.0
PM_TARGET_MB = 2048.0
STEP_SLOTS = 5  # slots per step of the synthetic job: 1 tensor-parallel all-gather, 4 buckets


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=10_000, help="ranks of the online window")
    p.add_argument("--slots", type=int, default=100, help="collectives per rank in the window")
    p.add_argument("--events", type=int, default=10_000_000, help="rows of the post-mortem")
    p.add_argument("--pm-ranks", type=int, default=2_000, help="ranks of the post-mortem job")
    p.add_argument("--repeats", type=int, default=5, help="timed window calls per case")
    p.add_argument("--pm-repeats", type=int, default=3, help="post-mortem runs (processes)")
    p.add_argument("--cases", default="window-healthy,window-straggler,window-hang,postmortem,"
                   "postmortem-analyzed")
    p.add_argument("--max-rss-mb", type=float, default=12_000,
                   help="stop a case whose process passes this much memory (shared machine)")
    p.add_argument("--straggler-ms", type=float, default=5.0,
                   help="extra compute of the straggler before each collective")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tmp", default=None, help="where the post-mortem logs go (removed after)")
    p.add_argument("--logs", default=None,
                   help="keep the post-mortem logs in this folder, and reuse them when it "
                        "already holds the same job (its spec.json)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--json", default=None, help="also write every figure to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.ranks, args.slots, args.events, args.pm_ranks = 512, 100, 200_000, 200
        args.repeats, args.pm_repeats = 2, 1
    return args


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _job(spec: dict):
    sys.path.insert(0, str(HERE))
    from synthetic import SyntheticJob

    return SyntheticJob(**spec)


def _summary(findings) -> list[dict]:
    return [{"kind": f.kind, "cls": f.cls, "ranks": list(f.ranks[:8]), "n_ranks": len(f.ranks),
             "pg": f.pg, "seq": f.seq, "since_step": f.since_step,
             "detected_step": f.detected_step, "confidence": round(f.confidence, 2)}
            for f in findings]


def child_window(spec: dict, repeats: int) -> dict:
    from synthetic import job_frame, newest_wall_ns, timeline

    from ringwatch._analyze import analyze_events

    job = _job(spec)
    t0 = time.perf_counter()
    tl = timeline(job)
    events = job_frame(job, tl)
    gen_s = time.perf_counter() - t0
    now_ns = newest_wall_ns(job, tl) + 60 * 10**9
    seen = dict.fromkeys(range(job.ranks), now_ns)
    rss_frame = _rss_mb()
    findings = analyze_events(events, now_ns=now_ns, last_seen_ns=seen)  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        analyze_events(events, now_ns=now_ns, last_seen_ns=seen)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"rows": events.height, "frame_mb": events.estimated_size() / 2**20,
            "gen_s": gen_s, "times_s": times, "cpu_s": cpu, "load": os.getloadavg()[0],
            "rss_before_mb": rss_frame,
            "peak_rss_mb": _rss_mb(), "findings": _summary(findings)}


def child_write(spec: dict, log_dir: str) -> dict:
    from synthetic import write_logs

    job = _job(spec)
    t0 = time.perf_counter()
    path = write_logs(job, log_dir)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"write_s": time.perf_counter() - t0, "disk_mb": size / 2**20,
            "files": sum(1 for p in path.rglob("*") if p.is_file()),
            "peak_rss_mb": _rss_mb()}


def child_postmortem(job_dir: str, columns: list[str] | None) -> dict:
    """What ``ringwatch analyze`` does with a job's logs, less its extras (clock offsets,
    a probe): read every rank's rows, take the agents' heartbeats, run every analyzer."""
    from ringwatch._analyze import analyze_events
    from ringwatch._logs import open_job

    t0, c0 = time.perf_counter(), time.process_time()
    job = open_job(job_dir)
    # the analyzed read is `ringwatch analyze`'s: its columns, strings as categoricals
    from ringwatch.analyzers._timing import TIMING_COLUMNS, with_analysis_durations
    from ringwatch.analyzers._work import WORK_COLUMNS

    extra = [*TIMING_COLUMNS, *WORK_COLUMNS]  # as analyze_job reads
    events = with_analysis_durations(job.events(
        include_pending=True, columns=None if columns is None else [*columns, *extra],
        categorical=columns is not None))
    read_s, rss_read = time.perf_counter() - t0, _rss_mb()
    seen = job.last_write_ns()
    findings = analyze_events(events, now_ns=max(seen.values()), last_seen_ns=seen)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"rows": events.height, "columns": events.width,
            "frame_mb": events.estimated_size() / 2**20, "wall_s": wall, "cpu_s": cpu,
            "load": os.getloadavg()[0], "read_s": read_s,
            "rss_after_read_mb": rss_read, "peak_rss_mb": _rss_mb(),
            "problems": len(job.problems), "findings": _summary(findings)}


def _watch_rss(limit_mb: float) -> None:
    """Stop this process (exit 3) if its memory passes ``limit_mb``: the machine is shared."""
    import threading

    def watch():
        while True:
            with open("/proc/self/status") as f:
                rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024
            if rss > limit_mb:
                print(f"RSS {rss:.0f} MB over the limit of {limit_mb:.0f} MB", file=sys.stderr,
                      flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def run_child(kind: str, max_rss_mb: float, **kw) -> dict:
    arg = json.dumps({"kind": kind, "max_rss_mb": max_rss_mb, **kw})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", arg],
                          capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{kind} child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def child_main(arg: str) -> None:
    sys.path.insert(0, str(HERE))
    kw = json.loads(arg)
    kind = kw.pop("kind")
    limit = kw.pop("max_rss_mb")
    if os.path.exists("/proc/self/status"):
        _watch_rss(limit)
    out = {"window": child_window, "write": child_write,
           "postmortem": child_postmortem}[kind](**kw)
    print("RESULT " + json.dumps(out), flush=True)


def expected(spec: dict) -> list[tuple[str, int]]:
    """``(kind, rank)`` the findings should name."""
    out = []
    if spec.get("straggler") is not None:
        out.append(("straggler", spec["straggler"]))
    if spec.get("hang") is not None:
        out.append(("hang", spec["hang"]))
    return out


def check(spec: dict, findings: list[dict]) -> tuple[bool, list[str]]:
    """Whether every injected culprit is named, and lines saying what was found."""
    lines, ok = [], True
    for kind, rank in expected(spec):
        hit = [f for f in findings if rank in f["ranks"] and f["n_ranks"] <= 8
               and (f["kind"] == kind or (kind == "straggler" and f["kind"] == "imbalance"))]
        ok &= bool(hit)
        lines.append(f"injected {kind} on rank {rank}: " + (
            f"found ({hit[0]['kind']}, {hit[0]['cls']}, since step {hit[0]['since_step']}, "
            f"by step {hit[0]['detected_step']})" if hit else "NOT FOUND"))
    named = {r for _, r in expected(spec)}
    for f in findings:
        if not named & set(f["ranks"]) or f["n_ranks"] > 8:
            lines.append(f"other finding: {f['kind']} ({f['cls']}) ranks {f['ranks']}"
                         f"{' +more' if f['n_ranks'] > 8 else ''}, pg {f['pg']} #{f['seq']}")
    return ok, lines


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}..{max(xs):.3f})"


def _window_cases(args, rng: random.Random, out: list[dict]) -> None:
    steps = max(1, args.slots // STEP_SLOTS)
    for case in [c for c in args.case_list if c.startswith("window")]:
        spec = {"ranks": args.ranks, "steps": steps, "seed": args.seed,
                "straggler_ms": args.straggler_ms}
        if case == "window-straggler":
            spec |= {"straggler": rng.randrange(1, args.ranks),
                     "straggler_step": (2 * steps) // 3}
        elif case == "window-hang":
            spec |= {"hang": rng.randrange(1, args.ranks), "hang_step": max(0, steps - 3)}
        try:
            r = run_child("window", args.max_rss_mb, spec=spec, repeats=args.repeats)
        except RuntimeError as exc:
            out.append({"case": case, "spec": spec, "error": str(exc)})
            print(f"{case}: FAILED\n{exc}")
            continue
        ok, lines = check(spec, r["findings"])
        met = statistics.median(r["times_s"]) < WINDOW_TARGET_S
        out.append({"case": case, "spec": spec, **r, "found": ok, "met": met, "lines": lines,
                    "wall": r["times_s"], "cpu": r["cpu_s"], "target": f"< {WINDOW_TARGET_S:g} s"})
        print(f"{case}: {r['rows']} rows ({r['frame_mb']:.0f} MB frame, generated in "
              f"{r['gen_s']:.1f} s), analyze_events {_spread(r['times_s'])} s")
        print("".join(f"    {x}\n" for x in lines) or "    no findings\n", end="")


def _postmortem_cases(args, rng: random.Random, out: list[dict]) -> None:
    variants = [c for c in args.case_list if c.startswith("postmortem")]
    if not variants:
        return
    pm_steps = max(1, args.events // (args.pm_ranks * STEP_SLOTS))
    spec = {"ranks": args.pm_ranks, "steps": pm_steps, "seed": args.seed,
            "straggler_ms": args.straggler_ms, "straggler": rng.randrange(1, args.pm_ranks),
            "straggler_step": pm_steps // 3, "hang": rng.randrange(1, args.pm_ranks),
            "hang_step": max(0, pm_steps - 3)}
    tmp = args.logs or tempfile.mkdtemp(prefix="ringwatch-scale-", dir=args.tmp)
    saved = Path(tmp) / "spec.json"
    try:
        if args.logs and saved.exists() and json.loads(saved.read_text()) == spec:
            w = {"reused": tmp}
            print(f"postmortem: reusing the logs in {tmp}")
        else:
            shutil.rmtree(Path(tmp) / "synthetic", ignore_errors=True)
            Path(tmp).mkdir(parents=True, exist_ok=True)
            w = run_child("write", args.max_rss_mb, spec=spec, log_dir=tmp)
            saved.write_text(json.dumps(spec))
            print(f"postmortem: wrote {w['files']} files, {w['disk_mb']:.0f} MB, in "
                  f"{w['write_s']:.1f} s")
        for case in variants:
            columns = list(ANALYZED_COLUMNS) if case == "postmortem-analyzed" else None
            try:
                runs = [run_child("postmortem", args.max_rss_mb, columns=columns,
                                  job_dir=str(Path(tmp) / "synthetic"))
                        for _ in range(args.pm_repeats)]
            except RuntimeError as exc:
                out.append({"case": case, "spec": spec, "error": str(exc)})
                print(f"{case}: FAILED\n{exc}")
                continue
            ok, lines = check(spec, runs[0]["findings"])
            walls = [r["wall_s"] for r in runs]
            peak = max(r["peak_rss_mb"] for r in runs)
            met = statistics.median(walls) < PM_TARGET_S and peak < PM_TARGET_MB
            out.append({"case": case, "spec": spec, "write": w, "runs": runs, "found": ok,
                        "met": met, "lines": lines, "rows": runs[0]["rows"], "wall": walls,
                        "cpu": [r["cpu_s"] for r in runs], "load": max(r["load"] for r in runs),
                        "peak_rss_mb": peak, "findings": runs[0]["findings"],
                        "target": f"< {PM_TARGET_S:g} s, < {PM_TARGET_MB / 1024:g} GB"})
            r0 = runs[0]
            print(f"{case}: {r0['rows']} rows x {r0['columns']} columns ({r0['frame_mb']:.0f} "
                  f"MB); read {_spread([r['read_s'] for r in runs])} s (RSS then "
                  f"{max(r['rss_after_read_mb'] for r in runs):.0f} MB), whole pass "
                  f"{_spread(walls)} s")
            print("".join(f"    {x}\n" for x in lines) or "    no findings\n", end="")
    finally:
        if not args.logs:
            shutil.rmtree(tmp, ignore_errors=True)
    done = [r for r in out if r["case"].startswith("postmortem") and "findings" in r]
    if len(done) == 2 and done[0]["findings"] != done[1]["findings"]:
        print("the findings of the two post-mortem variants DIFFER")
        done[1]["found"] = False


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    rng = random.Random(args.seed)
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, polars {_polars_version()}, load "
          f"{os.getloadavg()[0]:.1f} at start")
    out: list[dict] = []
    _window_cases(args, rng, out)
    _postmortem_cases(args, rng, out)
    print(f"load {os.getloadavg()[0]:.1f} at the end")
    print()
    print(f"{'case':<21}{'rows':>10}  {'wall s median (min..max)':<26}{'CPU s':>7}{'load':>6}"
          f"{'peak RSS MB':>12}  {'target':<17}met?")
    print("-" * 107)
    for r in out:
        if "error" in r:
            print(f"{r['case']:<21}{'':>10}  {'FAILED':<26}")
            continue
        print(f"{r['case']:<21}{r['rows']:>10}  {_spread(r['wall']):<26}"
              f"{statistics.median(r['cpu']):>7.2f}{r['load']:>6.1f}{r['peak_rss_mb']:>12.0f}  "
              f"{r['target']:<17}{'yes' if r['met'] else 'NO'}")
    print("CPU s: median process CPU time (all threads) of a timed call; load: 1-minute load "
          "average\nwhen the case ended (above 2, other work shared the 2 CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": {k: v for k, v in vars(args).items()}, "results": out}, indent=1))
    missed = [r["case"] for r in out if not r.get("found", False)]
    if missed:
        print(f"\nan injected fault was not found, or the case failed: {', '.join(missed)}")
    return 2 if missed else 0


def _polars_version() -> str:
    import polars as pl

    return pl.__version__


if __name__ == "__main__":
    sys.exit(main())
