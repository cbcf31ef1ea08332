"""What a job's captured collectives say, in words: the demo's reading of a run.

Two per-step figures per rank (:mod:`ringwatch.analyzers`): time in collectives, and of it the
time spent waiting for a member that had not arrived yet. A compute straggler arrives last at
most collectives and waits for no one while its peers wait for it; a slow network lengthens
every rank's collectives without making anyone wait for an arrival; a hang leaves ranks in
collectives that one rank never entered. The full detectors build on the same figures.
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
    out = []
    for (rank,), rows in sorted(events.sort("idx").group_by("rank")):
        waiting = rows.filter(pl.col("status") == "pending")
        if waiting.height:
            first, last = waiting.row(0, named=True), waiting.row(-1, named=True)
            seqs = (f"#{first['seq']}" if waiting.height == 1
                    else f"#{first['seq']}..#{last['seq']} ({waiting.height} in flight)")
            out.append(f"rank {rank} waiting in {first['op']} {seqs} of pg {first['pg']} "
                       f"for {(now_ns - first['t_start_ns']) / 1e9:.1f} s")
        else:
            r = rows.row(-1, named=True)
            out.append(f"rank {rank} last finished {r['op']} #{r['seq']} of pg {r['pg']}, "
                       "entered nothing since")
    return out


def interpret(events, truth: dict, nproc: int) -> Reading:
    """What the captured collectives say, before and after the fault's onset.

    Args:
        events: Every row of the job, pending ones included.
        truth: The run's ground truth; only ``kind``, ``onset_step`` and ``outcome`` are read
            (where the phases split, and whether to look for a hang).
        nproc: World size.
    """
    import polars as pl

    from ringwatch.analyzers import compute_phase_comm, compute_step_comm, compute_step_wait

    kind = truth.get("kind")
    finished = events.filter(pl.col("status") != "pending")
    sc = compute_step_comm(finished)
    if sc.is_empty():
        return Reading("no data", None, ["no complete step recorded"])
    sw = compute_step_wait(finished)
    onset = truth.get("onset_step") if kind in ("straggler", "hang", "link") else None
    comm = _phases_ms(compute_phase_comm(sc, onset))
    wait = _phases_ms(compute_phase_comm(sw, onset, value="wait_ns"))
    exit_lag = _phases_ms(compute_phase_comm(sw, onset, value="exit_lag_ns"))
    last = _last_share(sw, onset)
    lines = []
    name = "healthy steps" if onset is not None else "all steps"
    for phase, label in (("before", name), ("after", "fault steps")):
        if comm[phase] and not (phase == "after" and kind == "hang"):
            lines.append(f"{label:<14} median in collectives/waiting ms/step  "
                         f"{cells(comm[phase], wait[phase])}")
    if kind == "hang":
        lines.append("reading: the job stopped making progress; where each rank is:")
        ended = (truth.get("outcome") or {}).get("ended_wall_ns") or _last_ns(events)
        lines += [f"  {line}" for line in frontier_lines(events, now_ns=ended)]
        return Reading("hang", _behind(events), lines)
    with_base = onset is not None and len(comm["after"]) == nproc
    phase = "after" if with_base else "before"
    if len(wait[phase]) < 2:
        return Reading("no data", None, lines)
    late = _stands_out(exit_lag[phase], wait[phase], last[phase])
    already = (_stands_out(exit_lag["before"], wait["before"], last["before"]) if with_base
               else late)
    if late is not None:
        peers = statistics.median(v for r, v in wait[phase].items() if r != late)
        if late != already:
            split = _late_at_some_groups(finished, late, onset)
            if split is not None:
                lines.append(split)
                return Reading("network", None, lines)
            was = statistics.median(v for r, v in wait["before"].items() if r != late)
            lines.append(
                f"reading: rank {late} arrives last at {last['after'][late]:.0%} of collectives "
                f"since the onset ({last['before'].get(late, 0):.0%} before); its peers wait "
                f"{peers:.1f} ms per step for it (was {was:.1f}), it waits "
                f"{wait['after'][late]:.1f} ms: a straggler")
            return Reading("straggler", late, lines)
        lines.append(
            f"reading: rank {late} arrives last at {last[phase][late]:.0%} of collectives"
            + (" before and after the onset" if with_base else "")
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
    """The reading when ``rank`` comes late since ``onset`` to some of its groups only (a
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
    return (f"reading: rank {rank} comes late since the onset, but only to group(s) "
            f"{', '.join(map(str, late))}; in {', '.join(map(str, on_time))} every member "
            "is slowed alike: those transfers got slower (network), and it is late to the "
            "rest because of them")


def _phases_ms(phases) -> dict[str, dict[int, float]]:
    return {k: {r: v / 1e6 for r, v in phases.select("rank", f"{k}_ns").iter_rows()
                if v is not None} for k in ("before", "after")}


def _last_share(step_wait, onset: int | None) -> dict[str, dict[int, float]]:
    """Per phase, the share of each rank's collectives that it entered last."""
    import polars as pl

    from ringwatch.analyzers import phase_masks

    out = {}
    for name, cond in zip(("before", "after"), phase_masks(onset), strict=True):
        agg = step_wait.filter(cond).group_by("rank").agg(
            (pl.col("last_arrivals").sum() / pl.col("collectives").sum()).alias("share"))
        out[name] = dict(agg.iter_rows())
    return out


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


def _behind(events) -> int | None:
    """The one rank that issued fewest collectives (every rank issues the same sequence, so
    per-rank issue order is comparable), or None when several are equally far behind."""
    import polars as pl

    top = events.group_by("rank").agg(pl.col("idx").max().alias("n"))
    low = top.filter(pl.col("n") == pl.col("n").min())
    return int(low["rank"][0]) if low.height == 1 and top.height > 1 else None
