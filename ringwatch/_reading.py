"""What a job's captured collectives say, in words: the demo's reading of a run.

Two per-step figures per rank (:mod:`ringwatch.analyzers`): time in collectives, and of it the
time spent waiting for a member that had not arrived yet. A compute straggler arrives last at
most collectives and waits for no one while its peers wait for it; a slow network lengthens
every rank's collectives without making anyone wait for an arrival; a hang leaves ranks in
collectives that one rank never entered. The full detectors build on the same figures.

The verdict comes from the rows alone. What a run's ground truth says was injected is shown
beside it (:func:`injected_line`), never read to reach it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Reading:
    """``verdict``: ``straggler``, ``slow from the start``, ``network``, ``hang``, ``none`` or
    ``no data``; ``rank``: the rank it points at, if one; ``lines``: the text to show."""

    verdict: str
    rank: int | None
    lines: list[str] = field(default_factory=list)


def cells(ms: dict[int, float], wait: dict[int, float] | None = None) -> str:
    if wait is None:
        return "  ".join(f"r{r}:{v:6.1f}" for r, v in ms.items())
    return "  ".join(f"r{r}:{v:6.1f}/{wait.get(r, float('nan')):5.1f}" for r, v in ms.items())


def frontier_lines(events, *, now_ns: int) -> list[str]:
    """Per rank, the collectives it is still waiting in (oldest first), or else its latest."""
    import polars as pl

    if events.is_empty():
        return []
    unseen = _ends_unseen(events)
    out = []
    for (rank,), rows in sorted(events.sort("idx").group_by("rank")):
        pending = pl.col("status") == "pending"
        # a collective in flight without a sequence number was stopped before the backend
        # took it (numbered it): its peers never saw it, so the rank entered nothing
        waiting = rows.filter(pending & (pl.col("seq").is_not_null() | pl.col("is_p2p")))
        unnumbered = rows.filter(pending & pl.col("seq").is_null() & ~pl.col("is_p2p"))
        if waiting.height and rank in unseen and not waiting["is_p2p"].any():
            r = waiting.row(-1, named=True)
            out.append(f"rank {rank} last finished {r['op']} #{r['seq']} of pg {r['pg']} by "
                       f"its peers' ends ({waiting.height} end(s) it never saw), entered "
                       "nothing since")
        elif waiting.height:
            first, last = waiting.row(0, named=True), waiting.row(-1, named=True)
            seqs = (f"#{first['seq']}" if waiting.height == 1
                    else f"#{first['seq']}..#{last['seq']} ({waiting.height} in flight)")
            out.append(f"rank {rank} waiting in {first['op']} {seqs} of pg {first['pg']} "
                       f"for {(now_ns - first['t_start_ns']) / 1e9:.1f} s")
        else:
            done = rows.filter(~pending)
            r = done.row(-1, named=True) if done.height else None
            line = (f"rank {rank} last finished {r['op']} #{r['seq']} of pg {r['pg']}, "
                    "entered nothing since" if r is not None else
                    f"rank {rank} finished no collective")
            if unnumbered.height:
                u = unnumbered.row(0, named=True)
                since = u["t_start_ns"] or u.get("t_issue_ns") or now_ns
                line += (f" (stopped while issuing {u['op']} of pg {u['pg']}, "
                         f"{(now_ns - since) / 1e9:.1f} s ago: before the backend took it)")
            out.append(line)
    return out


def _ends_unseen(events) -> set[int]:
    """Ranks whose collectives in flight, in every group they have some, read to the hang
    detector as ends the rank never saw (:func:`ringwatch.analyzers._hangs.ends_unseen`):
    its peers finished them and went on."""
    import polars as pl

    from ringwatch._schema import parse_ranks
    from ringwatch.analyzers._hangs import compute_frontier, ends_unseen

    fr = compute_frontier(events).filter(pl.col("pending_seq").is_not_null().any().over("pg"))
    flying, held = set(), set()
    for (_,), rows in fr.group_by("pg"):
        entered, finished, first = (
            dict(zip(rows["rank"].to_list(), rows[c].to_list(), strict=True))
            for c in ("entered_seq", "finished_seq", "pending_seq"))
        pending = {r: n for r, n in first.items() if n is not None}
        unseen = ends_unseen(parse_ranks(rows["pg_ranks"][0]), entered, finished, pending)
        flying |= set(pending)
        held |= set(pending) - set(unseen)
    return flying - held


def injected_line(truth: dict) -> str:
    """One line: what a run's ground truth says was injected, to show beside the reading."""
    kind = truth.get("kind") or "none"
    if kind == "none":
        return "injected: nothing (a healthy run)"
    who = (f" of rank {truth['rank']}" if truth.get("rank") is not None
           else f" of {truth['host']}" if truth.get("host") else "")
    step = truth.get("onset_step")
    when = (" from the start" if kind == "imbalance"
            else f" at step {step}" if step is not None else " (never applied)")
    about = f": {truth['description']}" if truth.get("description") else ""
    return f"injected: {kind}{who}{when}{about}"


