"""Islands: the ranks of a job joined through shared groups.

A rank's lateness means something against the ranks its waits can come from. A training job is
one island: data parallel joins its tensor-parallel groups, and the world group joins everyone.
Independent serving replicas (tensor-parallel decode servers that share no group) are one island
each: a slow rank of one replica is compared with its own replica, not with another server.
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl


def rank_islands(events: pl.DataFrame) -> pl.DataFrame:
    """``rank``, ``island``: the ranks joined through shared groups (the connected parts of
    the job's communication). A training job is one island (data parallel joins its tensor
    parallel groups); independent serving replicas are one island each, and a rank is only
    compared with the ranks its waits can come from. ``island`` is the lowest rank of it."""
    if "pg_ranks" not in events.columns:
        return pl.DataFrame({"rank": events["rank"].unique().drop_nulls(),
                             }).with_columns(pl.lit(0).alias("island"))
    from ringwatch._schema import parse_ranks

    groups = []
    for spec in events["pg_ranks"].unique().drop_nulls().cast(pl.Utf8).to_list():
        try:
            groups.append(parse_ranks(spec))
        except ValueError:
            continue
    low = linked(groups + [[int(r)] for r in events["rank"].unique().drop_nulls().to_list()])
    ranks = sorted(low)
    return pl.DataFrame({"rank": ranks, "island": [low[r] for r in ranks]},
                        schema={"rank": pl.Int32, "island": pl.Int64})


def linked(groups: Iterable[Iterable[int]]) -> dict[int, int]:
    """``node -> the lowest node it is linked to``: the connected parts of ``groups`` (each
    an iterable of nodes joined together; a single node stands alone)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for members in groups:
        members = [int(m) for m in members]
        for m in members:
            a, b = find(members[0]), find(m)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {x: find(x) for x in sorted(parent)}


__all__ = ["linked", "rank_islands"]
