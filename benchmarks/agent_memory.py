"""The node agent with its collector down, over a long job: its memory, its CPU, the job's step.

Each run is a real `ringwatch cluster` job (4 Gloo ranks on 2 emulated hosts, 40 ms of host
work a step, the ranks' logs flushed every 0.5 s) twice: once with `ringwatch agent` reading
its logs and pushing every second to a loopback port nobody listens on, once without. The two
alternate (which goes first too) so that drift of the machine falls on both.

    .venv/bin/python benchmarks/agent_memory.py --steps 2400 --runs 2

Reports, per run with the agent: its resident memory every 15 s (MB), the growth from 30 s on
and over the last half of the job, its CPU share after 30 s, and the median step time of rank 0
with and without it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _procs import cpu_s, free_port, stop

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _step_ms(run: Path, steps: int) -> float:
    from ringwatch.cluster._run import read_steps

    _, marks = read_steps(run / "steps")[0]
    at = dict(marks)
    return 1e-6 * statistics.median(at[s + 1] - at[s] for s in range(10, steps - 1)
                                    if s in at and s + 1 in at)


def _job(run: Path, steps: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGWATCH_")}
    env.update(RINGWATCH_FLUSH_INTERVAL_S="0.5", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [PY, "-m", "ringwatch._cli", "cluster", "--run-dir", str(run), "--nproc", "4",
         "--hosts", "2", "--steps", str(steps), "--fault", "none", "--timeout-s",
         str(steps), "--", "--step-sleep-ms", "40"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def with_agent(run: Path, steps: int) -> dict:
    (run / "logs").mkdir(parents=True)
    dead = f"http://127.0.0.1:{free_port()}/v1/metrics"
    agent = subprocess.Popen(
        [PY, "-m", "ringwatch._cli", "agent", "--log-dir", str(run / "logs"), "--prometheus",
         "off", "--otlp-endpoint", dead, "--export-interval-s", "1", "--no-gpu"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    job = _job(run, steps)
    t0, samples, cpu0 = time.monotonic(), [], None
    try:
        while job.poll() is None:
            t = time.monotonic() - t0
            samples.append((t, _rss_mb(agent.pid)))
            if cpu0 is None and t >= 30:
                cpu0 = (cpu_s(agent.pid), time.monotonic())
            time.sleep(1.0)
        share = (None if cpu0 is None else
                 (cpu_s(agent.pid) - cpu0[0]) / (time.monotonic() - cpu0[1]))
    finally:
        stop(agent, job)
    late = [m for t, m in samples if t >= 30]
    half = [m for t, m in samples if t >= samples[-1][0] / 2]
    return {"rss": samples, "grew_after_30s_mb": late[-1] - late[0] if late else None,
            "grew_last_half_mb": half[-1] - half[0] if half else None, "cpu_share": share,
            "step_ms": _step_ms(run, steps)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="agent-memory-"))
    for i in range(args.runs):
        bare_first = i % 2 == 1
        order = ("bare", "agent") if bare_first else ("agent", "bare")
        got = {}
        for kind in order:
            run = out / f"run{i}-{kind}"
            if kind == "bare":
                job = _job(run, args.steps)
                job.wait()
                got["bare_ms"] = _step_ms(run, args.steps)
            else:
                got.update(with_agent(run, args.steps))
        every = [f"{t:.0f}s {m:.1f}" for t, m in got["rss"][::15]]
        print(f"run {i}: agent RSS (MB) {', '.join(every)}")
        share = got["cpu_share"]
        print(f"  grew {got['grew_after_30s_mb']:+.1f} MB from 30 s on, "
              f"{got['grew_last_half_mb']:+.1f} MB over the last half; CPU "
              f"{'-' if share is None else f'{100 * share:.1f}%'} of a core; step "
              f"{got['step_ms']:.1f} ms with the agent, {got['bare_ms']:.1f} ms without "
              f"(ratio {got['step_ms'] / got['bare_ms']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
