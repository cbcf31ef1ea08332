"""Hangs: per process group, the frontier of collective numbers and who is behind it.

Every member of a group enters the group's collectives in the same order (``seq``). When a
group stops progressing, its lowest collective still in flight on some member, #N, splits the
members in two: those that entered #N and wait in it, and those that never entered it. Members
that never arrived point at a host-side problem on those ranks (a stuck data loader, a dead
process, a rank blocked in another group); all members in and none out points at the
collective itself (the network or the device). A rank whose agent stopped writing while its
peers kept flushing is not running at all (stopped, killed, host down): that outranks what its
last rows say.

Online: call with the latest rows (pending ones included) and the current time. Post-mortem:
call with the logs, whose last entries are the collectives in flight when recording stopped,
and the time of the last flush.
"""

from __future__ import annotations

import bisect
import heapq

import polars as pl

from ringwatch._schema import parse_ranks
from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._memo import per_frame
from ringwatch.analyzers._steps import SLICE_ROWS, _slices, step_firsts
from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS as _D
from ringwatch.analyzers._thresholds import Thresholds

# a collective in flight this long, with the group stuck behind it, and this many of the
# job's usual steps; an agent silent this much longer than its peers' newest flush
# (:class:`~ringwatch.analyzers._thresholds.Thresholds`)
MIN_STALL_S = _D.stall_floor_s
STALL_STEPS = _D.stall_steps
SILENT_S = _D.silent_s


def compute_frontier(events: pl.DataFrame) -> pl.DataFrame:
    """Per (pg, rank), how far the rank got in the group's collectives.

    Args:
        events: Rows of one job, pending ones included (point-to-point rows are left out:
            their numbers count per pair, not per group).

    Returns:
        Columns ``pg``, ``pg_ranks``, ``rank``, ``host``, ``entered_seq`` (highest collective
        number it entered), ``finished_seq`` (highest it finished), ``pending_seq`` (lowest
        still in flight, null if none), ``pending_op``, ``pending_start_ns`` and
        ``pending_step``; sorted by pg then rank.
    """
    keep = ~pl.col("is_p2p") & pl.col("seq").is_not_null()
    pending = pl.col("status") == "pending"

    def frontier(rows: pl.DataFrame) -> pl.DataFrame:
        return rows.filter(keep).group_by("pg", "rank").agg(
            pl.col("pg_ranks").first(), pl.col("host").first(),
            pl.col("seq").max().alias("entered_seq"),
            pl.col("seq").filter(~pending).max().alias("finished_seq"))

    # per (pg, rank): a whole log goes by slices of ranks (the filter copies what it keeps)
    narrow = events.select("pg", "rank", "pg_ranks", "host", "seq", "status", "is_p2p")
    slices = None if events["rank"].null_count() else _slices(narrow, "rank", SLICE_ROWS)
    base = frontier(narrow) if slices is None else pl.concat(
        [frontier(narrow.filter(pl.col("rank").is_between(lo, hi))) for lo, hi in slices])
    df = events.select("pg", "rank", "seq", "status", "op", "t_start_ns", "step",
                       "is_p2p").filter(keep & pending)
    # The pending rows apart: few of them, and none at all in a healthy job.
    first_pending = pl.col("seq").min()
    at_first = pl.col("seq") == first_pending
    pend = df.group_by("pg", "rank").agg(
        first_pending.alias("pending_seq"),
        pl.col("op").filter(at_first).first().alias("pending_op"),
        pl.col("t_start_ns").filter(at_first).min().alias("pending_start_ns"),
        pl.col("step").filter(at_first).first().alias("pending_step"))
    return base.join(pend, on=["pg", "rank"], how="left", nulls_equal=True).sort("pg", "rank")


def ends_unseen(members, entered: dict, finished: dict,
                pending: dict[int, int]) -> dict[int, int]:
    """Ranks of a group whose collectives in flight every other member finished, while those
    members went on to later ones the rank never entered: ``rank -> its first in flight``.

    Its part of them reached every peer (a collective needs every member's), so the group
    does not wait in them: it waits at the next one, which the rank never entered. The rank
    stopped before it saw their ends (blocked inside their wait), or, rarely, its own
    receive never completed; either way it is the one the others wait for."""
    out = {}
    group = set(members)
    # every other member's figures from the group's two least finished, two most entered
    # and its members' collectives in flight, sorted: linear in the group, not quadratic
    # (a world group of 10,000 ranks, nearly all in flight at any moment)
    least = heapq.nsmallest(2, ((_seq(finished, m), m) for m in group))
    most = heapq.nlargest(2, ((_seq(entered, m), m) for m in group))
    flight = sorted(pending[m] for m in group if m in pending)
    for r, first in pending.items():
        mine = _seq(entered, r)
        if len(group) == (r in group):  # no other member
            continue
        low = next(v for v, m in least if m != r)  # the least finished among the others
        high = next(v for v, m in most if m != r)  # the most entered among the others
        # others in flight at one of the rank's collectives or before
        behind = bisect.bisect_right(flight, mine) - (r in group and pending[r] <= mine)
        if low >= mine and behind == 0 and high > mine:
            out[int(r)] = int(first)
    return out


