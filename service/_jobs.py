"""Per-job state of the central service, fed by the agents' OTLP pushes.

What is kept, per job: per rank, its host and local rank, the last pending collective and
its age, the per-group sequence frontier, the log's age, per (rank, group, step) the
step totals the analyzers need, and per (rank, step) the rank's step, its time blocked and its
fastest receive from each sender. Memory is bounded: the steps of each job's window (below), at
most ``max_jobs`` jobs (the longest silent is dropped first, with all its state, and named in
:meth:`Jobs.drain_evicted` so that the service drops what it holds of it too).

**Validation.** A push is read whole before any of it is applied. Every value the service
reads is checked against ``_bounds``: integers where integers are meant (ranks, steps,
sequence numbers, group sizes and ranks within a group), finite non-negative durations, bytes
and counts, labels (job id, host, group, op) of at most 256 characters. A data point that
fails is dropped and counted; a rank resource whose job id, rank or host fails is dropped
whole, all its points counted. :meth:`Jobs.ingest` returns the count, which the receiver sends
back as the OTLP partial success; the valid points of the same push are kept. A bad value
never reaches the analysis.

**The step window.** Each rank's *claim* is the newest step of its latest push that carried
steps. The job's newest step (``max_step``) is the lower median of its ranks' claims, over
the ranks that claimed within ``claim_ttl_s`` (all of them when none did): a single rank, or a
minority of forged ranks, cannot move it, however far ahead they claim to be. A step row is
kept when ``max_step - keep_steps < step <= max_step + max_ahead_steps``; one further ahead is
rejected (counted), an older one is dropped silently (a late resend after an outage). The
analysis is handed a row once ``max_step`` has reached its step. So a job's first push sets
where it is (a job resumed at step 50,000 is taken as it comes), and a job that restarts its
numbering, or jumps ahead, moves its window as soon as most of its ranks push the new numbers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ringwatch.service import _bounds as B

# OTLP names the service reads (declared in ringwatch/_metrics.py), and each value's bound.
_STEP_FIELDS = {
    "ringwatch.step.collective.time": "busy_s",
    "ringwatch.step.collective.io": "nbytes",
    "ringwatch.step.collective.count": "count",
    "ringwatch.step.collective.start": "start_s",
    "ringwatch.step.collective.end": "end_s",
}
_STEP_ROW = tuple(_STEP_FIELDS.values())
_STEP_BOUNDS = {"busy_s": (B.MAX_DURATION_S, False), "nbytes": (B.MAX_COUNT, True),
                "count": (B.MAX_COUNT, True), "start_s": (B.MAX_WALL_S, False),
                "end_s": (B.MAX_WALL_S, False)}
# Per (rank, step): its step and its time blocked in communication (the pipeline analysis).
_WORK_FIELDS = {"ringwatch.step.duration": "step_s", "ringwatch.step.blocked": "blocked_s"}
_WORK_ROW = tuple(_WORK_FIELDS.values())
# Per (rank, step, sender): its receives and the fastest one (send/recv across hosts as links).
_RECV_FIELDS = {"ringwatch.step.recv.count": "count", "ringwatch.step.recv.io": "nbytes",
                "ringwatch.step.recv.time": "recv_s"}
_RECV_BOUNDS = {"count": (B.MAX_COUNT, True), "nbytes": (B.MAX_COUNT, True),
                "recv_s": (B.MAX_DURATION_S, False)}
#: Senders a rank's step keeps (a pipeline stage has one or two; more is no pipeline).
MAX_RECV_PEERS = 8
_SEQ = {"ringwatch.collective.started_seq": "started",
        "ringwatch.collective.completed_seq": "completed"}
_PENDING = "ringwatch.collective.pending"
_RANK_STEP = "ringwatch.rank.step"
_P2P = "ringwatch.p2p.count"
_P2P_OPS = ("", "send", "recv")
_LOG_AGE = "ringwatch.rank.log_age"


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
    #: The newest step of its latest push that carried steps, and when that push came (ns).
    claim_step: int | None = None
    claim_ns: int = 0
    #: Its send/recv peers (global rank -> ops with it so far; at most ``MAX_P2P_PEERS``)
    #: and its first send/recv op: the job's pipeline stages are read from them
    #: (``ringwatch.analyzers._layout``).
    p2p_peers: dict[int, float] = field(default_factory=dict)
    first_p2p_op: str = ""


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
    #: The job's newest step: the lower median of its ranks' claims (-1: none yet).
    max_step: int = -1
    trimmed_at: int = -1
    #: pg -> a small number, in order of first sight (rows' ``idx`` is step x 1024 + it).
    pg_index: dict[str, int] = field(default_factory=dict)
    #: (rank, pg, step) keys added since the analysis last took them.
    fresh: set[tuple[int, str, int]] = field(default_factory=set)
    #: (rank, step) -> {"step_s", "blocked_s", "recv"}: each rank's step and time blocked in
    #: it, and (where it received from another rank) ``{sender: {"count", "nbytes",
    #: "recv_s"}}``, its receives and the fastest one.
    work: dict[tuple[int, int], dict] = field(default_factory=dict)
    work_fresh: set[tuple[int, int]] = field(default_factory=set)


@dataclass(slots=True)
class _Resource:
    """One rank resource of a push, its values checked, nothing applied yet."""

    job: str
    rank: int
    host: str | None
    #: (pg, step, field, value, (members, size) or None, rank within the group)
    steps: list[tuple] = field(default_factory=list)
    seq: list[tuple[str, str, int]] = field(default_factory=list)  # (which, pg, seq)
    pending: list[tuple[str, str, float]] = field(default_factory=list)  # (pg, op, age s)
    rank_step: int | None = None
    log_age_s: float | None = None
    p2p: list[tuple[int, str, float]] = field(default_factory=list)  # (peer, first op, ops)
    work: list[tuple[int, str, float]] = field(default_factory=list)  # (step, field, value)
    recv: list[tuple[int, int, str, float]] = field(default_factory=list)  # (step, peer, f, v)
    points: int = 0


def _value(dp) -> float:
    return dp.as_double if dp.HasField("as_double") else float(dp.as_int)


def _attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        if which in ("string_value", "int_value", "double_value", "bool_value"):
            out[kv.key] = getattr(kv.value, which)
    return out


def _read_resource(rm) -> tuple[_Resource | None, int]:
    """``(resource, rejected points)``; resource None when it is not a rank's (a GPU or host
    resource: not the analyzers' input) or when its identity is bad (every point rejected)."""
    res = _attrs(rm.resource.attributes)
    job, rank = res.get("ringwatch.job.id"), res.get("ringwatch.rank")
    if job is None or job == "" or rank is None or "hw.id" in res:
        return None, 0
    job, rank = B.as_label(job), B.as_int(rank, B.MAX_RANK)
    host = res.get("host.name")
    if host is not None:
        host = B.as_label(host, empty_ok=True)
    metrics = [m for sm in rm.scope_metrics for m in sm.metrics]
    if job is None or rank is None or (host is None and "host.name" in res):
        return None, sum(_n_points(m) for m in metrics)
    r = _Resource(job, rank, host)
    bad = 0
    for m in metrics:
        data = m.gauge if m.HasField("gauge") else m.sum if m.HasField("sum") else None
        if data is None:
            continue
        for dp in data.data_points:
            r.points += 1
            if not _read_point(r, m.name, _attrs(dp.attributes), _value(dp)):
                bad += 1
    return r, bad


