"""Is a capture complete and coherent? Checks over the event frame (``ringwatch.COLUMNS``).

Two questions, each a pure function returning a frozen report:

* :func:`check_consistency`: do the member ranks of every group agree on the ordered list of
  collectives (group, seq, op, bytes), does every rank's numbering run without holes, and
  does every send meet its recv?
* :func:`compare_flight_recorder`: does one rank's capture match PyTorch's Flight Recorder,
  one to one and in the same order?

Bytes compared per op (what every member of one collective must agree on): ``nbytes_in`` for
``gather`` (only the root has outputs), ``nbytes_out`` for ``scatter`` (only the root has
inputs), nothing for all-to-all (uneven splits are legal), ``nbytes`` for all others.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from ringwatch._flight_recorder import FrEntry, op_family, parse_entries
from ringwatch._schema import API_BACKFILL, parse_ranks

_BYTES_IN_OPS = ("gather",)
_BYTES_OUT_OPS = ("scatter",)
_UNCOMPARED_OPS = ("all_to_all", "all_to_all_single", "unknown")
# Ops that take several collective numbers (see ringwatch.agent.capture._pg_hooks): the numbers just
# below such an op's own are not holes.
SEQ_WIDTH = {"monitored_barrier": 2}
# Ops the Flight Recorder never lists.
_NOT_IN_FR = ("monitored_barrier",)
# Recorder families that stand for another (Gloo runs reduce_scatter_tensor as an all_reduce).
_FR_ALIASES = {("reduce_scatter", "all_reduce"), ("barrier", "all_reduce")}


def compute_signature_bytes(events: pl.DataFrame) -> pl.DataFrame:
    """``events`` plus ``sig_bytes``: the byte count all members of a collective share."""
    op = pl.col("op")
    return events.with_columns(
        pl.when(op.is_in(_BYTES_IN_OPS)).then(pl.col("nbytes_in"))
        .when(op.is_in(_BYTES_OUT_OPS)).then(pl.col("nbytes_out"))
        .when(op.is_in(_UNCOMPARED_OPS)).then(pl.lit(None, pl.Int64))
        .otherwise(pl.col("nbytes")).alias("sig_bytes"))


def compute_collective_signatures(events: pl.DataFrame) -> pl.DataFrame:
    """One row per (pg, rank, seq) of the collectives: ``signature`` = the ops and shared
    bytes issued under that number (several for a coalesced batch), in issue order. Rows
    without a number (a call that failed before the backend numbered it) are left out."""
    df = compute_signature_bytes(events.filter(~pl.col("is_p2p") & pl.col("seq").is_not_null()))
    return (
        df.sort("idx")
        .with_columns((pl.col("op") + ":" + pl.col("sig_bytes").cast(pl.Utf8).fill_null("*"))
                      .alias("_part"))
        .group_by("pg", "rank", "seq", maintain_order=True)
        .agg(pl.col("_part").str.join("+").alias("signature"), pl.col("idx").min(),
             pl.col("op").first(),
             pl.col("pg_ranks").first(), pl.col("status").first())
        .sort("pg", "rank", "idx")
    )


@dataclass(frozen=True, slots=True)
class GroupCheck:
    """What one group's members agreed on."""

    pg: str
    ranks: tuple[int, ...]
    collectives: int
    p2p: int


@dataclass(frozen=True, slots=True)
class ConsistencyReport:
    """Result of :func:`check_consistency`.

    Attributes:
        ok: No problem found.
        groups: One entry per group seen.
        problems: One line per disagreement (capped at ``max_problems``).
        n_problems: Total number of disagreements.
    """

    ok: bool
    groups: tuple[GroupCheck, ...]
    problems: tuple[str, ...]
    n_problems: int


