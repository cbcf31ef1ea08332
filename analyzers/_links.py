"""Faulty links, passively: groups whose transfers slowed down, and the hosts they share.

At a blocking collective every member leaves about when the data has gone round, so the
shortest duration among the members (the last arrival's, which did not wait) is the
collective's *transfer time*, free of anyone's lateness; its size over that time is the
group's *transfer bandwidth*. :func:`detect_slow_links` reads each group's steps as one
collective each: the step table (:mod:`~ringwatch.analyzers._step_table`: per rank, group
and step, the time the rank spent inside at least one of the group's collectives), which the
agents stream to the service, so that live and post-mortem judge the same figures; a step's
bandwidth is its bytes over its least busy member's time. (:func:`compute_group_bandwidth`
on a log's own rows sums each collective's transfer time instead: of asynchronous collectives
queued in the group's backend, each member's time after the earlier ones ended,
:func:`own_ns`.) The job's warm-up steps are neither baseline nor judged. A compute
straggler leaves it alone (it only makes the others wait); a slow link, NIC or switch port
lowers it for every group whose traffic crosses it.

A group is *slow* when its bandwidth stays below ``1 / ratio`` of its usual (its median over its
first ``baseline_steps`` steps, those before a lasting fall within them:
:mod:`~ringwatch.analyzers._link_baseline`) for ``persist`` steps in a row; of several such runs
the longest is the one reported (a slow link stays, a burst of load on the machine passes). The
bar rises with the group's own noise: where its bandwidth varies from step to step by a robust
spread ``s`` of its logarithm (Gloo's transfers are CPU work, and share a loaded host's cores),
a step is slow below ``1 / exp(noise * s)`` of the usual too, so that a few steps of load are
not a link. On a steady fabric (NCCL over InfiniBand: a few percent) the ratio rules. The
suspects are then narrowed across groups: a link is shared by every slow group that crosses
hosts (traffic inside one host does not use it) and by no healthy one, so the suspect hosts are
the hosts common to every slow multi-host group, less the hosts of the healthy multi-host
groups. Suspects that tie (a slow host and its peer share every slow group) are told apart by
their other groups: the faulty host's slow down too, if less than the ratio
(:func:`narrow_by_other_groups`). With one world group (plain DDP) every host of the group stays
a suspect: the finding says so and points at ``ringwatch probe``, whose pairwise matrix names
the host or link. Jobs with several kinds of groups (tensor, pipeline and data parallel over
different host sets) narrow it down by themselves.
"""

from __future__ import annotations

import math

import polars as pl

from ringwatch._schema import parse_ranks
from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._link_baseline import past_warmup, usual_bandwidth
from ringwatch.analyzers._link_episodes import TRANSIENT_LINK_CLASS, slow_episodes, undecided
from ringwatch.analyzers._p2p_links import (
    MIN_LINK_BYTES,
    compute_p2p_bandwidth,
    p2p_bandwidth,
)
from ringwatch.analyzers._step_table import is_step_table, step_totals
from ringwatch.analyzers._steps import (
    _KEY,
    COLLECTIVE,
    SLICE_ROWS,
    rank_row_ranges,
    running_reach,
)
from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS as _D
from ringwatch.analyzers._timing import HOST_TIMED, host_timed


