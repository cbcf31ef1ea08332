"""Serving jobs on the local cluster, scored: a TP decode straggler, a hot MoE expert, healthy runs.

Each run is a real `ringwatch cluster` job of 4 ranks on 2 emulated hosts (``cluster/_serving.py``:
no optimizer, no step marks, so the analyzers find the steps from the rhythm), then
`ringwatch analyze --json` on its logs. Cases:

* ``decode``: tensor-parallel decode, tp 2 (two independent replicas), 6 layers, continuous
  batching, 20 ms of host idle time per step; right when there is no finding;
* ``tpstrag``: the same with a random rank doing 2x the work from a random step in 20-35;
  right when that rank alone is named a straggler, its onset within 3 steps of the first
  slowed step (decode steps: the rhythm's iteration is one decode step);
* ``moe``: an expert-parallel MoE stack (one expert per rank, 4 layers, about 32 tokens per
  rank, routing uniform); right when there is no finding;
* ``hot``: the same with a random expert receiving half of every rank's tokens from a random
  step in 15-30; right when its rank alone is named (``imbalance``, class ``hot expert``) and
  nothing is called a straggler.

Every run keeps its folder under ``--out``; ``--rescore`` reads them again with the current
analyzers.

    .venv/bin/python benchmarks/serving.py --out /tmp/srv --reps 3
    .venv/bin/python benchmarks/serving.py --out /tmp/srv --rescore
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
CASES = ("decode", "tpstrag", "moe", "hot")
STEPS = 80
LAYERS_MOE = 4


def _cluster_args(case: str, victim: int, onset: int) -> list[str]:
    base = ["--nproc", "4", "--hosts", "2", "--netns", "off", "--steps", str(STEPS)]
    if case in ("decode", "tpstrag"):
        job = ["--", "--workload", "decode", "--step-sleep-ms", "20"]
        if case == "tpstrag":
            return base + ["--tp", "2", "--fault", "straggler", "--straggler-mode", "work",
                           "--victim-rank", str(victim), "--at-step", str(onset), *job]
        return base + ["--tp", "2", "--fault", "none", *job]
    job = ["--", "--workload", "moe", "--layers", str(LAYERS_MOE), "--step-sleep-ms", "20"]
    if case == "hot":
        job += ["--hot-expert", str(victim), "--hot-share", "0.5", "--hot-from-step",
                str(onset)]
    return base + ["--fault", "none", *job]


def score(run: Path) -> dict:
    """The run's verdict against what was injected."""
    meta = json.loads((run / "case.json").read_text())
    case, victim = meta["case"], meta["victim"]
    proc = subprocess.run([PY, "-m", "ringwatch._cli", "analyze", "--json", str(run / "logs")],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        return {**meta, "right": False, "why": f"analyze failed: {proc.stderr[-300:]}"}
    fs = json.loads(proc.stdout)["findings"]
    out = {**meta, "findings": [(f["kind"], f["cls"], f["ranks"], f["since_step"])
                                for f in fs]}
    if case in ("decode", "moe"):
        return {**out, "right": not fs}
    if case == "hot":
        hot = [f for f in fs if f["cls"] == "hot expert"]
        right = (len(fs) == 1 and len(hot) == 1 and hot[0]["ranks"] == [victim])
        return {**out, "right": right}
    onset = read_slowed_step(run / "steps", victim)
    named = [f for f in fs if f["kind"] == "straggler"]
    right = (len(fs) == 1 and len(named) == 1 and named[0]["ranks"] == [victim]
             and onset is not None and named[0]["since_step"] is not None
             and abs(named[0]["since_step"] - onset) <= 3)
    out["onset"] = onset
    if right:
        out["latency_steps"] = named[0]["detected_step"] - onset
    return {**out, "right": right}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--rescore", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rng = random.Random(args.seed)
    runs: list[Path] = []
    if args.rescore:
        runs = sorted(p.parent for p in out.glob("*/case.json"))
    else:
        out.mkdir(parents=True, exist_ok=True)
        for rep in range(args.reps):
            for case in args.cases.split(","):
                victim = rng.randrange(4)
                onset = rng.randrange(20, 36) if case == "tpstrag" else rng.randrange(15, 31)
                run = out / f"{case}-r{rep}"
                t0 = time.monotonic()
                proc = subprocess.run(
                    [PY, "-m", "ringwatch._cli", "cluster", "--run-dir", str(run),
                     *_cluster_args(case, victim, onset)],
                    capture_output=True, text=True, check=False)
                (run / "case.json").write_text(json.dumps(
                    {"case": case, "victim": victim if case in ("tpstrag", "hot") else None,
                     "at_step": onset if case in ("tpstrag", "hot") else None,
                     "rc": proc.returncode}))
                print(f"{run.name}: rc {proc.returncode} in {time.monotonic() - t0:.0f} s",
                      flush=True)
                runs.append(run)
    results = [score(r) for r in runs]
    with open(out / "scores.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    print(f"\n{'run':<12} {'right':<6} findings")
    for r, run in zip(results, runs, strict=True):
        print(f"{run.name:<12} {'yes' if r['right'] else 'NO':<6} "
              f"{r.get('findings', r.get('why'))}")
    by: dict[str, list[bool]] = {}
    for r in results:
        by.setdefault(r["case"], []).append(r["right"])
    print("\nright per case: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in by.items()))
    lat = [r["latency_steps"] for r in results if "latency_steps" in r]
    if lat:
        print(f"straggler detection latency (steps after the onset): {sorted(lat)}")
    print(f"total: {sum(r['right'] for r in results)}/{len(results)} right")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