def read_run(events, truth: dict, nproc: int, *, last_seen_ns: dict[int, int] | None = None,
             now_ns: int | None = None, min_stall_s: float | None = None) -> Reading:
    """The demo's reading of a run: what was injected, on a line of its own, then the
    verdict of :func:`interpret` from the rows. Of the ground truth only the onset step goes
    on, as where the figures split into before and after; the kind of fault, its victim and
    its outcome never reach the verdict."""
    r = interpret(events, nproc, onset_step=truth.get("onset_step"),
                  last_seen_ns=last_seen_ns, now_ns=now_ns, min_stall_s=min_stall_s)
    return Reading(r.verdict, r.rank, [injected_line(truth), *r.lines])


def interpret(events, nproc: int, *, onset_step: int | None = None,
              last_seen_ns: dict[int, int] | None = None, now_ns: int | None = None,
              min_stall_s: float | None = None) -> Reading:
    """What the captured collectives say: a verdict from the rows alone.

    A hang is a group stuck behind a collective that some member never entered, or that
    none leaves (:func:`ringwatch.analyzers.detect_hangs`); otherwise the per-step figures
    tell a compute straggler (late to every collective, waiting for no one), a rank slow
    from the first step, the network (every rank's collectives longer, nobody late; or a
    rank late because its groups cross the one host the link analyzer names) or nothing.

    Args:
        events: Every row of the job, pending ones included.
        nproc: World size.
        onset_step: Where to split the figures into a "before" and a "from" table (to show
            a run around an injected fault's onset); used when both sides hold a step of
            every rank, else the figures are read as one.
        last_seen_ns: ``rank -> newest flush`` heartbeats (``JobLogs.last_write_ns()``).
        now_ns: Wall clock a stall is measured up to (default: the newest heartbeat, else
            the newest timestamp of the rows).
        min_stall_s: How long a group must be stuck to be a hang (default: the analyzer's).
    """
    import polars as pl

    from ringwatch.analyzers import compute_phase_comm, compute_step_comm, compute_step_wait

    finished = events.filter(pl.col("status") != "pending")
    sc = compute_step_comm(finished)
    sw = compute_step_wait(finished)
    onset = onset_step
    if onset is not None:
        split = _phases_ms(compute_phase_comm(sc, onset))
        if len(split["before"]) < nproc or len(split["after"]) < nproc:
            onset = None  # a side without a step of every rank: nothing to compare
    comm = _phases_ms(compute_phase_comm(sc, onset))
    wait = _phases_ms(compute_phase_comm(sw, onset, value="wait_ns"))
    lines = []
    labels = ["all steps"] if onset is None else [f"before step {onset}", f"from step {onset}"]
    for phase, label in zip(("before", "after"), labels, strict=False):
        if comm[phase]:
            lines.append(f"{label:<16} median in collectives/waiting ms/step  "
                         f"{cells(comm[phase], wait[phase])}")
    if not events.is_empty():
        if now_ns is None:
            now_ns = max(last_seen_ns.values()) if last_seen_ns else _last_ns(events)
        hang = _hang(events, now_ns, last_seen_ns, min_stall_s)
        if hang is not None:
            return Reading("hang", hang.ranks[0] if len(hang.ranks) == 1 else None,
                           lines + _hang_lines(events, hang, now_ns))
    if sc.is_empty():
        return Reading("no data", None, lines + ["reading: no complete step recorded"])
    exit_lag = _phases_ms(compute_phase_comm(sw, onset, value="exit_lag_ns"))
    return _read_steps(finished, sw, comm, wait, exit_lag, onset, lines)


def _hang(events, now_ns: int, last_seen_ns, min_stall_s):
    """The root hang among the groups stuck at ``now_ns``, or None."""
    from ringwatch.analyzers import detect_hangs

    found = detect_hangs(events, now_ns=now_ns, last_seen_ns=last_seen_ns,
                         min_stall_s=min_stall_s)
    return found[0] if found else None


