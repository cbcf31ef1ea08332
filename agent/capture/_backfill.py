"""Recover collectives this rank issued from C++ outside the hooks, from the Flight Recorder.

The recorder notices them as unannounced steps of the backend's sequence counter (DDP's
construction-time all_gather and broadcasts, a C++ built-in comm hook, functional collectives
on Gloo) and reserves their number and issue-order slot. Here those slots are filled from the
FR: op, sizes, dtype and creation time; completion state where the backend records it (NCCL).
Gloo's FR entries carry no completion state, so those rows get status ``unknown``.
"""

from __future__ import annotations

from ringwatch._flight_recorder import FrEntry, parse_entries
from ringwatch._schema import API_BACKFILL
from ringwatch.agent.capture._recorder import GroupInfo, Recorder


def index_entries(dump: dict | None) -> dict[tuple[str, int], FrEntry]:
    """FR collectives by (group name, collective number); for a coalesced batch, which the FR
    lists twice under one number, the entry that carries the op."""
    out: dict[tuple[str, int], FrEntry] = {}
    if not dump:
        return out
    for e in parse_entries(dump):
        if e.is_p2p:
            continue
        key = (e.pg, e.seq)
        if key not in out or out[key].op == "coalesced":
            out[key] = e
    return out


def backfill(rec: Recorder, gaps: dict[GroupInfo, list[tuple[int, int]]],
             dump: dict | None, *, give_up: bool = True
             ) -> tuple[int, dict[GroupInfo, list[tuple[int, int]]]]:
    """Queue one event per reserved (seq, idx) found in the FR.

    One the FR lacks is queued as an ``unknown`` placeholder when ``give_up``, else handed back
    (the FR can lag the backend's counter by a moment; a later read may find it). Returns how
    many were found, and those handed back.
    """
    index = index_entries(dump)
    wall_minus_mono = rec.clock.wall_ns() - rec.clock.mono_ns()
    found = 0
    missed: dict[GroupInfo, list[tuple[int, int]]] = {}
    for g, items in gaps.items():
        for seq, idx in items:
            fe = index.get((g.name, seq))
            if fe is None and not give_up:
                missed.setdefault(g, []).append((seq, idx))
                continue
            if fe is None:
                ev = rec.unseen_event(g, "unknown", API_BACKFILL, seq=seq, idx=idx,
                                      mono_start=None)
                ev.status = "unknown"
                rec.unrecovered += 1
                rec.add_finished(ev)
                continue
            start = None if fe.t_created_ns is None else fe.t_created_ns - wall_minus_mono
            ev = rec.unseen_event(g, fe.op, API_BACKFILL, seq=seq, idx=idx,
                                  mono_start=start)
            ev.wall_issue = fe.t_created_ns
            ev.dtype = fe.dtype
            ev.nbytes_in, ev.nbytes_out = fe.nbytes_in, fe.nbytes_out
            ev.numel = fe.numel_in
            if fe.state == "completed":
                ev.status, ev.end_source = "ok", "watchdog"
                if fe.t_completed_ns is not None:
                    ev.mono_end = fe.t_completed_ns - wall_minus_mono
                ev.device_ns = fe.duration_ns
            else:
                ev.status = "unknown"
            rec.backfilled += 1
            found += 1
            rec.add_finished(ev)
    return found, missed
