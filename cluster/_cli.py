"""Command-line flags shared by ``ringwatch cluster`` and ``ringwatch demo``, and the
``ringwatch cluster`` subcommand itself (a thin layer over :class:`ringwatch.cluster.Cluster`)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from ringwatch.cluster._spec import (
    FAULT_KINDS,
    HANG_MODES,
    LINK_DIRECTIONS,
    NETNS_MODES,
    STRAGGLER_MODES,
)


def add_cluster_flags(p: argparse.ArgumentParser, *, nproc: int, hosts: int, steps: int,
                      fault: str, at_step: int, severity: float = 0.5) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--nproc", type=int, default=nproc, help=f"ranks (default {nproc})")
    g.add_argument("--hosts", type=int, default=hosts,
                   help=f"emulated hosts, ranks split evenly (default {hosts})")
    g.add_argument("--netns", choices=NETNS_MODES, default="auto",
                   help="one network namespace per host: on, off (loopback, hosts as labels) "
                   "or auto (on when root; default)")
    g.add_argument("--tp", type=int, default=1,
                   help="ranks per tensor-parallel group; > 1 gives dp x tp process groups")
    g.add_argument("--pp", type=int, default=1,
                   help="pipeline stages; > 1 gives dp x tp x pp (send/recv between stages)")
    g.add_argument("--steps", type=int, default=steps, help=f"training steps (default {steps})")
    g.add_argument("--timeout-s", type=float, default=600.0, help="end the run after this long")
    f = p.add_argument_group("fault")
    f.add_argument("--fault", choices=FAULT_KINDS, default=fault, help=f"default {fault}")
    f.add_argument("--victim-rank", type=int, default=2,
                   help="rank for straggler, hang, imbalance (default 2)")
    f.add_argument("--victim-host", type=int, default=1, help="host for link (default 1)")
    f.add_argument("--at-step", type=int, default=at_step,
                   help=f"apply when the victim reaches this step (default {at_step})")
    f.add_argument("--at-s", type=float, help="apply this many seconds after the first step "
                   "instead of at a step")
    f.add_argument("--straggler-mode", choices=STRAGGLER_MODES, default="stop",
                   help="straggler: stop = SIGSTOP/SIGCONT duty cycle (default); work = "
                   "--factor times the work per step from the onset on")
    f.add_argument("--severity", type=float, default=severity,
                   help="straggler (stop): share of each period the rank is stopped "
                   f"(default {severity})")
    f.add_argument("--period-ms", type=float, default=100.0,
                   help="straggler: duty-cycle period (default 100 ms)")
    f.add_argument("--rate-mbit", type=float, default=None,
                   help="link: bandwidth limit, Mbit/s (default 100 unless --loss-pct alone)")
    f.add_argument("--loss-pct", type=float, help="link: random packet loss, percent")
    f.add_argument("--direction", choices=LINK_DIRECTIONS, default="both",
                   help="link: traffic leaving the host, entering it, or both (default)")
    f.add_argument("--hang-mode", choices=HANG_MODES, default="block",
                   help="hang: block the main thread (default) or SIGSTOP the process")
    f.add_argument("--hold-s", type=float, default=15.0,
                   help="hang: seconds to leave the job hung before ending it (default 15)")
    f.add_argument("--factor", type=float, default=2.0,
                   help="imbalance, straggler (work): the victim's work multiplier (default 2)")


def fault_from_args(args):
    from ringwatch.cluster._spec import FaultSpec

    rate = args.rate_mbit
    if rate is None and args.loss_pct is None:
        rate = 100.0
    return FaultSpec(
        kind=args.fault, rank=args.victim_rank, host=args.victim_host,
        at_step=None if args.at_s is not None else args.at_step, at_s=args.at_s,
        severity=args.severity, period_s=args.period_ms / 1e3, rate_mbit=rate,
        loss_pct=args.loss_pct, direction=args.direction, hang_mode=args.hang_mode,
        hold_s=args.hold_s, factor=args.factor,
        straggler_mode=args.straggler_mode)


def spec_from_args(args, run_dir: Path, job_args: tuple[str, ...] = ()):
    from ringwatch.cluster._spec import ClusterSpec

    return ClusterSpec(run_dir=run_dir, nproc=args.nproc, hosts=args.hosts, netns=args.netns,
                       tp=args.tp, pp=args.pp, steps=args.steps, job_args=job_args,
                       timeout_s=args.timeout_s)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> None:
    """Make SIGTERM end a run like Ctrl-C (through ``finally``, so teardown runs)."""
    signal.signal(signal.SIGTERM, _interrupt)


def cmd_cluster(args) -> int:
    from ringwatch.cluster._run import Cluster, sweep

    say = lambda m: print(f"[cluster] {m}", flush=True)
    if args.clean:
        ids = sweep(say)
        say(f"cleaned {len(ids)} dead run(s)" if ids else "nothing left over")
        return 0
    job_args = tuple(a for a in args.job_args if a != "--")
    spec = spec_from_args(args, Path(args.run_dir), job_args)
    fault = fault_from_args(args)
    sigterm_as_interrupt()
    cluster = Cluster(spec, fault, log=say)
    with cluster:
        result = cluster.run()
    say(f"{result.reason}: exit statuses {result.returncodes}, {result.wall_s:.1f} s")
    say(f"ground truth: {result.run_dir / 'ground_truth.json'}")
    say(f"logs: {result.log_dir}   (ringwatch logs {result.log_dir} --check)")
    if result.leftovers:
        say("could not remove: " + "; ".join(result.leftovers))
    return 0 if result.ok and not result.leftovers else 1
