"""``ringwatch demo``: a real 4-rank DDP job on Gloo, one rank slowed down, watched live.

The job is :mod:`ringwatch.cluster._job` under ``torchrun --standalone``, launched exactly as
``ringwatch run`` would. Once it reaches ``fault_at_step``, the victim rank's process is
stopped for ``severity`` of every 100 ms (SIGSTOP/SIGCONT from outside). The terminal shows,
every second, the collective time per step of each rank read back from the Parquet logs: the
victim arrives last at every collective and so waits least, its peers wait for it.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ringwatch._config import CaptureConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoOptions:
    """Demo settings (see ``ringwatch demo --help``)."""

    log_dir: Path = Path("ringwatch-demo")
    nproc: int = 4
    steps: int = 150
    fault: str = "straggler"
    victim: int = 2
    severity: float = 0.5
    fault_at_step: int = 50
    period_s: float = 0.1
    refresh_s: float = 0.5
    # Host-side work per step (input pipeline) as in a real job, so that compute, not
    # collectives, fills most of a healthy step.
    job_args: tuple[str, ...] = ("--batch", "64", "--step-sleep-ms", "60")


class DutyCycle:
    """Stop a process for ``severity`` of every ``period_s`` (SIGSTOP/SIGCONT), until stopped.

    Always leaves the process running (SIGCONT) when it ends.
    """

    def __init__(self, pid: int, severity: float, period_s: float = 0.1):
        if not 0 < severity < 1:
            raise ValueError(f"severity {severity}: expected 0 < severity < 1")
        self.pid, self.severity, self.period_s = pid, severity, period_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="duty-cycle", daemon=True)
        self.started_at: float | None = None

    def start(self) -> None:
        self.started_at = time.time()
        self.thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                self._stop.wait(self.severity * self.period_s)
                os.kill(self.pid, signal.SIGCONT)
                self._stop.wait((1 - self.severity) * self.period_s)
        except ProcessLookupError:
            return
        finally:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _per_rank_ms(step_comm, steps) -> dict[int, float]:
    import polars as pl

    sel = step_comm.filter(pl.col("step").is_in(list(steps)))
    return {r: m / 1e6 for r, m in sel.group_by("rank").agg(pl.col("comm_ns").median())
            .sort("rank").iter_rows()}


def _complete_steps(step_comm, nproc: int) -> list[int]:
    import polars as pl

    counts = step_comm.group_by("step").agg(pl.col("rank").n_unique().alias("n"))
    done = sorted(counts.filter(pl.col("n") == nproc)["step"].to_list())
    return done[:-1]  # the newest step may still be in flight on some rank


def run_demo(opts: DemoOptions) -> int:
    """Run the demo; returns the job's exit status (0 when all went well)."""
    from ringwatch._logs import open_job
    from ringwatch._summary import check_job
    from ringwatch.agent._launch import child_env, jobs_since
    from ringwatch.analyzers import compute_step_comm

    cfg = CaptureConfig.from_env(log_dir=opts.log_dir, flush_interval_s=0.5)
    opts.log_dir.mkdir(parents=True, exist_ok=True)
    out_path = opts.log_dir / "demo-job.out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={opts.nproc}", "-m", "ringwatch.cluster._job",
           "--steps", str(opts.steps), *opts.job_args]
    fault = opts.fault != "none"
    _say(f"ringwatch demo: {opts.nproc}-rank DDP job on Gloo (CPU), {opts.steps} steps, "
         f"agent attached through `ringwatch run`")
    if fault:
        _say(f"fault: rank {opts.victim} stopped {opts.severity:.0%} of every "
             f"{opts.period_s * 1e3:.0f} ms from step {opts.fault_at_step} (SIGSTOP/SIGCONT)")
    _say(f"job output: {out_path}")
    started = time.time()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, env=child_env(cfg), stdout=out,
                                stderr=subprocess.STDOUT)
    job = None
    duty: DutyCycle | None = None
    fault_from = None
    shown = None
    try:
        while True:
            alive = proc.poll() is None
            if job is None:
                ids = jobs_since(opts.log_dir, started)
                job = open_job(opts.log_dir, ids[-1]) if ids else None
            if job is not None:
                job = open_job(opts.log_dir, job.job_id)  # pick up ranks that appeared since
                sc = compute_step_comm(job.events(include_pending=False))
                done = _complete_steps(sc, opts.nproc)
                if done and done[-1] != shown:
                    cur = shown = done[-1]
                    ms = _per_rank_ms(sc, done[-3:])
                    cells = "  ".join(f"r{r}:{v:7.1f}" for r, v in ms.items())
                    flag = "  <- fault on" if duty else ""
                    _say(f"step {cur + 1:>4}/{opts.steps}  collective ms/step  {cells}{flag}")
                    if fault and duty is None and cur + 1 >= opts.fault_at_step:
                        pid = job.meta().get(opts.victim, {}).get("pid")
                        if pid:
                            duty = DutyCycle(int(pid), opts.severity, opts.period_s)
                            duty.start()
                            fault_from = cur + 1
            if not alive:
                break
            time.sleep(opts.refresh_s)
    except KeyboardInterrupt:
        _say("interrupted: stopping the job")
        proc.terminate()
    finally:
        if duty is not None:
            duty.stop()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    rc = proc.returncode
    _say()
    if job is None:
        ids = jobs_since(opts.log_dir, started)
        job = open_job(opts.log_dir, ids[-1]) if ids else None
    if job is None:
        _say(f"no logs were written; see {out_path}")
        return rc or 1
    job = open_job(opts.log_dir, job.job_id)
    sc = compute_step_comm(job.events())
    done = _complete_steps(sc, opts.nproc)
    _say(_reading(sc, done, fault_from, opts))
    for line in check_job(job)["lines"]:
        _say(line)
    _say(f"logs: {job.path}   (read them: ringwatch logs {opts.log_dir} --steps)")
    return rc


def _reading(sc, done: list[int], fault_from: int | None, opts: DemoOptions) -> str:
    """What the per-step collective times say, before and during the fault."""
    if not done:
        return "no complete step recorded"
    before = [s for s in done if s >= 2 and (fault_from is None or s < fault_from)]
    during = [s for s in done if fault_from is not None and s >= fault_from + 1]
    lines = []
    for name, steps in (("healthy steps", before), ("fault steps", during)):
        if steps:
            ms = _per_rank_ms(sc, steps)
            cells = "  ".join(f"r{r}:{v:7.1f}" for r, v in ms.items())
            lines.append(f"{name:<14} median collective ms/step  {cells}")
    ms = _per_rank_ms(sc, during or before)
    base = _per_rank_ms(sc, before) if before and during else None
    if len(ms) >= 2:
        # With a healthy baseline, compare how much each rank's waiting grew; else levels.
        score = {r: ms[r] - base.get(r, 0.0) for r in ms} if base else ms
        low = min(score, key=score.get)
        peers = statistics.median(v for r, v in score.items() if r != low)
        notable = not base or peers > 0.1 * min(base.values())
        if peers > 0 and score[low] < 0.5 * peers and notable:
            how = "grew by {} ms, its peers' by {} ms" if base else "is {} ms, its peers' {} ms"
            lines.append(f"reading: rank {low}'s collective time per step "
                         f"{how.format(f'{score[low]:.1f}', f'{peers:.1f}')}: it arrives last "
                         "at every collective and the others wait for it (a straggler)")
        else:
            lines.append("reading: no rank stands out; every rank waits about as long")
    return "\n".join(lines)
