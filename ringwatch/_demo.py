"""``ringwatch demo``: a small local cluster with an injected fault, watched live.

The cluster (:mod:`ringwatch.cluster`) runs a real DDP job on Gloo under ``torchrun`` with the
agent attached, on emulated hosts when root, and applies the fault from outside at a chosen
step. Twice a second the terminal shows what ringwatch's logs say: each rank's collective time
per step (a compute straggler arrives last at every collective and so waits least; its peers
wait for it) and, when the job stops making progress, where each rank is stuck. At the end: the
reading before and after the fault, the capture checks, the ground truth and the logs.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

# Host-side work per step (an input pipeline) as in a real job, so that compute, not
# collectives, fills most of a healthy step.
JOB_ARGS = ("--batch", "64", "--step-sleep-ms", "60")
REFRESH_S = 0.5
STALL_S = 2.0


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _cells(ms: dict[int, float]) -> str:
    return "  ".join(f"r{r}:{v:6.1f}" for r, v in ms.items())


class LiveView:
    """Reads the job's logs every ``REFRESH_S`` and prints one line per new complete step, or
    the ranks' frontier when the job stalls."""

    def __init__(self, nproc: int, steps: int):
        self.nproc, self.steps = nproc, steps
        self.shown_step: int | None = None
        self.last_refresh = 0.0
        self.last_progress = time.monotonic()
        self.stall_shown = 0.0

    def tick(self, cluster) -> None:
        now = time.monotonic()
        if now - self.last_refresh < REFRESH_S:
            return
        self.last_refresh = now
        from ringwatch._logs import open_job
        from ringwatch.analyzers import compute_step_comm

        try:
            job = open_job(cluster.log_dir, cluster.job_id)
        except (FileNotFoundError, ValueError):
            return  # no rank has written yet
        events = job.events(include_pending=True)
        sc = compute_step_comm(events.filter(events["status"] != "pending"))
        done = _complete_steps(sc, self.nproc)
        if done and done[-1] != self.shown_step:
            self.shown_step = done[-1]
            self.last_progress = now
            flag = "  <- fault on" if cluster.injector is not None else ""
            _say(f"step {done[-1] + 1:>4}/{self.steps}  collective ms/step  "
                 f"{_cells(_per_rank_ms(sc, done[-3:]))}{flag}")
        elif (self.shown_step is not None and self.shown_step + 2 < self.steps
              and now - self.last_progress > STALL_S and now - self.stall_shown > 2.5):
            self.stall_shown = now
            for line in frontier_lines(events, now_ns=time.time_ns()):
                _say(f"  no progress for {now - self.last_progress:4.1f} s: {line}")


def frontier_lines(events, *, now_ns: int) -> list[str]:
    """Per rank, the collectives it is still waiting in (oldest first), or else its latest."""
    import polars as pl

    if events.is_empty():
        return []
    out = []
    for (rank,), rows in sorted(events.sort("idx").group_by("rank")):
        waiting = rows.filter(pl.col("status") == "pending")
        if waiting.height:
            first, last = waiting.row(0, named=True), waiting.row(-1, named=True)
            seqs = (f"#{first['seq']}" if waiting.height == 1
                    else f"#{first['seq']}..#{last['seq']} ({waiting.height} in flight)")
            out.append(f"rank {rank} waiting in {first['op']} {seqs} of pg {first['pg']} "
                       f"for {(now_ns - first['t_start_ns']) / 1e9:.1f} s")
        else:
            r = rows.row(-1, named=True)
            out.append(f"rank {rank} last finished {r['op']} #{r['seq']} of pg {r['pg']}, "
                       "entered nothing since")
    return out


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


