"""What-if by replay: each step rebuilt as a dependency graph and re-run with one rank's work
set to its peers', after "Understanding Stragglers in Large Model Training Using What-if
Analysis" (OSDI'25).

Per rank, a step is a sequence of communication ops (by issue order) with the rank's own work
before each: the time since it was last free (the end of its previous blocking op, the issue
of its previous asynchronous one, or for the step's first op the end of the previous step).
Where the rank waited for its asynchronous ops (DDP's buckets before the optimizer, isends
before the gradient all-reduce, an asynchronous receive's data), the sequence holds a *wait*,
placed as :func:`~ringwatch.analyzers._work.compute_step_work` counts it: after the last op
issued before the last of them (or the receive) completed. The replay runs every rank's
sequence from a common start:

* an asynchronous op is issued and the rank goes on; it completes as a blocking one would;
* a collective ends, on every member, when the last member has arrived plus its transfer time
  (the group's shortest duration: the last to arrive waits for nothing else);
* a receive ends when the matching send (the k-th from that peer) has been issued and the
  rank has arrived, plus its transfer time (the pair's median time from the later of the two
  to the receive's end, on aligned clocks; else its shortest receive); a send completes with
  its receive, or as early as measured (a buffered send, already out);
* a wait ends when every asynchronous op the rank issued before it has completed.

The step lasts until the last rank's last op ends. Replayed once as measured and once with the
culprit's work scaled to its peers' median (and, for a fault with steps before its onset, each
op's transfer time as in one of those steps: see :func:`_healthy_transfers`), the ratio of
the two applied to the measured step time is the step time with the culprit fixed: a slow
rank whose extra work lands in its neighbours' pipeline bubbles, or in a wait its peers would
have had anyway, costs less than its extra work, and the replay says how much less. A step
whose graph does not close (a send with no receive in the same step, a member missing) is
left out; with none left the replay gives no answer and the caller keeps its simpler
estimate.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict, deque
from dataclasses import dataclass, field

import polars as pl

from ringwatch.analyzers._clocks import align_clocks, estimate_clock_offsets, match_sends
from ringwatch.analyzers._work import blocking

#: Steps replayed at most (the latest of the episode), ranks at most, and ops at most over
#: all the steps (fewer steps when they hold more): the replay is a Python loop over ops,
#: ~10 µs per op for its two runs (a second per straggler at the most).
MAX_STEPS = 24
MAX_RANKS = 512
MAX_OPS = 100_000


@dataclass
class _Op:
    rank: int
    key: tuple  # ("c", pg, seq) | ("s"/"r", src, dst, step, k) | ("w", rank, step)
    blocking: bool
    work_ns: float
    xfer_ns: float
    deps: list = field(default_factory=list)  # a wait: the async ops it waits for
    took_ns: float = 0.0  # a send: how long it took as measured


def _ops(rows: pl.DataFrame, lead: dict[int, int]) -> dict[int, list[_Op]]:
    """One step's rows as each rank's op sequence (see the module); ``lead``: per rank, when
    it was free at the end of the previous step (its first op's work starts there)."""
    out: dict[int, list[_Op]] = {}
    pair_k: dict[tuple, int] = defaultdict(int)
    # the step's columns as lists once (a frame per rank and a dict per row cost ~10x more)
    rows = rows.sort("rank", "idx")
    names = ("rank", "mono_start_ns", "mono_end_ns", "_blk", "is_p2p", "peer", "op", "step",
             "pg", "seq", "_xfer")
    cols = [rows[c].to_list() for c in names]
    ranks = cols[0]
    at = 0
    while at < len(ranks):
        rank, end_at = ranks[at], at
        while end_at < len(ranks) and ranks[end_at] == rank:
            end_at += 1
        recs = list(zip(*(c[at:end_at] for c in cols), strict=True))
        at = end_at
        rank = int(rank)
        if any(s is None or e is None or e < s for _, s, e, *_ in recs):
            return {}
        asyncs = [e for _, _, e, blk, *_ in recs if not blk]
        waited = max(asyncs) if asyncs else None
        starts = [s for _, s, *_ in recs]
        wait_after = _last_issued(starts, waited) if waited is not None else None
        recv_waits: dict[int, list] = defaultdict(list)  # place -> (end, key) of async recvs
        seq, pending, free = [], [], lead.get(rank)
        for i, (_, start, end, blk, p2p, peer, op, step, pg, nth, xfer) in enumerate(recs):
            blocking = bool(blk)
            work = 0.0 if free is None else max(0.0, start - free)
            if p2p:
                if peer is None:
                    return {}
                src, dst = (rank, peer) if op == "send" else (peer, rank)
                k = pair_k[(op, src, dst)]
                pair_k[(op, src, dst)] += 1
                key = ("s" if op == "send" else "r", src, dst, step, k)
            else:
                key = ("c", pg, nth)
            seq.append(_Op(rank, key, blocking, work, float(xfer), took_ns=end - start))
            if not blocking:
                pending.append(key)
                if key[0] == "r":  # its data is waited for before it is used
                    recv_waits[_last_issued(starts, end)].append((end, key))
            free = end if blocking else start
            for when, waited_key in sorted(recv_waits.pop(i, ())):
                if when > free:
                    seq.append(_Op(rank, ("w", rank, step), True, 0.0, 0.0, [waited_key]))
                    free = when
            if i == wait_after and waited > free:
                seq.append(_Op(rank, ("w", rank, step), True, 0.0, 0.0, pending))
                pending, free = [], waited
        out[rank] = seq
    return out


def _last_issued(starts: list[int], at: int) -> int:
    """The place of the last op issued by ``at`` (``starts``: issue times in issue order)."""
    return max(0, bisect_right(starts, at) - 1)


class _Sim:
    """One replay of a step's ops (see the module)."""

    def __init__(self, ops: dict[int, list[_Op]], scale: dict[int, float]):
        self.ops, self.scale = ops, scale
        self.members: dict[tuple, set[int]] = defaultdict(set)
        for rank, seq in ops.items():
            for op in seq:
                if op.key[0] == "c":
                    self.members[op.key].add(rank)
        self.arrived: dict[tuple, dict[int, float]] = defaultdict(dict)
        self.done: dict[tuple, float] = {}  # collectives and receives: when they completed
        self.sent: dict[tuple, float] = {}
        self.sent_by: dict[tuple, float] = {}  # sends: issue + their measured duration
        self.posted: dict[tuple, tuple[float, float]] = {}  # async receives: (arrival, xfer)

    def _completion(self, key: tuple) -> float | None:
        if key[0] == "s":
            out = self._completion(("r",) + key[1:])
            by = self.sent_by.get(key)
            return by if out is None else out if by is None else min(out, by)
        if key in self.done:
            return self.done[key]
        if key[0] == "r" and key in self.posted and ("s",) + key[1:] in self.sent:
            at, xfer = self.posted[key]
            self.done[key] = max(at, self.sent[("s",) + key[1:]]) + xfer
            return self.done[key]
        return None

    def _try(self, op: _Op, at: float) -> float | None:
        """When the rank is free after ``op`` (issued at ``at``), or None: not yet."""
        kind = op.key[0]
        if kind == "c":
            got = self.arrived[op.key]
            got.setdefault(op.rank, at)
            if op.key not in self.done and len(got) == len(self.members[op.key]):
                self.done[op.key] = max(got.values()) + op.xfer_ns
            if not op.blocking:
                return at
            return self.done.get(op.key)
        if kind == "s":
            self.sent[op.key] = at
            self.sent_by[op.key] = at + op.took_ns
            if not op.blocking:
                return at
            return self._completion(op.key)
        if kind == "r":
            self.posted.setdefault(op.key, (at, op.xfer_ns))
            end = self._completion(op.key)
            return at if not op.blocking else end
        ends = [self._completion(k) for k in op.deps]  # a wait
        return None if any(e is None for e in ends) else max([at, *ends])

    def run(self) -> float | None:
        """The step's replayed length, or None when its graph does not close."""
        ops = self.ops
        pos = dict.fromkeys(ops, 0)
        clock = dict.fromkeys(ops, 0.0)
        todo, stalled = deque(ops), 0
        while todo:
            rank = todo.popleft()
            seq = ops[rank]
            if pos[rank] >= len(seq):
                stalled = 0
                continue
            op = seq[pos[rank]]
            free = self._try(op, clock[rank] + op.work_ns * self.scale.get(rank, 1.0))
            todo.append(rank)
            if free is None:  # waits for others (its arrival is recorded)
                stalled += 1
                if stalled > 2 * len(todo) + 2:
                    return None
                continue
            clock[rank], pos[rank], stalled = free, pos[rank] + 1, 0
        return max(clock.values())


def _replay(ops: dict[int, list[_Op]], scale: dict[int, float]) -> float | None:
    """The step's length replayed with each rank's work times ``scale`` (default 1)."""
    return _Sim(ops, scale).run()


def _step_rows(events: pl.DataFrame, steps: list[int]) -> pl.DataFrame:
    """The replayed steps' rows (and the step before the first, for its end) with each op's
    transfer time (``_xfer``): a collective's shortest member; a receive's, from the time
    its data was on its way (see :func:`_receive_transfers`), else the pair's shortest."""
    window = events.filter(pl.col("step").is_in(steps) & pl.col("mono_start_ns").is_not_null()
                           & pl.col("mono_end_ns").is_not_null())
    rows = window.select(
        "rank", "step", "idx", "pg", "seq", "is_p2p", "peer", "op",
        "mono_start_ns", "mono_end_ns", blocking(window).alias("_blk")).with_columns(
        pl.col("pg").cast(pl.Utf8), pl.col("op").cast(pl.Utf8),
        (pl.col("mono_end_ns") - pl.col("mono_start_ns")).alias("_d"))
    rows = rows.with_columns(pl.when(pl.col("is_p2p"))
                             .then(pl.col("_d").min().over("rank", "peer", "op"))
                             .otherwise(pl.col("_d").min().over("step", "pg", "seq"))
                             .alias("_xfer"))
    pure = _receive_transfers(window)
    if pure is None:
        return rows
    return (rows.join(pure, on=["rank", "peer"], how="left")
            .with_columns(pl.when(pl.col("op") == "recv")
                          .then(pl.min_horizontal("_xfer", pl.col("_pure").fill_null(
                              pl.col("_xfer"))))
                          .otherwise(pl.col("_xfer")).alias("_xfer")).drop("_pure"))


def _receive_transfers(window: pl.DataFrame) -> pl.DataFrame | None:
    """Per (receiving rank, peer), the median over its receives of the time from the later
    of its posting and the matching send's issue to its end: the transfer, without the wait
    for a late sender. In a pipeline the receiver waits for its sender's work in every
    micro-batch, so a pair's shortest receive still holds that work. Times are read on the
    hosts' wall clocks aligned by the collectives (:mod:`ringwatch.analyzers._clocks`), or on
    the monotonic clock when every rank is on one host; None when neither can be had."""
    p2p = window.filter(pl.col("is_p2p") & pl.col("peer").is_not_null())
    if p2p.is_empty():
        return None
    hosts = window["host"].n_unique() if "host" in window.columns else 1
    if hosts == 1:
        start, end = "mono_start_ns", "mono_end_ns"
    elif {"t_start_ns", "t_end_ns", "pg_size", "status"} <= set(window.columns):
        offsets = estimate_clock_offsets(window)
        if offsets.height < hosts:
            return None
        p2p = align_clocks(p2p, offsets)
        start, end = "t_start_ns", "t_end_ns"
    else:
        return None
    recvs = match_sends(p2p.filter(pl.col(start).is_not_null() & pl.col(end).is_not_null()),
                        _sent=start)
    if recvs.is_empty():
        return None
    took = (pl.col(end) - pl.max_horizontal(start, "_sent")).clip(0, pl.col(end) - pl.col(start))
    return (recvs.group_by("rank", "peer").agg(took.median().alias("_pure"))
            .select(pl.col("rank").cast(pl.Int64), pl.col("peer").cast(pl.Int64), "_pure"))


def _positions(rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` with each op's place in its rank's step (``_pos``) and its peer or -1."""
    return rows.with_columns(pl.col("idx").rank("ordinal").over("rank", "step").alias("_pos"),
                             pl.col("peer").fill_null(-1).alias("_peer"))


def _healthy_transfers(events: pl.DataFrame, before: list[int], most_steps: int, *,
                       warmup_steps: int = 2, least_steps: int = 5) -> list[pl.DataFrame] | None:
    """Per step of up to ``most_steps`` steps ``before`` a fault's onset (after the job's
    first ``warmup_steps``): each op's transfer time by (rank, place in the step, op, group,
    peer); None with fewer than ``least_steps`` of them. A compute straggler changes the
    others' transfers too: where transfers are CPU work (Gloo on shared cores), ranks that wait
    for it leave them the cores, and transfers measured during the fault read shorter than the
    job's own before it. The step with the straggler fixed is the job as it was, so it runs
    with these, one measured step's whole (a median per op would drop the jitter that a
    step's longest path picks up)."""
    ref = before[warmup_steps:][-most_steps:]
    if len(ref) < least_steps:
        return None
    rows = _positions(_step_rows(events, ref))
    if rows.is_empty():
        return None
    return [part.select("rank", "_pos", "op", "pg", "_peer", pl.col("_xfer").alias("_ref"))
            for _, part in sorted(rows.partition_by("step", as_dict=True).items())]


def _with_transfers(part: pl.DataFrame, healthy: pl.DataFrame) -> pl.DataFrame:
    """One step's rows with each op's transfer time from ``healthy`` where the same op (rank,
    place, op, group, peer) was seen there."""
    return (_positions(part).join(healthy, on=["rank", "_pos", "op", "pg", "_peer"],
                                  how="left")
            .with_columns(pl.col("_ref").fill_null(pl.col("_xfer")).alias("_xfer"))
            .drop("_pos", "_peer", "_ref"))


def _replayable(events: pl.DataFrame, steps: list[int]) -> bool:
    """Whether every row of ``steps`` says if it was asynchronous and is timed by the host
    (:mod:`._timing`): a device duration or a watchdog's end gives no timeline to replay."""
    from ringwatch.analyzers._timing import host_timed

    rows = events.filter(pl.col("step").is_in(steps))
    return bool(rows.select(pl.col("async_op").is_not_null().all()
                            & host_timed(rows).all()).item())


def _step_ends(rows: pl.DataFrame) -> dict[int, dict[int, int]]:
    """Per step, per rank: when the rank was free at the step's end (its last blocking op's
    end, or its asynchronous ops' last completion, the later)."""
    free = pl.when(pl.col("_blk")).then(pl.col("mono_end_ns")).otherwise(pl.col("mono_start_ns"))
    ends = rows.group_by("rank", "step").agg(pl.max_horizontal(
        free.max(), pl.col("mono_end_ns").filter(~pl.col("_blk")).max()
    ).alias("_e"))
    out: dict[int, dict[int, int]] = defaultdict(dict)
    for r, s, e in ends.iter_rows():
        if e is not None:
            out[int(s)][int(r)] = int(e)
    return out


def replay_fixed_step_ms(events: pl.DataFrame, culprit: int, peers: list[int],
                         first_step: int, last_step: int | None = None) -> float | None:
    """The job's step time (ms) over ``first_step..last_step`` with ``culprit``'s work scaled
    to its ``peers``' median, by replay (see the module); None when the replay cannot say."""
    ranks = events["rank"].n_unique()
    if ranks > MAX_RANKS or not peers or "async_op" not in events.columns:
        return None
    last = events["step"].max() if last_step is None else last_step
    known = sorted(events["step"].unique().drop_nulls().to_list())
    steps = [s for s in known if first_step <= s <= last][-MAX_STEPS - 1:-1]  # whole steps
    if not steps:
        return None
    per_step = events.filter(pl.col("step").is_in(steps)).height / len(steps)
    steps = steps[-max(1, int(MAX_OPS // max(per_step, 1))):]
    before = [s for s in known if s < steps[0]][-1:]
    rows = _step_rows(events, before + steps)
    if rows.is_empty() or not _replayable(events, before + steps):
        return None
    healthy = _healthy_transfers(events, [s for s in known if s < first_step],
                                 max(len(steps), 5))
    ends = _step_ends(rows)
    ratios = []
    prev = dict(zip(steps, before + steps if before else [None, *steps], strict=False))
    for n, ((step,), part) in enumerate(rows.partition_by("step", as_dict=True).items()):
        if step not in prev:
            continue
        ops = _ops(part, ends.get(prev[step], {}))
        if not ops or culprit not in ops:
            continue
        work = {r: sum(o.work_ns for o in seq) for r, seq in ops.items()}
        peer_work = sorted(work[p] for p in peers if p in work)
        if not peer_work or work[culprit] <= 0:
            continue
        target = peer_work[len(peer_work) // 2]
        base = _replay(ops, {})
        if healthy:  # the fixed step's transfers: the job's own before the onset
            ops = _ops(_with_transfers(part, healthy[n % len(healthy)]),
                       ends.get(prev[step], {}))
        fixed = _replay(ops, {culprit: min(1.0, target / work[culprit])})
        if base and fixed:
            ratios.append(fixed / base)
    if not ratios:
        return None
    step_ms = (events.filter(pl.col("step").is_in(steps)).group_by("rank", "step")
               .agg(pl.col("mono_start_ns").min()).sort("rank", "step")
               .with_columns((pl.col("mono_start_ns").shift(-1).over("rank")
                              - pl.col("mono_start_ns")).alias("_dur"))
               ["_dur"].drop_nulls().median())
    if step_ms is None:
        return None
    ratios.sort()
    return float(step_ms) / 1e6 * ratios[len(ratios) // 2]


def before_clause(events: pl.DataFrame, since: int, *, warmup_steps: int = 2,
                  least_steps: int = 5, most_steps: int = 20) -> str:
    """``"; before step N the step took X ms"``: the job's measured step time over up to
    ``most_steps`` steps before a fault's onset (after the job's first ``warmup_steps``), to
    read beside the replay's figure; ``""`` with fewer than ``least_steps`` such steps (a
    fault from the start, a window that holds few steps before it)."""
    from ringwatch.analyzers._hangs import step_s_between

    steps = events["step"].drop_nulls()
    if steps.is_empty():
        return ""
    lo = max(int(steps.min()) + warmup_steps, since - most_steps)
    if since - lo < least_steps:
        return ""
    step_s = step_s_between(events, lo, since)
    return "" if step_s is None else f"; before step {since} the step took {step_s * 1e3:.0f} ms"
