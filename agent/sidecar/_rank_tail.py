"""Per-rank collective summaries for the node sidecar, read from the ranks' own logs.

The in-process hooks already write every collective to Parquet segments beside the job
(:mod:`ringwatch.agent.capture._writer`). The sidecar reads each new segment once and keeps running
totals, instead of the training process pushing summaries itself. Three reasons:

* the training process does no network I/O and loads no exporter: a slow or dead collector
  can never stall a step;
* one OTLP stream per node, not one per rank;
* the online summaries and the post-mortem analysis read the very same rows.

The price is latency: a collective reaches the sidecar one flush interval (2 s by default,
``RINGWATCH_FLUSH_INTERVAL_S``) plus one tail interval after it ends. The pending snapshot a
rank rewrites at every flush says what a hung rank waits for, and since when.

Memory is bounded: per rank, the totals per (group, op), and the set of consumed segment
numbers and row indices above a low-water mark (rows complete a little out of order, so the set
stays small). Jobs whose logs have not moved for ``stale_after_s`` are forgotten.
"""

from __future__ import annotations

import json
import logging
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from ringwatch._clock import Clock, SystemClock
from ringwatch._logs import META_FILE, PENDING_FILE, RANK_DIR_RE, SEGMENT_RE, select_segments
from ringwatch.agent.sidecar._rhythm_steps import RhythmSteps
from ringwatch.agent.sidecar._step_work import StepWork, add_row, fold_before

log = logging.getLogger("ringwatch.agent")

_COLUMNS = ["idx", "pg", "pg_ranks", "pg_size", "group_rank", "op", "is_p2p", "peer", "seq",
            "status", "nbytes", "t_issue_ns", "t_start_ns", "t_end_ns", "duration_ns",
            "device_duration_ns", "end_source", "step", "mono_start_ns", "mono_end_ns",
            "async_op"]
#: Steps of per-step totals kept per rank (the newest): twice what a push carries, so that a
#: push that fails or comes late loses none.
KEEP_STEPS = 256
#: Finished collectives' intervals kept per rank (the newest), for the phase power split.
RECENT_COLLECTIVES = 4096
#: Send/recv peers kept per rank (a pipeline stage has two; more is no pipeline).
P2P_PEERS = 64


class _Watermark:
    """A set of non-negative ints kept as ``everything <= low`` plus the few above it."""

    __slots__ = ("above", "low")

    def __init__(self) -> None:
        self.low = -1
        self.above: set[int] = set()

    def __contains__(self, n: int) -> bool:
        return n <= self.low or n in self.above

    def add(self, n: int) -> None:
        if n in self:
            return
        self.above.add(n)
        while self.low + 1 in self.above:
            self.low += 1
            self.above.discard(self.low)


class Spans:
    """The newest ``cap`` (start, end) pairs, in one preallocated array: a rank's recent
    collectives cost the same memory from its first to its millionth (as Python tuples, 4,096
    of them took ~0.6 MB that grew until the bound)."""

    __slots__ = ("_a", "_cap", "_n", "_next")

    def __init__(self, cap: int = RECENT_COLLECTIVES):
        self._cap = cap
        self._a = array("q", bytes(16 * cap))  # start, end, start, end, ...
        self._n = 0  # pairs held
        self._next = 0  # where the next one goes

    def append(self, start: int, end: int) -> None:
        i = 2 * self._next
        self._a[i], self._a[i + 1] = start, end
        self._next = (self._next + 1) % self._cap
        self._n = min(self._n + 1, self._cap)

    def extend(self, pairs) -> None:
        for start, end in pairs:
            self.append(start, end)

    def __len__(self) -> int:
        return self._n

    def array(self):
        """The pairs held, oldest first (a copy: ``(n, 2)`` int64, wall ns)."""
        import numpy as np

        a = np.frombuffer(self._a, dtype=np.int64).reshape(self._cap, 2)
        if self._n < self._cap:
            return a[:self._n].copy()
        return np.concatenate([a[self._next:], a[:self._next]])


@dataclass(slots=True)
class OpTotals:
    """Running totals of one rank's completed collectives of one (group, op)."""

    count: int = 0
    nbytes: int = 0
    busy_ns: int = 0
    gap_ns: int = 0


