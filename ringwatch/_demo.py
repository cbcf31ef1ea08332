"""``ringwatch demo``: a small local cluster with an injected fault, watched live.

The cluster (:mod:`ringwatch.cluster`) runs a real DDP job on Gloo under ``torchrun`` with the
agent attached, on emulated hosts when root, and applies the fault from outside at a chosen
step. Twice a second the terminal shows what ringwatch's logs say: each rank's time in
collectives per step, and of it the time spent waiting for a member that had not arrived yet (a
compute straggler arrives last at every collective and so waits least; its peers wait for it)
and, when the job stops making progress, where each rank is stuck. At the end: what was
injected, beside the reading of the logs (its verdict from the rows alone, the figures split at
the injected onset), the capture checks, the analyzers' findings and the logs.
"""

from __future__ import annotations

import time
from pathlib import Path

from ringwatch._reading import cells, frontier_lines, read_run

# Host-side work per step (an input pipeline) as in a real job, so that compute, not
# collectives, fills most of a healthy step.
JOB_ARGS = ("--batch", "64", "--step-sleep-ms", "60")
REFRESH_S = 0.5
STALL_S = 2.0


def _say(msg: str = "") -> None:
    print(msg, flush=True)


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
        from ringwatch.analyzers import compute_step_comm, compute_step_wait

        try:
            job = open_job(cluster.log_dir, cluster.job_id)
        except (FileNotFoundError, ValueError):
            return  # no rank has written yet
        events = job.events(include_pending=True)
        finished = events.filter(events["status"] != "pending")
        sc = compute_step_comm(finished)
        done = _complete_steps(sc, self.nproc)
        if done and done[-1] != self.shown_step:
            self.shown_step = done[-1]
            self.last_progress = now
            flag = "  <- fault on" if cluster.injector is not None else ""
            wait = _per_rank_ms(compute_step_wait(finished), done[-3:], "wait_ns")
            _say(f"step {done[-1] + 1:>4}/{self.steps}  in collectives/waiting ms/step  "
                 f"{cells(_per_rank_ms(sc, done[-3:]), wait)}{flag}")
        elif (self.shown_step is not None and self.shown_step + 2 < self.steps
              and now - self.last_progress > STALL_S and now - self.stall_shown > 2.5):
            self.stall_shown = now
            for line in frontier_lines(events, now_ns=time.time_ns()):
                _say(f"  no progress for {now - self.last_progress:4.1f} s: {line}")


def _per_rank_ms(per_step, steps, value: str = "comm_ns") -> dict[int, float]:
    import polars as pl

    sel = per_step.filter(pl.col("step").is_in(list(steps)))
    return {r: m / 1e6 for r, m in sel.group_by("rank").agg(pl.col(value).median())
            .sort("rank").iter_rows()}


def _complete_steps(step_comm, nproc: int) -> list[int]:
    import polars as pl

    counts = step_comm.group_by("step").agg(pl.col("rank").n_unique().alias("n"))
    done = sorted(counts.filter(pl.col("n") == nproc)["step"].to_list())
    return done[:-1]  # the newest step may still be in flight on some rank


def _start_live(log_dir: Path, nproc: int):
    """The live loop beside the job, in this process: ``ringwatch serve`` on free loopback
    ports, and the node agent pushing to it every second (``nproc`` synthetic GPUs replayed,
    labelled so: this machine may have none; the ranks' summaries from their logs)."""
    from ringwatch._config import AgentConfig
    from ringwatch.agent.sidecar._main import build_sidecar
    from ringwatch.agent.sidecar._prom_export import build_registry, serve_metrics
    from ringwatch.service._service import Service, ServiceConfig

    service = Service(ServiceConfig(otlp_listen="127.0.0.1:0", api_listen="127.0.0.1:0",
                                    state_dir=log_dir.parent / "serve")).start()
    cfg = AgentConfig(log_dir=log_dir, prometheus_listen=None, host="demo-node",
                      logs_interval_s=0.5, export_interval_s=1.0,
                      otlp_endpoint=service.receiver.url)
    sidecar = build_sidecar(cfg, replay=f"synthetic:{nproc}")
    server, _ = serve_metrics(build_registry(sidecar.state), "127.0.0.1:0")
    sidecar.start()
    return service, sidecar, server


class LiveVerdict:
    """Prints each finding of the live service when it opens or resolves."""

    def __init__(self, service):
        self.service = service
        self.shown: dict[str, str] = {}
        self.t0 = time.monotonic()

    def tick(self) -> None:
        for t in self.service.store.current():
            if self.shown.get(t.id) == t.state:
                continue
            self.shown[t.id] = t.state
            f = t.finding
            when = f"{time.monotonic() - self.t0:5.1f} s"
            if t.state == "open":
                step = f", since step {f.since_step}" if f.since_step is not None else ""
                _say(f"  [serve {when}] LIVE: {f.headline()}{step}")
                for line in f.evidence[:2]:
                    _say(f"      {line}")
            else:
                _say(f"  [serve {when}] resolved: {f.headline()}")