def _seq(numbers: dict, rank: int) -> int:
    """A rank's collective number from ``numbers``, -1 for none (numbers may start at 0)."""
    n = numbers.get(rank)
    return -1 if n is None else int(n)


def _ranks(rs) -> str:
    return ",".join(str(r) for r in rs)


@per_frame
def typical_step_s(events: pl.DataFrame) -> float | None:
    """The job's usual step time (s): per rank, the median time between the first
    collectives of consecutive steps; the median over ranks. ``None`` without two steps.
    Once per frame (several analyzers read it)."""
    return _median_step_s(step_firsts(events))


def step_s_between(events: pl.DataFrame, first: int, last: int) -> float | None:
    """:func:`typical_step_s` of the steps ``first..last`` alone (a rank's first start in a
    step does not depend on the other steps: the frame's table, filtered)."""
    return _median_step_s(step_firsts(events).filter(pl.col("step").is_between(first, last)))


#: A job's newest steps (per rank) whose time sets how long a stall must last, where they are
#: longer than its usual step: a slowdown of every step (a slow link at a few Mbit/s, steps
#: 40x longer) raises the bar as it goes, while a hang, whose last steps were as usual, does
#: not.
RECENT_STEPS = 3


def stall_step_s(events: pl.DataFrame) -> float | None:
    """The step time a stall is measured in (s): the job's usual step
    (:func:`typical_step_s`), or its newest :data:`RECENT_STEPS` steps' (per rank, the median
    of its newest; the median over ranks) when longer."""
    usual = typical_step_s(events)
    recent = _median_step_s(step_firsts(events), newest=RECENT_STEPS)
    return usual if recent is None or (usual is not None and usual >= recent) else recent


def _median_step_s(firsts: pl.DataFrame, newest: int | None = None) -> float | None:
    """Per rank, the median of its step times (of its ``newest`` ones, given; ``firsts`` is
    sorted by rank then step); the median over ranks."""
    # diff within each rank: the frame is sorted by rank, so no window per rank is needed
    same = pl.col("rank").eq_missing(pl.col("rank").shift(1))
    firsts = firsts.with_columns(
        pl.when(same).then(pl.col("mono_start_ns").diff()).otherwise(None).alias("_d"))
    d = pl.col("_d").drop_nulls()
    per = firsts.group_by("rank").agg(
        (d if newest is None else d.tail(newest)).median())["_d"].drop_nulls()
    return None if per.is_empty() else float(per.median()) / 1e9


def stall_threshold_s(events: pl.DataFrame, min_stall_s: float | None = None,
                      thresholds: Thresholds = _D) -> float:
    """How long a group must be stuck to be a hang: ``min_stall_s`` when given, else
    ``thresholds``' (:meth:`~ringwatch.analyzers._thresholds.Thresholds.stall_s`: by default
    5 s or 10 steps, whichever is longer, in :func:`stall_step_s`; a job with minute-long
    steps is not hung after 5 s, nor one whose steps all slowed to a minute)."""
    if min_stall_s is not None:
        return min_stall_s
    if thresholds.min_stall_s is not None:
        return thresholds.min_stall_s
    return thresholds.stall_s(stall_step_s(events))


