"""Scenario runner: a matrix of real local-cluster runs with injected faults, for the detection
benchmark. Each run keeps its ringwatch logs and ground truth in its own folder.

    .venv/bin/python benchmarks/scenarios.py --out scenarios               # full matrix
    .venv/bin/python benchmarks/scenarios.py --worlds 4 --reps 1 --out s   # a quick one

Matrix: fault kind (none, straggler, hang, link, imbalance) x world size (4, 8, 16) x
repetitions; the victim rank (straggler, hang, imbalance) or host (link) is drawn at random
(``--seed``). Hosts are emulated with network namespaces when root (``--ranks-per-host`` ranks
each, and at least two hosts); without root every rank runs on loopback and link scenarios are
left out.

Layout of ``--out``::

    runs.jsonl                       one line per run: scenario, victim, outcome, figures
    <fault>-w<world>-r<rep>/         the run folder (see ringwatch.cluster):
        ground_truth.json  cluster.json  logs/  steps/  out/

``--resume`` skips runs whose folder already holds a finished ground truth; ``--rescore``
runs nothing and recomputes every figure of ``runs.jsonl`` from the stored logs (after a change
to the analyzers). The figures per
run, read back from the logs: each rank's median time in collectives per step and, of it, time
spent waiting for a member that had not arrived (``ringwatch.analyzers.compute_step_wait``),
before and after the onset; and the demo's reading of the run (``ringwatch demo``'s verdict
and the rank it points at, from the logs alone), scored against the ground truth. The table at
the end summarises them per scenario. The reading is the demo's simple rule, a baseline for
the detectors.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from ringwatch._logs import open_job
from ringwatch._reading import interpret
from ringwatch.analyzers import compute_phase_comm, compute_step_comm, compute_step_wait
from ringwatch.cluster import GROUND_TRUTH, ClusterSpec, FaultSpec, run_cluster
from ringwatch.cluster._netns import netns_unavailable_reason

JOB_ARGS = ("--batch", "64", "--step-sleep-ms", "60")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="scenarios", help="where the runs go")
    p.add_argument("--faults", default="none,straggler,hang,link,imbalance")
    p.add_argument("--worlds", default="4,8,16", help="world sizes")
    p.add_argument("--reps", type=int, default=3, help="repetitions per scenario")
    p.add_argument("--ranks-per-host", type=int, default=4)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel group size")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--at-step", type=int, default=20, help="fault onset step")
    p.add_argument("--straggler-mode", choices=("stop", "work"), default="work",
                   help="straggler: work = --factor times the work per step from the onset "
                   "(a compute straggler, default); stop = SIGSTOP duty cycle of --severity")
    p.add_argument("--severity", type=float, default=0.5, help="straggler (stop) duty cycle")
    p.add_argument("--rate-mbit", type=float,
                   help="link: tbf rate (default 400/world Mbit/s: 100 at 4 ranks, 25 at 16; "
                        "on 2 CPUs a bigger world makes longer steps and needs less bandwidth, "
                        "so a fixed limit would stop binding)")
    p.add_argument("--loss-pct", type=float, help="link: packet loss instead of a rate limit")
    p.add_argument("--link-layout", choices=("layered", "ddp"), default="layered",
                   help="link runs: layered = 4 hosts, tensor-parallel groups of world/2 ranks "
                   "(2 hosts each) and data-parallel pairs across them, so the groups cross "
                   "different host sets (default); ddp = the plain layout of the other runs")
    p.add_argument("--hold-s", type=float, default=15.0, help="hang: seconds held")
    p.add_argument("--factor", type=float, default=2.0,
                   help="imbalance, straggler (work): work multiplier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="skip finished runs")
    p.add_argument("--rescore", action="store_true",
                   help="run nothing; recompute the figures of --out/runs.jsonl from its logs")
    return p.parse_args(argv)


def plan(args, netns: bool) -> list[dict]:
    """Every run of the matrix, victims drawn from ``--seed``."""
    rng = random.Random(args.seed)
    runs = []
    for world in [int(w) for w in args.worlds.split(",")]:
        hosts = max(2, world // args.ranks_per_host)
        for kind in args.faults.split(","):
            for rep in range(args.reps):
                run = {"name": f"{kind}-w{world}-r{rep}", "fault": kind, "world": world,
                       "hosts": hosts, "rep": rep, "rank": None, "host": None}
                if kind in ("straggler", "hang", "imbalance"):
                    run["rank"] = rng.randrange(world)
                elif kind == "link":
                    if args.link_layout == "layered" and world >= 4:
                        run.update(hosts=4, tp=world // 2)
                    if not netns or run["hosts"] < 2:
                        continue
                    run["host"] = rng.randrange(run["hosts"])
                runs.append(run)
    return runs


def fault_of(run: dict, args) -> FaultSpec:
    kind = run["fault"]
    rate = None if args.loss_pct is not None else (args.rate_mbit or 400.0 / run["world"])
    return FaultSpec(kind=kind, rank=run["rank"], host=run["host"], at_step=args.at_step,
                     severity=args.severity, rate_mbit=rate, loss_pct=args.loss_pct,
                     hold_s=args.hold_s, factor=args.factor,
                     straggler_mode=args.straggler_mode)


# What the reading should say for each injected fault (and whether it names the victim).
EXPECTED = {"none": ("none", False), "straggler": ("straggler", True),
            "hang": ("hang", True), "link": ("network", False),
            "imbalance": ("slow from the start", True)}


def figures(log_dir: Path, truth: dict) -> dict:
    """Per rank, median collective and wait ms per step before / after the onset; the
    demo's reading and whether it matches the ground truth."""
    try:
        job = open_job(log_dir, truth["job_id"])
        events = job.events(include_pending=True)
    except (FileNotFoundError, ValueError) as exc:
        return {"error": str(exc)}
    onset = truth["onset_step"] if truth["is_fault"] else None
    finished = events.filter(events["status"] != "pending")
    out = {}
    ms = lambda v: None if v is None else round(v / 1e6, 2)
    for name, per_step, value in (("", compute_step_comm(finished), "comm_ns"),
                                  ("wait_", compute_step_wait(finished), "wait_ns")):
        ph = compute_phase_comm(per_step, onset, value=value)
        for phase in ("before", "after"):
            out[f"{name}{phase}_ms"] = {r: ms(v) for r, v in
                                        ph.select("rank", f"{phase}_ns").iter_rows()}
    # the verdict from the rows alone; the truth only splits the figures, and scores it
    reading = interpret(events, truth["world_size"], onset_step=onset,
                        last_seen_ns=job.last_write_ns())
    verdict, names_victim = EXPECTED[truth["kind"]]
    out.update(reading=reading.verdict, reading_rank=reading.rank,
               reading_ok=(reading.verdict == verdict
                           and (not names_victim or reading.rank == truth["rank"])))
    return out