def _agent_lines(sidecar, server) -> list[str]:
    from ringwatch.agent.sidecar._points import collect_points

    sidecar.read_logs()
    pts = collect_points(sidecar.state)
    power = [p.value for p in pts if p.spec.prom == "ringwatch_gpu_power_watts"]
    calls: dict[str, float] = {}
    for p in pts:
        if p.spec.prom == "ringwatch_collectives_total":
            rank = dict(p.resource)["rank"]
            calls[rank] = calls.get(rank, 0) + p.value
    port = server.server_address[1]
    return [f"node agent: /metrics on 127.0.0.1:{port} ({len(pts)} series); "
            f"{len(power)} GPU(s) replayed from a synthetic recording, "
            f"{sum(power):.0f} W now",
            "  collectives per rank, read from the ranks' logs: "
            + ", ".join(f"rank {r}: {int(n)}" for r, n in sorted(calls.items()))]


def run_demo(args) -> int:
    """Run the demo from parsed ``ringwatch demo`` arguments; returns the exit status."""
    from ringwatch._logs import open_job
    from ringwatch._summary import check_job
    from ringwatch.cluster._cli import fault_from_args, sigterm_as_interrupt, spec_from_args
    from ringwatch.cluster._run import GROUND_TRUTH, Cluster

    spec = spec_from_args(args, Path(args.log_dir), JOB_ARGS)
    fault = fault_from_args(args)
    import os

    # ranks flush every 0.5 s, so the live loop sees a step about a second after it ends
    os.environ.setdefault("RINGWATCH_FLUSH_INTERVAL_S", "0.5")
    view = LiveView(spec.nproc, spec.steps)
    service, sidecar, server = _start_live(Path(args.log_dir) / "logs", spec.nproc)
    verdict = LiveVerdict(service)

    def on_tick(c) -> None:
        view.tick(c)
        verdict.tick()

    cluster = Cluster(spec, fault, log=lambda m: _say(f"[cluster] {m}"), on_tick=on_tick)
    _say(f"ringwatch demo: {spec.nproc}-rank DDP job on Gloo (CPU), {spec.steps} steps, "
         f"{spec.hosts} host(s), agent attached through `ringwatch run`")
    _say(f"fault: {cluster.describe_fault()}"
         + (f", from step {fault.at_step}" if fault.kind in ("straggler", "hang", "link")
            and fault.at_step is not None else ""))
    _say(f"live: ringwatch serve on {service.receiver.url} (API "
         f"http://127.0.0.1:{service.api.port}), one node agent pushing to it every second")
    sigterm_as_interrupt()
    try:
        with cluster:
            result = cluster.run()
        time.sleep(3)  # the last steps reach the service
        service.analyze_once()
        verdict.tick()
        agent_lines = _agent_lines(sidecar, server)
    finally:
        sidecar.stop()
        server.shutdown()
        service.stop()
    _say()
    try:
        job = open_job(result.log_dir, result.job_id)
    except (FileNotFoundError, ValueError):
        _say(f"no logs were written; see {result.run_dir / 'out'}")
        return 1
    events = job.events(include_pending=True)
    # A hang is held --hold-s seconds before the job is ended, so the demo counts a stall of
    # half that (5 s at most) as a hang, whatever was injected: the same for every run.
    from ringwatch.analyzers._hangs import MIN_STALL_S

    stall = min(MIN_STALL_S, fault.hold_s / 2)
    # What was injected, then what the rows say: the verdict comes from the rows alone.
    reading = read_run(events, result.ground_truth, spec.nproc,
                       last_seen_ns=job.last_write_ns(), min_stall_s=stall)
    for line in reading.lines:
        _say(line)
    checked = check_job(job)
    for line in checked["lines"]:
        _say(line)
    if reading.verdict == "hang" and not checked["consistency"]["ok"]:
        _say("(in a hang, the ranks that never arrived lack the collectives their peers "
             "entered: the consistency problems above are the hang itself)")
    # The analyzers, as `ringwatch analyze` runs them
    from ringwatch._analyze import analyze_job, report_lines

    _say(f"ringwatch analyze {result.log_dir}:")
    for line in report_lines(analyze_job(job, min_stall_s=stall))[1:]:
        _say(f"  {line}")
    for line in agent_lines:
        _say(line)
    _say(f"ground truth: {result.run_dir / GROUND_TRUTH}")
    _say(f"logs: {job.path}   (read them: ringwatch logs {result.log_dir} --steps)")
    if result.leftovers:
        _say("could not remove: " + "; ".join(result.leftovers))
    return 0 if result.ok else 1
