"""In-memory bookkeeping of collectives: groups, sequence numbers, pending and finished events.

This module knows nothing of torch: the hooks in ``_pg_hooks``, ``_ddp`` and ``_nccl`` turn
what they see into calls on a :class:`Recorder`. It runs on the training thread's hot path and
on backend callback threads, so it is kept small: slotted objects, no I/O, one lock held for
microseconds.

Issue order: every event gets ``idx`` from one per-rank counter *when it is issued*. Ops this
rank did not see issued (C++-issued collectives, noticed as steps of the backend's counter) get
their ``idx`` reserved at the moment they are noticed, before the op that revealed them, so
sorting a rank's rows by ``idx`` gives issue order even for rows recovered later.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from ringwatch._clock import Clock, SystemClock
from ringwatch._schema import format_ranks


@dataclass(frozen=True, slots=True)
class RankIdentity:
    """Who is recording: constant for the life of the process."""

    job_id: str
    rank: int
    local_rank: int | None
    world_size: int
    host: str
    pid: int


class GroupInfo:
    """One process group as seen by this rank, plus its sequence bookkeeping.

    ``backend_seq`` below is the backend's own per-group counter (PyTorch's
    ``_get_sequence_number_for_group``). On Gloo it also counts send/recv, which differ between
    ranks, so the collective number is ``backend_seq - p2p_adjust``, where ``p2p_adjust`` sums
    the steps taken by this rank's own send/recv calls. Steps nobody announced are collectives
    issued outside the Python hooks; their numbers wait in ``gaps`` (for the Flight Recorder
    backfill) or in ``reserved`` (for the NCCL completion hook) with their reserved ``idx``.
    """

    __slots__ = (
        "key", "name", "desc", "backend", "global_ranks", "ranks_spec", "size", "group_rank",
        "coll_seq", "last_backend_seq", "p2p_adjust", "pair_seq", "gaps", "reserved", "by_seq",
        "nccl_hook", "hook_from", "hook_mono", "coalescing", "batch_seq", "last_hook_seq",
        "p2p_waiting", "handle", "native", "blocking",
    )

    def __init__(self, *, key: Any, name: str, desc: str | None, backend: str,
                 global_ranks: list[int], group_rank: int, handle: Any = None):
        self.key = key
        self.name = name
        self.desc = desc
        self.backend = backend
        self.global_ranks = list(global_ranks)
        self.ranks_spec = format_ranks(global_ranks)
        self.size = len(global_ranks)
        self.group_rank = group_rank
        self.coll_seq = 0
        self.last_backend_seq: int | None = None
        self.p2p_adjust = 0
        self.pair_seq: dict[tuple[int, int], int] = {}
        self.gaps: list[tuple[int, int]] = []  # (seq, reserved idx) awaiting the backfill
        self.reserved: dict[int, int] = {}  # seq -> reserved idx, awaiting the NCCL hook
        self.by_seq: dict[int, list[Event]] = {}  # pending collectives awaiting the NCCL hook
        self.nccl_hook = False
        self.hook_from = 0  # collective numbers above this are reported by the NCCL hook
        self.hook_mono = 0  # send/recv started before this (monotonic ns) are not reported
        self.coalescing: list[Event] | None = None
        self.batch_seq: int | None = None
        self.last_hook_seq: int | None = None
        self.p2p_waiting: list[Event] = []  # send/recv awaiting the NCCL hook
        self.handle = handle  # the ProcessGroup, so the writer can read its counter
        self.native = False  # recorded by the native backend wrapper (``_native``)
        # Blocking calls in flight (issued, not yet numbered): the backend's counter moves
        # under them, and a reading taken meanwhile must not pass for unannounced ops.
        self.blocking = 0

    @property
    def my_global_rank(self) -> int | None:
        return self.to_global(self.group_rank)

    def to_global(self, group_rank: int | None) -> int | None:
        """Translate a rank within this group to a global rank."""
        if group_rank is None or group_rank < 0 or group_rank >= self.size:
            return None
        return self.global_ranks[group_rank]

    def describe(self) -> dict:
        """The group as a JSON-able dict (for the rank's meta file)."""
        return {"pg": self.name, "pg_desc": self.desc, "backend": self.backend,
                "pg_ranks": self.ranks_spec, "pg_size": self.size, "group_rank": self.group_rank,
                "last_seq": self.coll_seq, "nccl_hook": self.nccl_hook}


class Event:
    """One collective on this rank. Timestamps are monotonic ns; wall time is derived at
    write time from a (wall, monotonic) anchor."""

    __slots__ = (
        "idx", "group", "seq", "op", "is_p2p", "peer", "root", "dtype", "numel", "nbytes_in",
        "nbytes_out", "async_op", "api", "mono_issue", "mono_start", "mono_end", "status",
        "error", "end_source", "device_ns", "step", "work", "wall_issue", "future",
    )

    def __init__(self, group: GroupInfo, op: str, api: str, mono_issue: int,
                 step: int | None, idx: int = -1):
        self.idx = idx
        self.group = group
        self.seq: int | None = None
        self.op = op
        self.is_p2p = False
        self.peer: int | None = None
        self.root: int | None = None
        self.dtype: str | None = None
        self.numel: int | None = None
        self.nbytes_in: int | None = None
        self.nbytes_out: int | None = None
        self.async_op: bool | None = None
        self.api = api
        self.mono_issue = mono_issue
        self.mono_start: int | None = mono_issue
        self.mono_end: int | None = None
        self.status = "pending"
        self.error: str | None = None
        self.end_source = "none"
        self.device_ns: int | None = None
        self.step = step
        self.work: Any = None  # kept only while a poller needs it
        self.wall_issue: int | None = None  # set when the source gave wall time (Flight Recorder)
        self.future: Any = None  # the work's future whose callback ends the event


def classify_error(exc: BaseException) -> str:
    """``timeout`` when the backend reports a timeout, else ``error``."""
    text = f"{type(exc).__name__} {exc}".lower()
    return "timeout" if ("timed out" in text or "timeout" in text) else "error"


class Recorder:
    """Collects the events of one rank; safe to call from the training thread and from backend
    callback threads at once.

    Args:
        identity: The recording rank.
        buffer_events: Bound of finished events held until the writer drains them; past it,
            events are dropped and counted in ``dropped``.
        clock: Time source (injected in tests).
    """

    def __init__(self, identity: RankIdentity, *, buffer_events: int = 200_000,
                 clock: Clock | None = None):
        self.identity = identity
        self.clock = clock or SystemClock()
        self.buffer_events = buffer_events
        # Re-entrant: a SIGTERM handler on the main thread may flush while the interrupted
        # main thread holds the lock.
        self.lock = threading.RLock()
        self.done: deque[Event] = deque()
        self.pending: dict[int, Event] = {}
        self.wait_watch: dict[int, Event] = {}  # id(work) -> event finished by Work.wait
        self.groups: dict[Any, GroupInfo] = {}
        self.dropped = 0
        self.recorded = 0
        self.backfilled = 0
        self.unrecovered = 0
        self.step: int | None = None
        self.user_steps = False
        self.step_owner: int | None = None  # id() of the optimizer whose steps count
        self.tls = threading.local()
        self.step_sink = None  # called with the new step whenever it changes (native path)
        self._idx = itertools.count()
        self.closed = False

    # ---- groups ------------------------------------------------------------------------------
    def add_group(self, info: GroupInfo) -> GroupInfo:
        """Register a group (idempotent on ``info.key``)."""
        with self.lock:
            return self.groups.setdefault(info.key, info)

    # ---- issue (hot path) ---------------------------------------------------------------------
    def new_event(self, group: GroupInfo, op: str, api: str) -> Event:
        """An event about to be issued; :meth:`issue` makes it pending."""
        return Event(group, op, api, 0, self.step)

    def issue(self, ev: Event, backend_before: int | None) -> None:
        """The op is being issued now: note unannounced counter steps first (they were issued
        earlier), then give the event its ``idx`` and make it pending. Call under ``lock``."""
        if ev.group.coalescing is None:
            self._note_unseen(ev.group, backend_before)
        ev.idx = next(self._idx)
        ev.mono_issue = ev.mono_start = self.clock.mono_ns()
        self.pending[ev.idx] = ev

    def assign_collective_seq(self, group: GroupInfo, ev: Event,
                              backend_after: int | None) -> None:
        """Give a collective its group sequence number. Call under ``lock``, right after the
        backend call returned."""
        if group.coalescing is not None:  # inside a batch: one number for the whole batch
            if group.batch_seq is None:
                group.coll_seq += 1
                group.batch_seq = group.coll_seq
            ev.seq = group.batch_seq
            group.coalescing.append(ev)
        else:
            seq = group.coll_seq + 1
            if backend_after is not None:
                seq = max(seq, backend_after - group.p2p_adjust)
                group.last_backend_seq = backend_after
            group.coll_seq = seq
            ev.seq = seq
        if group.nccl_hook:
            group.by_seq.setdefault(ev.seq, []).append(ev)

    def set_source(self, ev: Event, peer: int | None) -> None:
        """A receive from any source learnt its sender: number it in that pair now."""
        if peer is None or ev.peer is not None:
            return
        ev.peer = peer
        if ev.seq is None:
            me = ev.group.my_global_rank
            with self.lock:
                n = ev.group.pair_seq.get((peer, me), 0) + 1
                ev.group.pair_seq[(peer, me)] = n
            ev.seq = n

    def assign_composite_seq(self, group: GroupInfo, ev: Event, backend_before: int | None,
                             backend_after: int | None, width: int) -> None:
        """Number an op that the backend implements with a rank-dependent number of internal
        messages (Gloo's ``monitored_barrier``): it takes ``width`` collective numbers, as in
        the Flight Recorder, and the rest of the counter's step is point-to-point traffic."""
        group.coll_seq += width
        ev.seq = group.coll_seq
        if backend_before is not None and backend_after is not None:
            group.p2p_adjust += backend_after - backend_before - width
            group.last_backend_seq = backend_after

    def assign_p2p_seq(self, group: GroupInfo, ev: Event, src: int | None, dst: int | None,
                       backend_before: int | None, backend_after: int | None) -> None:
        """Give a send/recv the next number of its (group, sender, receiver) pair."""
        if group.coalescing is not None:
            group.coalescing.append(ev)
        elif backend_before is not None and backend_after is not None:
            group.p2p_adjust += backend_after - backend_before
            group.last_backend_seq = backend_after
        if src is not None and dst is not None:
            n = group.pair_seq.get((src, dst), 0) + 1
            group.pair_seq[(src, dst)] = n
            ev.seq = n
        if group.nccl_hook and group.coalescing is None:
            group.p2p_waiting.append(ev)

    def _note_unseen(self, group: GroupInfo, backend_now: int | None) -> None:
        if backend_now is None:
            return
        if group.last_backend_seq is None:
            # First sight of the group: ops issued before it was known (attach after init).
            unseen = backend_now - group.p2p_adjust - group.coll_seq
        elif backend_now <= group.last_backend_seq:
            # A stale reading (the writer thread reads the counter before taking the lock):
            # never move backwards, or the next op would look like it followed unseen ones.
            return
        else:
            unseen = backend_now - group.last_backend_seq
        group.last_backend_seq = backend_now
        for _ in range(max(0, unseen)):
            group.coll_seq += 1
            idx = next(self._idx)
            if group.nccl_hook and group.coll_seq > group.hook_from:
                group.reserved[group.coll_seq] = idx
            else:
                group.gaps.append((group.coll_seq, idx))

    def check_tail(self, group: GroupInfo, backend_now: int | None) -> None:
        """Note ops issued since the last recorded one (writer thread). Not while a blocking
        call is in flight on the group: its own internal steps (a monitored barrier's
        messages) would be taken for ops issued outside the hooks, and every later number
        would be one off."""
        with self.lock:
            if group.coalescing is None and not group.blocking:
                self._note_unseen(group, backend_now)

    # ---- coalescing blocks -------------------------------------------------------------------
    def start_batch(self, group: GroupInfo, backend_before: int | None) -> None:
        """A coalescing block opens on ``group`` (``ProcessGroup._start_coalescing``)."""
        with self.lock:
            self._note_unseen(group, backend_before)
            group.coalescing = []
            group.batch_seq = None

    def end_batch(self, group: GroupInfo, backend_now: int | None) -> list[Event]:
        """The block closes; return its events so the caller can attach the batch's work."""
        with self.lock:
            evs = group.coalescing or []
            group.coalescing = None
            if backend_now is not None:
                # Backends that count a batch count it as one collective number (NCCL bumps
                # its collective counter when a batch opens, even one of send/recv only), so
                # any movement advances the collective numbering, as in the Flight Recorder.
                group.coll_seq = max(group.coll_seq, backend_now - group.p2p_adjust)
                group.last_backend_seq = backend_now
            if group.nccl_hook and evs:
                # The hook reports the whole batch once, under the batch's number.
                group.by_seq.setdefault(group.coll_seq, []).extend(e for e in evs if e.is_p2p)
            group.batch_seq = None
            return evs

    # ---- completion ----------------------------------------------------------------------------
    def end(self, ev: Event, *, status: str = "ok", end_source: str = "wait",
            mono_end: int | None = None, error: str | None = None,
            device_ns: int | None = None) -> None:
        """Finish a pending event and queue it for the writer (idempotent)."""
        if self.pending.pop(ev.idx, None) is None:
            if device_ns is not None and ev.device_ns is None:
                ev.device_ns = device_ns  # a second source completing what is already done
            return
        ev.mono_end = self.clock.mono_ns() if mono_end is None else mono_end
        ev.status = status
        ev.end_source = end_source
        ev.error = error
        if device_ns is not None:
            ev.device_ns = device_ns
        ev.work = ev.future = None
        self._queue(ev)

    def end_exc(self, ev: Event, exc: BaseException, end_source: str = "wait") -> None:
        """Finish an event that raised."""
        self.end(ev, status=classify_error(exc), end_source=end_source,
                 error=f"{type(exc).__name__}: {exc}"[:2000])

    def add_finished(self, ev: Event) -> None:
        """Queue an event built complete by a secondary source (hook, Flight Recorder)."""
        self._queue(ev)

    def _queue(self, ev: Event) -> None:
        if len(self.done) >= self.buffer_events:
            self.dropped += 1
            return
        self.done.append(ev)
        self.recorded += 1

    def unseen_event(self, group: GroupInfo, op: str, api: str, *, seq: int | None,
                     idx: int | None, mono_start: int | None) -> Event:
        """An event for an op this rank did not see issued (never pending)."""
        ev = Event(group, op, api, mono_start if mono_start is not None else 0, None,
                   next(self._idx) if idx is None else idx)
        ev.seq = seq
        ev.mono_start = mono_start
        ev.step = None
        return ev

    def complete_seq(self, group: GroupInfo, seq: int, *, op: str, mono_start: int | None,
                     mono_end: int | None, device_ns: int | None) -> None:
        """Complete the pending collectives numbered ``seq`` (NCCL completion hook).

        A number with no pending event is an op this rank did not see issued (DDP's C++
        reducer, functional collectives): it is recorded as seen only by the hook. The hook
        reports works of one group in order, and a coalesced batch reports its number twice;
        the repeat is dropped.
        """
        with self.lock:
            evs = group.by_seq.pop(seq, None)
            repeat = seq == group.last_hook_seq
            group.last_hook_seq = seq
            idx = group.reserved.pop(seq, None)  # callers run check_tail() first
        if evs:
            for e in evs:
                self.end(e, end_source="watchdog", mono_end=mono_end, device_ns=device_ns)
            return
        if repeat or op == "coalesced":
            return
        ev = self.unseen_event(group, op, "nccl_hook", seq=seq, idx=idx, mono_start=mono_start)
        ev.mono_end, ev.status, ev.end_source, ev.device_ns = mono_end, "ok", "watchdog", device_ns
        self.add_finished(ev)

    def complete_p2p(self, group: GroupInfo, op: str, *, mono_start: int | None,
                     mono_end: int | None, device_ns: int | None) -> None:
        """Complete the send/recv the NCCL hook reports: the pending one of that direction
        issued last before the work was created (works are created right after issue)."""
        with self.lock:
            best = None
            for e in group.p2p_waiting:
                if e.op == op and (mono_start is None or e.mono_issue <= mono_start):
                    if best is None or e.mono_issue > best.mono_issue:
                        best = e
            if best is None:
                best = next((e for e in group.p2p_waiting if e.op == op), None)
            if best is not None:
                group.p2p_waiting.remove(best)
        if best is not None:
            self.end(best, end_source="watchdog", mono_end=mono_end, device_ns=device_ns)
            return
        ev = self.unseen_event(group, op, "nccl_hook", seq=None, idx=None, mono_start=mono_start)
        ev.is_p2p = True
        ev.mono_end, ev.status, ev.end_source, ev.device_ns = mono_end, "ok", "watchdog", device_ns
        self.add_finished(ev)

    # ---- steps ---------------------------------------------------------------------------------
    def mark_step(self, step: int | None = None) -> int:
        """Set the step recorded on later events (the next one when ``step`` is None)."""
        self.user_steps = True
        self.step = (0 if self.step is None else self.step + 1) if step is None else int(step)
        if self.step_sink is not None:
            self.step_sink(self.step)
        return self.step

    def auto_step(self) -> None:
        """An optimizer step was taken (ignored once the job marks steps itself)."""
        if not self.user_steps:
            self.step = 1 if self.step is None else self.step + 1
            if self.step_sink is not None:
                self.step_sink(self.step)

    def reserve_idx(self, n: int) -> int:
        """Take ``n`` consecutive issue-order numbers at once (rows built in bulk); returns
        the first. Call under ``lock``."""
        first = next(self._idx)
        self._idx = itertools.count(first + max(n, 1))
        return first

    # ---- writer side -----------------------------------------------------------------------------
    def drain(self) -> list[Event]:
        """Take every finished event queued so far."""
        out = []
        pop = self.done.popleft
        try:
            while True:
                out.append(pop())
        except IndexError:
            pass
        return out

    def pending_snapshot(self) -> list[Event]:
        """The events still in flight, oldest first."""
        return sorted(list(self.pending.values()), key=lambda e: e.idx)

    def take_gaps(self) -> dict[GroupInfo, list[tuple[int, int]]]:
        """Remove and return the unannounced (seq, idx) of every group."""
        with self.lock:
            out = {g: g.gaps for g in self.groups.values() if g.gaps}
            for g in out:
                g.gaps = []
        return out

    def return_gaps(self, gaps: dict[GroupInfo, list[tuple[int, int]]]) -> None:
        """Put back gaps that :meth:`take_gaps` returned, for a later try."""
        with self.lock:
            for g, items in gaps.items():
                g.gaps = items + g.gaps

    def finish_pending(self, status: str = "pending") -> list[Event]:
        """Close every in-flight event as ``status`` (at exit) and return them."""
        evs = self.pending_snapshot()
        for e in evs:
            self.pending.pop(e.idx, None)
            e.status = status
            e.work = e.future = None
        return evs

    def ends_due(self) -> bool:
        """Whether an event in flight has a completed future whose callback, which records
        its end, has not run yet (a waiter wakes before the future's callbacks run)."""
        for ev in list(self.pending.values()):
            try:
                if ev.future is not None and ev.future.done():
                    return True
            except Exception:  # noqa: BLE001 - a broken future ends nothing
                continue
        return False

    def release(self) -> None:
        """Drop every reference to the job's process groups and works (after the final
        flush), so that destroying and re-creating groups is not held up by ringwatch."""
        with self.lock:
            for g in self.groups.values():
                g.handle = None
                g.key = None
            self.groups.clear()
            self.wait_watch.clear()
            for ev in self.pending.values():
                ev.work = None

    def groups_snapshot(self) -> list[GroupInfo]:
        with self.lock:
            return list(self.groups.values())

    def counters(self) -> dict[str, int]:
        """Counts for the rank's meta file."""
        return {"recorded": self.recorded, "dropped": self.dropped,
                "pending": len(self.pending), "backfilled": self.backfilled,
                "unrecovered": self.unrecovered}