def run_demo(args) -> int:
    """Run the demo from parsed ``ringwatch demo`` arguments; returns the exit status."""
    from ringwatch._logs import open_job
    from ringwatch._summary import check_job
    from ringwatch.cluster._cli import fault_from_args, sigterm_as_interrupt, spec_from_args
    from ringwatch.cluster._run import GROUND_TRUTH, Cluster

    spec = spec_from_args(args, Path(args.log_dir), JOB_ARGS)
    fault = fault_from_args(args)
    view = LiveView(spec.nproc, spec.steps)
    cluster = Cluster(spec, fault, log=lambda m: _say(f"[cluster] {m}"), on_tick=view.tick)
    _say(f"ringwatch demo: {spec.nproc}-rank DDP job on Gloo (CPU), {spec.steps} steps, "
         f"{spec.hosts} host(s), agent attached through `ringwatch run`")
    _say(f"fault: {cluster.describe_fault()}"
         + (f", from step {fault.at_step}" if fault.kind in ("straggler", "hang", "link")
            and fault.at_step is not None else ""))
    sigterm_as_interrupt()
    with cluster:
        result = cluster.run()
    _say()
    try:
        job = open_job(result.log_dir, result.job_id)
    except (FileNotFoundError, ValueError):
        _say(f"no logs were written; see {result.run_dir / 'out'}")
        return 1
    events = job.events(include_pending=True)
    for line in reading(events, result.ground_truth, spec.nproc):
        _say(line)
    for line in check_job(job)["lines"]:
        _say(line)
    if fault.kind == "hang":
        _say("(for a hang, the ranks that never arrived lack the collectives their peers "
             "entered: the consistency problems above are the hang itself)")
    _say(f"ground truth: {result.run_dir / GROUND_TRUTH}")
    _say(f"logs: {job.path}   (read them: ringwatch logs {result.log_dir} --steps)")
    if result.leftovers:
        _say("could not remove: " + "; ".join(result.leftovers))
    return 0 if result.ok else 1


def reading(events, truth: dict, nproc: int) -> list[str]:
    """What the captured collectives say, before and after the fault's onset."""
    import polars as pl

    from ringwatch.analyzers import compute_phase_comm, compute_step_comm

    kind = truth.get("kind")
    finished = events.filter(pl.col("status") != "pending")
    sc = compute_step_comm(finished)
    if sc.is_empty():
        return ["no complete step recorded"]
    onset = truth.get("onset_step") if kind in ("straggler", "hang", "link") else None
    ph = compute_phase_comm(sc, onset)
    lines = []
    before = {r: v / 1e6 for r, v in ph.select("rank", "before_ns").iter_rows() if v is not None}
    after = {r: v / 1e6 for r, v in ph.select("rank", "after_ns").iter_rows() if v is not None}
    if before:
        name = "healthy steps" if onset is not None else "all steps"
        lines.append(f"{name:<14} median collective ms/step  {_cells(before)}")
    if after and kind != "hang":
        lines.append(f"{'fault steps':<14} median collective ms/step  {_cells(after)}")
    if kind == "hang":
        lines.append("reading: the job stopped making progress; where each rank is:")
        ended = (truth.get("outcome") or {}).get("ended_wall_ns") or _last_ns(events)
        lines += [f"  {line}" for line in frontier_lines(events, now_ns=ended)]
        return lines
    base = before if len(after) == nproc else None
    ms = after if base else before
    if len(ms) < 2:
        return lines
    score = {r: ms[r] - base[r] for r in ms} if base else ms
    low = min(score, key=score.get)
    peers = statistics.median(v for r, v in score.items() if r != low)
    floor = 0.1 * min(base.values()) if base else 0.0
    if peers > floor and score[low] < 0.5 * peers:
        how = "grew by {} ms, its peers' by {} ms" if base else "is {} ms, its peers' {} ms"
        lines.append(f"reading: rank {low}'s collective time per step "
                     f"{how.format(f'{score[low]:.1f}', f'{peers:.1f}')}: it arrives last "
                     "at every collective and the others wait for it"
                     + (" (a straggler)" if base else " (slower by design, or a straggler "
                        "from the start)"))
    elif base and min(score.values()) > max(0.5 * statistics.median(base.values()), 5.0):
        lines.append(f"reading: every rank's collective time per step grew, by "
                     f"{min(score.values()):.1f} to {max(score.values()):.1f} ms: the "
                     "collectives themselves got slower (network), no rank arrives late")
    else:
        lines.append("reading: no rank stands out; every rank waits about as long")
    return lines


def _last_ns(events) -> int:
    import polars as pl

    return int(events.select(pl.max_horizontal(pl.col("t_end_ns").max(),
                                               pl.col("t_start_ns").max())).item())