def _read_point(r: _Resource, name: str, a: dict, v: float) -> bool:
    """Adds one data point to ``r`` when its values pass their bounds; False when not.
    Points of other metrics are not the service's: taken (True) and ignored."""
    if name in _STEP_FIELDS:
        key = _STEP_FIELDS[name]
        limit, integral = _STEP_BOUNDS[key]
        step = B.as_int(a.get("ringwatch.step"), B.MAX_STEP)
        pg = B.as_label(a.get("ringwatch.pg"))
        value = B.as_amount(v, limit, integral=integral)
        members = B.as_label(a.get("ringwatch.pg.ranks", ""), B.MAX_MEMBERS_CHARS,
                             empty_ok=True)
        size = B.as_int(a.get("ringwatch.pg.size", 0), B.MAX_RANK + 1)
        grank = B.as_int(a.get("ringwatch.pg.rank", 0), B.MAX_RANK)
        if None in (step, pg, value, members, size, grank):
            return False
        r.steps.append((pg, step, key, value, (members, size), grank))
    elif name in _WORK_FIELDS:
        step = B.as_int(a.get("ringwatch.step"), B.MAX_STEP)
        value = B.as_amount(v, B.MAX_DURATION_S)
        if step is None or value is None:
            return False
        r.work.append((step, _WORK_FIELDS[name], value))
    elif name in _RECV_FIELDS:
        key = _RECV_FIELDS[name]
        limit, integral = _RECV_BOUNDS[key]
        step = B.as_int(a.get("ringwatch.step"), B.MAX_STEP)
        peer = B.as_int(a.get("ringwatch.p2p.peer"), B.MAX_RANK)
        value = B.as_amount(v, limit, integral=integral)
        if None in (step, peer, value):
            return False
        r.recv.append((step, peer, key, value))
    elif name in _SEQ:
        pg = B.as_label(a.get("ringwatch.pg"))
        seq = B.as_int(v, B.MAX_SEQ)
        if pg is None or seq is None:
            return False
        r.seq.append((_SEQ[name], pg, seq))
    elif name == _PENDING:
        pg = B.as_label(a.get("ringwatch.pg", ""), empty_ok=True)
        op = B.as_label(a.get("ringwatch.pending.op", ""), empty_ok=True)
        age_s = B.as_amount(v, B.MAX_DURATION_S)
        if None in (pg, op, age_s):
            return False
        r.pending.append((pg, op, age_s))
    elif name == _RANK_STEP:
        r.rank_step = B.as_int(v, B.MAX_STEP)
        return r.rank_step is not None
    elif name == _P2P:
        peer = B.as_int(a.get("ringwatch.p2p.peer"), B.MAX_RANK)
        first = a.get("ringwatch.p2p.first_op", "")
        ops = B.as_amount(v, B.MAX_COUNT)
        if peer is None or first not in _P2P_OPS or ops is None:
            return False
        r.p2p.append((peer, first, ops))
    elif name == _LOG_AGE:
        age_s = B.as_amount(v, B.MAX_DURATION_S)
        if age_s is None:
            return False
        r.log_age_s = age_s
    return True


