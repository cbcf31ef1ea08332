"""Profiler traces against ringwatch's own logs of the same straggler run, at 16 ranks.

    .venv/bin/python benchmarks/kineto_agreement.py                  # 16 ranks, 4 hosts
    .venv/bin/python benchmarks/kineto_agreement.py --nproc 8 --reps 3 --json out.json

Each repetition runs the local cluster (``ringwatch.cluster``: torchrun, Gloo, emulated hosts
when root, else loopback) with a compute straggler (``--mode work``: ``--factor`` times the
work from ``--at-step``; ``--mode stop``: the SIGSTOP duty cycle of ``--severity``) and the job
traced with ``torch.profiler`` (``--profile-dir``), then runs ``ringwatch analyze``'s
analysis (``analyze_job``) over the logs and over the traces and prints the straggler ranks
each names, the victim, and the time and rows of each read. Exit status 0 when every
repetition named the same ranks from both, 1 otherwise. The tests do the same at 4 ranks
(``tests/integration/test_kineto_agreement.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=16)
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--at-step", type=int, default=15)
    p.add_argument("--victim", type=int, default=6)
    p.add_argument("--mode", choices=("work", "stop"), default="work")
    p.add_argument("--factor", type=float, default=3.0)
    p.add_argument("--severity", type=float, default=0.6)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--netns", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--keep", metavar="DIR", help="keep the runs here (default: a temporary "
                   "folder, removed)")
    p.add_argument("--json", metavar="FILE", help="write every figure here")
    return p.parse_args(argv)


def _stragglers(report: dict) -> list[int]:
    return sorted({r for f in report["_findings"] if f.kind == "straggler" for r in f.ranks})


def one_run(args, run_dir: Path) -> dict:
    from ringwatch._analyze import analyze_job
    from ringwatch._logs import open_job
    from ringwatch.cluster import ClusterSpec, FaultSpec, run_cluster
    from ringwatch.inputs import open_sources

    traces = run_dir / "traces"
    spec = ClusterSpec(run_dir=run_dir, nproc=args.nproc, hosts=args.hosts, steps=args.steps,
                       netns=args.netns, job_args=("--batch", "64", "--step-sleep-ms", "60",
                                                   "--profile-dir", str(traces)))
    fault = FaultSpec(kind="straggler", rank=args.victim, at_step=args.at_step,
                      straggler_mode=args.mode,
                      **({"factor": args.factor} if args.mode == "work"
                         else {"severity": args.severity}))
    t0 = time.monotonic()
    result = run_cluster(spec, fault)
    run_s = time.monotonic() - t0
    out = {"ok": result.ok, "mode": result.mode, "run_s": round(run_s, 1),
           "victim": args.victim, "trace_bytes": sum(p.stat().st_size
                                                      for p in traces.glob("*.json.gz"))}
    t0 = time.monotonic()
    logs = analyze_job(open_job(result.log_dir, result.job_id))
    out["logs_s"] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    opened = open_sources([traces])
    from_traces = analyze_job(opened.sources[0])
    out["traces_s"] = round(time.monotonic() - t0, 2)
    out.update(logs_rows=logs["collectives"], traces_rows=from_traces["collectives"],
               logs_ranks=len(logs["ranks"]), traces_ranks=len(from_traces["ranks"]),
               from_logs=_stragglers(logs), from_traces=_stragglers(from_traces),
               traces_problems=from_traces["unreadable"] + opened.unreadable,
               findings_logs=[f"{f['kind']} {f['ranks']}" for f in logs["findings"]],
               findings_traces=[f"{f['kind']} {f['ranks']}" for f in from_traces["findings"]])
    out["agree"] = out["from_logs"] == out["from_traces"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rw-kineto-"))
    runs = []
    try:
        for i in range(args.reps):
            r = one_run(args, root / f"run-{i}")
            runs.append(r)
            print(json.dumps(r), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.nproc} ranks on {args.hosts} hosts, straggler rank {args.victim} "
          f"({args.mode}), {args.steps} steps")
    print(f"{'rep':>3} {'mode':>8} {'logs names':>12} {'traces name':>12} {'agree':>6} "
          f"{'rows logs/traces':>18} {'read logs s':>11} {'read traces s':>13} {'trace MB':>9}")
    for i, r in enumerate(runs):
        print(f"{i:>3} {r['mode']:>8} {str(r['from_logs']):>12} {str(r['from_traces']):>12} "
              f"{'yes' if r['agree'] else 'NO':>6} "
              f"{r['logs_rows']:>8}/{r['traces_rows']:<9} {r['logs_s']:>11} "
              f"{r['traces_s']:>13} {r['trace_bytes'] / 1e6:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0 if runs and all(r["agree"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
