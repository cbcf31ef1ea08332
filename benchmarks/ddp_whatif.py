"""The what-if of data-parallel stragglers, scored on a folder of ``scenarios.py`` runs.

For every ``straggler-*`` and ``imbalance-*`` run (a rank doing 2x the work mid-run, or from
the first step), `ringwatch analyze --json` names the straggler and says what the job's step
would be with it working like its peers (``~N ms with this rank ...``: the replay of the steps'
dependencies, ``analyzers/_replay.py``; else ``~N ms if this rank arrived like its peers``:
the step less its delay, the fallback). Its truth:

* the median step time of the healthy (``none-*``) runs of the same world size;
* for a mid-run straggler also the run's own steps before the onset (same run, same load).

Printed per run: the prediction, the fallback figure (step less delay) for comparison, and
their errors against each truth; then how many are within 10%.

    .venv/bin/python benchmarks/ddp_whatif.py /tmp/scenarios
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import polars as pl

from ringwatch._logs import list_jobs, open_job
from ringwatch.analyzers._hangs import typical_step_s

PY = sys.executable


def step_ms(run: Path, first: int, last: int) -> float:
    """The job's usual step time (ms) over steps ``first..last``, as its findings read it."""
    job = open_job(run / "logs", list_jobs(run / "logs")[0])
    return 1e3 * typical_step_s(job.events(include_pending=True)
                                .filter(pl.col("step").is_between(first, last)))


def _world(run: Path) -> int:
    return int(re.search(r"-w(\d+)-", run.name).group(1))


def _err(pred: float, truth: float) -> str:
    return f"{(pred - truth) / truth:+.1%}"


def main(argv=None) -> int:
    root = Path((argv or sys.argv[1:])[0])
    healthy: dict[int, list[float]] = {}
    for run in sorted(root.glob("none-*")):
        healthy.setdefault(_world(run), []).append(step_ms(run, 5, 10**9))
    for w, v in sorted(healthy.items()):
        print(f"healthy runs, {w} ranks: " + ", ".join(f"{x:.0f}" for x in v) + " ms")
    within: dict[str, list[bool]] = {"given": [], "fallback": []}
    for run in sorted([*root.glob("straggler-*"), *root.glob("imbalance-*")]):
        truth = json.loads((run / "ground_truth.json").read_text())
        proc = subprocess.run([PY, "-m", "ringwatch._cli", "analyze", "--json",
                               str(run / "logs")], capture_output=True, text=True, check=False)
        found = [f for f in json.loads(proc.stdout or "{}").get("findings", [])
                 if f["kind"] == "straggler" and f["ranks"] == [truth.get("rank")]]
        if not found or _world(run) not in healthy:
            print(f"{run.name}: no straggler named, or no healthy run of its size")
            continue
        ev = " ".join(found[0]["evidence"])
        pred = re.search(r"~(\d+) ms (with this rank|if this rank)", ev)
        now = re.search(r"step took (\d+) ms", ev)
        delay = re.search(r"came ([\d.]+) ms per step", ev)
        if not (pred and now and delay):
            print(f"{run.name}: no what-if in the finding")
            continue
        how = "replay" if pred.group(2) == "with this rank" else "fallback"
        p, fallback = float(pred.group(1)), float(now.group(1)) - float(delay.group(1))
        truths = {"healthy runs": statistics.median(healthy[_world(run)])}
        onset = (truth.get("trigger") or {}).get("at_step")
        if run.name.startswith("straggler") and onset:
            truths["own steps before the onset"] = step_ms(run, 5, onset - 1)
        line = f"{run.name:18} {how} {p:.0f} ms (fallback {fallback:.0f})"
        for name, t in truths.items():
            line += f"; {name} {t:.0f}: {_err(p, t)} (fallback {_err(fallback, t)})"
        best = truths.get("own steps before the onset", truths["healthy runs"])
        within["given"].append(abs(p - best) / best <= 0.10)
        within["fallback"].append(abs(fallback - best) / best <= 0.10)
        print(line)
    n = len(within["given"])
    if n:
        print(f"within 10% (mid-run: of its own steps before the onset; from the start: of the "
              f"healthy runs): as given {sum(within['given'])}/{n}, the step less the delay "
              f"{sum(within['fallback'])}/{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
