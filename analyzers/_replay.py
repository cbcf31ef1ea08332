"""What-if by replay: each step rebuilt as a dependency graph and re-run with one rank's work
set to its peers', after "Understanding Stragglers in Large Model Training Using What-if
Analysis" (OSDI'25).

Per rank, a step is a sequence of communication ops (by issue order) with the rank's own work
before each: the time since it was last free (the end of its previous blocking op, or the issue
of its previous asynchronous one). The replay runs every rank's sequence from a common start:

* an asynchronous op (an ``isend``, a DDP bucket) is issued and the rank goes on;
* a blocking collective ends, on every member, when the last member has arrived plus its
  transfer time (the group's shortest duration: the last to arrive waits for nothing else);
* a receive ends when the matching send (the k-th from that peer) has been issued and the
  rank has arrived, plus its transfer time (the pair's shortest receive).

The step lasts until the last rank's last op ends. Replayed once as measured and once with the
culprit's work scaled to its peers' median, the ratio of the two applied to the measured step
time is the step time with the culprit fixed: a slow rank whose extra work lands in its
neighbours' pipeline bubbles costs less than its extra work, and the replay says how much
less. A step whose graph does not close (a send with no receive in the same step, a member
missing) is left out; with none left the replay gives no answer and the caller keeps its
simpler estimate.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

import polars as pl

#: Steps replayed at most (the latest of the episode), and ranks at most: the replay is a
#: Python loop over ops.
MAX_STEPS = 24
MAX_RANKS = 512


@dataclass
class _Op:
    rank: int
    key: tuple  # ("c", pg, seq) | ("s", src, dst, k) | ("r", src, dst, k)
    blocking: bool
    work_ns: float
    xfer_ns: float


def _ops(rows: pl.DataFrame) -> dict[int, list[_Op]]:
    """One step's rows as each rank's op sequence (see the module)."""
    out: dict[int, list[_Op]] = {}
    pair_k: dict[tuple, int] = defaultdict(int)
    for (rank,), mine in rows.sort("rank", "idx").partition_by("rank", as_dict=True,
                                                               maintain_order=True).items():
        seq, free = [], None
        for r in mine.iter_rows(named=True):
            start, end = r["mono_start_ns"], r["mono_end_ns"]
            if start is None or end is None or end < start:
                return {}
            blocking = r["async_op"] is False
            work = 0.0 if free is None else max(0.0, start - free)
            if r["is_p2p"]:
                if r["peer"] is None:
                    return {}
                src, dst = (rank, r["peer"]) if r["op"] == "send" else (r["peer"], rank)
                k = pair_k[(r["op"], src, dst)]
                pair_k[(r["op"], src, dst)] += 1
                key = ("s" if r["op"] == "send" else "r", src, dst, k)
            else:
                key = ("c", r["pg"], r["seq"])
            seq.append(_Op(rank, key, blocking, work, float(r["_xfer"])))
            free = end if blocking else start
        out[int(rank)] = seq
    return out


def _replay(ops: dict[int, list[_Op]], scale: dict[int, float]) -> float | None:
    """The step's length replayed with each rank's work times ``scale`` (default 1)."""
    members: dict[tuple, set[int]] = defaultdict(set)
    for rank, seq in ops.items():
        for op in seq:
            if op.key[0] == "c":
                members[op.key].add(rank)
    pos = dict.fromkeys(ops, 0)
    clock = dict.fromkeys(ops, 0.0)
    arrived: dict[tuple, dict[int, float]] = defaultdict(dict)
    sent: dict[tuple, float] = {}
    todo = deque(ops)
    stalled = 0
    while todo:
        rank = todo.popleft()
        seq = ops[rank]
        if pos[rank] >= len(seq):
            stalled = 0
            continue
        op = seq[pos[rank]]
        at = clock[rank] + op.work_ns * scale.get(rank, 1.0)
        kind = op.key[0]
        if kind == "c" and op.blocking:
            arrived[op.key][rank] = at
            if len(arrived[op.key]) < len(members[op.key]):
                todo.append(rank)  # wait for the others (its arrival is recorded)
                stalled += 1
                if stalled > 4 * len(ops):
                    return None
                continue
            done = max(arrived[op.key].values()) + op.xfer_ns
            for r in members[op.key]:
                if ops[r][pos[r]].key == op.key:
                    clock[r] = done
                    pos[r] += 1
            stalled = 0
            todo.append(rank)
            continue
        if kind == "r":
            src_key = ("s",) + op.key[1:]
            if src_key not in sent:
                arrived[op.key][rank] = at
                todo.append(rank)
                stalled += 1
                if stalled > 4 * len(ops):
                    return None
                continue
            clock[rank] = max(at, sent[src_key]) + op.xfer_ns if op.blocking else at
        elif kind == "s":
            sent[op.key] = at
            clock[rank] = at + (op.xfer_ns if op.blocking else 0.0)
        else:  # an asynchronous collective: issued, the rank goes on
            clock[rank] = at
        pos[rank] += 1
        stalled = 0
        todo.append(rank)
    if any(pos[r] < len(ops[r]) for r in ops):
        return None
    return max(clock.values())


def replay_fixed_step_ms(events: pl.DataFrame, culprit: int, peers: list[int],
                         first_step: int, last_step: int | None = None) -> float | None:
    """The job's step time (ms) over ``first_step..last_step`` with ``culprit``'s work scaled
    to its ``peers``' median, by replay (see the module); None when the replay cannot say."""
    ranks = events["rank"].n_unique()
    if ranks > MAX_RANKS or not peers or "async_op" not in events.columns:
        return None
    last = events["step"].max() if last_step is None else last_step
    steps = sorted(s for s in events.filter(pl.col("step").is_between(first_step, last))
                   ["step"].unique().drop_nulls().to_list())[-MAX_STEPS - 1:-1]  # whole steps
    if not steps:
        return None
    rows = events.filter(pl.col("step").is_in(steps) & pl.col("mono_start_ns").is_not_null()
                         & pl.col("mono_end_ns").is_not_null()).select(
        "rank", "step", "idx", "pg", "seq", "is_p2p", "peer", "op", "async_op",
        "mono_start_ns", "mono_end_ns").with_columns(
        pl.col("pg").cast(pl.Utf8), pl.col("op").cast(pl.Utf8),
        (pl.col("mono_end_ns") - pl.col("mono_start_ns")).alias("_d"))
    # transfer: a collective's shortest member; a receive: the pair's shortest in that step
    # (over all the steps it is the pair's best moment, and a healthy step replays ~8% short)
    rows = rows.with_columns(pl.when(pl.col("is_p2p"))
                             .then(pl.col("_d").min().over("step", "rank", "peer", "op"))
                             .otherwise(pl.col("_d").min().over("step", "pg", "seq"))
                             .alias("_xfer"))
    ratios = []
    for part in rows.partition_by("step"):
        ops = _ops(part)
        if not ops or culprit not in ops:
            continue
        work = {r: sum(o.work_ns for o in seq) for r, seq in ops.items()}
        peer_work = sorted(work[p] for p in peers if p in work)
        if not peer_work or work[culprit] <= 0:
            continue
        target = peer_work[len(peer_work) // 2]
        base = _replay(ops, {})
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
