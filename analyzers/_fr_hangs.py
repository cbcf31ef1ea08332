"""Hangs from Flight Recorder dumps alone: who is behind, who is stuck inside, what mismatched.

A set of dumps is one snapshot per rank, usually taken because something went wrong (a
watchdog timeout, an error), with no heartbeat and, on Gloo, no completion times. Per process
group, the lowest collective still pending on some member, #N, is the group's frontier; when it
has been pending far longer than the job ever paused between collectives, the group is stuck:

- members that never entered #N are **behind**: a rank pending in another group is a knock-on
  (it waits there), one in no collective is stuck outside collectives (host side), one with no
  dump at all is not running (killed, crashed, its host down);
- when every member entered #N, those that did not finish it while others did are **stuck
  inside** it; when none finished, the collective itself does not complete (network or device)
  and the dumps cannot tell which member (lower confidence);
- members whose #N (or any common number) differs in op, dtype or size from the others' is a
  **mismatched collective**: the minority is named.

Across groups, the ranks whose absence explains the others are root causes (top confidence);
groups stuck only because their missing members wait elsewhere are consequences
(``knock_on_confidence``). Input: the event schema (``docs/schema.md``) as the Flight Recorder
reader makes it (``ringwatch.inputs._fr``), pending rows included, and each rank's dump time.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from ringwatch._schema import parse_ranks
from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._hangs import compute_frontier

#: The columns :func:`detect_dump_hangs` reads.
DUMP_COLUMNS = ("rank", "host", "idx", "pg", "pg_ranks", "seq", "op", "is_p2p", "status",
                "dtype", "nbytes_in", "t_issue_ns", "t_start_ns", "step")
# Ops whose members legitimately pass different sizes (only the op is compared).
_ANY_SIZE = ("gather", "scatter", "all_to_all", "all_to_all_single", "coalesced", "unknown")


@dataclass(frozen=True, kw_only=True)
class DumpHangThresholds:
    """When a group in a set of dumps is stuck, and how sure the findings are.

    Attributes:
        stall_pauses: The frontier must have been pending this many times the job's usual
            longest pause between two collectives of a rank (default 10: a collective in
            flight in a healthy job is pending for less than one step).
        min_gaps: Gaps a rank's record needs for its longest pause to count (default 5);
            with none, a pending frontier with a member behind counts as stuck (dumps are
            taken when something is wrong), and the evidence says so.
        knock_on_confidence: Confidence of a group stuck only because its missing members
            wait in another group, and of a collective none of whose members finished
            (default 0.5).
    """

    stall_pauses: float = 10.0
    min_gaps: int = 5
    knock_on_confidence: float = 0.5


def compute_usual_pause_ns(events: pl.DataFrame, *, min_gaps: int = 5) -> int | None:
    """The job's usual longest pause (ns): per rank, the longest gap between the issue times
    of consecutive collectives in the later half of its record (the earlier half of a short
    record holds the start-up: process groups, DDP's construction); the median over ranks with
    ``min_gaps`` such gaps. ``None`` when no rank has enough."""
    df = (events.select("rank", "idx", "t_issue_ns").filter(pl.col("t_issue_ns").is_not_null())
          .sort("rank", "idx")
          .with_columns(pl.col("t_issue_ns").diff().over("rank").alias("_gap"),
                        pl.int_range(pl.len()).over("rank").alias("_i"),
                        pl.len().over("rank").alias("_n")))
    df = df.filter(pl.col("_i") >= pl.col("_n") // 2)
    per = df.group_by("rank").agg(pl.col("_gap").max(), pl.col("_gap").count().alias("_n"))
    per = per.filter(pl.col("_n") >= min_gaps)["_gap"].drop_nulls()
    return None if per.is_empty() else int(per.median())


def compute_mismatches(events: pl.DataFrame) -> pl.DataFrame:
    """Collective numbers whose members disagree on what the collective is.

    Returns:
        Columns ``pg``, ``seq``, ``rank``, ``op``, ``dtype``, ``nbytes_in``, ``sig`` (a
        string), one row per member that recorded the number, for the numbers where the
        signatures differ; sorted by pg, seq, rank.
    """
    df = events.select("pg", "seq", "rank", "op", "dtype", "nbytes_in", "is_p2p").filter(
        ~pl.col("is_p2p") & pl.col("seq").is_not_null()).drop("is_p2p")
    loose = pl.col("op").cast(pl.String).is_in(_ANY_SIZE)
    df = df.with_columns(pl.when(loose).then(pl.col("op").cast(pl.String)).otherwise(
        pl.concat_str([pl.col("op").cast(pl.String), pl.col("dtype").cast(pl.String)
                       .fill_null("?"), pl.col("nbytes_in").cast(pl.String).fill_null("?")],
                      separator=" ")).alias("sig"))
    bad = df.group_by("pg", "seq").agg(pl.col("sig").n_unique().alias("_k")).filter(
        pl.col("_k") > 1).drop("_k")
    return df.join(bad, on=["pg", "seq"], how="semi").sort("pg", "seq", "rank")


def _ranks(rs) -> str:
    return ",".join(str(r) for r in rs)


def detect_dump_hangs(events: pl.DataFrame, *, dumped_ns: dict[int, int],
                      thresholds: DumpHangThresholds | None = None) -> tuple[Finding, ...]:
    """Stuck groups, their culprits and mismatched collectives, from one set of dumps.

    Args:
        events: The dumps' rows (pending ones included), columns :data:`DUMP_COLUMNS`.
        dumped_ns: ``rank -> wall ns`` each rank's dump was taken; a member of a group
            that is not a key left no dump.
        thresholds: See :class:`DumpHangThresholds`.

    Returns:
        Findings (kind ``hang``), root causes first: ``mismatched collective`` (the
        minority), ``rank not running`` (no dump), ``never arrived`` (behind, in no
        collective), ``stuck in the collective``; consequences at ``knock_on_confidence``.
    """
    th = thresholds or DumpHangThresholds()
    usual = compute_usual_pause_ns(events, min_gaps=th.min_gaps)
    limit_ns = None if usual is None else int(th.stall_pauses * usual)
    fr = compute_frontier(events)
    hosts = dict(events.select("rank", "host").unique("rank").iter_rows())
    pending_at: dict[int, list[tuple[str, int]]] = {}
    for pg, rank, seq in fr.filter(pl.col("pending_seq").is_not_null()).select(
            "pg", "rank", "pending_seq").iter_rows():
        pending_at.setdefault(rank, []).append((str(pg), seq))
    mism = compute_mismatches(events)
    first_mismatch: dict[str, tuple[int, dict[int, str]]] = {}
    for (pg, seq), rows in mism.group_by("pg", "seq", maintain_order=True):
        if str(pg) not in first_mismatch:
            first_mismatch[str(pg)] = (seq, dict(zip(rows["rank"], rows["sig"], strict=True)))
    dumped = set(dumped_ns)
    findings: list[Finding] = []
    explained_mismatch: set[str] = set()
    named_missing: set[int] = set()

    def host_of(rs) -> tuple[str, ...]:
        return tuple(dict.fromkeys(h for r in rs if (h := hosts.get(r))))

    def finding(cls, ranks, pg, seq, conf, since, ev) -> Finding:
        return Finding(kind="hang", cls=cls, ranks=tuple(ranks), hosts=host_of(ranks), pg=pg,
                       seq=seq, confidence=conf, since_ns=since, evidence=tuple(ev),
                       detected_ns=None if since is None or limit_ns is None
                       else since + limit_ns)

    def mismatch_finding(pg: str, seq: int, sigs: dict[int, str], head: str) -> Finding:
        counts: dict[str, list[int]] = {}
        for r, s in sigs.items():
            counts.setdefault(s, []).append(r)
        ordered = sorted(counts.items(), key=lambda kv: -len(kv[1]))
        clear = len(ordered[0][1]) > len(ordered[1][1])
        culprits = sorted(r for s, rs in ordered[1:] for r in rs) if clear else sorted(sigs)
        ev = [head] + [f"rank(s) {_ranks(sorted(rs))}: {s}" for s, rs in ordered]
        if not clear:
            ev.append("no majority: the dumps cannot tell which side is wrong")
        return finding("mismatched collective", culprits, pg, seq,
                       1.0 if clear else th.knock_on_confidence, None, ev)

    fr = fr.filter(pl.col("pending_seq").is_not_null().any().over("pg"))
    for (pg,), rows in fr.group_by("pg", maintain_order=True):
        pg = str(pg)
        blocking = rows.filter(pl.col("pending_seq").is_not_null())
        n = int(blocking["pending_seq"].min())
        at_n = blocking.filter(pl.col("pending_seq") == n)
        since = at_n["pending_start_ns"].min()
        ages = [dumped_ns[r] - t for r, t in at_n.select("rank", "pending_start_ns").iter_rows()
                if r in dumped_ns and t is not None]
        stall_ns = max(ages) if ages else None
        members = parse_ranks(rows["pg_ranks"][0])
        entered = dict(zip(rows["rank"], rows["entered_seq"], strict=True))
        finished = dict(zip(rows["rank"], rows["finished_seq"], strict=True))
        behind = [m for m in members if m in dumped and (entered.get(m) or 0) < n]
        missing = [m for m in members if m not in dumped]
        waiting = sorted(at_n["rank"].to_list())
        mm = first_mismatch.get(pg)
        if mm is not None and mm[0] == n:
            explained_mismatch.add(pg)
            findings.append(mismatch_finding(pg, n, mm[1], (
                f"pg {pg} ({rows['pg_ranks'][0]}): #{n} is not the same collective on every "
                "member; the group hangs there")))
            continue
        if limit_ns is not None and (stall_ns is None or stall_ns < limit_ns):
            continue  # in flight, as collectives are in a healthy job's dump
        op = at_n["pending_op"][0]
        stall = "?" if stall_ns is None else f"{stall_ns / 1e9:.1f} s"
        head = (f"pg {pg} ({rows['pg_ranks'][0]}): rank(s) {_ranks(waiting)} waiting in {op} "
                f"#{n} for {stall} at their dumps" + (
                    f" (stuck: over {limit_ns / 1e9:.2f} s, {th.stall_pauses:g}x the job's "
                    f"usual longest pause of {usual / 1e6:.1f} ms)" if limit_ns is not None
                    else " (too little history to judge the stall: taken as stuck)"))
        if behind or missing:
            roots, knock, ev = [], [], [head]
            for r in missing:
                roots.append(r)
                named_missing.add(r)
                ev.append(f"rank {r} left no dump while its group-mates did: not running "
                          "(killed, crashed or its host down)")
            for r in behind:
                elsewhere = [(g, s) for g, s in pending_at.get(r, []) if g != pg]
                got = entered.get(r)
                if elsewhere:
                    knock.append(r)
                    ev.append(f"rank {r} last entered #{got} here and is waiting in pg "
                              f"{elsewhere[0][0]} #{elsewhere[0][1]}")
                else:
                    roots.append(r)
                    ev.append(f"rank {r} last entered #{got} here and is in no collective: "
                              "stuck outside collectives (host side)" if got else
                              f"rank {r} never entered a collective of this group")
            if roots:
                cls = "rank not running" if missing else "never arrived"
                findings.append(finding(cls, sorted(roots), pg, n, 1.0, since, ev))
            else:
                ev.append("a consequence: the missing members wait in another group")
                findings.append(finding("never arrived", sorted(knock), pg, n,
                                        th.knock_on_confidence, since, ev))
            continue
        done = [m for m in members if (finished.get(m) or 0) >= n]
        inside = [m for m in members if m not in done]
        if done:
            findings.append(finding("stuck in the collective", inside, pg, n, 1.0, since, [
                head, f"rank(s) {_ranks(done)} finished #{n}; rank(s) {_ranks(inside)} "
                "entered it and did not: stuck inside it"]))
        else:
            findings.append(finding("stuck in the collective", members, pg, n,
                                    th.knock_on_confidence, since, [
                                        head, f"every member entered #{n} and none finished "
                                        "it: the collective itself does not complete "
                                        "(network or device); the dumps cannot tell which "
                                        "member"]))
    for pg, (seq, sigs) in first_mismatch.items():
        if pg not in explained_mismatch:
            findings.append(mismatch_finding(pg, seq, sigs, (
                f"pg {pg}: #{seq} is not the same collective on every member")))
    # Ranks with no dump that no stuck group named: the others' record ends without them.
    groups = events.select("pg", "pg_ranks").unique()
    for r in sorted({m for spec in groups["pg_ranks"].unique().to_list()
                     for m in parse_ranks(spec)} - dumped - named_missing):
        mates = sorted(dumped & {m for spec in groups["pg_ranks"].to_list()
                                 if r in parse_ranks(spec) for m in parse_ranks(spec)})
        if not mates:
            continue
        last = events.filter(pl.col("rank").is_in(mates) & ~pl.col("is_p2p")).sort("t_issue_ns")
        where = last.tail(1).select("pg", "seq", "t_issue_ns").row(0) if last.height else \
            (None, None, None)
        findings.append(finding("rank not running", [r], None if where[0] is None
                                else str(where[0]), where[1], 1.0, where[2], [
                                    f"rank {r} left no dump while rank(s) {_ranks(mates)}, "
                                    "its group-mates, did: not running (killed, crashed or "
                                    "its host down)"] + ([
                                        f"its group-mates' record ends at pg {where[0]} "
                                        f"#{where[1]}"] if where[0] is not None else [])))
    return tuple(sorted(findings, key=lambda f: (-f.confidence, f.since_ns or 0)))


__all__ = ["DUMP_COLUMNS", "DumpHangThresholds", "compute_mismatches",
           "compute_usual_pause_ns", "detect_dump_hangs"]
