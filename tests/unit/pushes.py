"""Agent pushes built from real agent state (the node state, the metric table, the OTLP
encoder), for the service's tests."""

from __future__ import annotations

from ringwatch.agent.sidecar._node_state import NodeState
from ringwatch.agent.sidecar._otlp_export import metrics_data
from ringwatch.agent.sidecar._points import collect_points
from ringwatch.agent.sidecar._rank_tail import RankSummary, StepTotals

WALL = 1_800_000_000_000_000_000


def agent_push(job: str, *, late_rank: int | None, steps=range(0, 40), late_from: int = 25,
          late_ms: float = 30.0, late_until: int | None = None):
    """An agent push for 4 ranks on 2 hosts, one world group; ``late_rank`` arrives late from
    ``late_from`` on (its peers wait: their time in the collective grows), up to step
    ``late_until`` (excluded) when given."""
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

    state = NodeState(host="agent-host")
    for rank in range(4):
        s = RankSummary(job=job, rank=rank, local_rank=rank % 2, host=f"host{rank // 2}")
        s.groups["0"] = ("0-3", 4, rank)
        for step in steps:
            start = WALL + step * 100_000_000
            busy = 10_000_000 + (rank * 37 % 5) * 100_000
            if late_rank is not None and late_from <= step < (late_until or 1 << 62):
                busy += 0 if rank == late_rank else int(late_ms * 1e6)
            t = StepTotals(count=2, nbytes=4 << 20)
            t.add(start, start + busy)
            t.first_start_ns, t.last_end_ns = start, start + busy
            s.steps[step] = {"0": t}
        s.step = max(steps) + 1
        s.last_started_seq["0"] = s.last_completed_seq["0"] = 2 * (max(steps) + 1)
        state.ranks[(job, rank)] = s
    pts = collect_points(state, now_wall_ns=WALL, steps_after={})
    return encode_metrics(metrics_data(pts, start_ns=1, now_ns=WALL))