@dataclass(slots=True)
class StepTotals:
    """One rank's collectives (not send/recv) of one group in one training step.

    ``busy_ns`` is the time inside at least one of them: overlapping collectives (DDP's
    buckets in flight together) count once, so a rank that waits for a late peer in four
    buckets at the same time waits once, as it does. Collectives timed on the device (NCCL's
    CUDA events) add their device durations instead (``device_ns``: one group's kernels run
    one after the other on its stream), and those whose end only the NCCL watchdog saw add
    nothing: that end is up to ~100 ms late (see ``ringwatch.analyzers._timing``).
    """

    count: int = 0
    nbytes: int = 0
    device_ns: int = 0  # summed device durations
    closed_ns: int = 0  # merged time of the intervals before the open one
    open_start_ns: int | None = None
    open_end_ns: int | None = None
    first_start_ns: int | None = None
    last_end_ns: int | None = None

    @property
    def busy_ns(self) -> int:
        if self.open_start_ns is None:
            return self.closed_ns + self.device_ns
        return self.closed_ns + self.device_ns + self.open_end_ns - self.open_start_ns

    def add(self, start: int | None, end: int | None) -> None:
        if start is None or end is None:
            return
        if self.open_start_ns is None or start > self.open_end_ns:
            self.closed_ns = self.busy_ns
            self.open_start_ns, self.open_end_ns = start, end
        else:
            self.open_start_ns = min(self.open_start_ns, start)
            self.open_end_ns = max(self.open_end_ns, end)


@dataclass(slots=True)
class RankSummary:
    """What the sidecar knows of one rank."""

    job: str
    rank: int
    local_rank: int | None = None
    host: str | None = None
    ops: dict[tuple[str, str], OpTotals] = field(default_factory=dict)
    last_started_seq: dict[str, int] = field(default_factory=dict)
    last_completed_seq: dict[str, int] = field(default_factory=dict)
    step: int | None = None
    #: Oldest pending collective at the last flush: (pg, op, since wall ns), or None.
    pending: tuple[str, str, int] | None = None
    #: (mtime ns, size, inode) of the pending file read: one not replaced is not read again.
    pending_stamp: tuple[int, int, int] | None = None
    written_ns: int | None = None
    last_end_ns: int | None = None
    #: step -> pg -> totals, for the newest :data:`KEEP_STEPS` steps.
    steps: dict[int, dict[str, StepTotals]] = field(default_factory=dict)
    #: pg -> (members in compact form, size, this rank's rank in it).
    groups: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    segments: _Watermark = field(default_factory=_Watermark)
    rows: _Watermark = field(default_factory=_Watermark)
    #: (t_start_ns, t_end_ns) of its newest finished collectives, for the phase power split.
    recent: Spans = field(default_factory=Spans)
    #: Steps from the rhythm when the rank marks none (:mod:`._rhythm_steps`).
    rhythm: RhythmSteps = field(default_factory=RhythmSteps)
    #: peer (global rank) -> send/recv ops with it, at most :data:`P2P_PEERS` peers: who the
    #: rank's pipeline neighbours are (the service infers the stages from them).
    p2p: dict[int, int] = field(default_factory=dict)
    #: (idx, op) of the rank's first send/recv: stage 0 is the end of a chain that sends first.
    first_p2p: tuple[int, str] | None = None
    #: step -> its communication, for the blocked time per step (:mod:`._step_work`).
    work: dict[int, StepWork] = field(default_factory=dict)


def _seg_range(name: str) -> range:
    m = SEGMENT_RE.match(name)
    a = int(m.group(1))
    return range(a, int(m.group(2) or a) + 1)


