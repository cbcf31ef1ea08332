"""Which process group each Gloo worker thread of a profiler trace serves, across ranks.

A ``gloo:<op>`` span names no group. Each Gloo group has its own ``GLOO_THREADS`` worker
threads, started as the group is made, and ``distributedInfo.pg_config`` lists a rank's groups
in the order they were made; so a rank's worker threads sorted by id, in runs of
``GLOO_THREADS``, are its groups in order, less the groups whose threads did nothing while
traced (an idle world group beside dp and tp groups, say; a group with one thread busy and
one idle is not told apart). Which groups those are is read from
all the ranks together: the fewest group names that, left out on every rank, leave each rank
as many groups as it has thread runs, and give every remaining group's members the same
collectives (op and element count) on the threads it is mapped to. One such set: the threads
are mapped; none or several: the spans are left out, and the source says so.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

#: Gloo worker threads per process group (``ProcessGroupGloo.Options.threads`` default).
GLOO_THREADS = 2
#: Sets of idle groups tried at most.
MAX_TRIES = 4096


@dataclass
class Unmapped:
    """One rank's Gloo threads that could not be mapped from its own trace.

    Attributes:
        rank: The rank.
        runs: Its worker threads, sorted, in runs of ``GLOO_THREADS``.
        groups: Its Gloo groups (``pg_config`` entries), in the order they were made.
        sigs: Per run, the collectives on its threads: ``Counter((op family, numel))``.
    """

    rank: int
    runs: list[tuple[int, ...]]
    groups: list[dict]
    sigs: list[Counter]


def thread_runs(tids: list[int]) -> list[tuple[int, ...]]:
    """Thread ids sorted, in runs of ``GLOO_THREADS``: one run per group, in the order the
    groups were made. Ids are not consecutive within a group (the ranks on one host start
    threads at the same time, from one pool of ids), only in the same order."""
    ids = sorted(set(tids))
    return [tuple(ids[i:i + GLOO_THREADS]) for i in range(0, len(ids), GLOO_THREADS)]


def resolve(unmapped: list[Unmapped], busy: set[str]) -> dict[int, dict[int, dict]] | None:
    """``rank -> {tid -> group}`` for every rank of ``unmapped``, or None if not one answer.

    Args:
        unmapped: The ranks whose threads their own trace could not map.
        busy: Group names seen busy on ranks that were mapped (never idle).
    """
    names = sorted({str(g.get("pg_name")) for u in unmapped for g in u.groups} - busy)
    tries = 0
    for size in range(len(names) + 1):
        found = []
        for idle in itertools.combinations(names, size):
            tries += 1
            if tries > MAX_TRIES:
                return None
            maps = _try(unmapped, set(idle))
            if maps is not None:
                found.append(maps)
        if found:
            return found[0] if len(found) == 1 else None
    return None


def _try(unmapped: list[Unmapped], idle: set[str]) -> dict[int, dict[int, dict]] | None:
    maps: dict[int, dict[int, dict]] = {}
    sigs: dict[str, Counter] = {}
    for u in unmapped:
        active = [g for g in u.groups if str(g.get("pg_name")) not in idle]
        if len(active) != len(u.runs):
            return None
        for group, sig in zip(active, u.sigs, strict=True):
            name = str(group.get("pg_name"))
            if sigs.setdefault(name, sig) != sig:
                return None  # the group's members did not do the same collectives
        maps[u.rank] = {t: g for run, g in zip(u.runs, active, strict=True) for t in run}
    return maps


__all__ = ["GLOO_THREADS", "Unmapped", "resolve", "thread_runs"]
