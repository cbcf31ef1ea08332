"""Run a local cluster: launch, watch progress, inject the fault, end, clean up, write the truth.

One ``torchrun`` per emulated host (static rendezvous on host 0), each in its own session and
its host's namespace, with the agent attached as ``ringwatch run`` would. The run folder gets:

- ``logs/``: ringwatch's per-rank logs (job id :attr:`Cluster.job_id`);
- ``ground_truth.json``: what was injected, where and when (rewritten as the run goes, so an
  interrupted run leaves one too);
- ``cluster.json``: the layout (hosts, addresses, ranks per host);
- ``steps/rank-R.tsv``: the job's own step start times, independent of ringwatch;
- ``out/host-I.log``: each launcher's output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ringwatch._config import CaptureConfig
from ringwatch.cluster import _faults, _netns, _owner, _procs
from ringwatch.cluster._spec import ClusterSpec, FaultSpec

GROUND_TRUTH = "ground_truth.json"
LAYOUT = "cluster.json"
TRUTH_FORMAT = "ringwatch-ground-truth/1"
MASTER_PORT = 29500
STOP_GRACE_S = 20.0


def leftovers() -> dict[str, list[str]]:
    """What dead cluster runs left behind: ``{run id: [descriptions]}`` (namespaces, links,
    processes, lock files of runs whose owner is gone). Runs in progress are not listed."""
    pids = _procs.marked_pids()
    nets = (_netns.list_netns() + _netns.list_links()) if os.geteuid() == 0 else []
    locks = _owner.lock_ids()
    ids = locks | set(pids.values()) | {m.group(1) for n in nets if (m := _owner.ID_RE.match(n))}
    out: dict[str, list[str]] = {}
    for rid in sorted(ids):
        if _owner.is_alive(rid):
            continue
        out[rid] = ([f"process {p}" for p, r in sorted(pids.items()) if r == rid]
                    + [f"namespace/link {n}" for n in nets if n.startswith(rid)]
                    + (["lock file"] if rid in locks else []))
    return out


def sweep(log: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Remove what dead cluster runs left behind (processes, namespaces, links, lock files).

    Returns the run ids cleaned. Runs whose owner is alive are never touched.
    """
    cleaned = []
    for rid in leftovers():
        pids = list(_procs.marked_pids(rid))
        if pids:
            _procs.end_processes(pids, grace_s=2.0)
        left = _netns.remove_run_objects(rid) if os.geteuid() == 0 else []
        _owner.forget(rid)
        cleaned.append(rid)
        log(f"cleaned up after dead run {rid}: {len(pids)} process(es)"
            + (f"; could not remove: {'; '.join(left)}" if left else ""))
    return cleaned


def read_steps(steps_dir: Path) -> dict[int, tuple[int, list[tuple[int, int]]]]:
    """The job's step marks: ``{rank: (pid, [(step, wall_ns), ...])}`` (other lines, such as
    ``slowed<TAB>step``, are left to :func:`read_slowed_step`)."""
    out = {}
    for f in sorted(steps_dir.glob("rank-*.tsv")):
        pid, marks = 0, []
        for line in f.read_text().splitlines():
            a, _, b = line.partition("\t")
            if a == "pid":
                pid = int(b)
            elif a.isdigit() and b.isdigit():
                marks.append((int(a), int(b)))
        out[int(f.stem.split("-")[1])] = (pid, marks)
    return out


def read_slowed_step(steps_dir: Path, rank: int) -> int | None:
    """The first step rank ``rank`` ran slowed (a ``work`` straggler takes the runner's signal
    at its next step boundary, a step or two after the runner saw the onset step)."""
    try:
        text = (steps_dir / f"rank-{rank}.tsv").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        a, _, b = line.partition("\t")
        if a == "slowed" and b.isdigit():
            return int(b)
    return None