def check_consistency(events: pl.DataFrame, *, upto_common: bool = False,
                      max_problems: int = 50) -> ConsistencyReport:
    """Check that the ranks of every group recorded the same collectives, in the same order.

    Args:
        events: Rows of one job (``ringwatch.read_events``).
        upto_common: Compare each group only up to the last number every member reached (for
            a hung or killed job); False requires every member to have every number.
        max_problems: Keep this many problem lines.

    Returns:
        The report; ``ok`` is False if any member lacks a number another has, two members
        disagree on a number's ops or bytes, a rank's numbers have holes or go backwards, or
        a send has no matching recv.
    """
    problems: list[str] = []
    sig = compute_collective_signatures(events)
    groups: list[GroupCheck] = []
    for (pg,), g in sig.group_by("pg", maintain_order=True):
        members = tuple(parse_ranks(g["pg_ranks"][0] or ""))
        ranks_seen = sorted(set(g["rank"].to_list()))
        missing_ranks = [r for r in members if r not in ranks_seen]
        if members and missing_ranks and len(ranks_seen) > 0:
            problems.append(f"pg {pg}: ranks {missing_ranks} recorded none of its collectives")
        problems.extend(_order_problems(pg, g))
        frame = g
        if upto_common:
            reach = g.group_by("rank").agg(pl.col("seq").max())["seq"].min()
            frame = g.filter(pl.col("seq") <= reach)
        n_ranks = len(ranks_seen)
        per_seq = frame.group_by("seq").agg(
            pl.col("rank").n_unique().alias("n"), pl.col("signature").n_unique().alias("nsig"),
            pl.col("rank"), pl.col("signature")).sort("seq")
        for row in per_seq.filter((pl.col("n") < n_ranks) | (pl.col("nsig") > 1)).iter_rows(
                named=True):
            if row["n"] < n_ranks:
                absent = sorted(set(ranks_seen) - set(row["rank"]))
                problems.append(f"pg {pg} seq {row['seq']}: ranks {absent} did not record it")
            if row["nsig"] > 1:
                by = dict(zip(row["rank"], row["signature"], strict=True))
                problems.append(f"pg {pg} seq {row['seq']}: members disagree: {by}")
        p2p = events.filter(pl.col("is_p2p") & (pl.col("pg") == pg)).height
        groups.append(GroupCheck(str(pg), members or tuple(ranks_seen),
                                 int(frame["seq"].n_unique()), p2p))
    problems.extend(_p2p_problems(events))
    return ConsistencyReport(not problems, tuple(groups), tuple(problems[:max_problems]),
                             len(problems))


def _order_problems(pg: str, sig: pl.DataFrame) -> list[str]:
    out = []
    for (rank,), g in sig.group_by("rank", maintain_order=True):
        g = g.sort("idx")
        seqs = g["seq"].to_list()
        if any(b <= a for a, b in zip(seqs, seqs[1:], strict=False)):
            out.append(f"pg {pg} rank {rank}: numbers out of issue order")
            continue
        covered = set()
        for seq, op in zip(seqs, g["op"].to_list(), strict=True):
            covered.update(range(seq - SEQ_WIDTH.get(op, 1) + 1, seq + 1))
        if seqs:
            holes = sorted(set(range(seqs[0], seqs[-1] + 1)) - covered)
            if holes:
                out.append(f"pg {pg} rank {rank}: missing numbers {holes[:10]}"
                           f"{' ...' if len(holes) > 10 else ''}")
    return out


def _p2p_problems(events: pl.DataFrame) -> list[str]:
    p2p = events.filter(pl.col("is_p2p"))
    if p2p.height == 0:
        return []
    sends = p2p.filter(pl.col("op") == "send").select(
        "pg", src="rank", dst="peer", seq="seq", send_bytes="nbytes")
    recvs = p2p.filter(pl.col("op") == "recv").select(
        "pg", src="peer", dst="rank", seq="seq", recv_bytes="nbytes")
    both = sends.join(recvs, on=["pg", "src", "dst", "seq"], how="full", coalesce=True)
    out = []
    for row in both.iter_rows(named=True):
        where = f"pg {row['pg']} {row['src']}->{row['dst']} #{row['seq']}"
        if row["recv_bytes"] is None:
            out.append(f"{where}: send without a matching recv")
        elif row["send_bytes"] is None:
            out.append(f"{where}: recv without a matching send")
        elif row["send_bytes"] != row["recv_bytes"]:
            out.append(f"{where}: send {row['send_bytes']} B, recv {row['recv_bytes']} B")
    return out


@dataclass(frozen=True, slots=True)
class FrComparison:
    """Result of :func:`compare_flight_recorder` for one rank.

    Attributes:
        ok: One to one, same order, same ops and bytes.
        matched: Collectives found on both sides.
        fr_only: ``(pg, seq)`` the Flight Recorder has and ringwatch missed.
        ringwatch_only: ``(pg, seq)`` ringwatch has and the Flight Recorder does not (within
            the recorder's window).
        order_ok: Both sides list the common collectives in the same order across groups.
        mismatches: One line per op or byte disagreement.
        fr_p2p: Point-to-point entries in the recorder (not compared: numbered differently).
    """

    ok: bool
    matched: int
    fr_only: tuple[tuple[str, int], ...]
    ringwatch_only: tuple[tuple[str, int], ...]
    order_ok: bool
    mismatches: tuple[str, ...]
    fr_p2p: int


