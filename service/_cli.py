"""``ringwatch serve`` and ``ringwatch status``: thin commands over the service."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from ringwatch._config import (
    ENV_READ_TOKEN,
    ENV_READ_TOKEN_FILE,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
    ConfigError,
    read_secret,
)
from ringwatch._net import join_host_port

_NO_ARGV_TOKEN = (f"a token on the command line is visible to every local user: put it in "
                  f"a file (--token-file PATH) or in {ENV_TOKEN}")


def _tokens(args) -> tuple[str | None, str | None]:
    """(token, read token) from the files or the environment, never from argv.

    Raises:
        ConfigError: ``--token`` was given, or a token file is unreadable or malformed.
    """
    if args.token is not None:
        raise ConfigError(_NO_ARGV_TOKEN)
    return (read_secret(file=args.token_file, value_var=ENV_TOKEN, file_var=ENV_TOKEN_FILE),
            read_secret(file=args.read_token_file, value_var=ENV_READ_TOKEN,
                        file_var=ENV_READ_TOKEN_FILE))


def cmd_serve(args) -> int:
    from ringwatch._analyze import thresholds_from_args
    from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS
    from ringwatch.service._service import Service, ServiceConfig

    token, read_token = _tokens(args)
    if args.window_s <= 0:
        raise ConfigError("--window-s must be > 0")
    if args.max_jobs < 1:
        raise ConfigError("--max-jobs must be >= 1")
    if args.max_connections < 1 or not args.read_timeout_s > 0:
        raise ConfigError("--max-connections and --read-timeout-s must be > 0")
    if (args.auth_reads or read_token) and not token:
        raise ConfigError(f"read authentication needs the service's token ({ENV_TOKEN} or "
                          "--token-file)")
    cfg = ServiceConfig(otlp_listen=args.otlp_listen, api_listen=args.listen,
                        otlp_grpc_listen=args.otlp_grpc_listen,
                        state_dir=None if args.state_dir == "off" else Path(args.state_dir),
                        window_s=args.window_s, token=token, read_token=read_token,
                        auth_reads=args.auth_reads, resolve_after_s=args.resolve_after_s,
                        max_jobs=args.max_jobs, max_connections=args.max_connections,
                        read_timeout_s=args.read_timeout_s,
                        thresholds=thresholds_from_args(args) or DEFAULT_THRESHOLDS)
    try:
        service = Service(cfg).start()
    except OSError as exc:
        raise ConfigError(f"cannot listen: {exc.strerror or exc}") from None
    except ImportError as exc:
        raise ConfigError(str(exc)) from None
    done = threading.Event()
    old = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    grpc = service.grpc_receiver
    auth = ("" if not token else ", token asked for pushes and changes"
            + (" and reads" if cfg.auth_reads else ""))
    print(f"ringwatch serve: OTLP on {service.receiver.url}"
          + (f" and grpc://{grpc.target}" if grpc else "") + ", API and /metrics on "
          f"http://{join_host_port(service.api.host, service.api.port)}, findings in "
          f"{cfg.state_dir or '(memory)'}{auth}", file=sys.stderr, flush=True)
    try:
        done.wait(args.duration_s)
    finally:
        service.stop()
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def _call(url: str, body: dict | None = None, token: str | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        msg = json.loads(exc.read() or b"{}").get("error", exc.reason)
        raise ConfigError(f"{url}: {exc.code} {msg}") from None
    except OSError as exc:
        raise ConfigError(f"cannot reach the service at {url}: {exc}") from None


def status_lines(findings: list[dict], jobs: list[dict]) -> list[str]:
    """The live findings as a table, with each job's headline figures."""
    out = []
    for j in jobs:
        lag = j.get("analysis_lag_s")
        out.append(f"job {j['job']}: {j['ranks']} rank(s) on {len(j['hosts'])} host(s), "
                   f"step {j['max_step']}, {j['open_findings']} open finding(s)"
                   + (f", analysis lag {lag:.1f} s" if lag is not None else ""))
    if not findings:
        out.append("no findings")
        return out
    out.append(f"{'ID':<22} {'STATE':<9} {'KIND':<10} {'CLASS':<24} {'RANKS':<12} "
               f"{'HOSTS':<16} {'CONF':>5} {'SINCE':>6}")
    for t in findings:
        f = t["finding"]
        ranks = ",".join(map(str, f["ranks"][:6])) + ("…" if len(f["ranks"]) > 6 else "")
        hosts = ",".join(f["hosts"][:3]) + ("…" if len(f["hosts"]) > 3 else "")
        since = "" if f.get("since_step") is None else str(f["since_step"])
        out.append(f"{t['id']:<22} {t['state']:<9} {f['kind']:<10} {f['cls'][:24]:<24} "
                   f"{ranks:<12} {hosts:<16} {f['confidence']:>5.2f} {since:>6}")
    return out


