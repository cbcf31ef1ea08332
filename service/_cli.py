"""``ringwatch serve`` and ``ringwatch status``: thin commands over the service."""

from __future__ import annotations

import json
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from ringwatch._config import ConfigError


def cmd_serve(args) -> int:
    from ringwatch.service._service import Service, ServiceConfig

    cfg = ServiceConfig(otlp_listen=args.otlp_listen, api_listen=args.listen,
                        otlp_grpc_listen=args.otlp_grpc_listen,
                        state_dir=None if args.state_dir == "off" else Path(args.state_dir),
                        window_s=args.window_s, token=args.token,
                        resolve_after_s=args.resolve_after_s, max_jobs=args.max_jobs)
    if cfg.window_s <= 0:
        raise ConfigError("--window-s must be > 0")
    if cfg.max_jobs < 1:
        raise ConfigError("--max-jobs must be >= 1")
    try:
        service = Service(cfg).start()
    except OSError as exc:
        raise ConfigError(f"cannot listen: {exc.strerror or exc}") from None
    except ImportError as exc:
        raise ConfigError(str(exc)) from None
    done = threading.Event()
    old = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    grpc = service.grpc_receiver
    print(f"ringwatch serve: OTLP on http://{cfg.otlp_listen}/v1/metrics"
          + (f" and grpc://{grpc.target}" if grpc else "") + ", API and /metrics on "
          f"http://{service.api.host}:{service.api.port}, findings in "
          f"{cfg.state_dir or '(memory)'}", file=sys.stderr, flush=True)
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
    base = args.url.rstrip("/")
    if args.pause or args.resume or args.threshold:
        th = {}
        for item in args.threshold or []:
            k, sep, v = item.partition("=")
            if not sep:
                raise ConfigError(f"--threshold {item!r}: expected NAME=VALUE")
            th[k] = None if v in ("", "default") else float(v)
        print(json.dumps(_call(f"{base}/api/v1/control", {
            "pause": args.pause or [], "resume": args.resume or [], "thresholds": th},
            token=args.token), indent=1))
        return 0
    q = "?state=open" if not args.all else ""
    if args.job:
        q += ("&" if q else "?") + f"job={args.job}"
    findings = _call(f"{base}/api/v1/findings{q}")["findings"]
    jobs = _call(f"{base}/api/v1/jobs")["jobs"]
    if args.json:
        print(json.dumps({"jobs": jobs, "findings": findings}, indent=1))
        return 0
    for line in status_lines(findings, jobs):
        print(line)
    return 0


def add_parsers(sub) -> None:
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
    sv.add_argument("--token", help="bearer token agents must send")
    sv.add_argument("--resolve-after-s", type=float, default=30.0,
                    help="a finding not seen for this long is resolved (default 30)")
    sv.add_argument("--max-jobs", type=int, default=64, help="jobs held at once; one more "
                    "evicts the one silent longest (default 64)")
    sv.add_argument("--duration-s", type=float, help="stop after this many seconds")
    sv.set_defaults(func=cmd_serve)

    st = sub.add_parser("status", help="the live findings of a running `ringwatch serve`")
    st.add_argument("--url", default="http://127.0.0.1:9410", help="the service's API")
    st.add_argument("--job", help="only this job")
    st.add_argument("--all", action="store_true", help="resolved findings too")
    st.add_argument("--json", action="store_true", help="as JSON")
    st.add_argument("--pause", action="append", metavar="DETECTOR",
                    help="pause a detector (hang, straggler, slow_link)")
    st.add_argument("--resume", action="append", metavar="DETECTOR", help="resume a detector")
    st.add_argument("--token", help="the service's bearer token (for changes)")
    st.add_argument("--threshold", action="append", metavar="NAME=VALUE",
                    help="change a threshold at run time, e.g. min_stall_s=8 ('default' "
                    "restores the analyzer's own)")
    st.set_defaults(func=cmd_status)