class RankLogTail:
    """Follows every rank folder under ``log_dir`` (``<job>/rank-<N>/``).

    Args:
        log_dir: Root of the per-rank logs on this node.
        host: Only ranks whose ``meta.json`` names this host (None: every rank found, for a
            node-local log folder).
        stale_after_s: Forget a job whose logs have not been written for this long.
        clock: Wall clock for ages.
    """

    def __init__(self, log_dir: str | Path, *, host: str | None = None,
                 stale_after_s: float = 300.0, clock: Clock | None = None):
        self.log_dir = Path(log_dir)
        self.host = host
        self.stale_after_ns = int(stale_after_s * 1e9)
        self.clock = clock or SystemClock()
        self.ranks: dict[tuple[str, int], RankSummary] = {}
        self.errors = 0
        self._logged: set[str] = set()

    def _once(self, key: str, msg: str) -> None:
        self.errors += 1
        if key not in self._logged:
            self._logged.add(key)
            log.warning("ringwatch agent: %s", msg)

    def poll(self) -> dict[tuple[str, int], RankSummary]:
        """Read what is new; return the summaries of the live ranks. Never raises."""
        now = self.clock.wall_ns()
        seen = set()
        try:
            job_dirs = [p for p in self.log_dir.iterdir() if p.is_dir()]
        except OSError:
            job_dirs = []
        for job_dir in job_dirs:
            try:
                rank_dirs = [(int(m.group(1)), p) for p in job_dir.iterdir()
                             if (m := RANK_DIR_RE.match(p.name))]
            except OSError:
                continue
            for rank, d in rank_dirs:
                key = (job_dir.name, rank)
                try:
                    if self._poll_rank(key, d, now):
                        seen.add(key)
                except Exception as exc:  # noqa: BLE001 - one bad folder never stops the others
                    self._once(f"{d}:{type(exc).__name__}", f"cannot read {d}: {exc}")
        for key in set(self.ranks) - seen:
            del self.ranks[key]
        return self.ranks

    def _poll_rank(self, key: tuple[str, int], d: Path, now_ns: int) -> bool:
        meta = _read_meta(d / META_FILE)
        if meta is None:
            return False
        if self.host is not None and meta.get("host") != self.host:
            return False
        written = meta.get("written_ns")
        if not isinstance(written, int):
            written = (d / META_FILE).stat().st_mtime_ns
        if now_ns - written > self.stale_after_ns:
            return False
        s = self.ranks.get(key)
        if s is None:
            s = self.ranks[key] = RankSummary(job=key[0], rank=key[1])
        s.local_rank = meta.get("local_rank")
        s.host = meta.get("host")
        s.written_ns = written
        names = [p.name for p in d.iterdir()]
        for name in select_segments(names):
            numbers = _seg_range(name)
            if all(n in s.segments for n in numbers):
                continue
            frame = _read_rows(d / name, after=s.rows.low if len(numbers) > 1 else -1)
            if frame is not None:
                _consume(s, frame)
            for n in numbers:
                s.segments.add(n)
        stamp = _stamp(d / PENDING_FILE) if PENDING_FILE in names else None
        if stamp is None:
            s.pending = s.pending_stamp = None
        elif stamp != s.pending_stamp:
            s.pending = _read_pending(s, d / PENDING_FILE)
            s.pending_stamp = stamp
        return True


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None  # removed between listing and reading: nothing in flight
    return st.st_mtime_ns, st.st_size, st.st_ino


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_rows(path: Path, *, after: int = -1):
    """The rows of a segment with ``idx`` above ``after`` (every row below it was read):
    a compacted file, 32 segments of which the tail read all but the newest, is filtered as
    it is read (row groups and rows skipped) instead of decoded whole."""
    import polars as pl

    try:
        if after < 0:  # a single segment: read whole (a third faster than a filtered scan)
            return pl.read_parquet(path, columns=_COLUMNS)
        return pl.scan_parquet(path).select(_COLUMNS).filter(pl.col("idx") > after).collect()
    except FileNotFoundError:
        return None  # compacted away between listing and reading: the range file has them