def _hang_lines(events, hang, now_ns: int) -> list[str]:
    who = (f"rank {hang.ranks[0]}" if len(hang.ranks) == 1
           else f"ranks {', '.join(map(str, hang.ranks))}")
    lines = [f"reading: the job stopped making progress at pg {hang.pg} #{hang.seq}: "
             f"a hang ({hang.cls}), {who} behind it"]
    lines += [f"  {e}" for e in hang.evidence]
    lines.append("  where each rank is:")
    lines += [f"    {line}" for line in frontier_lines(events, now_ns=now_ns)]
    return lines


def _read_steps(finished, sw, comm, wait, exit_lag, onset: int | None,
                lines: list[str]) -> Reading:
    """The reading of a job that kept going, from its per-step figures (split at
    ``onset`` when it is not None)."""
    counts = _last_counts(sw, onset)
    last = _shares(counts)
    with_base = onset is not None
    phase = "after" if with_base else "before"
    if len(wait[phase]) < 2:
        return Reading("no data", None, lines)
    late = _stands_out(exit_lag[phase], wait[phase], last[phase])
    already = (_stands_out(exit_lag["before"], wait["before"], last["before"]) if with_base
               else late)
    if late is not None:
        peers = statistics.median(v for r, v in wait[phase].items() if r != late)
        # late behind its own host's slower transfers (the link analyzer names that host
        # alone), whether it looked late before the change too or not: the network
        split = (_late_at_some_groups(finished, late, onset) if late != already else None) \
            or _behind_a_slow_link(finished, late)
        if split is not None:
            lines.append(split)
            return Reading("network", None, lines)
        was = statistics.median(v for r, v in wait["before"].items() if r != late) \
            if with_base and len(wait["before"]) > 1 else None
        # standing out a little before the onset (noise) does not make it slow from the start
        # when the wait its peers spend for it more than doubled since: a change, on it
        grew = was is not None and late in wait["before"] and peers > 2 * was + 1.0
        if late != already or grew or _last_more_often(counts, late):
            lines.append(
                f"reading: rank {late} arrives last at {last['after'][late]:.0%} of collectives "
                f"from step {onset} ({last['before'].get(late, 0):.0%} before); its peers wait "
                f"{peers:.1f} ms per step for it (was {was:.1f}), it waits "
                f"{wait['after'][late]:.1f} ms: a straggler")
            return Reading("straggler", late, lines)
        lines.append(
            f"reading: rank {late} arrives last at {last[phase][late]:.0%} of collectives"
            + (f" before and from step {onset}" if with_base else "")
            + f"; its peers wait {peers:.1f} ms per step for it, it waits "
            f"{wait[phase][late]:.1f} ms: slower from the first step (by design, or a "
            "straggler from the start)")
        return Reading("slow from the start", late, lines)
    grew = {r: comm["after"][r] - comm["before"].get(r, 0.0) for r in comm["after"]}
    if with_base and min(grew.values()) > max(0.25 * statistics.median(comm["before"].values()),
                                              5.0):
        lines.append(f"reading: every rank's time in collectives per step grew, by "
                     f"{min(grew.values()):.1f} to {max(grew.values()):.1f} ms, and no rank "
                     "arrives late: the collectives themselves got slower (network)")
        return Reading("network", None, lines)
    most = max(last[phase], key=last[phase].get) if last[phase] else None
    lines.append(f"reading: no rank stands out (wait per step {min(wait[phase].values()):.1f} "
                 f"to {max(wait[phase].values()):.1f} ms"
                 + (f"; rank {most} arrives last most often, at {last[phase][most]:.0%} of "
                    "collectives)" if most is not None else ")"))
    return Reading("none", None, lines)


def _late_at_some_groups(finished, rank: int, onset: int) -> str | None:
    """The reading when ``rank`` comes late from ``onset`` to some of its groups only (a
    compute straggler is late at every group it is in): its transfers in another group got
    slower, every member of that group alike, which makes it late to the rest; else None."""
    from ringwatch.analyzers._stragglers import compute_group_lateness

    last = finished["step"].max()
    if last is None or last < onset:
        return None
    groups = compute_group_lateness(finished, [rank], onset, int(last))
    late = groups.filter("late")["pg"].to_list()
    on_time = groups.filter(~groups["late"])["pg"].to_list()
    if not late or not on_time:
        return None
    return (f"reading: rank {rank} comes late from step {onset}, but only to group(s) "
            f"{', '.join(map(str, late))}; in {', '.join(map(str, on_time))} every member "
            "is slowed alike: those transfers got slower (network), and it is late to the "
            "rest because of them")