def _fr_collectives(entries: list[FrEntry]) -> dict[tuple[str, int], list[FrEntry]]:
    by: dict[tuple[str, int], list[FrEntry]] = {}
    for e in entries:
        if not e.is_p2p:
            by.setdefault((e.pg, e.seq), []).append(e)
    for key, lst in by.items():  # NCCL adds a summary "coalesced" entry to a batch
        real = [e for e in lst if e.op != "coalesced"]
        by[key] = real or lst
    return by


def compare_flight_recorder(rank_events: pl.DataFrame, dump: dict) -> FrComparison:
    """Compare one rank's captured collectives with its Flight Recorder dump.

    Only the recorder's window is compared (it is a ring of the last ``TORCH_FR_BUFFER_SIZE``
    entries): per group, numbers from its oldest kept entry on.

    Args:
        rank_events: Rows of a single rank.
        dump: That rank's Flight Recorder content (``flight_recorder.json``).
    """
    entries = parse_entries(dump)
    fr = _fr_collectives(entries)
    first = {}
    for pg, seq in fr:
        first[pg] = min(first.get(pg, seq), seq)
    ev = rank_events.filter(~pl.col("is_p2p") & pl.col("pg").is_in(list(first))
                            & ~pl.col("op").is_in(_NOT_IN_FR))
    if first:
        ev = ev.filter(pl.col("seq") >= pl.col("pg").replace_strict(first, default=None,
                                                                    return_dtype=pl.Int64))
    else:
        ev = ev.head(0)
    rw: dict[tuple[str, int], list[dict]] = {}
    rw_order: list[tuple[str, int]] = []  # the order ringwatch saw them in, live
    for row in ev.sort("idx").iter_rows(named=True):
        key = (row["pg"], row["seq"])
        if key not in rw and row["api"] != API_BACKFILL:
            # Rows recovered from the recorder itself are numbered when recovered, later
            # than collectives of other groups issued after them: their order says nothing.
            rw_order.append(key)
        rw.setdefault(key, []).append(row)
    fr_order = list(dict.fromkeys((e.pg, e.seq) for e in entries if not e.is_p2p))
    common = set(fr) & set(rw)
    mismatches = []
    for key in sorted(common):
        fams_fr = sorted({op_family(e.op) for e in fr[key]})
        fams_rw = sorted({op_family(r["op"]) for r in rw[key]})
        aliased = len(fams_fr) == len(fams_rw) == 1 and (fams_rw[0], fams_fr[0]) in _FR_ALIASES
        if fams_fr != fams_rw and not aliased:
            mismatches.append(f"pg {key[0]} seq {key[1]}: op {fams_rw} vs recorder {fams_fr}")
            continue
        sizes = [r["nbytes_in"] for r in rw[key] if r["nbytes_in"] is not None]
        if not sizes:
            continue  # sizes unknown to ringwatch: an op only the NCCL completion hook saw
        b_fr = sum(e.nbytes_in for e in fr[key])
        b_rw = sum(sizes)
        if b_fr != b_rw and "barrier" not in fams_rw:
            mismatches.append(f"pg {key[0]} seq {key[1]}: {b_rw} B in vs recorder {b_fr} B")
    live = common & set(rw_order)
    order_ok = [k for k in fr_order if k in live] == [k for k in rw_order if k in live]
    fr_only = tuple(sorted(set(fr) - set(rw)))
    rw_only = tuple(sorted(set(rw) - set(fr)))
    return FrComparison(
        ok=not fr_only and not rw_only and order_ok and not mismatches,
        matched=len(common), fr_only=fr_only, ringwatch_only=rw_only, order_ok=order_ok,
        mismatches=tuple(mismatches), fr_p2p=sum(1 for e in entries if e.is_p2p))


__all__ = ["ConsistencyReport", "FrComparison", "GroupCheck", "check_consistency",
           "compare_flight_recorder", "compute_collective_signatures",
           "compute_signature_bytes"]