def _consume(s: RankSummary, frame) -> None:
    """Add a segment's rows not seen before to the totals."""
    rows = [r for r in frame.sort("t_start_ns", nulls_last=True).iter_rows(named=True)
            if r["idx"] not in s.rows]
    for r in rows:
        s.rows.add(r["idx"])
        if r["is_p2p"]:
            _add_p2p(s, r)
        pg, seq = r["pg"], r["seq"]
        if seq is not None and r["t_start_ns"] is not None:
            s.last_started_seq[pg] = max(seq, s.last_started_seq.get(pg, -1))
        if r["status"] not in ("ok", "unknown"):
            continue
        if seq is not None:
            s.last_completed_seq[pg] = max(seq, s.last_completed_seq.get(pg, -1))
        t = s.ops.setdefault((pg, r["op"]), OpTotals())
        t.count += 1
        t.nbytes += r["nbytes"] or 0
        t.busy_ns += _timed_ns(r) or 0
        start, end = r["t_start_ns"], r["t_end_ns"]
        if start is not None and s.last_end_ns is not None and start > s.last_end_ns:
            t.gap_ns += start - s.last_end_ns
        if end is not None:
            s.last_end_ns = max(end, s.last_end_ns or end)
            if start is not None:
                s.recent.append(start, end)
    # the steps: the rows' own, or the rhythm's iterations for a rank that marks none
    was_rhythm = s.rhythm.active
    stepped = s.rhythm.feed(rows)
    if s.rhythm.active and not was_rhythm and s.rhythm.iteration >= 0:
        s.steps.clear()  # what the one step number gathered is no step
        s.work.clear()
        s.step = None
    for r in stepped:
        if r["step"] is None:
            continue
        s.step = max(r["step"], s.step if s.step is not None else -1)
        add_row(s.work, r["step"], r)
        if r["status"] in ("ok", "unknown") and not r["is_p2p"]:
            _add_step(s, r)
    while len(s.steps) > KEEP_STEPS:
        del s.steps[min(s.steps)]
    if s.step is not None:
        fold_before(s.work, s.step)
    while len(s.work) > KEEP_STEPS:
        del s.work[min(s.work)]


def _add_p2p(s: RankSummary, r: dict) -> None:
    peer = r["peer"]
    if peer is None or peer == s.rank or r["op"] not in ("send", "recv"):
        return
    if s.first_p2p is None or r["idx"] < s.first_p2p[0]:
        s.first_p2p = (r["idx"], r["op"])
    if peer in s.p2p or len(s.p2p) < P2P_PEERS:
        s.p2p[peer] = s.p2p.get(peer, 0) + 1


def _add_step(s: RankSummary, r: dict) -> None:
    if r["pg"] not in s.groups:
        s.groups[r["pg"]] = (r["pg_ranks"], r["pg_size"], r["group_rank"])
    t = s.steps.setdefault(r["step"], {}).setdefault(r["pg"], StepTotals())
    t.count += 1
    t.nbytes += r["nbytes"] or 0
    start, end = r["t_start_ns"], r["t_end_ns"]
    if r.get("device_duration_ns") is not None:
        t.device_ns += r["device_duration_ns"]
    elif r.get("end_source") != "watchdog":
        t.add(start, end)
    if start is not None:
        t.first_start_ns = start if t.first_start_ns is None else min(start, t.first_start_ns)
    if end is not None:
        t.last_end_ns = end if t.last_end_ns is None else max(end, t.last_end_ns)


def _timed_ns(r: dict) -> int | None:
    """A row's time in the collective as the analyzers read it: the device's, none for an
    end only the watchdog saw, else the host's."""
    if r.get("device_duration_ns") is not None:
        return r["device_duration_ns"]
    return None if r.get("end_source") == "watchdog" else r["duration_ns"]


def completed_steps(s: RankSummary, last: int) -> list[tuple[int, str, StepTotals]]:
    """(step, pg, totals) of the newest ``last`` steps the rank has finished (a later step
    has begun), oldest first."""
    if s.step is None:
        return []
    done = sorted(k for k in s.steps if k < s.step)[-last:]
    return [(k, pg, t) for k in done for pg, t in s.steps[k].items()]


def _read_pending(s: RankSummary, path: Path) -> tuple[str, str, int] | None:
    """The oldest pending collective (pg, op, since wall ns); started ones move
    ``last_started_seq`` on (a hung collective started but never completed)."""
    import polars as pl

    try:
        df = pl.read_parquet(path, columns=["pg", "op", "seq", "t_issue_ns", "t_start_ns"])
    except (OSError, pl.exceptions.PolarsError):
        return None  # replaced or removed between listing and reading: next poll has it
    for pg, seq in df.filter(pl.col("seq").is_not_null() & pl.col("t_start_ns").is_not_null()
                             ).group_by("pg").agg(pl.col("seq").max()).iter_rows():
        s.last_started_seq[pg] = max(seq, s.last_started_seq.get(pg, -1))
    df = df.with_columns(pl.coalesce("t_start_ns", "t_issue_ns").alias("since"))
    df = df.filter(pl.col("since").is_not_null()).sort("since")
    if df.height == 0:
        return None
    r = df.row(0, named=True)
    return r["pg"], r["op"], r["since"]