def compute_group_bandwidth(events: pl.DataFrame, *, summed: bool = False) -> pl.DataFrame:
    """Per (pg, step), the group's transfer bandwidth.

    Args:
        events: Rows of one job; finished (``ok``) collectives with a step and a size that
            every member recorded, the same size on every member and at least
            :data:`MIN_LINK_BYTES`, are used.
        summed: Sum ``events`` into the step table first and read that
            (:func:`~ringwatch.analyzers._step_table.step_rows`: each group's steps, as the
            agents sum them for the service), range of ranks by range (a log's whole table
            is never held).

    Returns:
        Columns ``pg``, ``pg_ranks``, ``hosts`` (the group's hosts, sorted, comma-joined),
        ``step``, ``collectives``, ``bytes`` (sum of the collectives' sizes), ``transfer_ns``
        (sum of their transfer times: the shortest member time of each, that member's time
        the group's earlier collectives did not already hold: :func:`own_ns`) and ``MBps``
        (``bytes / transfer_ns`` in MB/s); sorted by pg then step.
    """
    # Only the columns used: every filter of the full-width frame copies all of them.
    cols = ["pg", "seq", "is_p2p", "pg_size", "pg_ranks", "group_rank", "host", "step",
            "status", "nbytes", "duration_ns", "rank", "mono_start_ns",
            *([HOST_TIMED] if HOST_TIMED in events.columns else [])]
    keep = ((pl.col("status") == "ok") & pl.col("step").is_not_null()
            & pl.col("duration_ns").is_not_null() & (pl.col("nbytes") >= MIN_LINK_BYTES))
    # A whole log (or step table) by row ranges of whole ranks: own_ns is per (group, rank),
    # and each collective's figures are sums, minima and maxima over its members, which
    # add up across ranges (a collective's members sit in several)
    ranges = rank_row_ranges(events, SLICE_ROWS)
    parts = [_partial(events, cols, keep, summed)] if ranges is None else [
        _partial(events.slice(at, n), cols, keep, summed) for at, n in ranges]
    per = pl.concat([p for p, _ in parts])
    if len(parts) > 1:
        per = per.group_by(_KEY).agg(
            pl.col("_n").sum(), pl.col("pg_size").first(), pl.col("_xfer").min(),
            pl.col("_max").max(), pl.col("_min").min(), pl.col("_g0").sum(),
            pl.col("_bytes").sum(), pl.col("step").drop_nulls().first(),
            pl.col("pg_ranks").drop_nulls().first())
    # complete collectives (every member recorded it) whose members moved one size (an
    # all-to-all with uneven splits, MoE routing, has no one bandwidth: its time follows the
    # busiest member's share), counted once (their group rank 0's row)
    done = per.filter((pl.col("_n") == pl.col("pg_size")) & (pl.col("_max") == pl.col("_min"))
                      & (pl.col("_g0") > 0))
    bw = done.group_by("pg", "step").agg(
        pl.col("pg_ranks").first(), pl.col("_g0").sum().alias("collectives"),
        pl.col("_bytes").sum().alias("bytes"),
        (pl.col("_xfer") * pl.col("_g0")).sum().alias("transfer_ns"))
    # a group's hosts: once per group, not a string per row
    hosts = pl.concat([h for _, h in parts]).group_by("pg").agg(
        pl.col("host").unique().sort().str.join(",").alias("hosts"))
    return bw.join(hosts, on="pg", how="left").with_columns(
        (pl.col("bytes") / pl.col("transfer_ns").clip(lower_bound=1) * 1e3).alias("MBps"),
    ).select("pg", "pg_ranks", "hosts", "step", "collectives", "bytes", "transfer_ns",
             "MBps").sort("pg", "step")