def cmd_status(args) -> int:
    token, read_token = _tokens(args)
    base = args.url.rstrip("/")
    if args.pause or args.resume or args.threshold:
        th = {}
        for item in args.threshold or []:
            k, sep, v = item.partition("=")
            if not sep:
                raise ConfigError(f"--threshold {item!r}: expected NAME=VALUE")
            try:
                th[k] = None if v in ("", "default") else float(v)
            except ValueError:
                raise ConfigError(f"--threshold {item!r}: expected a number or "
                                  "'default'") from None
        print(json.dumps(_call(f"{base}/api/v1/control", {
            "pause": args.pause or [], "resume": args.resume or [], "thresholds": th},
            token=token), indent=1))
        return 0
    from urllib.parse import quote

    q = "?state=open" if not args.all else ""
    if args.job:
        q += ("&" if q else "?") + f"job={quote(args.job, safe='')}"
    reader = read_token or token  # sent when the service asks for reads to be authenticated
    findings = _call(f"{base}/api/v1/findings{q}", token=reader)["findings"]
    jobs = _call(f"{base}/api/v1/jobs", token=reader)["jobs"]
    if args.json:
        print(json.dumps({"jobs": jobs, "findings": findings}, indent=1))
        return 0
    for line in status_lines(findings, jobs):
        print(line)
    return 0


def add_parsers(sub) -> None:
    from ringwatch._analyze import add_threshold_args

    sv = sub.add_parser("serve", help="the central service: receive the agents' OTLP, find "
                        "hangs, stragglers and slow links live",
                        description="Receive what the node agents push (OTLP/HTTP), analyse "
                        "every window and publish the findings: /metrics, /api/v1, "
                        "`ringwatch status`. Stops cleanly on SIGTERM.")
    sv.add_argument("--otlp-listen", default="127.0.0.1:4318", help="HOST:PORT of the OTLP "
                    "receiver (default loopback 127.0.0.1:4318)")
    sv.add_argument("--otlp-grpc-listen", metavar="HOST:PORT", help="also receive OTLP/gRPC "
                    "here (what a Collector's loadbalancing exporter sends; needs grpcio: "
                    "pip install 'ringwatch[grpc]'); off by default")
    sv.add_argument("--listen", default="127.0.0.1:9410", help="HOST:PORT of /metrics and the "
                    "JSON API (default 127.0.0.1:9410)")
    sv.add_argument("--state-dir", default="ringwatch-serve", help="folder of the findings' "
                    "Parquet files, kept across restarts ('off': memory only)")
    sv.add_argument("--window-s", type=float, default=1.0, help="seconds between analyses")
    _token_flags(sv, "the bearer token agents must send (OTLP/HTTP and gRPC) and API "
                 "changes need")
    sv.add_argument("--auth-reads", action="store_true", help="GETs of /metrics and "
                    "/api/v1 need the token too, or the read token (/healthz stays open)")
    sv.add_argument("--max-connections", type=int, default=128, help="connections each HTTP "
                    "port (OTLP, API) handles at once, a thread each; more are answered 503 "
                    "(default 128)")
    sv.add_argument("--read-timeout-s", type=float, default=10.0, help="seconds an HTTP "
                    "request may take to arrive, headers and body (408 after; default 10)")
    sv.add_argument("--resolve-after-s", type=float, default=30.0,
                    help="a finding not seen for this long is resolved (default 30)")
    sv.add_argument("--max-jobs", type=int, default=64, help="jobs held at once; one more "
                    "evicts the one silent longest, with its series and findings (default 64)")
    sv.add_argument("--duration-s", type=float, help="stop after this many seconds")
    add_threshold_args(sv)  # changed at run time: ringwatch status --threshold
    sv.set_defaults(func=cmd_serve)

    st = sub.add_parser("status", help="the live findings of a running `ringwatch serve`")
    st.add_argument("--url", default="http://127.0.0.1:9410", help="the service's API")
    st.add_argument("--job", help="only this job")
    st.add_argument("--all", action="store_true", help="resolved findings too")
    st.add_argument("--json", action="store_true", help="as JSON")
    st.add_argument("--pause", action="append", metavar="DETECTOR",
                    help="pause a detector (hang, straggler, slow_link)")
    st.add_argument("--resume", action="append", metavar="DETECTOR", help="resume a detector")
    _token_flags(st, "the service's bearer token, sent with changes (and with reads, when "
                 "the service asks for one)")
    st.add_argument("--threshold", action="append", metavar="NAME=VALUE",
                    help="change a threshold at run time, e.g. min_stall_s=8 (any of "
                    "docs/thresholds.md; 'default' restores the default)")
    st.set_defaults(func=cmd_status)


def _token_flags(p: argparse.ArgumentParser, what: str) -> None:
    """``--token-file``, ``--read-token-file`` and a hidden ``--token`` that only says why it
    is refused (a token on argv shows in ``ps``)."""
    p.add_argument("--token-file", metavar="PATH", help=f"file holding {what}; default: the "
                   f"file named by {ENV_TOKEN_FILE}, else {ENV_TOKEN}")
    p.add_argument("--read-token-file", metavar="PATH", help="file holding a token that "
                   f"allows API reads only; default: the file named by {ENV_READ_TOKEN_FILE}, "
                   f"else {ENV_READ_TOKEN}")
    p.add_argument("--token", help=argparse.SUPPRESS)
