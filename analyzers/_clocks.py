"""Per-host clock offsets from the collectives themselves, so arrival times can be compared.

Durations need no shared clock; arrival *times* do, and hosts' wall clocks differ (NTP keeps
them within about a millisecond, often worse). A blocking collective bounds the offset between
two members' clocks: nobody leaves before the last member arrived, so for members ``a`` and
``b`` of one collective, ``end_a + off_a >= start_b + off_b`` and the other way round. With
``d = off_b - off_a`` (what to add to ``b``'s clock to read ``a``'s) that is
``start_a - end_b <= d <= end_a - start_b``.

One collective's window is as wide as its duration, and on a throttled link the members' exits
differ by tens of milliseconds, so no single collective is trusted. Per pair of hosts, over
many *small* collectives (the ``small_share`` with the narrowest windows): every window holds
the true offset, so when they all overlap the estimate is the middle of their intersection
(tens of microseconds wide after a few hundred collectives); when they do not (clocks that
drift during the job, a timestamp taken late), it is the median of their midpoints. Hosts are
joined to a reference host through the pairs with the most collectives (a spanning tree), so
every host gets an offset when the groups connect them.

Hosts that share no collective (pipeline stages on their own hosts, each stage's tensor- and
data-parallel groups inside it) are joined by their point-to-point messages instead
(:func:`compute_p2p_pairs`): a receive ends after its matching send was issued, so messages
both ways between two hosts bound their offset from both sides.

How close it gets depends on the job: the window can be no narrower than the shortest
collective's transfer after the last arrival. Small blocking collectives (a barrier, a loss
all-reduce) give tens of microseconds; a job of large gradient buckets on a slow network only
milliseconds (the local Gloo cluster: 6-70 ms half-windows, estimates within 0.5-8 ms of the
true offset, 0 there). ``error_ns`` says which case a job is in.
"""

from __future__ import annotations

import polars as pl

from ringwatch.analyzers._steps import SLICE_ROWS, _complete_collectives, _slices


def compute_host_pairs(events: pl.DataFrame, *, small_share: float = 0.5) -> pl.DataFrame:
    """Per pair of hosts (``a`` < ``b``), the offset window of their collectives; ``a`` is the
    first host (by name) of each collective, so the pairs form stars that the spanning tree
    of :func:`estimate_clock_offsets` joins.

    Args:
        events: Rows of one job; finished collectives every member recorded are used (per
            host and collective, its members' last start and first end).
        small_share: Share of each pair's collectives, the shortest, to use.

    Returns:
        Columns ``host_a``, ``host_b``, ``collectives``, ``offset_ns`` (the middle of the
        common window when there is one, else the median midpoint: add it to ``b``'s clock
        to read ``a``'s), ``low_ns`` / ``high_ns`` (the common window: the largest lower and the
        smallest upper bound; ``low > high`` means the windows do not agree) and
        ``spread_ns`` (the median window width) and ``error_ns`` (half the common window:
        the most the estimate can be off; null when the windows do not agree).
    """
    # Only the columns used: a filter of the full-width frame copies all of them (a
    # gigabyte at ten million rows). Everything up to the pairs' windows is per collective:
    # a whole log goes by slices of collective numbers (each holds whole collectives).
    cols = ["pg", "seq", "is_p2p", "pg_size", "host", "status", "t_start_ns", "t_end_ns"]
    keep = ((pl.col("status") == "ok") & pl.col("t_start_ns").is_not_null()
            & pl.col("t_end_ns").is_not_null() & pl.col("seq").is_not_null())
    slices = _slices(events, "seq", SLICE_ROWS)
    pairs = pl.concat([_pair_windows(events.select(cols).filter(
        keep if r is None else keep & pl.col("seq").is_between(*r)))
        for r in ([None] if slices is None else slices)])
    # Keep each pair's narrowest windows (the small, fast collectives).
    pairs = pairs.filter(pl.col("w") <= pl.col("w").quantile(small_share).over("host", "host_b"))
    out = pairs.group_by("host", "host_b").agg(
        pl.len().alias("collectives"), ((pl.col("lo") + pl.col("hi")) / 2).median().alias("mid"),
        pl.col("lo").max().alias("low_ns"), pl.col("hi").min().alias("high_ns"),
        pl.col("w").median().alias("spread_ns"))
    agree = pl.col("low_ns") <= pl.col("high_ns")
    off = pl.when(agree).then((pl.col("low_ns") + pl.col("high_ns")) / 2) \
        .otherwise(pl.col("mid"))
    err = pl.when(agree).then((pl.col("high_ns") - pl.col("low_ns")) / 2)
    return out.with_columns(off.round().cast(pl.Int64).alias("offset_ns"),
                            err.alias("error_ns")).rename({"host": "host_a"}).select(
        "host_a", "host_b", "collectives", "offset_ns", "low_ns", "high_ns", "spread_ns",
        "error_ns").sort("host_a", "host_b")


