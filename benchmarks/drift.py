"""Slow drift against faults: real runs where one rank's host work grows a little every step,
with and without a straggler, scored with the usual following the drift and kept from the
first steps.

Each case is one ``ringwatch cluster`` run (4 or 8 Gloo DDP ranks on 2 emulated hosts; the
job's ``--drift-rank R --drift-ms-per-step X``, and for some a ``work`` straggler from a step
on). Its findings are read three ways:

* ``ringwatch analyze`` (the default thresholds: the usual follows drift, ``drift_steps`` 200);
* the same with ``--threshold drift_steps=0`` (the usual of the first steps kept);
* the online window fed 10 steps a push: every finding it showed (kind, class, ranks, since).

A case is right when the findings (hiccups apart) are exactly the injected straggler, the
right rank with class ``compute straggler`` since its onset (at most 3 steps after), or none
where nothing was injected; and live = post-mortem when the window showed the findings the
post-mortem gives (kind, class, ranks, since), no more, no fewer.

    .venv/bin/python benchmarks/drift.py --set tune --out /tmp/drift-bench
    .venv/bin/python benchmarks/drift.py --set heldout --out /tmp/drift-heldout
    .venv/bin/python benchmarks/drift.py --set tune --out /tmp/drift-bench --rescore
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

RINGWATCH = str(Path(sys.executable).parent / "ringwatch")


@dataclass(frozen=True)
class Case:
    name: str
    nproc: int
    steps: int
    drift_rank: int
    drift_ms: float  # per step
    victim: int | None = None  # a work straggler on this rank ...
    at_step: int | None = None  # ... from this step
    sleep_ms: float = 40.0  # host idle per step (0: CPU-bound)


#: The set the rules were read and fixed on ...
TUNE = (
    Case("drift-only-w4", 4, 1500, 2, 0.005),
    Case("drift-other-straggler-w4", 4, 1500, 0, 0.005, victim=3, at_step=1100),
    Case("drift-same-straggler-w8", 8, 1200, 5, 0.006, victim=5, at_step=900),
    Case("healthy-w4", 4, 1500, 1, 0.0),
    Case("drift-only-cpu-w4", 4, 2000, 1, 0.003, sleep_ms=0.0),
)
#: ... and the held-out set, scored once at the end.
HELDOUT = (
    Case("h-drift-only-w8", 8, 1000, 6, 0.006),
    Case("h-drift-straggler-w4", 4, 1800, 3, 0.004, victim=3, at_step=1400),
    Case("h-drift-cpu-straggler-w4", 4, 2000, 0, 0.002, victim=2, at_step=1500,
         sleep_ms=0.0),
    Case("h-healthy-cpu-w4", 4, 2000, 1, 0.0, sleep_ms=0.0),
)
SETS = {"tune": TUNE, "heldout": HELDOUT}


def run_case(case: Case, out: Path) -> Path:
    run = out / case.name
    if (run / "ground_truth.json").exists():
        return run
    cmd = [RINGWATCH, "cluster", "--run-dir", str(run), "--nproc", str(case.nproc),
           "--hosts", "2", "--steps", str(case.steps), "--timeout-s", "1200"]
    if case.victim is not None:
        cmd += ["--fault", "straggler", "--straggler-mode", "work", "--victim-rank",
                str(case.victim), "--at-step", str(case.at_step)]
    cmd += ["--", "--step-sleep-ms", str(case.sleep_ms), "--drift-rank", str(case.drift_rank),
            "--drift-ms-per-step", str(case.drift_ms)]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"  ran {case.name} in {time.monotonic() - t0:.0f} s", flush=True)
    return run


def _key(f) -> tuple:
    return (f.kind, f.cls, f.ranks, f.since_step)


def findings(run: Path) -> dict[str, list]:
    from ringwatch._analyze import ANALYZED_COLUMNS, analyze_events
    from ringwatch._logs import list_jobs, open_job
    from ringwatch.analyzers import OnlineWindow, Thresholds
    from ringwatch.analyzers._policy import significant, split_hiccups, split_undecided
    from ringwatch.analyzers._work import WORK_COLUMNS

    job = open_job(run / "logs", list_jobs(run / "logs")[0])
    ev = job.events(include_pending=True, columns=[*ANALYZED_COLUMNS, *WORK_COLUMNS])
    now = int(ev["t_end_ns"].max())
    out = {"follow": split_hiccups(analyze_events(ev, now_ns=now))[0],
           "kept": split_hiccups(analyze_events(ev, now_ns=now,
                                                thresholds=Thresholds(drift_steps=0)))[0]}
    # live: every finding the window showed, push after push, as the service shows them
    # (hiccups apart, young ones held back, those worth less than min_gain_share dropped)
    w, shown = OnlineWindow(), {}
    top = int(ev["step"].max())
    for lo in range(0, top + 1, 10):
        w.add(ev.filter(pl.col("step").is_between(lo, lo + 9)))
        live = tuple(f for f in w.findings(now_ns=now) if f.kind in ("straggler", "imbalance"))
        found = split_undecided(split_hiccups(live)[0], newest_step=lo + 9)[0]
        for f in significant(found, w.rows, Thresholds().min_gain_share):
            shown.setdefault(_key(f), f)
    out["live"] = sorted(shown.values(), key=lambda f: (f.since_step or 0, f.ranks))
    return out


def right(found, case: Case, truth: dict) -> bool:
    if case.victim is None:
        return not found
    onset = truth.get("onset_step") or case.at_step
    return len(found) == 1 and found[0].kind == "straggler" \
        and found[0].cls == "compute straggler" and found[0].ranks == (case.victim,) \
        and onset <= found[0].since_step <= onset + 3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rescore", action="store_true", help="run nothing; score what is there")
    p.add_argument("--set", choices=SETS, default="heldout")
    p.add_argument("--cases", help="comma-separated names (default: the whole set)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, tally = [], {"follow": 0, "kept": 0, "live": 0}
    cases = [c for c in SETS[args.set] if not args.cases or c.name in args.cases.split(",")]
    for case in cases:
        run = args.out / case.name if args.rescore else run_case(case, args.out)
        truth = json.loads((run / "ground_truth.json").read_text())
        got = findings(run)
        ok = {k: right(v, case, truth) for k, v in got.items() if k != "live"}
        ok["live"] = [_key(f) for f in got["live"]] == [_key(f) for f in got["follow"]]
        for k, v in ok.items():
            tally[k] += v
        rows.append({"case": case.name, **{k: "yes" if v else "NO" for k, v in ok.items()},
                     **{f"{k}_findings": "; ".join(
                         f"{f.cls} r{','.join(map(str, f.ranks))} since {f.since_step}"
                         for f in v) or "none" for k, v in got.items()}})
    for r in rows:
        print(f"{r['case']:<28} follow {r['follow']:<3} kept {r['kept']:<3} live=pm {r['live']}")
        for k in ("follow", "kept", "live"):
            print(f"    {k:<6} {r[f'{k}_findings']}")
    n = len(cases)
    print(f"right with the usual following drift: {tally['follow']}/{n}; kept from the first "
          f"steps: {tally['kept']}/{n}; live = post-mortem: {tally['live']}/{n}")
    (args.out / "scores.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
