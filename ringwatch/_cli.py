"""The ``ringwatch`` command: one entry point, thin subcommands over library code.

Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from ringwatch._config import ConfigError
from ringwatch._version import __version__


def _capture_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("capture (flag > RINGWATCH_* variable > default)")
    g.add_argument("--log-dir", help="root folder of the per-rank logs (default ./ringwatch-logs)")
    g.add_argument("--job-id", help="job identifier shared by all ranks")
    g.add_argument("--flush-interval-s", type=float, help="seconds between segment writes")
    g.add_argument("--no-ddp-hook", dest="ddp_hook", action="store_const", const=False,
                   help="do not time DDP buckets through a comm hook")
    g.add_argument("--no-fr-backfill", dest="fr_backfill", action="store_const", const=False,
                   help="do not recover unseen collectives from the Flight Recorder")
    g.add_argument("--wrap-backend", dest="wrap_backend", action="store_const", const=True,
                   help="create Gloo groups through the ringwatch wrapper backend")
    g.add_argument("--native", dest="native", action="store_const", const=True,
                   help="record Gloo groups with the native C++ backend wrapper (built against "
                   "the installed torch on first use; the Python hooks where it cannot be)")


def _config(args):
    from ringwatch._config import CaptureConfig

    return CaptureConfig.from_env(
        log_dir=args.log_dir, job_id=args.job_id, flush_interval_s=args.flush_interval_s,
        ddp_hook=args.ddp_hook, fr_backfill=args.fr_backfill, wrap_backend=args.wrap_backend,
        native=args.native)


def cmd_run(args) -> int:
    from ringwatch._logs import open_job
    from ringwatch._summary import summary_lines
    from ringwatch.agent.capture._launch import jobs_since, run_command

    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ConfigError("nothing to run: ringwatch run [options] -- COMMAND ...")
    cfg = _config(args)
    if cfg.native:  # build once here, not in every rank at its first collective
        from ringwatch.agent.capture import _native

        _native.load()
    result = run_command(cmd, cfg)
    for job in jobs_since(result.log_dir, result.started_wall_s):
        for line in summary_lines(open_job(result.log_dir, job)):
            print(f"[ringwatch] {line}", file=sys.stderr)
    return result.returncode


def cmd_build_native(args) -> int:
    from ringwatch.agent.capture import _native

    mod = _native.load()
    print(f"{'built' if mod else 'cannot build'}: {_native.build_dir()}")
    return 0 if mod else 1


def cmd_logs(args) -> int:
    from ringwatch._logs import open_job
    from ringwatch._summary import check_job, summary_lines

    job = open_job(args.log_dir, args.job)
    if args.check:
        report = check_job(job)
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            for line in summary_lines(job) + report["lines"]:
                print(line)
        return 0 if report["ok"] else 1
    if args.json:
        print(json.dumps({"job_id": job.job_id, "path": str(job.path), "meta": job.meta()},
                         indent=1, default=str))
        return 0
    for line in summary_lines(job):
        print(line)
    if args.steps:
        from ringwatch._summary import step_table

        print(step_table(job.events()))
    return 0


def cmd_analyze(args) -> int:
    from ringwatch._analyze import cmd_analyze as run

    return run(args)


def cmd_schema(args) -> int:
    from ringwatch._schema import COLUMNS, SCHEMA_VERSION, schema_markdown

    if args.thresholds:
        from ringwatch.analyzers._thresholds import thresholds_markdown

        sys.stdout.write(thresholds_markdown())
        return 0
    if args.metrics:
        from ringwatch._metrics import metrics_markdown

        sys.stdout.write(metrics_markdown())
        return 0
    if args.markdown:
        sys.stdout.write(schema_markdown())
        return 0
    print(f"ringwatch event schema {SCHEMA_VERSION}")
    for c in COLUMNS:
        print(f"  {c.name:<20} {c.dtype:<8} {'null ' if c.nullable else '     '}{c.doc}")
    return 0


def cmd_probe(args) -> int:
    from ringwatch._probe import report, run_and_print

    if args.read:
        from pathlib import Path

        doc = json.loads(Path(args.read).read_text())
        lines, findings = report(doc, ratio=args.ratio)
        if args.json:
            print(json.dumps({"path": args.read, "hosts": doc.get("hosts"),
                              "bw_MBps": doc.get("bw_MBps"), "lat_us": doc.get("lat_us"),
                              "findings": [f.to_dict() for f in findings]}, indent=1))
        else:
            print("\n".join(lines))
        return 0
    run_and_print(args)
    return 0


def cmd_cluster(args) -> int:
    if args.probe and not args.clean:
        from ringwatch.cluster._probe_run import cmd_probe_cluster

        return cmd_probe_cluster(args)
    from ringwatch.cluster._cli import cmd_cluster as run

    return run(args)


def cmd_agent(args) -> int:
    from ringwatch._config import AgentConfig, parse_headers
    from ringwatch.agent.sidecar._main import run_agent

    cfg = AgentConfig.from_env(
        fast_interval_s=args.fast_interval_s, slow_interval_s=args.slow_interval_s,
        logs_interval_s=args.logs_interval_s, export_interval_s=args.export_interval_s,
        otlp_endpoint=args.otlp_endpoint, prometheus_listen=args.prometheus,
        log_dir=args.log_dir, job_id=args.job_id, host=args.host,
        power_window_s=args.power_window_s, stale_after_s=args.stale_after_s,
        otlp_headers=parse_headers("--otlp-header", ",".join(args.otlp_header))
        if args.otlp_header else None, token_file=args.token_file)
    return run_agent(cfg, once=args.once, duration_s=args.duration_s, replay=args.replay,
                     record=args.record, no_gpu=args.no_gpu, sysfs_root=args.sysfs_root)


def cmd_demo(args) -> int:
    from ringwatch._demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringwatch", description="Observability for distributed "
                                "training: every collective of every rank.")
    p.add_argument("--version", action="version", version=f"ringwatch {__version__}")
    from ringwatch._analyze import add_threshold_args

    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a command (e.g. torchrun ...) with ringwatch attached",
                       description="Run COMMAND with the agent attached to its Python "
                       "processes; forwards SIGTERM/SIGHUP; exits with COMMAND's status.")
    _capture_flags(r)
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    r.set_defaults(func=cmd_run)

    bn = sub.add_parser("build-native", help="build the native hot path against this torch "
                        "(RINGWATCH_NATIVE_DIR or ~/.cache/ringwatch/native; e.g. in an image)")
    bn.set_defaults(func=cmd_build_native)

    lg = sub.add_parser("logs", help="summarise or check a job's logs")
    lg.add_argument("log_dir", help="the log root (or one job's folder)")
    lg.add_argument("--job", help="job id (default: the most recently written)")
    lg.add_argument("--check", action="store_true", help="check rank consistency and compare "
                    "with the saved Flight Recorder; exit 1 on any problem")
    lg.add_argument("--steps", action="store_true", help="per-step collective time per rank")
    lg.add_argument("--json", action="store_true", help="machine-readable output")
    lg.set_defaults(func=cmd_logs)

    an = sub.add_parser("analyze", help="find hangs, stragglers and slow links in a job's logs "
                        "or traces", description="Run the analyzers over a job's logs "
                        "(post-mortem, or --online on a running job's folder) or over what "
                        "PyTorch and other tools left (Flight Recorder dumps, profiler "
                        "traces, a collective table; docs/inputs.md) and print the findings.")
    an.add_argument("paths", nargs="+", metavar="PATH", help="ringwatch's log root or a "
                    "job's folder; or folders, files or glob patterns of other inputs")
    an.add_argument("--job", help="job id (default: the most recently written)")
    an.add_argument("--online", action="store_true",
                    help="measure stalls up to now, not up to the agents' newest write")
    an.add_argument("--min-stall-s", type=float, default=None,
                    help="seconds a collective must be in flight, its group stuck behind "
                    "it, to count as a hang (default: 5 s or 10 of the job's usual steps, "
                    "whichever is longer)")
    add_threshold_args(an)
    an.add_argument("--probe", metavar="FILE", help="a `ringwatch probe` result over the "
                    "job's hosts: its findings join the report and narrow the passive "
                    "link suspects")
    an.add_argument("--json", action="store_true", help="the findings as JSON")
    an.add_argument("--html", metavar="FILE", help="also write the report as one "
                    "self-contained HTML page (findings and plots, nothing fetched when "
                    "viewed; docs/report.md)")
    an.add_argument("--gpu-recording", metavar="FILE", nargs="+", action="extend",
                    help="`ringwatch agent --record` recordings of the job's nodes: GPU "
                    "power over the steps in the --html page (aligned on wall time)")
    an.add_argument("--layout", metavar="SPEC", help="the job's parallel layout, e.g. "
                    "tp=4,pp=2,dp=2 (tensor-parallel index fastest, then replica, then stage, "
                    "as Megatron lays ranks out); by default inferred from the groups and "
                    "send/recv pairs")
    an.set_defaults(func=cmd_analyze)

    s = sub.add_parser("schema", help="print the event schema")
    s.add_argument("--markdown", action="store_true", help="as docs/schema.md")
    s.add_argument("--metrics", action="store_true", help="the agent's metric table, as "
                   "docs/metrics.md")
    s.add_argument("--thresholds", action="store_true", help="the analyzers' thresholds, as "
                   "docs/thresholds.md")
    s.set_defaults(func=cmd_schema)

    pr = sub.add_parser("probe", help="pairwise point-to-point bandwidth/latency test over "
                        "the job's hosts", description="Run under torchrun, one rank per host: "
                        "measure every ordered pair of hosts with send/recv and read the "
                        "matrix as C4 does (a slow row: the sender side of a host, a slow "
                        "column: its receiver side, a single cell: that link). With --read, "
                        "print a result's matrices and verdicts.")
    pr.add_argument("--read", metavar="FILE", help="read a probe result instead of measuring")
    pr.add_argument("--json", action="store_true", help="with --read: the matrices and the "
                    "findings as JSON")
    pr.add_argument("--ratio", type=float, default=None, help="a cell below RATIO x the "
                    "healthy level is slow (default 0.5)")
    from ringwatch._probe import add_probe_flags

    add_probe_flags(pr)
    pr.set_defaults(func=cmd_probe)

    from ringwatch.cluster._cli import add_cluster_flags

    c = sub.add_parser("cluster", help="run a local multi-host training cluster with a fault",
                       description="Run a real Gloo DDP job under torchrun with ringwatch "
                       "attached, on emulated hosts (network namespaces, when root), inject a "
                       "fault from outside at a chosen step, write the ground truth beside the "
                       "logs, and clean everything up.")
    c.add_argument("--run-dir", default="ringwatch-cluster", help="where logs, ground truth "
                   "and outputs go (default ./ringwatch-cluster)")
    c.add_argument("--clean", action="store_true",
                   help="only remove what dead runs left behind (namespaces, links, processes)")
    add_cluster_flags(c, nproc=4, hosts=2, steps=60, fault="none", at_step=20)
    c.add_argument("--probe", action="store_true", help="run the pairwise probe (ringwatch "
                   "probe) instead of training: one rank per host, a --fault link on from the "
                   "start; extra arguments after -- go to the probe")
    c.add_argument("job_args", nargs=argparse.REMAINDER,
                   help="-- extra arguments for the workload (ringwatch.cluster._job)")
    c.set_defaults(func=cmd_cluster)

    ag = sub.add_parser("agent", help="the node sidecar: GPUs, NICs and the ranks' "
                        "collectives, on /metrics and over OTLP",
                        description="Sample every GPU (NVML: energy, power, clocks at 20 Hz; "
                        "limits, memory, throttling, ECC, NVLink, XID more slowly), the host's "
                        "NIC/InfiniBand counters, and the per-rank collective summaries from "
                        "the ranks' logs; serve them on /metrics and push them over "
                        "OTLP/HTTP. Stops cleanly on SIGTERM. Flag > environment > default.")
    ag.add_argument("--once", action="store_true", help="one round of every reading, printed "
                    "as Prometheus text (and pushed once with --otlp-endpoint)")
    ag.add_argument("--fast-interval-s", type=float, help="seconds between power/energy/clock "
                    "samples (default 0.05: 20 Hz)")
    ag.add_argument("--slow-interval-s", type=float, help="seconds between the other GPU "
                    "and host reads (default 1)")
    ag.add_argument("--logs-interval-s", type=float, help="seconds between reads of the "
                    "ranks' logs (default 2)")
    ag.add_argument("--export-interval-s", type=float, help="seconds between OTLP pushes "
                    "(default 10; sooner, at most once a second, when 32 finished steps of "
                    "a rank wait: each push carries every step not yet sent, up to 128)")
    ag.add_argument("--power-window-s", type=float, help="span of the peak/min power "
                    "gauges (default 10)")
    ag.add_argument("--otlp-endpoint", help="OTLP/HTTP metrics URL, e.g. "
                    "http://127.0.0.1:4318/v1/metrics (default: none, or "
                    "OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT)")
    ag.add_argument("--otlp-header", action="append", metavar="KEY=VALUE",
                    help="extra header of each push (repeatable), e.g. 'x-tenant=a'; not for "
                    "secrets, which every local user sees on the command line: use "
                    "--token-file")
    ag.add_argument("--token-file", metavar="PATH", help="file holding the bearer token "
                    "sent with each push (`ringwatch serve`'s token); default: the file "
                    "named by RINGWATCH_AGENT_TOKEN_FILE, else RINGWATCH_AGENT_TOKEN")
    ag.add_argument("--prometheus", metavar="HOST:PORT", help="where /metrics is served "
                    "(default loopback 127.0.0.1:9400; 0.0.0.0:9400 for a scraper on "
                    "another machine; 'off' for none)")
    ag.add_argument("--log-dir", help="root of the ranks' logs on this node (default "
                    "./ringwatch-logs; 'off' for none)")
    ag.add_argument("--job-id", help="job label of the GPU and host series (default: the "
                    "one job whose ranks write here)")
    ag.add_argument("--host", help="host name label (default: RINGWATCH_HOST or the "
                    "machine's name)")
    ag.add_argument("--stale-after-s", type=float, help="forget a rank whose log has not "
                    "been written for this long (default 300)")
    ag.add_argument("--record", metavar="FILE", help="also save every reading to FILE "
                    "(gzip JSON lines) for later replay")
    ag.add_argument("--replay", metavar="FILE", help="read the GPUs (and host) from a "
                    "recording, with its original timing, instead of NVML; every output "
                    "says so. 'synthetic[:N]' replays N generated GPUs (default 8), "
                    "labelled synthetic")
    ag.add_argument("--no-gpu", action="store_true", help="do not touch NVML")
    ag.add_argument("--sysfs-root", default="/", help="root under which /sys and /proc "
                    "are read (default /)")
    ag.add_argument("--duration-s", type=float, help="stop after this many seconds "
                    "(default: run until SIGTERM)")
    ag.set_defaults(func=cmd_agent)

    from ringwatch.service._cli import add_parsers as add_service_parsers

    add_service_parsers(sub)
    from ringwatch.dashboards._cli import add_parsers as add_dashboard_parsers
    add_dashboard_parsers(sub)
    from ringwatch._power_cli import add_parsers as add_power_parsers
    add_power_parsers(sub)

    d = sub.add_parser("demo", help="a local cluster with an injected fault, watched live",
                       description="Launch a small local cluster (4 ranks of a real DDP job on "
                       "Gloo, 2 emulated hosts when root), inject a fault and show live what "
                       "ringwatch sees, ending with its reading and where the logs are.")
    d.add_argument("--log-dir", default="ringwatch-demo", help="where the run goes")
    add_cluster_flags(d, nproc=4, hosts=2, steps=150, fault="straggler", at_step=50,
                      severity=0.6)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"ringwatch {args.cmd}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ringwatch {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