def _pair_windows(df: pl.DataFrame) -> pl.DataFrame:
    """Per collective of ``df`` (whole collectives' rows), its first host against each of
    its others: ``lo``, ``hi`` (the offset window) and ``w`` (its width)."""
    df = _complete_collectives(df)
    # Per host, its last arrival and first exit: the tightest bounds its members give.
    one = (df.select("pg", "seq", "host", "t_start_ns", "t_end_ns")
           .group_by("pg", "seq", "host")
           .agg(pl.col("t_start_ns").max().alias("s"), pl.col("t_end_ns").min().alias("e")))
    # Each collective's first host against each of its other hosts (a star, not every pair:
    # rows grow with the hosts, not with their square; the spanning tree needs no more).
    first = one.group_by("pg", "seq").agg(pl.col("host").min().alias("_a"))
    a = one.join(first, on=["pg", "seq"]).filter(pl.col("host") == pl.col("_a")).drop("_a")
    pairs = a.join(one, on=["pg", "seq"], suffix="_b").filter(pl.col("host") < pl.col("host_b"))
    pairs = pairs.with_columns(
        (pl.col("s") - pl.col("e_b")).alias("lo"), (pl.col("e") - pl.col("s_b")).alias("hi"))
    return pairs.with_columns((pl.col("hi") - pl.col("lo")).alias("w"))


_OFFSETS = {"host": pl.Utf8, "offset_ns": pl.Int64, "via": pl.Utf8, "collectives": pl.UInt32,
            "error_ns": pl.Float64}


def estimate_clock_offsets(events: pl.DataFrame, *, reference: str | None = None,
                           small_share: float = 0.5) -> pl.DataFrame:
    """Each host's clock offset against a reference host.

    Args:
        events: Rows of one job.
        reference: The host whose clock the others are read on (default: rank 0's).
        small_share: See :func:`compute_host_pairs`.

    Returns:
        Columns ``host``, ``offset_ns`` (add it to the host's wall-clock times to read them on
        the reference's clock; 0 for the reference), ``via`` (the host it was joined through),
        ``collectives`` of that pair and ``error_ns`` (the most the offset can be off, summed
        along the path; null where some pair's windows did not agree); hosts no group
        connects to the reference are left out.
    """
    pairs = compute_host_pairs(events, small_share=small_share)
    p2p = compute_p2p_pairs(events)
    if not p2p.is_empty():  # only between hosts no collective joins
        p2p = p2p.join(pairs.select(pl.col("host_a", "host_b").cast(pl.Utf8)),
                       on=["host_a", "host_b"], how="anti")
        pairs = pl.concat([pairs, p2p.select(pairs.columns)], how="vertical_relaxed")
    if reference is None:
        low = events["rank"].min() if events.height else None
        r0 = events.filter(pl.col("rank") == low) if low is not None else events.clear()
        reference = r0["host"][0] if r0.height else None
    if reference is None:
        return pl.DataFrame(schema=_OFFSETS)
    # Edges both ways: off(b) = off(a) + d(a, b) with d(a, b) = offset_ns; d(b, a) = -d(a, b).
    edges: dict[str, list[tuple[int, str, int, float | None]]] = {}
    for a, b, n, d, _lo, _hi, _spread, err in pairs.iter_rows():
        edges.setdefault(a, []).append((n, b, d, err))
        edges.setdefault(b, []).append((n, a, -d, err))
    known: dict[str, tuple] = {reference: (0, None, None, 0.0)}
    while True:  # grow the tree by the best-supported edge out of it (Prim's)
        best = None
        for h, (off, _via, _n, err_h) in known.items():
            for n, other, d, err in edges.get(h, ()):
                if other not in known and (best is None or n > best[0]):
                    total = None if err is None or err_h is None else err_h + err
                    best = (n, other, off + d, h, total)
        if best is None:
            break
        n, other, off, via, err = best
        known[other] = (off, via, n, err)
    rows = [{"host": h, "offset_ns": off, "via": via, "collectives": n, "error_ns": err}
            for h, (off, via, n, err) in known.items()]
    return pl.DataFrame(rows, schema=_OFFSETS).sort("host")


