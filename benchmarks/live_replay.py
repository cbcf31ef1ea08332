"""Live = post-mortem on logs already written: a run's logs replayed through the agent and the
service on a simulated clock, against `ringwatch analyze` on the same logs.

The live benchmarks (``hybrid.py --live``, ``live.py``) watch a job while it runs, so their
figures carry the machine's timing: when a push lands, how loaded the service is. This replays
a finished run instead, deterministically: every ``--tick-s`` of the run's wall clock, the rows
that had ended by then reach the agent's rank tails (the sidecar's own code: per-step totals,
blocked time, receives per sender, the rhythm), the oldest row still in flight is each rank's
pending collective, the agent's OTLP pusher sends its points (encoded as on the wire) to the
service's ingest, and the service runs one analysis round. Each finding is kept as the service
last showed it, and the set (kind, class, ranks, onset; hangs apart) is compared with
``ringwatch analyze --json`` on the same logs.

    .venv/bin/python benchmarks/live_replay.py /tmp/hl923/*/logs
    .venv/bin/python benchmarks/live_replay.py --timeline RUN/logs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import polars as pl

PY = sys.executable


class _ToService:
    """An OTLP exporter that hands each export to the service's ingest, encoded as on the
    wire; ``rejected``: the points the service refused."""

    def __init__(self, svc, clock):
        self.svc, self.clock = svc, clock
        self.rejected = 0

    def export(self, data, timeout_millis=None):
        from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
        from opentelemetry.sdk.metrics.export import MetricExportResult

        self.rejected += self.svc.jobs.ingest(encode_metrics(data), self.clock.wall_ns())
        return MetricExportResult.SUCCESS

    def shutdown(self):
        pass


def agent_for(ev: pl.DataFrame, svc, clock):
    """An agent's state with a rank summary per rank of ``ev`` (one job) and its OTLP
    pusher into ``svc``: ``(pusher, {rank: summary})``."""
    from ringwatch.agent.sidecar._node_state import NodeState
    from ringwatch.agent.sidecar._otlp_export import OtlpPusher
    from ringwatch.agent.sidecar._rank_tail import RankSummary

    state = NodeState(host="replay")
    ranks = {}
    for rank, local, host in ev.select("rank", "local_rank", "host").unique().iter_rows():
        ranks[rank] = state.ranks[("job", rank)] = RankSummary(
            job="job", rank=rank, local_rank=local, host=host)
    pusher = OtlpPusher(state, "http://127.0.0.1:9/v1/metrics", start_ns=clock.wall_ns())
    pusher.exporter = _ToService(svc, clock)
    return pusher, ranks


def replay(logs: Path, *, tick_s: float = 1.0, timeline: bool = False) -> list[dict]:
    """The findings the service showed, each as last shown (``Finding.to_dict``)."""
    from ringwatch._clock import FakeClock
    from ringwatch._logs import list_jobs, open_job
    from ringwatch.agent.sidecar._rank_tail import _COLUMNS, _consume
    from ringwatch.service._service import Service, ServiceConfig

    job = open_job(logs, list_jobs(logs)[0])
    ev = job.events(include_pending=True)
    for c in _COLUMNS:  # columns a log may lack (older schema): none
        if c not in ev.columns:
            ev = ev.with_columns(pl.lit(None).alias(c))
    # in flight to the end: what was pending at the last flush; a row that finished with no
    # end seen (one recovered from the Flight Recorder) is done when it started
    ev = ev.select("rank", "local_rank", "host", *_COLUMNS).with_columns(
        pl.when(pl.col("status") == "pending").then(1 << 62)
        .otherwise(pl.coalesce("t_end_ns", "t_start_ns", pl.lit(0))).alias("_done")
    ).sort("_done", "rank", "idx")
    t0, t1 = int(ev["t_start_ns"].min()), int(ev["t_end_ns"].max())
    clock = FakeClock(wall_ns=t0)
    svc = Service(ServiceConfig(state_dir=None), clock=clock)
    pusher, ranks = agent_for(ev, svc, clock)
    shown: dict[str, dict] = {}
    fed, now, tick = 0, t0, int(tick_s * 1e9)
    while now < t1 + 30 * 10**9:  # and 30 s after the last row: the service's last rounds
        now += tick
        clock.advance(now - clock.wall_ns())
        new = ev.slice(fed).filter(pl.col("_done") <= now)
        fed += new.height
        for (rank,), rows in new.partition_by("rank", as_dict=True).items():
            _consume(ranks[rank], rows.drop("rank", "local_rank", "host", "_done"))
        flying = ev.slice(fed).filter(pl.col("t_start_ns") <= now).sort("t_start_ns")
        first = {r: (pg, op, t) for r, pg, op, t in flying.select(
            "rank", "pg", "op", "t_start_ns").unique("rank", keep="first").iter_rows()}
        for rank, s in ranks.items():
            s.pending = first.get(rank)
        for rank, pg, seq in flying.filter(pl.col("seq").is_not_null()).group_by(
                "rank", "pg").agg(pl.col("seq").max()).iter_rows():
            s = ranks[rank]
            s.last_started_seq[pg] = max(seq, s.last_started_seq.get(pg, -1))
        pusher.push(now)
        for c in svc.analyze_once():
            f = c.tracked.finding
            if c.what != "resolved":
                shown[c.tracked.id] = f.to_dict()
            if timeline and c.what != "updated":
                print(f"{(now - t0) / 1e9:8.1f} s  {c.what:8s} {f.kind} ({f.cls}) ranks "
                      f"{list(f.ranks)} hosts {list(f.hosts)} since step {f.since_step}")
    if pusher.exporter.rejected:
        print(f"{logs}: the service refused {pusher.exporter.rejected} point(s)")
    return list(shown.values())


def _key(f: dict) -> tuple:
    return f["kind"], f["cls"], tuple(f["ranks"]), f["since_step"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", type=Path, help="runs' log folders")
    ap.add_argument("--tick-s", type=float, default=1.0,
                    help="simulated seconds between pushes and rounds (default 1)")
    ap.add_argument("--timeline", action="store_true",
                    help="print each finding as the service opened and resolved it")
    args = ap.parse_args()
    agree, hung = 0, []
    for logs in args.logs:
        shown = replay(logs, tick_s=args.tick_s, timeline=args.timeline)
        live = sorted({_key(f) for f in shown if f["kind"] != "hang"})
        hangs = [f for f in shown if f["kind"] == "hang"]
        if hangs:  # a hang the service showed, resolved or not (post-mortem has none mid-run)
            hung.append(logs)
            since = [f["since_step"] for f in hangs if f["since_step"] is not None]
            print(f"{logs}: {len(hangs)} hang(s) shown live, the first since step "
                  f"{min(since, default=None)}")
        proc = subprocess.run([PY, "-m", "ringwatch._cli", "analyze", "--json", str(logs)],
                              capture_output=True, text=True, check=False)
        post = sorted(_key(f) for f in json.loads(proc.stdout)["findings"]
                      if f["kind"] != "hang")
        same = live == post
        agree += same
        print(f"{logs}: {'agrees' if same else 'DIFFERS'}: live {live}"
              + ("" if same else f", post-mortem {post}"))
    print(f"live = post-mortem (kind, class, ranks, onset; hangs apart): "
          f"{agree}/{len(args.logs)} runs; runs where the service showed a hang: {len(hung)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