def _behind_a_slow_link(finished, rank: int) -> str | None:
    """The reading when the link analyzer names ``rank``'s host, and only it, as the one
    behind slower transfers: every group of the rank crosses that link, so it comes late to
    all of them, as a compute straggler would; else None."""
    import polars as pl

    from ringwatch.analyzers import detect_slow_links
    from ringwatch.analyzers._policy import is_hiccup

    hosts = finished.filter(pl.col("rank") == rank)["host"].unique().to_list()
    for f in detect_slow_links(finished):
        if list(f.hosts) == hosts and not is_hiccup(f):
            return (f"reading: rank {rank} comes late to its groups, but the transfers of "
                    f"those crossing {hosts[0]} got slower: the network (a slow link there), "
                    "not its compute")
    return None


def _phases_ms(phases) -> dict[str, dict[int, float]]:
    return {k: {r: v / 1e6 for r, v in phases.select("rank", f"{k}_ns").iter_rows()
                if v is not None} for k in ("before", "after")}


def _last_counts(step_wait, onset: int | None) -> dict[str, dict[int, tuple[float, float]]]:
    """Per phase, each rank's collectives it entered last and all its collectives."""
    import polars as pl

    from ringwatch.analyzers import phase_masks

    out = {}
    for name, cond in zip(("before", "after"), phase_masks(onset), strict=True):
        agg = step_wait.filter(cond).group_by("rank").agg(
            pl.col("last_arrivals").sum().cast(pl.Float64),
            pl.col("collectives").sum().cast(pl.Float64))
        out[name] = {r: (k, n) for r, k, n in agg.iter_rows()}
    return out


def _shares(counts: dict[str, dict[int, tuple[float, float]]]) -> dict[str, dict[int, float]]:
    """Per phase, the share of each rank's collectives that it entered last."""
    return {name: {r: k / n for r, (k, n) in per.items() if n}
            for name, per in counts.items()}


def _last_more_often(counts: dict[str, dict[int, tuple[float, float]]], rank: int, *,
                     min_z: float = 3.0) -> bool:
    """Whether ``rank`` arrives last at a share of its collectives after the onset that is
    higher than before it, beyond chance: a two-proportion z of ``min_z`` or more over the
    collectives of each side (``counts``: :func:`_last_counts`). A rank slow by design
    comes last as often before as after; one that looked slow before by noise (a loaded
    host) and then turned straggler does not.
    """
    (last_b, n_b), (last_a, n_a) = (counts[p].get(rank, (0.0, 0.0)) for p in ("before", "after"))
    if not n_b or not n_a:
        return False
    pooled = (last_b + last_a) / (n_b + n_a)
    spread = (pooled * (1 - pooled) * (1 / n_b + 1 / n_a)) ** 0.5
    return spread > 0 and (last_a / n_a - last_b / n_b) / spread >= min_z


def _stands_out(exit_lag_ms: dict[int, float], wait_ms: dict[int, float],
                last: dict[int, float], *, min_share: float = 0.5,
                min_peer_wait_ms: float = 3.0, exit_share: float = 0.25) -> int | None:
    """The rank that is late because of what it does *outside* collectives, if any.

    Healthy ranks take turns arriving last. A compute straggler arrives last at
    ``min_share`` or more of its collectives and waits less than half as long as the median
    of its peers, who wait ``min_peer_wait_ms`` or more per step; and, once in, it leaves
    with the others: its exit lag exceeds its peers' by less than ``exit_share`` of their
    wait. A rank made late by its own slow transfers (the far end of a throttled link)
    leaves each collective last, which is why it arrives last at the next, and fails that.
    """
    if len(wait_ms) < 2:
        return None
    late = min(wait_ms, key=wait_ms.get)
    peers = statistics.median(v for r, v in wait_ms.items() if r != late)
    peers_exit = statistics.median(v for r, v in exit_lag_ms.items() if r != late)
    if (last.get(late, 0.0) >= min_share and peers >= min_peer_wait_ms
            and wait_ms[late] < 0.5 * peers
            and exit_lag_ms.get(late, peers_exit) - peers_exit < exit_share * peers):
        return late
    return None


def _last_ns(events) -> int:
    import polars as pl

    return int(events.select(pl.max_horizontal(pl.col("t_end_ns").max(),
                                               pl.col("t_start_ns").max())).item())
