"""The live loop's detection latency on the local cluster, with no post-processing.

Per run: a fresh `ringwatch serve` and one `ringwatch agent` (pushing every second, reading the
ranks' logs every 0.5 s; ranks flush every 0.5 s), then `ringwatch cluster` with one fault.
The API is polled every 0.5 s. Reported per run: the culprit named, the wall time from the
fault's onset (ground truth) to the finding first seen on the API, and for stragglers the
steps from onset to the step the evidence was conclusive at.

    .venv/bin/python benchmarks/live.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from _live_stack import LiveStack, rw

SCENARIOS = {
    "straggler": ["--nproc", "4", "--hosts", "2", "--steps", "90", "--fault", "straggler",
                  "--straggler-mode", "work", "--at-step", "30", "--", "--step-sleep-ms",
                  "60"],
    "hang": ["--nproc", "4", "--hosts", "2", "--steps", "40", "--fault", "hang",
             "--victim-rank", "1", "--at-step", "15", "--hold-s", "15"],
    "link": ["--nproc", "4", "--hosts", "4", "--tp", "2", "--steps", "50", "--fault", "link",
             "--victim-host", "2", "--at-step", "26", "--rate-mbit", "50"],
    "healthy": ["--nproc", "4", "--hosts", "2", "--steps", "60", "--fault", "none"],
}


def one_run(kind: str, tmp: Path) -> dict:
    run = tmp / "run"
    with LiveStack(run / "logs", tmp / "state") as stack:
        rc = stack.run(rw("cluster", "--run-dir", str(run), *SCENARIOS[kind]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    truth = json.loads((run / "ground_truth.json").read_text())
    out = {"kind": kind, "findings": [], "rc": rc}
    for first_ns, f in stack.findings():
        lag = None if truth.get("onset_wall_ns") is None else \
            (first_ns - truth["onset_wall_ns"]) / 1e9
        steps = None if f.get("detected_step") is None or truth.get("onset_step") is None \
            else f["detected_step"] - truth["onset_step"]
        effect = truth.get("effect_step")  # a work straggler's first slowed step
        out["findings"].append({"kind": f["kind"], "cls": f["cls"], "ranks": f["ranks"],
                                "hosts": f["hosts"], "seen_after_s": lag,
                                "steps_after_onset": steps,
                                "steps_after_effect": None if steps is None or effect is None
                                else f["detected_step"] - effect})
    out["truth"] = {k: truth.get(k) for k in ("kind", "rank", "host", "onset_step",
                                              "effect_step")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kinds", default="straggler,hang,link,healthy")
    a = ap.parse_args()
    lags: dict[str, list[float]] = {}
    for kind in a.kinds.split(","):
        for i in range(a.runs):
            with tempfile.TemporaryDirectory() as d:
                r = one_run(kind, Path(d))
            print(json.dumps(r), flush=True)
            want = {"link": "slow_link"}.get(kind, kind)
            hit = [f for f in r["findings"] if f["kind"] == want]
            if hit and hit[0]["seen_after_s"] is not None:
                lags.setdefault(kind, []).append(hit[0]["seen_after_s"])
            print(f"{kind} run {i + 1}: {len(r['findings'])} finding(s); "
                  + "; ".join(f"{f['kind']} {f['cls']} ranks {f['ranks']} hosts {f['hosts']} "
                              f"seen {f['seen_after_s']} s after onset, detected "
                              f"{f['steps_after_onset']} steps after ("
                              f"{f['steps_after_effect']} after the first slowed step)"
                              for f in r["findings"]), flush=True)
    for kind, xs in lags.items():
        print(f"{kind}: median {statistics.median(xs):.1f} s from onset to the API "
              f"(runs: {', '.join(f'{x:.1f}' for x in xs)})")


if __name__ == "__main__":
    main()