def _done(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / GROUND_TRUTH).read_text()).get("outcome") is not None
    except (OSError, ValueError):
        return False


def _victim_vs_peers(records: list[dict], prefix: str) -> str:
    """Median change after the onset, victim's / its peers' (all ranks' without a victim)."""
    victim_d, peer_d = [], []
    for r in records:
        b, a = r.get(f"{prefix}before_ms", {}), r.get(f"{prefix}after_ms", {})
        ch = {int(k): a[k] - b[k] for k in a if a.get(k) is not None and b.get(k) is not None}
        if not ch:
            continue
        v = r["rank"]
        if v is not None and v in ch:
            victim_d.append(ch[v])
            peer_d.append(statistics.median(x for k, x in ch.items() if k != v))
        else:
            peer_d.append(statistics.median(ch.values()))
    if not peer_d:
        return "-"
    vs = f"{statistics.median(victim_d):+.1f}" if victim_d else "-"
    return f"{vs} / {statistics.median(peer_d):+.1f}"


def summarize(records: list[dict]) -> list[str]:
    """One line per scenario: runs ok, median wall time, victim vs peers change, reading."""
    lines = [f"{'scenario':<18}{'runs':>5}{'ok':>4}{'wall s':>8}  {'collective ms/step':>20}"
             f"  {'wait ms/step':>16}  reading right",
             f"{'':<35}  {'change, victim / peers':>20}  {'(same)':>16}"]
    for kind, world in sorted({(r["fault"], r["world"]) for r in records}):
        rs = [r for r in records if (r["fault"], r["world"]) == (kind, world)]
        ok = sum(r["ok"] for r in rs)
        wall = statistics.median(r["wall_s"] for r in rs)
        right = sum(bool(r.get("reading_ok")) for r in rs)
        lines.append(f"{kind + '-w' + str(world):<18}{len(rs):>5}{ok:>4}{wall:>8.1f}  "
                     f"{_victim_vs_peers(rs, ''):>20}  {_victim_vs_peers(rs, 'wait_'):>16}  "
                     f"{right}/{len(rs)}")
    right = sum(bool(r.get("reading_ok")) for r in records)
    lines.append(f"reading right in {right} of {len(records)} run(s)")
    return lines


def rescore(out: Path) -> list[dict]:
    """Recompute the figures of every run listed in ``out/runs.jsonl``; rewrite it."""
    index = out / "runs.jsonl"
    records = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    for rec in records:
        run_dir = out / rec["name"]
        truth = json.loads((run_dir / GROUND_TRUTH).read_text())
        rec.update(figures(run_dir / "logs", truth))
    index.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.rescore:
        records = rescore(out)
        print("\n".join(summarize(records)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    why = netns_unavailable_reason()
    if why:
        print(f"emulated hosts unavailable ({why}): loopback only, link scenarios left out")
    runs = plan(args, why is None)
    print(f"{len(runs)} run(s) into {out}", flush=True)
    records = []
    index = out / "runs.jsonl"
    for i, run in enumerate(runs, 1):
        run_dir = out / run["name"]
        if args.resume and _done(run_dir):
            print(f"[{i}/{len(runs)}] {run['name']}: done before, skipped")
            continue
        spec = ClusterSpec(run_dir=run_dir, nproc=run["world"], hosts=run["hosts"],
                           tp=run.get("tp", args.tp), steps=args.steps, job_args=JOB_ARGS,
                           netns="auto", timeout_s=900)
        t0 = time.monotonic()
        result = run_cluster(spec, fault_of(run, args))
        rec = {**run, "ok": result.ok, "reason": result.reason, "mode": result.mode,
               "wall_s": round(time.monotonic() - t0, 1), "path": str(run_dir),
               "onset_step": result.ground_truth.get("onset_step"),
               "leftovers": result.leftovers,
               **figures(result.log_dir, result.ground_truth)}
        records.append(rec)
        with open(index, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"[{i}/{len(runs)}] {run['name']}: {result.reason} in {rec['wall_s']} s"
              + (f", victim rank {run['rank']}" if run["rank"] is not None else "")
              + (f", victim host{run['host']}" if run["host"] is not None else ""), flush=True)
    if records:
        print("\n".join(summarize(records)))
    return 0 if all(r["ok"] and not r["leftovers"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
