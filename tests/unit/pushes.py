"""Agent pushes built from real agent state (the node state, the metric table, the OTLP
encoder), for the service's tests."""

from __future__ import annotations

from ringwatch.agent.sidecar._node_state import NodeState
from ringwatch.agent.sidecar._otlp_export import metrics_data
from ringwatch.agent.sidecar._points import collect_points
from ringwatch.agent.sidecar._rank_tail import RankSummary, StepTotals

WALL = 1_800_000_000_000_000_000


def agent_push(job: str, *, late_rank: int | None, steps=range(0, 40), late_from: int = 25,
          late_ms: float = 30.0, late_until: int | None = None, on_time=()):
    """An agent push for 4 ranks on 2 hosts, one world group; ``late_rank`` arrives late from
    ``late_from`` on (its peers wait: their time in the collective grows), up to step
    ``late_until`` (excluded) when given, except in the steps of ``on_time``."""
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

    state = NodeState(host="agent-host")
    for rank in range(4):
        s = RankSummary(job=job, rank=rank, local_rank=rank % 2, host=f"host{rank // 2}")
        s.groups["0"] = ("0-3", 4, rank)
        for step in steps:
            start = WALL + step * 100_000_000
            busy = 10_000_000 + (rank * 37 % 5) * 100_000
            if late_rank is not None and late_from <= step < (late_until or 1 << 62) \
                    and step not in on_time:
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


STEP_FIELDS = ("time", "io", "count", "start", "end")


def _set(value, v) -> None:
    if isinstance(v, bool):
        value.bool_value = v
    elif isinstance(v, int):
        value.int_value = v
    elif isinstance(v, float):
        value.double_value = v
    else:
        value.string_value = str(v)


def rank_push(job, rank, points, *, host="host-x"):
    """A push of one rank resource holding exactly ``points``, each ``(name, value, attrs)``
    as a gauge; the job id, rank and host go as given (any attribute type), so hostile
    values can be built."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    for key, v in (("ringwatch.job.id", job), ("ringwatch.rank", rank), ("host.name", host)):
        if v is not None:
            _set(rm.resource.attributes.add(key=key).value, v)
    sm = rm.scope_metrics.add()
    for name, v, attrs in points:
        dp = sm.metrics.add(name=name).gauge.data_points.add(as_double=float(v))
        for key, a in attrs.items():
            _set(dp.attributes.add(key=key).value, a)
    return req


def step_points(step, *, pg="0", value=0.01, start_s=1.8e9):
    """The five step totals of one (rank, group, step), all of ``value`` but the times."""
    attrs = {"ringwatch.step": step, "ringwatch.pg": pg}
    values = {"time": value, "io": 4096, "count": 2, "start": start_s, "end": start_s + value}
    return [(f"ringwatch.step.collective.{f}", values[f], attrs) for f in STEP_FIELDS]


def merged(*requests):
    """One push holding the resources of ``requests``, in order."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    out = ExportMetricsServiceRequest()
    for req in requests:
        out.resource_metrics.extend(req.resource_metrics)
    return out


def only_ranks(request, ranks):
    """A copy of an agent push keeping the resources of ``ranks`` only (one node's share)."""
    out = type(request)()
    for rm in request.resource_metrics:
        rank = {a.key: a.value.int_value for a in rm.resource.attributes}.get("ringwatch.rank")
        if rank in ranks:
            out.resource_metrics.add().CopyFrom(rm)
    return out
