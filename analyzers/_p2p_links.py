"""Send/recv between hosts as link evidence: each direction's transfer bandwidth per step.

A pipeline's stages often sit on different hosts, so that its only traffic between them is
send/recv. A receive's duration holds the wait for its sender (the stage before it still
computing) and the transfer; the step's *fastest* receive over a direction (its size over its
duration) is the one that waited least, as a collective's shortest member is: in a pipeline's
steady state some receive finds its data already sent.

Two stages, so that the service and ``ringwatch analyze`` read the same figures:

* :func:`receive_table`: per receiving rank, sender and step, the number of receives and the
  fastest one's size and duration. Post-mortem builds it from the rows; live, each agent sums
  its own ranks' receives (``ringwatch.agent.sidecar._step_work``) and the service joins the
  hosts (``ringwatch.service._analysis.recv_table``).
* :func:`p2p_bandwidth`: per direction between two hosts and step, the bandwidth, in
  :func:`~ringwatch.analyzers._links.compute_group_bandwidth`'s columns, to be judged like a
  group's.
"""

from __future__ import annotations

import polars as pl

from ringwatch._schema import format_ranks

#: Transfers smaller than this are latency-bound on any fabric (a count exchange, a flag):
#: their time says nothing about bandwidth.
MIN_LINK_BYTES = 4096

#: The receive table's columns (:func:`receive_table`).
RECV_SCHEMA = {"rank": pl.Int64, "host": pl.Utf8, "peer": pl.Int64, "peer_host": pl.Utf8,
               "step": pl.Int64, "receives": pl.UInt32, "nbytes": pl.Int64,
               "duration_ns": pl.Int64}

_BW_SCHEMA = {"pg": pl.Utf8, "pg_ranks": pl.Utf8, "hosts": pl.Utf8, "step": pl.Int64,
              "collectives": pl.UInt32, "bytes": pl.Int64, "transfer_ns": pl.Int64,
              "MBps": pl.Float64}


def receive_table(events: pl.DataFrame) -> pl.DataFrame:
    """Per (receiving rank, sender, step): its receives and the fastest one, in
    :data:`RECV_SCHEMA` (``host`` the receiver's, ``peer_host`` the sender's).

    Finished receives with a step, a sender, a duration and at least :data:`MIN_LINK_BYTES`
    count; ``duration_ns`` is the analyzers' (a device duration where there is one, none for
    an end only the NCCL watchdog saw: ``ringwatch.analyzers._timing``)."""
    cols = ["rank", "host", "peer", "op", "is_p2p", "status", "step", "nbytes", "duration_ns"]
    if not set(cols) <= set(events.columns):
        return pl.DataFrame(schema=RECV_SCHEMA)
    recv = (events.lazy().select(cols)
            .filter(pl.col("is_p2p") & (pl.col("op") == "recv") & (pl.col("status") == "ok")
                    & pl.col("step").is_not_null() & pl.col("peer").is_not_null()
                    & (pl.col("duration_ns") > 0) & (pl.col("nbytes") >= MIN_LINK_BYTES))
            .with_columns((pl.col("nbytes") / pl.col("duration_ns")).alias("_rate"))
            .group_by("rank", "peer", "step")
            .agg(pl.col("host").first().cast(pl.Utf8),
                 pl.len().cast(pl.UInt32).alias("receives"),
                 pl.col("nbytes").get(pl.col("_rate").arg_max()),
                 pl.col("duration_ns").get(pl.col("_rate").arg_max()))
            .collect())
    host_of = (events.lazy().select(pl.col("rank").alias("peer"),
                                    pl.col("host").alias("peer_host"))
               .unique("peer").collect()  # then the cast: not a string for every row
               .with_columns(pl.col("peer_host").cast(pl.Utf8)))
    return (recv.join(host_of.with_columns(pl.col("peer").cast(recv["peer"].dtype)),
                      on="peer", how="left")
            .select([pl.col(c).cast(t) for c, t in RECV_SCHEMA.items()])
            .sort("rank", "peer", "step"))


def p2p_bandwidth(recv: pl.DataFrame) -> pl.DataFrame:
    """Per direction between two hosts and step, the send/recv transfer bandwidth, in
    :func:`~ringwatch.analyzers._links.compute_group_bandwidth`'s columns: ``pg``
    ``p2p host_a>host_b``, ``collectives`` the receives, ``bytes`` and ``transfer_ns`` the
    fastest receive's times the receives per receiving rank (what one rank's step moves at
    that rate).

    Args:
        recv: A :func:`receive_table`; receives inside one host, or from a sender whose host
            is unknown, are left out.
    """
    pairs = (recv.filter(pl.col("host").is_not_null() & pl.col("peer_host").is_not_null()
                         & (pl.col("host") != pl.col("peer_host")) & (pl.col("duration_ns") > 0))
             .with_columns(pl.concat_str("peer_host", pl.lit(">"), "host").alias("_dir"),
                           (pl.col("nbytes") / pl.col("duration_ns")).alias("_rate")))
    if pairs.is_empty():
        return pl.DataFrame(schema=_BW_SCHEMA)
    members = {d: format_ranks(sorted({int(x) for x in rs} | {int(x) for x in ps}))
               for d, rs, ps in pairs.group_by("_dir").agg(
                   pl.col("rank").unique(), pl.col("peer").unique()).iter_rows()}
    fastest = pl.col("_rate").arg_max()
    each = pl.col("receives").sum() / pl.col("rank").n_unique()  # per receiving rank
    per = (pairs.group_by("_dir", "step")
           .agg(pl.col("peer_host").first().alias("_src"), pl.col("host").first().alias("_dst"),
                pl.col("receives").sum().cast(pl.UInt32).alias("collectives"),
                (pl.col("nbytes").get(fastest) * each).round().cast(pl.Int64).alias("bytes"),
                (pl.col("duration_ns").get(fastest) * each).round().cast(pl.Int64)
                .alias("transfer_ns")))
    return per.select(
        pl.concat_str(pl.lit("p2p "), "_dir").alias("pg"),
        pl.col("_dir").replace_strict(members, return_dtype=pl.Utf8).alias("pg_ranks"),
        pl.concat_str(pl.min_horizontal("_src", "_dst"), pl.lit(","),
                      pl.max_horizontal("_src", "_dst")).alias("hosts"),
        pl.col("step").cast(pl.Int64), "collectives", "bytes", "transfer_ns",
        (pl.col("bytes") / pl.col("transfer_ns") * 1e3).alias("MBps"),
    ).sort("pg", "step")


def compute_p2p_bandwidth(events: pl.DataFrame) -> pl.DataFrame:
    """:func:`p2p_bandwidth` of the rows' :func:`receive_table`."""
    return p2p_bandwidth(receive_table(events))


__all__ = ["MIN_LINK_BYTES", "RECV_SCHEMA", "compute_p2p_bandwidth", "p2p_bandwidth",
           "receive_table"]
