"""Per-job state of the central service, fed by the agents' OTLP pushes.

What is kept, per job: per rank, its host and local rank, the last pending collective and
its age, the per-group sequence frontier, the log's age, and per (rank, group, step) the
step totals the analyzers need. Memory is bounded: the newest ``keep_steps`` steps of each job,
at most ``max_jobs`` jobs (the longest silent is dropped first).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

# OTLP names the service reads (declared in ringwatch/_metrics.py).
_STEP_FIELDS = {
    "ringwatch.step.collective.time": "busy_s",
    "ringwatch.step.collective.io": "nbytes",
    "ringwatch.step.collective.count": "count",
    "ringwatch.step.collective.start": "start_s",
    "ringwatch.step.collective.end": "end_s",
}
_STEP_ROW = tuple(_STEP_FIELDS.values())


@dataclass(slots=True)
class RankLive:
    """The newest the service heard of one rank."""

    host: str = ""
    local_rank: int | None = None
    pushed_ns: int = 0
    log_age_s: float | None = None
    step: int | None = None
    #: (pg, op, since wall ns) of its oldest pending collective, or None.
    pending: tuple[str, str, int] | None = None
    started_seq: dict[str, int] = field(default_factory=dict)
    completed_seq: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class JobLive:
    job: str
    ranks: dict[int, RankLive] = field(default_factory=dict)
    #: (rank, pg, step) -> {field: value}; complete rows have every field of _STEP_ROW.
    steps: dict[tuple[int, str, int], dict] = field(default_factory=dict)
    #: pg -> (members in compact form, size); (rank, pg) -> rank within the group.
    groups: dict[str, tuple[str, int]] = field(default_factory=dict)
    group_rank: dict[tuple[int, str], int] = field(default_factory=dict)
    last_push_ns: int = 0
    max_step: int = -1
    trimmed_at: int = -1
    #: pg -> a small number, in order of first sight (rows' ``idx`` is step x 1024 + it).
    pg_index: dict[str, int] = field(default_factory=dict)
    #: (rank, pg, step) keys added since the analysis last took them.
    fresh: set[tuple[int, str, int]] = field(default_factory=set)


def _value(dp) -> float:
    return dp.as_double if dp.HasField("as_double") else float(dp.as_int)


def _attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        if which in ("string_value", "int_value", "double_value", "bool_value"):
            out[kv.key] = getattr(kv.value, which)
    return out


class Jobs:
    """Every job the agents report, updated by :meth:`ingest` (thread-safe)."""

    def __init__(self, *, keep_steps: int = 200, max_jobs: int = 64):
        self.keep_steps = keep_steps
        self.max_jobs = max_jobs
        self.jobs: dict[str, JobLive] = {}
        self.lock = threading.Lock()

    def ingest(self, request, received_ns: int) -> int:
        """Take one ``ExportMetricsServiceRequest``; returns the data points rejected
        (malformed: a rank that is not an integer, a step that is not one)."""
        rejected = 0
        with self.lock:
            for rm in request.resource_metrics:
                res = _attrs(rm.resource.attributes)
                job, rank = res.get("ringwatch.job.id"), res.get("ringwatch.rank")
                if not job or rank is None or "hw.id" in res:
                    continue  # a GPU or host resource: not the analyzers' input
                try:
                    rank = int(rank)
                except (TypeError, ValueError):
                    rejected += sum(_n_points(m) for sm in rm.scope_metrics for m in sm.metrics)
                    continue
                jl = self._job(str(job))
                jl.last_push_ns = received_ns
                rl = jl.ranks.setdefault(rank, RankLive())
                rl.host = str(res.get("host.name", rl.host))
                rl.pushed_ns = received_ns
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        rejected += self._metric(jl, rl, rank, m, received_ns)
            for jl in self.jobs.values():
                self._trim(jl)
        return rejected

    def _job(self, job: str) -> JobLive:
        jl = self.jobs.get(job)
        if jl is None:
            if len(self.jobs) >= self.max_jobs:
                oldest = min(self.jobs.values(), key=lambda j: j.last_push_ns)
                del self.jobs[oldest.job]
            jl = self.jobs[job] = JobLive(job)
        return jl

    def _metric(self, jl: JobLive, rl: RankLive, rank: int, m, now_ns: int) -> int:
        name = m.name
        data = m.gauge if m.HasField("gauge") else m.sum if m.HasField("sum") else None
        if data is None:
            return 0
        bad = 0
        for dp in data.data_points:
            a = _attrs(dp.attributes)
            v = _value(dp)
            if name in _STEP_FIELDS:
                try:
                    step = int(a["ringwatch.step"])
                    pg = str(a["ringwatch.pg"])
                    members = str(a.get("ringwatch.pg.ranks", ""))
                    if members or pg not in jl.groups:  # sent on a group's first point only
                        jl.groups[pg] = (members, int(a.get("ringwatch.pg.size", 0)))
                    jl.pg_index.setdefault(pg, len(jl.pg_index))
                    jl.group_rank[(rank, pg)] = int(a.get("ringwatch.pg.rank", 0))
                except (KeyError, TypeError, ValueError):
                    bad += 1
                    continue
                if step > jl.max_step - self.keep_steps:
                    key = (rank, pg, step)
                    row = jl.steps.get(key)
                    if row is None:
                        row = jl.steps[key] = {}
                        jl.fresh.add(key)
                    row[_STEP_FIELDS[name]] = v
                    jl.max_step = max(jl.max_step, step)
            elif name == "ringwatch.collective.started_seq":
                rl.started_seq[str(a.get("ringwatch.pg", ""))] = int(v)
            elif name == "ringwatch.collective.completed_seq":
                rl.completed_seq[str(a.get("ringwatch.pg", ""))] = int(v)
            elif name == "ringwatch.collective.pending":
                pg = str(a.get("ringwatch.pg", ""))
                rl.pending = (pg, str(a.get("ringwatch.pending.op", "")),
                              now_ns - int(v * 1e9)) if pg and v > 0 else None
            elif name == "ringwatch.rank.step":
                rl.step = int(v)
            elif name == "ringwatch.rank.log_age":
                rl.log_age_s = v
        return bad

    def _trim(self, jl: JobLive) -> None:
        """Drop steps older than the newest ``keep_steps`` (a pass every quarter of them)."""
        if jl.max_step - jl.trimmed_at < max(1, self.keep_steps // 4):
            return
        jl.trimmed_at = jl.max_step
        edge = jl.max_step - self.keep_steps
        for key in [k for k in jl.steps if k[2] <= edge]:
            del jl.steps[key]
        jl.fresh = {k for k in jl.fresh if k[2] > edge}

    def snapshot(self, job: str):
        """A full copy of one job's state, kept steps included (tests, diagnostics)."""
        import copy

        with self.lock:
            jl = self.jobs.get(job)
            return None if jl is None else copy.deepcopy(jl)

    def take(self, job: str):
        """What an analysis round needs, taken under the lock in time proportional to the
        new data, not to the job: a copy of the job without its kept steps, and the step rows
        completed since the last take (each handed over once).

        Returns:
            ``(view, rows)`` with ``rows`` a list of ``((rank, pg, step), values)``, or
            ``(None, [])`` for an unknown job.
        """
        import copy

        with self.lock:
            jl = self.jobs.get(job)
            if jl is None:
                return None, []
            done = [k for k in jl.fresh if all(f in jl.steps[k] for f in _STEP_ROW)]
            rows = [(k, dict(jl.steps[k])) for k in done]
            jl.fresh.difference_update(done)
            steps, fresh = jl.steps, jl.fresh
            jl.steps, jl.fresh = {}, set()
            try:
                view = copy.deepcopy(jl)
            finally:
                jl.steps, jl.fresh = steps, fresh
        return view, rows


def _n_points(m) -> int:
    for kind in ("gauge", "sum", "histogram", "exponential_histogram", "summary"):
        if m.HasField(kind):
            return len(getattr(m, kind).data_points)
    return 0