def detect_hangs(events: pl.DataFrame, *, now_ns: int, min_stall_s: float | None = None,
                 last_seen_ns: dict[int, int] | None = None,
                 silent_s: float = SILENT_S) -> tuple[Finding, ...]:
    """Groups stuck behind a collective in flight for ``min_stall_s`` or more at ``now_ns``.

    Args:
        events: Rows of one job, pending ones included.
        now_ns: Wall clock (ns) to measure the stall against: the current time online, the
            last flush post-mortem.
        min_stall_s: How long the oldest blocking collective must have been in flight
            (default: :func:`stall_threshold_s`).
        last_seen_ns: Per rank, wall clock of its agent's newest write (a heartbeat); a rank
            ``silent_s`` behind the newest is reported as not running.

    Returns:
        One :class:`Finding` per stuck group, root causes first: a group whose missing ranks
        are themselves waiting in another stuck group is a consequence (lower confidence).
    """
    min_stall_s = stall_threshold_s(events, min_stall_s)
    fr = compute_frontier(events)
    newest = max(last_seen_ns.values()) if last_seen_ns else None
    silent = {r for r, t in (last_seen_ns or {}).items() if newest - t > silent_s * 1e9}
    stuck: dict[str, tuple] = {}
    # Only groups with a collective in flight since ``min_stall_s`` ago can be stuck (the
    # stall is measured from the start of one in flight): a filter first, as a job has a
    # group per tensor/pipeline slice, thousands of them at scale, most with one in flight
    # at any moment.
    oldest_ns = now_ns - min_stall_s * 1e9
    fr = fr.filter((pl.col("pending_seq").is_not_null()
                    & (pl.col("pending_start_ns") <= oldest_ns)).any().over("pg"))
    for (pg,), rows in fr.group_by("pg", maintain_order=True):
        members = parse_ranks(rows["pg_ranks"][0])
        entered = dict(zip(rows["rank"].to_list(), rows["entered_seq"].to_list(), strict=True))
        finished = dict(zip(rows["rank"].to_list(), rows["finished_seq"].to_list(),
                            strict=True))
        flight = rows.filter(pl.col("pending_seq").is_not_null())
        unseen = ends_unseen(members, entered, finished,
                             dict(zip(flight["rank"].to_list(), flight["pending_seq"].to_list(),
                                      strict=True)))
        blocking = rows.filter(pl.col("pending_seq").is_not_null()
                               & ~pl.col("rank").is_in(list(unseen)))
        if blocking.is_empty():
            continue
        n = int(blocking["pending_seq"].min())
        at_n = blocking.filter(pl.col("pending_seq") == n)
        since = int(at_n["pending_start_ns"].min())
        stall_s = (now_ns - since) / 1e9
        if stall_s < min_stall_s:
            continue
        hosts = dict(zip(rows["rank"].to_list(), rows["host"].to_list(), strict=True))
        missing = [m for m in members if _seq(entered, m) < n]
        waiting = sorted(at_n["rank"].to_list())
        done = [m for m in members if _seq(finished, m) >= n]
        stuck[pg] = (n, since, stall_s, members, missing, waiting, done, hosts,
                     at_n.row(0, named=True), unseen)
    waiting_in = {r: (pg, s[0]) for pg, s in stuck.items() for r in s[5]}
    findings = []
    for pg, (n, since, stall_s, members, missing, waiting, done, hosts, row,
             unseen) in stuck.items():
        op = row["pending_op"]
        ev = [f"pg {pg} ({row['pg_ranks']}): rank(s) {_ranks(waiting)} waiting in {op} #{n} "
              f"for {stall_s:.1f} s (a hang after {min_stall_s:.1f} s)"]
        conf = 1.0
        mute = sorted(set(members) & silent)
        if mute:
            cls, culprits = "rank not running", mute
            ev += [f"rank {r}'s agent silent for {(newest - last_seen_ns[r]) / 1e9:.1f} s "
                   "while its peers kept writing (stopped, killed or host down)" for r in mute]
        elif missing:
            cls, culprits = "never arrived", missing
            for r in missing:
                got = entered.get(r)
                where = waiting_in.get(r)
                if where is not None and where[0] != pg:
                    ev.append(f"rank {r} last entered #{got} here and is waiting in pg "
                              f"{where[0]} #{where[1]}")
                    conf = 0.5  # a consequence of the other group's hang
                elif r in unseen:
                    ev.append(f"rank {r} last entered #{got} here; every peer finished "
                              f"#{unseen[r]}..#{got} while it never saw them end: blocked in "
                              "their wait (host side) or its receive never completed")
                else:
                    ev.append(f"rank {r} last entered #{got} here and is in no collective: "
                              "stuck outside collectives (host side)" if got is not None else
                              f"rank {r} never entered a collective of this group")
        else:
            not_done = [m for m in members if m not in done]
            cls = "stuck in the collective"
            culprits = not_done or members
            ev.append(f"every member entered #{n}; {len(done)} finished it: the collective "
                      "itself does not complete (network or device)")
        findings.append(Finding(
            kind="hang", cls=cls, ranks=tuple(culprits),
            hosts=tuple(dict.fromkeys(hosts.get(r) for r in culprits if hosts.get(r))),
            pg=pg, seq=n, confidence=conf, since_ns=since, since_step=row["pending_step"],
            detected_ns=since + int(min_stall_s * 1e9),
            evidence=tuple(ev)))
    return tuple(sorted(findings, key=lambda f: (-f.confidence, f.since_ns or 0)))
