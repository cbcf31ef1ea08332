"""Islands: the ranks of a job joined through shared groups.

A rank's lateness means something against the ranks its waits can come from. A training job is
one island: data parallel joins its tensor-parallel groups, and the world group joins everyone.
Independent serving replicas (tensor-parallel decode servers that share no group) are one island
each: a slow rank of one replica is compared with its own replica, not with another server.
"""

from __future__ import annotations

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

    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for spec in events["pg_ranks"].unique().drop_nulls().cast(pl.Utf8).to_list():
        try:
            members = parse_ranks(spec)
        except ValueError:
            continue
        for m in members[1:]:
            a, b = find(members[0]), find(m)
            if a != b:
                parent[max(a, b)] = min(a, b)
    for r in events["rank"].unique().drop_nulls().to_list():
        find(int(r))
    ranks = sorted(parent)
    return pl.DataFrame({"rank": ranks, "island": [find(r) for r in ranks]},
                        schema={"rank": pl.Int32, "island": pl.Int64})


__all__ = ["rank_islands"]