@dataclass(slots=True)
class RunResult:
    """How a cluster run ended.

    Attributes:
        ok: The job completed (or, for a hang, was held hung and then ended as planned).
        reason: ``completed``, ``hang held``, ``failed``, ``timeout`` or ``interrupted``.
        returncodes: Each launcher's exit status, host by host.
        run_dir, log_dir, job_id: Where to read the results.
        ground_truth: The ground-truth record written to ``run_dir/ground_truth.json``.
        mode: ``netns`` or ``loopback``.
        leftovers: Anything teardown could not remove (empty when all is clean).
        wall_s: Duration of the run, seconds.
    """

    ok: bool
    reason: str
    returncodes: list[int | None]
    run_dir: Path
    log_dir: Path
    job_id: str
    ground_truth: dict
    mode: str
    leftovers: list[str] = field(default_factory=list)
    wall_s: float = 0.0


class Cluster:
    """One local cluster run. Use as a context manager, or call :meth:`run`.

    Args:
        spec: The cluster's shape.
        fault: The fault to inject (default: none).
        log: Where progress messages go (one line each).
        on_tick: Called about every ``poll_s`` while the job runs, with the cluster.
        poll_s: Progress polling interval, seconds.
    """

    def __init__(self, spec: ClusterSpec, fault: FaultSpec | None = None, *,
                 log: Callable[[str], None] = lambda _m: None,
                 on_tick: Callable[[Cluster], None] | None = None, poll_s: float = 0.05):
        self.spec, self.fault = spec, fault or FaultSpec()
        self.log, self.on_tick, self.poll_s = log, on_tick, poll_s
        self.run_dir = Path(spec.run_dir).resolve()
        self.log_dir = self.run_dir / "logs"
        self.steps_dir = self.run_dir / "steps"
        self.tmp_dir = self.run_dir / "tmp"  # the job's TMPDIR, removed at teardown
        self.job_id = spec.job_id or self.run_dir.name
        self.mode = "loopback"
        self.fallback_reason: str | None = None
        self.hosts: list[_netns.Host] = []
        self.procs: list[subprocess.Popen] = []
        self.injector = None
        self.truth: dict = {}
        self._lock: _owner.RunLock | None = None
        self._net: _netns.Network | None = None
        self._t0_ns = 0
        self._first_step_ns: int | None = None
        self._onset_mono: float | None = None
        self._stopping = False

    # -- set-up ------------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def start(self) -> None:
        """Clean up after dead runs, create the hosts, launch the job."""
        spec = self.spec
        if self.fault.kind in ("straggler", "hang", "imbalance") and \
                not 0 <= self.fault.rank < spec.nproc:
            raise ValueError(f"victim rank {self.fault.rank}: the job has {spec.nproc} ranks")
        if self.fault.kind == "link" and not 0 <= self.fault.host < spec.hosts:
            raise ValueError(f"victim host {self.fault.host}: the cluster has {spec.hosts}")
        why = _netns.netns_unavailable_reason()
        if spec.netns == "on" and why:
            raise PermissionError(f"emulated hosts need network namespaces: {why}")
        use_netns = spec.netns == "on" or (spec.netns == "auto" and why is None)
        if spec.netns == "auto" and why:
            self.fallback_reason = why
            self.log(f"emulated hosts need root and iproute2 ({why}): running every rank on "
                     "loopback, hosts as labels only")
        if self.fault.kind == "link" and not use_netns:
            raise PermissionError("a link fault needs emulated hosts (network namespaces, root)"
                                  + (f": {why}" if why else ""))
        for d in (self.log_dir, self.steps_dir, self.run_dir / "out"):
            d.mkdir(parents=True, exist_ok=True)
        for stale in self.steps_dir.glob("rank-*.tsv"):
            stale.unlink()
        sweep(self.log)
        self._lock = _owner.RunLock()
        if use_netns:
            self.mode = "netns"
            self._net = _netns.Network(self._lock.id, spec.hosts, spec.subnet)
            self.hosts = self._net.create()
        else:
            self.hosts = _netns.loopback_hosts(spec.hosts)
        self._write_layout()
        self._t0_ns = time.time_ns()
        self.truth = self._truth_base()
        self._write_truth()
        self._launch()

    def _port(self) -> int:
        if self.mode == "netns":
            return MASTER_PORT  # host 0's namespace is fresh: nothing else listens there
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def _launch(self) -> None:
        spec, f = self.spec, self.fault
        job_args = ["--steps", str(spec.steps), "--tp", str(spec.tp), "--pp", str(spec.pp),
                    "--step-log", str(self.steps_dir), *spec.job_args]
        if f.kind == "imbalance":
            job_args += ["--extra-work-rank", str(f.rank), "--extra-work-factor", str(f.factor)]
        if f.kind == "straggler" and f.straggler_mode == "work":
            job_args += ["--slowdown-factor", str(f.factor)]
        base = dict(os.environ)
        base.update(spec.env)
        if spec.attach:
            from ringwatch.agent.capture._launch import child_env

            cfg = CaptureConfig.from_env(log_dir=self.log_dir, job_id=self.job_id,
                                         flush_interval_s=spec.flush_interval_s)
            base = child_env(cfg, base)
        self._start_launchers(["-m", "ringwatch.cluster._job", *job_args], base)

    def _start_launchers(self, target: list[str], base: dict[str, str]) -> None:
        """One ``torchrun`` per host running ``target`` (``["-m", module, *args]``) with
        environment ``base``, each in its host's namespace and its own session."""
        spec = self.spec
        port = self._port()
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for h in self.hosts:
            env = dict(base)
            env.update({_owner.ENV_MARK: self._lock.id, "RINGWATCH_HOST": h.name,
                        "GLOO_SOCKET_IFNAME": h.ifname, "OMP_NUM_THREADS": "1",
                        "TMPDIR": str(self.tmp_dir)})
            cmd = h.wrap([sys.executable, "-m", "torch.distributed.run",
                          f"--nnodes={spec.hosts}", f"--node-rank={h.index}",
                          f"--nproc-per-node={spec.per_host}",
                          f"--master-addr={self.hosts[0].addr}",
                          f"--master-port={port}", "--max-restarts=0", *target])
            with open(self.run_dir / "out" / f"host-{h.index}.log", "w") as out:
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT,
                                                   start_new_session=True))
        self.log(f"launched {spec.nproc} ranks on {spec.hosts} host(s) ({self.mode}), "
                 f"run id {self._lock.id}, job id {self.job_id}")

    # -- the run -----------------------------------------------------------------------------
    def steps(self) -> dict[int, tuple[int, list[tuple[int, int]]]]:
        """The job's step marks so far (see :func:`read_steps`)."""
        return read_steps(self.steps_dir)

    def run(self) -> RunResult:
        """Wait for the job, injecting the fault on cue; tear everything down; return how it
        ended. Ctrl-C ends the run cleanly (reason ``interrupted``)."""
        t_start = time.monotonic()
        reason = None
        try:
            reason = self._watch(t_start)
        except KeyboardInterrupt:
            reason = "interrupted"
            self.log("interrupted: ending the job")
            raise
        finally:
            codes = self._end_job()
            if reason is None:
                reason = "failed"
            self._finish_truth(reason, codes)
            leftovers = self.teardown()
        ok = reason == "hang held" or (reason == "completed" and all(c == 0 for c in codes))
        return RunResult(ok=ok, reason=reason, returncodes=codes, run_dir=self.run_dir,
                         log_dir=self.log_dir, job_id=self.job_id, ground_truth=self.truth,
                         mode=self.mode, leftovers=leftovers,
                         wall_s=time.monotonic() - t_start)

    def _watch(self, t_start: float) -> str:
        f = self.fault
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                return "completed" if all(c == 0 for c in codes) else "failed"
            if any(c not in (None, 0) for c in codes):
                self.log(f"a launcher failed (exit statuses {codes}): ending the job")
                return "failed"
            if time.monotonic() - t_start > self.spec.timeout_s:
                self.log(f"timeout after {self.spec.timeout_s:.0f} s: ending the job")
                return "timeout"
            if self.injector is None and f.kind in ("straggler", "hang", "link"):
                self._maybe_inject()
            if f.kind == "hang" and self._onset_mono is not None and \
                    time.monotonic() - self._onset_mono >= f.hold_s:
                self.log(f"hang held for {f.hold_s:.0f} s: ending the job")
                return "hang held"
            if self.on_tick is not None:
                self.on_tick(self)
            time.sleep(self.poll_s)

    def _maybe_inject(self) -> None:
        f = self.fault
        marks = self.steps()
        if not marks:
            return
        if self._first_step_ns is None:
            firsts = [m[0][1] for _pid, m in marks.values() if m]
            if firsts:
                self._first_step_ns = min(firsts)
        if f.kind == "link":
            ranks = list(range(self.spec.nproc))
        else:
            ranks = [f.rank]
        if any(r not in marks or not marks[r][1] for r in ranks):
            return
        step = min(marks[r][1][-1][0] for r in ranks)
        if f.at_step is not None:
            due = step >= f.at_step
        else:
            due = (time.time_ns() - self._first_step_ns) / 1e9 >= f.at_s
        if not due:
            return
        if f.kind == "straggler" and f.straggler_mode == "work":
            inj = _faults.SlowDown(marks[f.rank][0])
        elif f.kind == "straggler":
            inj = _faults.DutyCycle(marks[f.rank][0], f.severity, f.period_s)
        elif f.kind == "hang":
            inj = _faults.Hang(marks[f.rank][0], f.hang_mode)
        else:
            inj = _faults.LinkFault(self.hosts[f.host], rate_mbit=f.rate_mbit,
                                    loss_pct=f.loss_pct, direction=f.direction)
        onset_ns = time.time_ns()
        inj.start()
        self.injector = inj
        self._onset_mono = time.monotonic()
        self.truth.update(applied=True, onset_wall_ns=onset_ns, onset_step=step,
                          where=inj.where)
        self._write_truth()
        self.log(f"fault on: {self._describe()} at step {step}")

    def _end_job(self) -> list[int | None]:
        """Stop the injector and end every process of the run (SIGTERM through the launchers,
        which forward it to the ranks so they flush their logs; SIGKILL after a grace)."""
        self._stopping = True
        if self.injector is not None:
            self.injector.stop()
            self.truth["cleared_wall_ns"] = time.time_ns()
        live = [p for p in self.procs if p.poll() is None]
        if isinstance(self.injector, _faults.Hang) and self.injector.mode == "stop":
            # A frozen rank woken up would finish the collectives its peers wait in and
            # undo the hang in the logs; it ends as a frozen host does, without a word.
            _faults._kill(self.injector.pid, signal.SIGKILL)
        if live and self._lock is not None:
            for pid in _procs.marked_pids(self._lock.id):  # let stopped ranks act on SIGTERM
                _faults._kill(pid, signal.SIGCONT)
            _procs.end_processes([p.pid for p in live], grace_s=STOP_GRACE_S)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._lock is not None:
            _procs.end_processes(list(_procs.marked_pids(self._lock.id)), grace_s=5.0)
        return [p.returncode for p in self.procs]

    def teardown(self) -> list[str]:
        """End leftover processes, remove namespaces and links, release the run id. Idempotent.
        Returns what could not be removed."""
        left: list[str] = []
        if self._lock is None:
            return left
        rid = self._lock.id
        if self.injector is not None:
            self.injector.stop()
        stuck = _procs.end_processes(list(_procs.marked_pids(rid)), grace_s=5.0)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self._net is not None:
            left += self._net.teardown()
            left += [f"{n} still present" for n in _netns.run_ids_in_network() if n == rid]
        still = _procs.marked_pids(rid)
        if still:
            left.append(f"processes still running: {sorted(still)} (SIGKILL sent to {stuck})")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # torchrun's folders, one per launch
        self._lock.release()
        self._lock = None
        return left

    # -- records -----------------------------------------------------------------------------
    def _describe(self) -> str:
        f = self.fault
        if f.kind == "straggler" and f.straggler_mode == "work":
            return f"rank {f.rank} does {f.factor:g}x the work per step from the onset on"
        if f.kind == "straggler":
            return (f"rank {f.rank} stopped {f.severity:.0%} of every "
                    f"{f.period_s * 1e3:.0f} ms (SIGSTOP/SIGCONT)")
        if f.kind == "hang":
            how = "main thread blocked" if f.hang_mode == "block" else "process stopped"
            return f"rank {f.rank} hung for good ({how})"
        if f.kind == "link":
            parts = []
            if f.rate_mbit is not None:
                parts.append(f"limited to {f.rate_mbit:g} Mbit/s (tc tbf)")
            if f.loss_pct is not None:
                parts.append(f"{f.loss_pct:g}% packet loss (nftables)")
            return f"host{f.host}'s link ({f.direction}) " + " and ".join(parts)
        if f.kind == "imbalance":
            return (f"rank {f.rank} does {f.factor:g}x the compute per step from the start "
                    "(its peers' work, slower: a straggler from the first step)")
        return "none (a healthy run)"

    def describe_fault(self) -> str:
        return self._describe()

    def _truth_base(self) -> dict:
        spec, f = self.spec, self.fault
        victim_host = (spec.host_of(f.rank) if f.rank is not None and f.kind != "link"
                       else f.host if f.kind == "link" else None)
        return {
            "format": TRUTH_FORMAT, "job_id": self.job_id, "kind": f.kind,
            # injected mid-run, with steps before it to compare (imbalance is there from
            # the first step)
            "is_fault": f.kind in ("straggler", "hang", "link"),
            "description": self._describe(),
            "rank": f.rank if f.kind in ("straggler", "hang", "imbalance") else None,
            "local_rank": (f.rank % spec.per_host
                           if f.kind in ("straggler", "hang", "imbalance") else None),
            "host": self.hosts[victim_host].name if victim_host is not None else None,
            "ranks_on_host": (list(range(victim_host * spec.per_host,
                                         (victim_host + 1) * spec.per_host))
                              if victim_host is not None else None),
            "params": f.params(),
            "trigger": {"at_step": f.at_step, "at_s": f.at_s},
            # imbalance is there from the first step
            "applied": f.kind == "imbalance",
            "onset_wall_ns": self._t0_ns if f.kind == "imbalance" else None,
            "onset_step": 0 if f.kind == "imbalance" else None,
            "cleared_wall_ns": None, "where": None,
            "world_size": spec.nproc, "hosts": spec.hosts, "tp": spec.tp, "pp": spec.pp,
            "role": _role(spec, f.rank) if f.rank is not None and f.kind in (
                "straggler", "hang", "imbalance") else None, "steps": spec.steps,
            "mode": self.mode, "launched_wall_ns": self._t0_ns,
            "outcome": None,
        }

    def _finish_truth(self, reason: str, codes: list[int | None]) -> None:
        if not self.truth:
            return
        self.truth["outcome"] = {"reason": reason, "returncodes": codes,
                                 "ended_wall_ns": time.time_ns()}
        f = self.fault
        if (self.truth.get("applied") and f.kind == "straggler"
                and f.straggler_mode == "work"):
            step = read_slowed_step(self.steps_dir, f.rank)
            marks = dict(read_steps(self.steps_dir).get(f.rank, (0, []))[1])
            self.truth["effect_step"] = step
            self.truth["effect_wall_ns"] = None if step is None else marks.get(step)
        self._write_truth()

    def _write_truth(self) -> None:
        _write_json(self.run_dir / GROUND_TRUTH, self.truth)

    def _write_layout(self) -> None:
        spec = self.spec
        _write_json(self.run_dir / LAYOUT, {
            "run_id": self._lock.id, "job_id": self.job_id, "mode": self.mode,
            "fallback_reason": self.fallback_reason, "nproc": spec.nproc, "tp": spec.tp,
            "steps": spec.steps, "log_dir": str(self.log_dir),
            "hosts": [{"index": h.index, "name": h.name, "netns": h.netns, "addr": h.addr,
                       "ifname": h.ifname, "veth": h.veth,
                       "ranks": list(range(h.index * spec.per_host,
                                           (h.index + 1) * spec.per_host))}
                      for h in self.hosts]})


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def run_cluster(spec: ClusterSpec, fault: FaultSpec | None = None, **kw) -> RunResult:
    """Run a cluster to the end (see :class:`Cluster`); always cleans up."""
    cluster = Cluster(spec, fault, **kw)
    with cluster:
        return cluster.run()


def _role(spec, rank: int) -> dict:
    """A rank's place in the job's dp x tp x pp layout (as ``cluster/_pipeline.py`` lays it
    out: tp index fastest, then replica, then stage)."""
    dp = spec.nproc // (spec.tp * spec.pp)
    return {"stage": rank // (dp * spec.tp), "replica": rank % (dp * spec.tp) // spec.tp,
            "tp_index": rank % spec.tp, "dp": dp, "tp": spec.tp, "pp": spec.pp}