def compute_p2p_pairs(events: pl.DataFrame) -> pl.DataFrame:
    """Per pair of hosts (``a`` < ``b``), the offset window of the point-to-point messages
    between them, in :func:`compute_host_pairs`' columns (``collectives``: the messages).

    A message from ``a`` to ``b`` ends on ``b`` after it was issued on ``a``:
    ``end_b + d >= issue_a``, a lower bound on ``d`` (add it to ``b``'s clock to read
    ``a``'s); one from ``b`` to ``a`` an upper bound. A pair with messages one way only has
    no window and is left out. Sends and receives are matched as the k-th of their step
    between the two ranks."""
    cols = ["rank", "step", "idx", "op", "peer", "host", "status", "is_p2p", "t_start_ns",
            "t_end_ns"]
    if not set(cols) <= set(events.columns):
        return pl.DataFrame(schema=_PAIRS)
    p = events.select(cols).filter(
        pl.col("is_p2p") & pl.col("peer").is_not_null() & pl.col("step").is_not_null()
        & (pl.col("status") == "ok") & pl.col("t_start_ns").is_not_null()
        & pl.col("t_end_ns").is_not_null()).with_columns(pl.col("op").cast(pl.Utf8),
                                                         pl.col("host").cast(pl.Utf8))
    if p.is_empty():
        return pl.DataFrame(schema=_PAIRS)
    m = (match_sends(p, _hs="host", _s="t_start_ns")
         .select(pl.col("host").alias("_hr"), pl.col("t_end_ns").alias("_e"), "_hs", "_s")
         .filter(pl.col("_hs") != pl.col("_hr")))
    if m.is_empty():
        return pl.DataFrame(schema=_PAIRS)
    forward = pl.col("_hs") < pl.col("_hr")  # sent by a
    m = m.with_columns(pl.min_horizontal("_hs", "_hr").alias("host_a"),
                       pl.max_horizontal("_hs", "_hr").alias("host_b"),
                       pl.when(forward).then(pl.col("_s") - pl.col("_e")).alias("_lo"),
                       pl.when(~forward).then(pl.col("_e") - pl.col("_s")).alias("_hi"))
    out = (m.group_by("host_a", "host_b")
           .agg(pl.len().cast(pl.UInt32).alias("collectives"), pl.col("_lo").max().alias("low_ns"),
                pl.col("_hi").min().alias("high_ns"))
           .filter(pl.col("low_ns").is_not_null() & pl.col("high_ns").is_not_null()))
    agree = pl.col("low_ns") <= pl.col("high_ns")
    return out.with_columns(
        ((pl.col("low_ns") + pl.col("high_ns")) / 2).round().cast(pl.Int64).alias("offset_ns"),
        (pl.col("high_ns") - pl.col("low_ns")).cast(pl.Float64).alias("spread_ns"),
        pl.when(agree).then((pl.col("high_ns") - pl.col("low_ns")) / 2).alias("error_ns"),
    ).select(list(_PAIRS)).sort("host_a", "host_b")


def match_sends(p2p: pl.DataFrame, **send_cols: str) -> pl.DataFrame:
    """The receives among ``p2p`` (point-to-point rows: ``rank``, ``step``, ``idx``, ``op``,
    ``peer``), each with columns of its matching send, the k-th of their step between the
    two ranks: ``send_cols`` names a new column for each of the send's columns it takes."""
    op = pl.col("op").cast(pl.Utf8)
    send = op == "send"
    p = (p2p.sort("rank", "step", "idx")
         .with_columns(pl.when(send).then(pl.col("rank")).otherwise(pl.col("peer")).alias("_src"),
                       pl.when(send).then(pl.col("peer")).otherwise(pl.col("rank")).alias("_dst"),
                       op.alias("_op"))
         .with_columns(pl.int_range(pl.len()).over("step", "_src", "_dst", "_op").alias("_k")))
    key = ["step", "_src", "_dst", "_k"]
    sends = p.filter(send).select(*key, *(pl.col(c).alias(n) for n, c in send_cols.items()))
    return p.filter(op == "recv").join(sends, on=key).drop("_src", "_dst", "_op", "_k")


_PAIRS = {"host_a": pl.Utf8, "host_b": pl.Utf8, "collectives": pl.UInt32, "offset_ns": pl.Int64,
          "low_ns": pl.Int64, "high_ns": pl.Int64, "spread_ns": pl.Float64,
          "error_ns": pl.Float64}


def align_clocks(events: pl.DataFrame, offsets: pl.DataFrame) -> pl.DataFrame:
    """``events`` with ``t_issue_ns``, ``t_start_ns`` and ``t_end_ns`` (those it has) read on
    the reference host's clock (hosts without an offset are left as they are)."""
    cols = ("t_issue_ns", "t_start_ns", "t_end_ns")
    # hosts are categorical in the logs' rows, plain strings in the offsets
    df = events.with_columns(pl.col("host").cast(pl.Utf8).alias("_h")).join(
        offsets.select(pl.col("host").cast(pl.Utf8).alias("_h"),
                       pl.col("offset_ns").alias("_off")), on="_h", how="left")
    off = pl.col("_off").fill_null(0)
    return df.with_columns([(pl.col(c) + off).alias(c) for c in cols
                            if c in df.columns]).drop("_off", "_h")


__all__ = ["align_clocks", "compute_host_pairs", "compute_p2p_pairs", "estimate_clock_offsets",
           "match_sends"]