def _partial(events: pl.DataFrame, cols: list[str], keep: pl.Expr, summed: bool
             ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per collective ``(pg, seq, is_p2p)`` of some whole ranks' rows that ``keep`` keeps
    (their step totals where ``summed``): its members here (``_n``), their shortest own
    time (``_xfer``: :func:`own_ns`), largest and smallest size, and its group rank 0's
    rows (``_g0``), their bytes, step and ``pg_ranks``; and the (pg, host) pairs of the
    rows."""
    if summed:
        events = step_totals(events)
    rows = own_ns(events.select(c for c in cols if c in events.columns)
                  .filter(keep & COLLECTIVE))
    first = pl.col("group_rank") == 0
    per = rows.group_by(_KEY).agg(
        pl.len().alias("_n"), pl.col("pg_size").first(), pl.col("_own").min().alias("_xfer"),
        pl.col("nbytes").max().alias("_max"), pl.col("nbytes").min().alias("_min"),
        first.sum().alias("_g0"), pl.col("nbytes").filter(first).sum().alias("_bytes"),
        pl.col("step").filter(first).first(), pl.col("pg_ranks").filter(first).first())
    return per, rows.select("pg", "host").unique()


def own_ns(rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` (collectives: ``pg``, ``rank``, ``mono_start_ns``, ``duration_ns``) with
    ``_own``: each one's time that the group's earlier collectives on that rank did not
    already hold. Asynchronous collectives of a group (a DDP job's gradient buckets, issued
    within a few ms of one another) queue behind each other in its backend: the fifth one's
    duration holds the four before it, so summed durations count a transfer up to as many
    times as the ops waiting behind it, by how far the queue backed up (on a loaded host,
    three times and more, coming and going with the load). A collective's own time is the
    part of its interval after the latest end among its rank's earlier ones in the group,
    so a step's own times add up to the time its collectives held the group. A duration
    not timed on the host (a device's: kernels of one stream run one after another) is its
    own time, as is any without a start."""
    if rows.is_empty() or "mono_start_ns" not in rows.columns or "rank" not in rows.columns:
        return rows.with_columns(pl.col("duration_ns").alias("_own"))
    host = host_timed(rows) & pl.col("mono_start_ns").is_not_null()
    start = pl.col("mono_start_ns")
    ordered = _own_ordered(rows, host)
    if ordered is not None:
        return ordered
    # each (group, rank)'s rows in the order they started: a log's rows are in each rank's
    # order already (a sort of the frame cost twice the rest), others are sorted first
    if rows.select((start.diff().over("pg", "rank") < 0).any()).item():
        rows = rows.sort("pg", "rank", "mono_start_ns", nulls_last=True)
    end = pl.when(host).then(start + pl.col("duration_ns"))
    # the latest end among the earlier ones: a running maximum, one row back
    held = end.cum_max().forward_fill().shift(1).over("pg", "rank")
    overlap = (held - start).clip(lower_bound=0).fill_null(0)
    own = pl.when(host).then((pl.col("duration_ns") - overlap).clip(lower_bound=0))
    return rows.with_columns(own.otherwise(pl.col("duration_ns")).alias("_own"))


def _own_ordered(rows: pl.DataFrame, host: pl.Expr) -> pl.DataFrame | None:
    """:func:`own_ns` by whole-column passes where each (group, rank)'s rows are together
    and in the order they started (the step totals of a log, summed range by range), no
    start is missing, and every duration is known; None otherwise. The windows per (group,
    rank) were most of the link pass's time over 10,000 ranks."""
    start, g = pl.col("mono_start_ns"), pl.col("_g")
    df = rows.with_columns(pl.struct("pg", "rank").rle_id().alias("_g"))
    first = (g != g.shift(1)).fill_null(True)
    ok = df.select(start.is_not_null().all(), pl.col("duration_ns").is_not_null().all(),
                   (first | (start >= start.shift(1))).all(),
                   (g.max() + 1).alias("_runs"), pl.struct("pg", "rank").n_unique()).row(0)
    if not (ok[0] and ok[1] and ok[2] and ok[3] == ok[4]):
        return None
    # the latest end among the earlier ones: a running maximum (the smallest integer where
    # the host did not time it: no end), one row back
    floor = -(2**63)
    end = pl.when(host).then(start + pl.col("duration_ns")).otherwise(floor)
    df = running_reach(df.with_columns(end.alias("_end")), "_g", "_end")
    held = pl.when(~first & (pl.col("_reach").shift(1) > floor)).then(pl.col("_reach").shift(1))
    overlap = (held - start).clip(lower_bound=0).fill_null(0)
    own = pl.when(host).then((pl.col("duration_ns") - overlap).clip(lower_bound=0))
    return df.with_columns(own.otherwise(pl.col("duration_ns")).alias("_own")).drop(
        "_g", "_end", "_reach")


def compute_slow_groups(bw: pl.DataFrame, *, warmup_steps: int = _D.warmup_steps,
                        baseline_steps: int = _D.baseline_steps,
                        min_baseline_steps: int = _D.min_baseline_steps,
                        ratio: float = _D.link_ratio,
                        persist: int = _D.link_persist_steps,
                        noise: float = _D.link_noise,
                        transient_steps: int = _D.transient_steps,
                        usual: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per group: its usual bandwidth, and its episode of slow steps
    (:func:`~ringwatch.analyzers._link_episodes.slow_episodes`).

    Args:
        bw: Output of :func:`compute_group_bandwidth`.
        warmup_steps: The job's first steps (seen), left out where ``usual`` is None (``bw``
            then holds the job from its first step); a caller that passes ``usual`` passes
            the steps to judge.
        baseline_steps: The group's first steps after the warm-up that give its usual
            bandwidth.
        min_baseline_steps: Steps a group needs before it can be judged.
        ratio: A step is slow below ``usual / ratio`` ...
        noise: ... and below ``usual / exp(noise * spread_log)``: a group whose bandwidth
            varies much from step to step (transfers that share a loaded machine's cores)
            must fall by more than its own noise.
        persist: Slow steps in a row that make the group slow (and steps not slow in a row
            that end its episode).
        transient_steps: An episode that ended within this many steps is transient.
        usual: ``pg``, ``usual_MBps`` and, optionally, ``spread_log`` (0 where missing):
            each group's usual bandwidth when known from earlier data (an online window
            passes what the job's first steps gave).

    Returns:
        Columns ``pg``, ``pg_ranks``, ``hosts``, ``usual_MBps``, ``slow_below`` (the factor
        below the usual that makes a step slow), ``slow`` (bool),
        ``since_step`` / ``detected_step`` (the episode's first step and its ``persist``-th:
        when it became a finding), ``until_step`` (its last slow step, where it ended;
        null: still on), ``severe`` (its first slow steps fell twice as far as the bar),
        ``transient`` (it ended within ``transient_steps``, not severe), ``slow_MBps``
        (median over the episode), ``steps``, ``newest_step`` and ``on_steps`` (the group's
        steps from ``since_step`` to its newest).
    """
    if usual is None:
        bw = past_warmup(bw, warmup_steps)
        usual = usual_bandwidth(bw, baseline_steps=baseline_steps,
                                min_baseline_steps=min_baseline_steps, ratio=ratio,
                                noise=noise, persist=persist)
    if "spread_log" not in usual.columns:
        usual = usual.with_columns(pl.lit(0.0).alias("spread_log"))
    below = pl.max_horizontal(pl.lit(float(ratio)),
                              (pl.col("spread_log").fill_null(0.0) * noise).exp())
    df = bw.sort("pg", "step").join(
        usual.select("pg", "usual_MBps", below.alias("slow_below")), on="pg", how="inner")
    df = df.with_columns((pl.col("MBps") * pl.col("slow_below") < pl.col("usual_MBps"))
                         .alias("_slow"))
    eps = slow_episodes(df, persist=persist, transient_steps=transient_steps)
    out = df.group_by("pg").agg(pl.col("pg_ranks").first(), pl.col("hosts").first(),
                                pl.col("usual_MBps").first(), pl.col("slow_below").first(),
                                pl.len().alias("steps"))
    out = out.join(eps, on="pg", how="left").with_columns(
        pl.col("detected_step").is_not_null().alias("slow"),
        pl.col("transient").fill_null(False), pl.col("severe").fill_null(False))
    return out.select("pg", "pg_ranks", "hosts", "usual_MBps", "slow_below", "slow",
                      "since_step", "detected_step", "until_step", "severe", "transient",
                      "slow_MBps", "steps", "newest_step", "on_steps").sort("pg")


def suspect_hosts(groups: pl.DataFrame, *,
                  together_steps: int = 5) -> tuple[list[str], str, list[str]]:
    """The hosts common to every slow multi-host group and to no healthy one.

    One fault slows its groups at one moment: only the slow groups whose slowdown began within
    ``together_steps`` of the most slowed group's are taken together (others are counted as
    neither slow nor healthy).

    When no host is common to all the slow groups (a second, unrelated slowdown; load on the
    machine), each host is weighed by how much slower its slow groups got (the sum of
    ``log(usual / slow)``), and the heaviest are the suspects: those within a quarter of the
    heaviest, when that leaves some host out.

    Returns the suspects (sorted), how they were found (in words) and the slow groups taken
    together.
    """
    multi = groups.filter(pl.col("hosts").str.contains(","))
    slow_rows = multi.filter(pl.col("slow"))
    if slow_rows.is_empty():
        return [], "no slow group crosses hosts", []
    worst = slow_rows.sort(pl.col("usual_MBps") / pl.col("slow_MBps"), descending=True).row(
        0, named=True)
    apart = (pl.col("since_step") - worst["since_step"]).abs() > together_steps
    aside = slow_rows.filter(apart).height
    slow_rows = slow_rows.filter(~apart)
    slow = [set(h.split(",")) for h in slow_rows["hosts"].to_list()]
    used = slow_rows["pg"].to_list()
    common = set.intersection(*slow)
    healthy = set()
    for h in multi.filter(~pl.col("slow"))["hosts"].to_list():
        healthy |= set(h.split(","))
    narrowed = common - healthy
    if narrowed:
        how = (f"common to the {len(slow)} slow group(s) that cross hosts"
               + (", in no healthy one" if healthy else "")
               + (f"; {aside} other group(s) slowed at another time" if aside else ""))
        return sorted(narrowed), how, used
    if common:
        return sorted(common), (f"common to the {len(slow)} slow group(s), though healthy "
                                "groups use them too"), used
    weight: dict[str, float] = {}
    for hosts, usual, got in slow_rows.select("hosts", "usual_MBps", "slow_MBps").iter_rows():
        for h in hosts.split(","):
            weight[h] = weight.get(h, 0.0) + math.log(usual / got)
    ranked = sorted(weight.items(), key=lambda kv: -kv[1])
    top = [h for h, w in ranked if w * 1.25 >= ranked[0][1]]
    if len(top) < len(ranked):
        why = (f"no host is common to the {len(slow)} slow groups; "
               f"{', '.join(sorted(top))}'s groups slowed most (weight {ranked[0][1]:.1f} vs "
               f"{ranked[len(top)][1]:.1f} next)")
        return sorted(top), why, used
    return sorted(set.union(*slow)), "the slow groups share no host: more than one fault?", used


def narrow_by_other_groups(hosts: list[str], used: list, groups: pl.DataFrame,
                           bw: pl.DataFrame, since_step: int, *, steps: int = 10,
                           ratio: float = 1.5) -> tuple[str, str] | None:
    """One host among several suspects, from the groups that were not taken as slow.

    Suspects tie when they are in the same slow groups (every group over a slow host's link
    also crosses its peer's). The faulty host's link also carries its *other* groups, which
    slow down too, sometimes less than the slow-group ratio (small, latency-bound transfers)
    or in a run that began later; its peer's other groups do not slow at all. For each
    suspect, its other multi-host groups' slowdown is their usual bandwidth over their median
    over ``since_step`` and the ``steps - 1`` after it, the largest of them counting.

    Returns (the host, the reason in words) when exactly one suspect's other groups slowed at
    least ``ratio`` times and every other suspect's at least ``ratio`` times less than that;
    None otherwise (also when a suspect has no other group to compare with).
    """
    after = (bw.filter(pl.col("step").is_between(since_step, since_step + steps - 1))
             .group_by("pg").agg(pl.col("MBps").median().alias("_after")))
    others = (groups.filter(pl.col("hosts").str.contains(",") & ~pl.col("pg").is_in(used))
              .join(after, on="pg").filter(pl.col("_after") > 0)
              .with_columns((pl.col("usual_MBps") / pl.col("_after")).alias("_x")))
    worst: dict[str, tuple[float, str]] = {}
    for pg, group_hosts, x in others.select("pg", "hosts", "_x").iter_rows():
        for h in set(group_hosts.split(",")) & set(hosts):
            if h not in worst or x > worst[h][0]:
                worst[h] = (x, pg)
    if set(worst) != set(hosts):
        return None
    ranked = sorted(worst.items(), key=lambda kv: -kv[1][0])
    (top, (x_top, pg_top)), rest = ranked[0], ranked[1:]
    if x_top < ratio or any(x * ratio > x_top for _, (x, _pg) in rest):
        return None
    why = (f"{top}'s other groups slowed too (pg {pg_top} {x_top:.1f}x slower from step "
           f"{since_step}), "
           + ", ".join(f"{h}'s hardly (pg {pg} {x:.1f}x)" for h, (x, pg) in rest))
    return top, why


def detect_slow_links(events: pl.DataFrame, *, warmup_steps: int = _D.warmup_steps,
                      baseline_steps: int = _D.baseline_steps,
                      min_baseline_steps: int = _D.min_baseline_steps,
                      ratio: float = _D.link_ratio,
                      persist: int = _D.link_persist_steps, noise: float = _D.link_noise,
                      transient_steps: int = _D.transient_steps,
                      usual: pl.DataFrame | None = None,
                      recv: pl.DataFrame | None = None,
                      hold_undecided: bool = False) -> tuple[Finding, ...]:
    """Slow communication: groups whose transfer bandwidth dropped, and the suspect hosts.

    Args:
        events: Rows of one job (a whole log or an online window).
        warmup_steps, baseline_steps, min_baseline_steps, ratio, persist, noise,
        transient_steps, usual: See :func:`compute_slow_groups`.
        recv: The job's send/recv as a :func:`~ringwatch.analyzers._p2p_links.receive_table`
            (the service's, from the agents' sums); None reads it from ``events``.
        hold_undecided: The job goes on (live): a group whose episode is still on and may
            yet end as a hiccup (:func:`~ringwatch.analyzers._link_episodes.undecided`) is
            not slow yet, so that live shows what the post-mortem pass will.

    Returns:
        One :class:`Finding` of kind ``slow_link`` when any group crossing hosts is slow:
        class ``slow communication``; ``hosts`` the suspects (one host: that host's link or
        NIC; several: run ``ringwatch probe`` over them); ``ranks`` the slow groups'
        members; ``pg`` the first slow collective group (a ``p2p`` direction only where
        none is); ``since_step`` / ``detected_step`` the earliest among the slow groups;
        ``gain_s_per_step`` the transfer time per step the slow groups lost against their
        usual bandwidth; ``until_step`` the latest end where every slow group recovered.
        Where every slow group recovered within ``transient_steps`` (and the job went on),
        the finding is a hiccup instead: class ``transient slow link``
        (:mod:`~ringwatch.analyzers._link_episodes`).
    """
    # collectives' groups, from the step table (the service's rows are it already: the same
    # figures live and post-mortem), and send/recv between hosts (a pipeline's stages on
    # other hosts)
    bw = pl.concat([compute_group_bandwidth(events, summed=not is_step_table(events))
                    .with_columns(pl.col("pg").cast(pl.Utf8)),
                    compute_p2p_bandwidth(events) if recv is None else p2p_bandwidth(recv)],
                   how="vertical_relaxed")
    if bw.is_empty():
        return ()
    groups = compute_slow_groups(bw, warmup_steps=warmup_steps, baseline_steps=baseline_steps,
                                 min_baseline_steps=min_baseline_steps, ratio=ratio,
                                 persist=persist, noise=noise, transient_steps=transient_steps,
                                 usual=usual)
    if hold_undecided:
        groups = groups.with_columns(pl.col("slow") & ~undecided(
            persist=persist, transient_steps=transient_steps).fill_null(False))
    lasting = _finding(groups.with_columns(pl.col("slow") & ~pl.col("transient")), bw, ratio)
    if lasting is not None:
        return (lasting,)
    # none lasting: the transient ones, as one hiccup (each group's longest)
    transient = _finding(groups, bw, ratio)
    return () if transient is None else (transient,)


def _finding(groups: pl.DataFrame, bw: pl.DataFrame, ratio: float) -> Finding | None:
    """The finding of ``groups``' slow ones that cross hosts, if any: a transient one
    (:data:`TRANSIENT_LINK_CLASS`) where they all are."""
    slow = groups.filter(pl.col("slow") & pl.col("hosts").str.contains(","))
    if slow.is_empty():
        return None
    hosts, how, used = suspect_hosts(groups)
    slow = slow.filter(pl.col("pg").is_in(used))
    ranks = sorted({r for pr in slow["pg_ranks"].to_list() for r in parse_ranks(pr)})
    first = slow.sort("since_step").row(0, named=True)
    # the finding's group: the first slow collective group, else (send/recv alone: a
    # ``p2p`` direction, which a late sender slows as much as a slow link) the first one
    named = slow.sort(pl.col("pg").str.starts_with("p2p "), "since_step").row(0, named=True)
    tie_broken = None
    if len(hosts) > 1:
        tie_broken = narrow_by_other_groups(hosts, used, groups, bw, first["since_step"])
        if tie_broken is not None:
            how = f"{how}; of those, {tie_broken[1]}"
            hosts = [tie_broken[0]]
    lost_ns = 0.0
    evidence = []
    for g in slow.sort("since_step").iter_rows(named=True):
        within = (pl.col("pg") == g["pg"]) & (pl.col("step") >= g["since_step"])
        if g["until_step"] is not None:
            within &= pl.col("step") <= g["until_step"]
        after = bw.filter(within)
        xfer = float(after["transfer_ns"].median())
        lost_ns += xfer * (1 - g["slow_MBps"] / g["usual_MBps"])
        what = (f"send/recv {g['pg'][4:].replace('>', ' -> ')} (ranks {g['pg_ranks']}, its "
                "fastest receive each step)" if g["pg"].startswith("p2p ") else
                f"pg {g['pg']} (ranks {g['pg_ranks']}, hosts {g['hosts']})")
        when = (f"from step {g['since_step']}" if g["until_step"] is None else
                f"in steps {g['since_step']}-{g['until_step']}, then as usual")
        evidence.append(
            f"{what}: transfers at {g['slow_MBps']:.2f} MB/s {when}, usually "
            f"{g['usual_MBps']:.2f} MB/s ({g['usual_MBps'] / g['slow_MBps']:.1f}x slower"
            + (f"; its steps vary so much that only {g['slow_below']:.1f}x counts"
               if g["slow_below"] > ratio else "") + ")")
    n_multi = groups.filter(pl.col("hosts").str.contains(",")).height
    evidence.append(f"suspect host(s) {', '.join(hosts)}: {how} ({slow.height} of {n_multi} "
                    "group(s) and send/recv direction(s) across hosts slow)")
    if len(hosts) > 1:
        evidence.append(f"run `ringwatch probe` over {', '.join(hosts)} to tell which host "
                        "or link: a slow row is a sender side, a slow column a receiver "
                        "side, a single cell the link")
    worst = float((slow["usual_MBps"] / slow["slow_MBps"]).max())
    # several suspects: half as sure; one named by its other groups only: three quarters
    surety = 1.0 if len(hosts) == 1 and tie_broken is None else (
        0.75 if tie_broken is not None else 0.5)
    ends = slow["until_step"]
    return Finding(
        kind="slow_link", cls=TRANSIENT_LINK_CLASS if slow["transient"].all()
        else "slow communication", ranks=tuple(ranks), hosts=tuple(hosts),
        pg=named["pg"], confidence=min(1.0, (worst - 1) / ratio) * surety,
        since_step=first["since_step"], detected_step=first["detected_step"],
        until_step=None if ends.null_count() else int(ends.max()),
        gain_s_per_step=lost_ns / 1e9, evidence=tuple(evidence))


def explain_by_links(stragglers: tuple[Finding, ...], links: tuple[Finding, ...],
                     *, around_steps: int = 5) -> tuple[Finding, ...]:
    """Stragglers and slow-link findings together: a "straggler" on the one suspect host of a
    slow link, starting with it, is that host's own slow transfers (every group it is in
    crosses the link, so it comes late to all of them, as a compute straggler would): it is
    folded into the link finding's evidence instead of standing as a straggler.

    The other way round: a slow link that names no one host (several suspects) and starts
    while a compute straggler on one of them is late is the straggler's doing (stopped or
    busy inside a collective, it holds every member's transfer up): it is folded into the
    straggler. So is one that rests on send/recv alone (:func:`compute_p2p_bandwidth`),
    whatever its suspects, where the straggler is one of its ranks: a late sender's receivers
    wait for it as for a slow link; and no straggler is folded into such a one, nor into a
    transient one (a hiccup: :mod:`~ringwatch.analyzers._link_episodes`).
    """
    from dataclasses import replace

    out_links = list(links)
    kept = []
    for s in stragglers:
        hit = None
        for i, f in enumerate(out_links):
            if (len(f.hosts) == 1 and s.hosts == f.hosts and s.since_step is not None
                    and not _p2p_only(f) and f.cls != TRANSIENT_LINK_CLASS
                    and f.since_step is not None
                    and abs(s.since_step - f.since_step) <= around_steps):
                hit = i
                break
        if hit is None or s.kind != "straggler":
            kept.append(s)
            continue
        f = out_links[hit]
        out_links[hit] = replace(f, evidence=f.evidence + (
            f"rank {s.ranks[0]} on {s.hosts[0]} comes late to its groups from step "
            f"{s.since_step}: its own transfers cross the slow link (not a compute "
            "straggler)",))
    for f in list(out_links):
        p2p = _p2p_only(f)
        if (len(f.hosts) < 2 and not p2p) or f.since_step is None:
            continue
        for i, s in enumerate(kept):
            end = s.until_step if s.until_step is not None else f.since_step
            if (s.kind == "straggler" and s.hosts and s.hosts[0] in f.hosts
                    and (not p2p or s.ranks[0] in f.ranks) and s.since_step is not None
                    and s.since_step - around_steps <= f.since_step <= end + around_steps):
                kept[i] = replace(s, evidence=s.evidence + ((
                    f"its send/recv across hosts is slower from step {f.since_step}: the "
                    "receives wait for its sends") if p2p else (
                    f"the groups it is in transfer slower from step {f.since_step} (no one "
                    "host to blame): they wait for it inside their collectives"),))
                out_links.remove(f)
                break
    return tuple(kept) + tuple(out_links)


def _p2p_only(f: Finding) -> bool:
    """Whether a slow-link finding rests on send/recv alone (its group is a ``p2p``
    direction: :func:`detect_slow_links` names a collective group where there is one)."""
    return f.kind == "slow_link" and (f.pg or "").startswith("p2p ")


__all__ = ["compute_group_bandwidth", "compute_p2p_bandwidth", "compute_slow_groups",
           "detect_slow_links",
           "explain_by_links", "narrow_by_other_groups", "suspect_hosts", "usual_bandwidth"]