class Jobs:
    """Every job the agents report, updated by :meth:`ingest` (thread-safe).

    Args:
        keep_steps: Steps of each job kept behind its newest.
        max_jobs: Jobs held at once; one more evicts the one silent longest.
        max_ahead_steps: Steps a row may be ahead of the job's newest (default
            ``keep_steps``); further is rejected.
        claim_ttl_s: A rank's claim to the newest step counts for this long after its push.
    """

    def __init__(self, *, keep_steps: int = 200, max_jobs: int = 64,
                 max_ahead_steps: int | None = None, claim_ttl_s: float = 60.0):
        self.keep_steps = keep_steps
        self.max_jobs = max_jobs
        self.max_ahead_steps = keep_steps if max_ahead_steps is None else max_ahead_steps
        self.claim_ttl_ns = int(claim_ttl_s * 1e9)
        self.jobs: dict[str, JobLive] = {}
        self.lock = threading.Lock()
        self.evicted_total = 0
        self._evicted: dict[str, None] = {}  # evicted since the last drain_evicted()

    def ingest(self, request, received_ns: int) -> int:
        """Take one ``ExportMetricsServiceRequest``; returns the data points rejected (see
        the module's validation and step window). Never raises on the push's content."""
        rejected = 0
        parsed = []
        for rm in request.resource_metrics:
            r, bad = _read_resource(rm)
            rejected += bad
            if r is not None:
                parsed.append(r)
        with self.lock:
            placed = []
            for r in parsed:
                rl = self._rank(r, received_ns)
                if rl is None:  # one rank too many for its job
                    rejected += r.points
                else:
                    placed.append((r, rl))
            touched = {id(self.jobs[r.job]): self.jobs[r.job]
                       for r, _ in placed if r.job in self.jobs}
            for jl in touched.values():
                jl.max_step = self._newest(jl, received_ns)
            for r, rl in placed:
                jl = self.jobs.get(r.job)
                if jl is not None:  # not evicted by a later job of the same push
                    rejected += self._apply(jl, rl, r, received_ns)
            for jl in touched.values():
                self._trim(jl)
        return rejected

    def drain_evicted(self) -> list[str]:
        """Jobs evicted since the last call (each named once)."""
        with self.lock:
            out, self._evicted = list(self._evicted), {}
            return out

    def _job(self, job: str) -> JobLive:
        jl = self.jobs.get(job)
        if jl is None:
            if len(self.jobs) >= self.max_jobs:
                oldest = min(self.jobs.values(), key=lambda j: j.last_push_ns)
                del self.jobs[oldest.job]
                self.evicted_total += 1
                self._evicted[oldest.job] = None
                while len(self._evicted) > 4 * self.max_jobs + 1024:  # nobody drains them
                    del self._evicted[next(iter(self._evicted))]
            self._evicted.pop(job, None)
            jl = self.jobs[job] = JobLive(job)
        return jl

    def _rank(self, r: _Resource, now_ns: int) -> RankLive | None:
        """The rank's state (made if new), its push time, host and claim set; None when its
        job already has ``MAX_RANKS_PER_JOB`` other ranks."""
        known = self.jobs.get(r.job)
        if known is not None and r.rank not in known.ranks \
                and len(known.ranks) >= B.MAX_RANKS_PER_JOB:
            return None
        jl = self._job(r.job)
        jl.last_push_ns = now_ns
        rl = jl.ranks.setdefault(r.rank, RankLive())
        if r.host is not None:
            rl.host = r.host
        rl.pushed_ns = now_ns
        if r.steps:
            rl.claim_step, rl.claim_ns = max(s[1] for s in r.steps), now_ns
        return rl

    def _newest(self, jl: JobLive, now_ns: int) -> int:
        """The lower median of the ranks' recent claims (all claims when none is recent)."""
        claims = [rl.claim_step for rl in jl.ranks.values() if rl.claim_step is not None]
        recent = [rl.claim_step for rl in jl.ranks.values() if rl.claim_step is not None
                  and now_ns - rl.claim_ns <= self.claim_ttl_ns]
        voters = sorted(recent or claims)
        return voters[(len(voters) - 1) // 2] if voters else -1

    def _apply(self, jl: JobLive, rl: RankLive, r: _Resource, now_ns: int) -> int:
        """Applies a checked resource to its job; returns the points refused here (a step
        too far ahead, a group or frontier past the job's group bound)."""
        bad = 0
        low, high = jl.max_step - self.keep_steps, jl.max_step + self.max_ahead_steps
        for pg, step, key, value, (members, size), grank in r.steps:
            if step > high:
                bad += 1
                continue
            if step <= low:
                continue  # older than the window: a late resend, not an error
            if pg not in jl.groups and len(jl.groups) >= B.MAX_GROUPS_PER_JOB:
                bad += 1
                continue
            if members or pg not in jl.groups:  # sent on a group's first point only
                jl.groups[pg] = (members, size)
            jl.pg_index.setdefault(pg, len(jl.pg_index))
            jl.group_rank[(r.rank, pg)] = grank
            row_key = (r.rank, pg, step)
            row = jl.steps.get(row_key)
            if row is None:
                row = jl.steps[row_key] = {}
                jl.fresh.add(row_key)
            row[key] = value
        for step, key, value in r.work:
            if step > high:
                bad += 1
            elif step > low:
                _work_row(jl, r.rank, step)[key] = value
        for step, peer, key, value in r.recv:
            if step > high:
                bad += 1
            elif step > low:
                got = _work_row(jl, r.rank, step).setdefault("recv", {})
                if peer not in got and len(got) >= MAX_RECV_PEERS:
                    bad += 1
                else:
                    got.setdefault(peer, {})[key] = value
        for which, pg, seq in r.seq:
            frontier = rl.started_seq if which == "started" else rl.completed_seq
            if pg not in frontier and len(frontier) >= B.MAX_GROUPS_PER_JOB:
                bad += 1
                continue
            frontier[pg] = seq
        for pg, op, age_s in r.pending:
            rl.pending = (pg, op, now_ns - int(age_s * 1e9)) if pg and age_s > 0 else None
        for peer, first, ops in r.p2p:
            if peer not in rl.p2p_peers and len(rl.p2p_peers) >= B.MAX_P2P_PEERS:
                bad += 1
                continue
            rl.p2p_peers[peer] = ops
            rl.first_p2p_op = first or rl.first_p2p_op
        if r.rank_step is not None:
            rl.step = r.rank_step
        if r.log_age_s is not None:
            rl.log_age_s = r.log_age_s
        return bad

    def _trim(self, jl: JobLive) -> None:
        """Drop the rows outside the job's window (a pass each time it moved by a quarter of
        ``keep_steps``, either way: a job that restarts its numbering moves it back)."""
        if abs(jl.max_step - jl.trimmed_at) < max(1, self.keep_steps // 4):
            return
        jl.trimmed_at = jl.max_step
        low, high = jl.max_step - self.keep_steps, jl.max_step + self.max_ahead_steps
        for key in [k for k in jl.steps if not low < k[2] <= high]:
            del jl.steps[key]
        jl.fresh = {k for k in jl.fresh if low < k[2] <= high}
        for key in [k for k in jl.work if not low < k[1] <= high]:
            del jl.work[key]
        jl.work_fresh = {k for k in jl.work_fresh if low < k[1] <= high}

    def snapshot(self, job: str):
        """A full copy of one job's state, kept steps included (tests, diagnostics)."""
        import copy

        with self.lock:
            jl = self.jobs.get(job)
            return None if jl is None else copy.deepcopy(jl)

    def take(self, job: str):
        """What an analysis round needs, taken under the lock in time proportional to the
        new data, not to the job: a copy of the job without its kept steps, and the step rows
        completed since the last take whose step the job's newest has reached (each handed
        over once), and likewise each rank's step and blocked time.

        Returns:
            ``(view, rows, work)`` with ``rows`` a list of ``((rank, pg, step), values)`` and
            ``work`` of ``((rank, step), {"step_s", "blocked_s"[, "recv"]})``, or
            ``(None, [], [])``
            for an unknown job.
        """
        import copy

        with self.lock:
            jl = self.jobs.get(job)
            if jl is None:
                return None, [], []
            done = [k for k in jl.fresh if k[2] <= jl.max_step
                    and all(f in jl.steps[k] for f in _STEP_ROW)]
            rows = [(k, dict(jl.steps[k])) for k in done]
            jl.fresh.difference_update(done)
            done = [k for k in jl.work_fresh if k[1] <= jl.max_step
                    and all(f in jl.work[k] for f in _WORK_ROW)]
            work = [(k, copy.deepcopy(jl.work[k])) for k in done]
            jl.work_fresh.difference_update(done)
            kept = jl.steps, jl.fresh, jl.work, jl.work_fresh
            jl.steps, jl.fresh, jl.work, jl.work_fresh = {}, set(), {}, set()
            try:
                view = copy.deepcopy(jl)
            finally:
                jl.steps, jl.fresh, jl.work, jl.work_fresh = kept
        return view, rows, work


def _work_row(jl: JobLive, rank: int, step: int) -> dict:
    """The (rank, step) row of the job's step and blocked times (made, and marked fresh, if
    new)."""
    row = jl.work.get((rank, step))
    if row is None:
        row = jl.work[(rank, step)] = {}
        jl.work_fresh.add((rank, step))
    return row


def _n_points(m) -> int:
    for kind in ("gauge", "sum", "histogram", "exponential_histogram", "summary"):
        if m.HasField(kind):
            return len(getattr(m, kind).data_points)
    return 0
