"""Hybrid-parallel jobs on the local cluster, scored: layout, stragglers on any role, imbalance.

Each run is a real `ringwatch cluster` job, dp x tp x pp on Gloo (``cluster/_pipeline.py``: 1F1B
over 4 micro-batches, ``--idle-ms`` (40) of host idle time per step in the micro-batches),
tp = pp = 2 (``--tp``, ``--pp``; ``--job "--vpp 2 --p2p batched"`` for an interleaved pipeline
whose sends and receives go as Megatron-LM's), 4 ranks per emulated host, 60 steps, then
`ringwatch analyze --json` on its logs. Cases:

* ``none``: healthy; right when there is no finding;
* ``laststage``: the last stage does 2x the work by design; right with one structural
  imbalance naming the last stage's ranks and no fault finding;
* ``varyseq``: each replica's batch drawn from 16-64 rows per step; right with workload
  imbalance and no fault finding;
* ``straggler``: a random rank does 2x the work from step 25 on; right when that rank alone is
  named a straggler, its onset within 3 steps of the first slowed step;
* ``strag0``: a random rank does 2x the work from the first step; right when that rank alone
  is named a straggler from the first steps (since step 3 at the latest);
* ``link``: a random rank's host has its link limited to 100 / world Mbit/s both ways (tc
  tbf) from step 25 on; right with one fault finding, a slow link whose suspects include that
  host, its onset within 3 steps of the fault's. With the stages one per host (2 x 2 x 2 on
  two hosts) only send/recv crosses the link.

Every straggler run (``straggler``, ``strag0``) is followed by its *twin*: the same job without
the fault, right after it (``RUN/twin``), whose step time is the what-if's measured truth: the
step time the job would have had with the culprit fixed. With ``--twins 2`` a second twin runs
right before it (``RUN.twin-before``) and the truth is the two's mean: on a machine whose speed
drifts, twins on both sides of the run. ``--no-twins`` skips them (the
what-if is then read against the healthy runs, and a mid-run straggler's own steps before its
onset).

Every run keeps its folder under ``--out``; ``--rescore`` reads them again with the current
analyzers.

``--gpu-like``: the same jobs with a model so small that the host computes a few ms a step: the
step is the host idle time (as while a GPU computes) and the transfers; ``--idle-ms 160``
makes the idle time the larger part, as compute is on a GPU. On the 2-core testbed the
transfers are CPU work: they run slower while every rank runs, faster while a straggler's
peers wait for it. That does not happen between GPUs, and the what-if's replay (which keeps
every transfer as measured in the faulty steps) cannot know it: with the default job it
predicts the fixed step 10-20% short.

``--live``: each run is also watched live, by a fresh `ringwatch serve` and `ringwatch agent`
(``benchmarks/_live_stack.py``); every finding the service showed is kept in the run's
``live.json``, and a run's live verdict *agrees* when the service showed the same findings
(kind, class, ranks, onset) as `ringwatch analyze` gives afterwards, no more, no fewer.

    .venv/bin/python benchmarks/hybrid.py --out /tmp/hyb --worlds 8 --reps 2
    .venv/bin/python benchmarks/hybrid.py --out /tmp/hyb --rescore
    .venv/bin/python benchmarks/hybrid.py --out /tmp/hyb-live --live --worlds 8,16
    .venv/bin/python benchmarks/hybrid.py --out /tmp/hyb-gpu --gpu-like --idle-ms 160
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from ringwatch.cluster._run import read_slowed_step

PY = sys.executable
CASES = ("none", "laststage", "varyseq", "straggler", "strag0", "link")
RANKS_PER_HOST = 4
ONSET = 25


#: ``--gpu-like``: a model so small that the host's own compute is a few ms a step, and the
#: step is the 40 ms of host idle time (as while a GPU computes) and the transfers.
GPU_LIKE = ["--width", "64", "--batch", "8"]


def _cluster_args(case: str, world: int, victim: int, gpu_like: bool = False,
                  idle_ms: float = 40, shape: tuple[int, int, str] = (2, 2, ""),
                  at_step: int = ONSET) -> list[str]:
    tp, pp, more = shape
    base = ["--nproc", str(world), "--hosts", str(world // RANKS_PER_HOST), "--tp", str(tp), "--pp",
            str(pp), "--steps", "60"]
    job = ["--step-sleep-ms", f"{idle_ms:g}", *(GPU_LIKE if gpu_like else []), *more.split()]
    if case == "laststage":
        return base + ["--fault", "none", "--", *job, "--last-stage-factor", "2"]
    if case == "varyseq":
        return base + ["--fault", "none", "--", *job, "--vary-seq", "2"]
    if case == "straggler":
        return base + ["--fault", "straggler", "--straggler-mode", "work", "--victim-rank",
                       str(victim), "--at-step", str(at_step), "--", *job]
    if case == "strag0":
        return base + ["--fault", "imbalance", "--victim-rank", str(victim), "--", *job]
    if case == "link":  # the victim rank's host's link, both ways, at 100 / world Mbit/s
        return base + ["--fault", "link", "--victim-host", str(victim // RANKS_PER_HOST),
                       "--at-step", str(at_step), "--rate-mbit", f"{100 / world:g}", "--",
                       *job]
    return base + ["--fault", "none", "--", *job]


def _step_ms(run: Path, before: int | None = None, after: int | None = None) -> float:
    """The median step time (ms) of a run after its warm-up (and before step ``before``, from
    step ``after``), from its logs."""
    from ringwatch._logs import list_jobs, open_job
    from ringwatch.analyzers._work import compute_step_work

    job = open_job(run / "logs", list_jobs(run / "logs")[0])
    w = compute_step_work(job.events(include_pending=True))
    keep = w["step"] >= 5
    if before is not None:
        keep = keep & (w["step"] < before)
    if after is not None:
        keep = keep & (w["step"] >= after)
    return float(w.filter(keep)["step_ms"].median())


def score(run: Path) -> dict:
    """The run's verdict against what was injected."""
    meta = json.loads((run / "case.json").read_text())
    case, world, victim = meta["case"], meta["world"], meta["victim"]
    tp, pp = meta.get("tp", 2), meta.get("pp", 2)
    proc = subprocess.run([PY, "-m", "ringwatch._cli", "analyze", "--json", str(run / "logs")],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        return {**meta, "right": False, "why": f"analyze failed: {proc.stderr[-300:]}"}
    rep = json.loads(proc.stdout)
    fs = rep["findings"]
    faults = [f for f in fs if f["kind"] in ("straggler", "hang", "slow_link")]
    lay = rep.get("layout") or {}
    out = {**meta, "layout": lay.get("text"), "findings": [
        (f["kind"], f["cls"], f["ranks"], f["since_step"]) for f in fs]}
    if (run / "live.json").exists():  # what the service showed while the job ran
        live = json.loads((run / "live.json").read_text())
        out["live"] = sorted((f["kind"], f["cls"], f["ranks"], f.get("since_step"))
                             for f in live if f["kind"] != "hang")
        out["live_agrees"] = out["live"] == sorted(out["findings"])
    dp = world // (tp * pp)
    last_stage = list(range(world - tp * dp, world))
    if (lay.get("dp"), lay.get("tp"), lay.get("pp")) != (dp, tp, pp):
        return {**out, "right": False, "why": f"layout {lay.get('text')}"}
    if case == "none":
        right = not fs
    elif case == "laststage":
        right = (not faults and len(fs) == 1 and fs[0]["cls"] == "structural imbalance"
                 and fs[0]["ranks"] == last_stage)
    elif case == "varyseq":
        right = not faults and bool(fs) and all(f["cls"] == "workload imbalance" for f in fs)
    elif case == "link":  # one slow-link finding with the victim's host among its suspects
        truth = json.loads((run / "ground_truth.json").read_text())
        onset = out["onset"] = truth.get("onset_step")
        named = [f for f in faults if f["kind"] == "slow_link"]
        right = (len(faults) == 1 and len(named) == 1 and truth["host"] in named[0]["hosts"]
                 and onset is not None and named[0]["since_step"] is not None
                 and abs(named[0]["since_step"] - onset) <= 3)
        if right:
            out["latency_steps"] = named[0]["detected_step"] - onset
    else:
        onset = read_slowed_step(run / "steps", victim) if case == "straggler" else 0
        out["onset"] = onset
        named = [f for f in faults if f["kind"] == "straggler"]
        right = (len(faults) == 1 and len(named) == 1 and named[0]["ranks"] == [victim]
                 and onset is not None and named[0]["since_step"] is not None
                 and abs(named[0]["since_step"] - onset) <= 3)
        if right and named:
            out["latency_steps"] = named[0]["detected_step"] - onset
        if named:  # the what-if: "... ~N ms with this rank working like its peers (...)"
            import re

            m = re.search(r"~(\d+) ms with this rank", " ".join(named[0]["evidence"]))
            out["whatif_ms"] = int(m.group(1)) if m else None
            out["whatif_how"] = "replay" if "replay" in " ".join(named[0]["evidence"]) \
                else "fallback"
    return {**out, "right": bool(right)}


def _run_live(cmd: list[str], run: Path, agent_defaults: bool = False) -> int:
    """``cmd`` (a cluster run writing ``run/logs``) watched by a fresh serve and agent (at
    the agent's default intervals with ``agent_defaults``); every finding the service showed
    goes to ``run/live.json``."""
    from _live_stack import LiveStack

    with LiveStack(run / "logs", run / "serve-state", agent_defaults=agent_defaults) as stack:
        rc = stack.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (run / "live.json").write_text(json.dumps([f for _, f in stack.findings()]))
    return rc


def _twins(run: Path) -> list[Path]:
    """A straggler run's twins that ran: the one right after it, and the one right before
    it (``--twins 2``)."""
    return [t for t in (run / "twin", _twin_before(run)) if (t / "logs").is_dir()]


def _twin_before(run: Path) -> Path:
    return run.parent / f"{run.name}.twin-before"


def _run_twin(where: Path, world: int, gpu_like: bool, idle_ms: float,
              shape: tuple[int, int, str]) -> None:
    """The same job as a straggler run without its fault, into ``where``."""
    subprocess.run([PY, "-m", "ringwatch._cli", "cluster", "--clean"], capture_output=True,
                   check=False)
    t0 = time.monotonic()
    cmd = [PY, "-m", "ringwatch._cli", "cluster", "--run-dir", str(where),
           *_cluster_args("none", world, 0, gpu_like, idle_ms, shape)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    print(f"{where.parent.name}/{where.name}: rc {proc.returncode} in "
          f"{time.monotonic() - t0:.0f} s", flush=True)


def _what_if_lines(results: list[dict], runs: list[Path]) -> None:
    """The what-if of every straggler run against its twin (else against the healthy runs
    of its shape, and a mid-run straggler's own steps before its onset)."""
    healthy = {}
    for r, run in zip(results, runs, strict=True):
        if r["case"] == "none":
            healthy.setdefault(r["world"], []).append(_step_ms(run))
    for w, base in sorted(healthy.items()):
        print(f"healthy step time, {w} ranks: " + ", ".join(f"{b:.0f}" for b in base) + " ms")
    within, errs = [], []
    for r, run in zip(results, runs, strict=True):
        if r["case"] not in ("straggler", "strag0"):
            continue
        if not r.get("whatif_ms"):
            print(f"what-if {r['case']}-w{r['world']} victim {r['victim']}: none given")
            within.append(False)
            continue
        line = (f"what-if {r['case']}-w{r['world']} victim {r['victim']}: predicted "
                f"{r['whatif_ms']} ms ({r['whatif_how']}); ")
        onset = r.get("at_step", ONSET)
        fault_ms = _step_ms(run, after=onset if r["case"] == "straggler" else None)
        twins = _twins(run)
        if twins:  # the twins' mean: a machine whose speed drifts, on both sides of the run
            each = [_step_ms(t) for t in twins]
            truth = sum(each) / len(each)
            halves = _step_ms(twins[0], before=onset), _step_ms(twins[0], after=onset)
            line += (f"its twin without the fault {truth:.0f} ms (its steps before and after "
                     f"{onset}: {halves[0]:.0f}, {halves[1]:.0f}"
                     + (f"; the twins after and before it {each[0]:.0f}, {each[1]:.0f}"
                        if len(each) > 1 else "") + ")")
        elif healthy.get(r["world"]):
            base = healthy[r["world"]]
            truth = sorted(base)[len(base) // 2]
            line += f"healthy runs {truth:.0f} ms"
        else:
            continue
        err = (r["whatif_ms"] - truth) / truth
        line += f": {err:+.1%} (with the fault {fault_ms:.0f} ms)"
        if r["case"] == "straggler":
            own = _step_ms(run, before=onset)
            line += f"; its own steps before the onset {own:.0f} ms"
        within.append(abs(err) <= 0.10)
        errs.append(abs(err))
        print(line)
    if within:
        errs.sort()
        print(f"what-if within 10% of the truth: {sum(within)}/{len(within)}"
              + (f" (median error {errs[len(errs) // 2]:.1%}, worst {errs[-1]:.1%})"
                 if errs else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--worlds", default="8")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--rescore", action="store_true")
    ap.add_argument("--gpu-like", action="store_true",
                    help="a model of a few ms of host compute: the step is host idle time "
                         "(as while a GPU computes) and transfers, and a straggler's extra "
                         "work is idle time, not CPU taken from the other ranks")
    ap.add_argument("--idle-ms", type=float, default=40,
                    help="host idle time per step, as while a GPU computes (default 40)")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    ap.add_argument("--pp", type=int, default=2, help="pipeline stages (default 2)")
    ap.add_argument("--at-step", type=int, default=ONSET,
                    help=f"the mid-run faults' step (default {ONSET}; 10: within the "
                    "baseline steps)")
    ap.add_argument("--job", default="",
                    help="more arguments for the job, e.g. \"--vpp 2 --p2p batched\"")
    ap.add_argument("--no-twins", action="store_true",
                    help="run no fault-free twin after each straggler run")
    ap.add_argument("--twins", type=int, choices=(1, 2), default=1,
                    help="fault-free twins per straggler run: 1 right after it, 2 also one "
                         "right before it (the truth is their mean; default 1)")
    ap.add_argument("--live", action="store_true",
                    help="watch each run with ringwatch serve and an agent (live.json)")
    ap.add_argument("--agent-defaults", action="store_true",
                    help="with --live: the agent at its default intervals (logs read every "
                         "2 s, pushes every 10 s or sooner when steps wait), not 0.5 s and 1 s")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rng = random.Random(args.seed)
    shape = (args.tp, args.pp, args.job)
    runs: list[Path] = []
    if args.rescore:
        runs = sorted(p.parent for p in out.glob("*/case.json"))
    else:
        out.mkdir(parents=True, exist_ok=True)
        for world in (int(w) for w in args.worlds.split(",")):
            for rep in range(args.reps):
                for case in args.cases.split(","):
                    victim = rng.randrange(world)
                    run = out / f"{case}-w{world}-r{rep}"
                    twin = case in ("straggler", "strag0") and not args.no_twins
                    if twin and args.twins == 2:
                        _run_twin(_twin_before(run), world, args.gpu_like, args.idle_ms, shape)
                    subprocess.run([PY, "-m", "ringwatch._cli", "cluster", "--clean"],
                                   capture_output=True, check=False)
                    t0 = time.monotonic()
                    cmd = [PY, "-m", "ringwatch._cli", "cluster", "--run-dir", str(run),
                           *_cluster_args(case, world, victim, args.gpu_like,
                                         args.idle_ms, shape, args.at_step)]
                    rc = _run_live(cmd, run, args.agent_defaults) if args.live else subprocess.run(
                        cmd, capture_output=True, text=True, check=False).returncode
                    (run / "case.json").write_text(json.dumps(
                        {"case": case, "world": world, "victim": victim if case in (
                            "straggler", "strag0") else f"host{victim // RANKS_PER_HOST}"
                         if case == "link" else None, "rc": rc, "tp": args.tp,
                         "pp": args.pp, "job": args.job, "at_step": args.at_step}))
                    print(f"{run.name}: rc {rc} in {time.monotonic() - t0:.0f} s", flush=True)
                    runs.append(run)
                    if twin:
                        _run_twin(run / "twin", world, args.gpu_like, args.idle_ms, shape)
    results = [score(r) for r in runs]
    with open(out / "scores.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    print(f"\n{'run':<22} {'right':<6} findings")
    for r in results:
        print(f"{Path(str(r.get('case'))).name + '-w' + str(r['world']):<22} "
              f"{'yes' if r['right'] else 'NO':<6} {r.get('findings', r.get('why'))}")
    by: dict[str, list[bool]] = {}
    for r in results:
        by.setdefault(f"{r['case']}-w{r['world']}", []).append(r["right"])
    print("\nright per case: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in by.items()))
    lat = [r["latency_steps"] for r in results if "latency_steps" in r]
    if lat:
        print(f"detection latency (steps after the onset): {sorted(lat)}")
    print(f"total: {sum(r['right'] for r in results)}/{len(results)} right")
    watched = [r for r in results if "live_agrees" in r]
    for r in watched:
        if not r["live_agrees"]:
            print(f"live differs, {r['case']}-w{r['world']}: live {r['live']}, "
                  f"post-mortem {sorted(r['findings'])}")
    if watched:
        print(f"live = post-mortem (kind, class, ranks, onset): "
              f"{sum(r['live_agrees'] for r in watched)}/{len(watched)} runs")
    _what_if_lines(results, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
