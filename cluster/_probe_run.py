"""The pairwise probe (``ringwatch._probe``) on the local cluster: one rank per emulated host,
an optional link fault applied before the probe starts, the result beside the ground truth.

A :class:`ProbeCluster` is a :class:`~ringwatch.cluster.Cluster` whose workload is the probe
(``ringwatch probe`` under one ``torchrun`` per host): the same namespaces, launchers,
tc/nftables fault, ground truth and clean-up (on exit, Ctrl-C and failure). The run folder
gets ``probe.json`` (the probe's result), ``ground_truth.json``, ``cluster.json`` and
``out/host-I.log``. ``ringwatch cluster --probe`` is its CLI.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ringwatch.cluster._faults import LinkFault
from ringwatch.cluster._run import Cluster, RunResult
from ringwatch.cluster._spec import ClusterSpec, FaultSpec

PROBE_FILE = "probe.json"


class ProbeCluster(Cluster):
    """A local cluster running the probe, one rank per host.

    Args:
        run_dir: Where the run goes (``probe.json`` among the rest).
        hosts: Emulated hosts (one probe rank each).
        fault: ``none`` or a ``link`` fault, on from before the first measurement (its
            ``at_step``/``at_s`` are not used).
        probe_args: Extra arguments for ``ringwatch._probe`` (``--size-kb``, ``--repeats``...).
        netns: As :attr:`ClusterSpec.netns`; a link fault needs namespaces.
        timeout_s: End the run (as a failure) after this long.
        log: Where progress messages go.

    Raises:
        ValueError: A fault other than ``link`` or ``none``, or a bad cluster shape.
    """

    def __init__(self, run_dir: Path, *, hosts: int = 3, fault: FaultSpec | None = None,
                 probe_args: tuple[str, ...] = (), netns: str = "auto",
                 timeout_s: float = 300.0, log: Callable[[str], None] = lambda _m: None):
        fault = fault or FaultSpec()
        if fault.kind not in ("none", "link"):
            raise ValueError(f"the probe takes a link fault or none, not {fault.kind}")
        spec = ClusterSpec(run_dir=Path(run_dir), nproc=hosts, hosts=hosts, netns=netns,
                           steps=1, timeout_s=timeout_s, attach=False)
        super().__init__(spec, fault, log=log)
        self.probe_args = tuple(probe_args)
        self.result_path = self.run_dir / PROBE_FILE

    def _launch(self) -> None:
        self.result_path.unlink(missing_ok=True)
        if self.fault.kind == "link":
            self._link_fault_on()
        base = dict(os.environ)
        base.update(self.spec.env)
        self._start_launchers(["-m", "ringwatch._cli", "probe", "--out",
                               str(self.result_path), *self.probe_args], base)

    def _link_fault_on(self) -> None:
        f = self.fault
        inj = LinkFault(self.hosts[f.host], rate_mbit=f.rate_mbit, loss_pct=f.loss_pct,
                        direction=f.direction)
        onset_ns = time.time_ns()
        inj.start()
        self.injector = inj  # the run loop injects nothing more; teardown removes it
        self.truth.update(applied=True, onset_wall_ns=onset_ns, where=inj.where,
                          trigger={"at": "launch"})
        self._write_truth()
        self.log(f"fault on: {self.describe_fault()}, before the probe starts")


@dataclass(frozen=True, slots=True)
class ProbeRun:
    """A finished probe run: how the cluster ended and the probe's result (``None`` when the
    probe did not finish)."""

    result: RunResult
    doc: dict | None
    path: Path


def run_probe_cluster(run_dir: Path, **kw) -> ProbeRun:
    """Run the probe on a local cluster to the end (see :class:`ProbeCluster`); always cleans
    up. Returns the run and the probe's result."""
    pc = ProbeCluster(run_dir, **kw)
    with pc:
        result = pc.run()
    doc = None
    if result.ok and pc.result_path.is_file():
        doc = json.loads(pc.result_path.read_text())
    return ProbeRun(result, doc, pc.result_path)


def cmd_probe_cluster(args) -> int:
    """``ringwatch cluster --probe``: the probe over ``--hosts`` emulated hosts, with the link
    fault of the cluster's fault flags (``--fault link|none``)."""
    from ringwatch._probe import report
    from ringwatch.cluster._cli import fault_from_args, sigterm_as_interrupt

    say = lambda m: print(f"[cluster] {m}", flush=True)
    if args.fault not in ("none", "link"):
        raise ValueError(f"--probe takes --fault link or none, not {args.fault}")
    fault = fault_from_args(args) if args.fault == "link" else None
    probe_args = tuple(a for a in args.job_args if a != "--")
    sigterm_as_interrupt()
    run = run_probe_cluster(Path(args.run_dir), hosts=args.hosts, fault=fault,
                            probe_args=probe_args, netns=args.netns, timeout_s=args.timeout_s,
                            log=say)
    r = run.result
    say(f"{r.reason}: exit statuses {r.returncodes}, {r.wall_s:.1f} s")
    if r.leftovers:
        say("could not remove: " + "; ".join(r.leftovers))
    if run.doc is None:
        say(f"no probe result: see {r.run_dir / 'out'}")
        return 1
    print("\n".join(report(run.doc)[0]))
    say(f"result: {run.path}   (ringwatch probe --read {run.path})")
    say(f"ground truth: {r.run_dir / 'ground_truth.json'}")
    return 0 if r.ok and not r.leftovers else 1
