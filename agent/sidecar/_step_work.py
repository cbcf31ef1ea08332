"""Each rank's blocked time per step, for the central service's pipeline analysis.

On a pipeline the figure that reads a job right is each rank's *unblocked* time per step: its
step less the time it sat blocked in communication (:mod:`ringwatch.analyzers._work`). The
service never sees the rows, so the sidecar sums them per rank and step as
:func:`ringwatch.analyzers._work.compute_step_work` does post-mortem, on the rank's monotonic
clock:

* the step begins at its first communication and lasts to the next step's first;
* blocked: the time inside blocking rows (collectives, receives, waits: ``async_op`` false;
  where a row does not say, a receive or a collective, not a send), overlaps once, plus the
  wait for the step's asynchronous ones (DDP's buckets, isends) and for each asynchronous
  receive's data (``batch_isend_irecv``): from the rank's last own activity before the last
  of them (or the receive) completes to that completion;
* a row timed on the device (NCCL's CUDA events) adds its device duration if it blocks (a
  receive always: on the device the next kernel needs its data), and one whose end only the
  NCCL watchdog saw adds nothing: its host interval is not its time in the op
  (``ringwatch.analyzers._timing``).

Each step also keeps, per sender, its receives and the fastest one (size and duration, as
:func:`ringwatch.analyzers._p2p_links.receive_table` reads them post-mortem): the service judges
send/recv between hosts like a group's transfers.

A step's rows are kept until a step two later begins (an isend of the step may complete in
the next one), then folded into two numbers; at most :data:`MAX_ROWS` rows per step are kept.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

#: Rows of one step kept until it is folded (a step of more is summed from its first ones).
MAX_ROWS = 65_536
#: Senders whose receives a step keeps (a pipeline stage has one or two).
MAX_SENDERS = 8
#: Receives smaller than this say nothing about bandwidth
#: (:data:`ringwatch.analyzers._p2p_links.MIN_LINK_BYTES`).
MIN_RECV_BYTES = 4096


@dataclass(slots=True)
class StepWork:
    """One rank's communication in one step."""

    #: Monotonic ns of its first communication.
    begin_ns: int | None = None
    #: (start, end, async_op, host-timed, a receive) of its finished rows, until :meth:`fold`.
    rows: list[tuple[int, int, bool | None, bool, bool]] = field(default_factory=list)
    #: Time blocked (ns), once folded.
    blocked_ns: int | None = None
    #: Device durations (ns) of its blocking rows timed on the device.
    device_ns: int = 0
    #: sender (global rank) -> [receives, fastest one's bytes, its duration ns].
    recv: dict[int, list[int]] = field(default_factory=dict)

    def add_recv(self, peer: int, nbytes: int, duration_ns: int) -> None:
        """One finished receive from ``peer``."""
        got = self.recv.get(peer)
        if got is None:
            if len(self.recv) < MAX_SENDERS:
                self.recv[peer] = [1, nbytes, duration_ns]
            return
        got[0] += 1
        if nbytes * got[2] > got[1] * duration_ns:  # a faster one
            got[1], got[2] = nbytes, duration_ns

    def add(self, start: int | None, end: int | None, async_op: bool | None,
            host: bool = True, recv: bool = False) -> None:
        if start is None:
            return
        self.begin_ns = start if self.begin_ns is None else min(self.begin_ns, start)
        if end is not None and end >= start and self.blocked_ns is None \
                and len(self.rows) < MAX_ROWS:
            self.rows.append((start, end, async_op, host, recv))

    def fold(self) -> None:
        """Sum the blocked time and let the rows go."""
        if self.blocked_ns is None:
            self.blocked_ns = blocked_ns(self.rows) + self.device_ns
            self.rows = []


def blocked_ns(rows: list[tuple[int, int, bool | None, bool, bool]]) -> int:
    """Time blocked in ``rows`` ((start, end, async_op, host-timed, a receive), finished):
    see the module; rows timed on the device count here only for the waits for the
    asynchronous ones (their blocking ones are summed apart)."""
    spans = [(s, e) for s, e, a, h, _ in rows if a is False and h]
    async_end = max((e for _, e, a, _, _ in rows if a is True), default=None)
    if async_end is not None:
        targets = {async_end, *(e for _, e, a, _, rv in rows if a is True and rv)}
        # the rank's last own activity before each: the end of a blocking row, or the
        # issue of an asynchronous one
        starts, free = [], []
        for s, e, a, _, _ in sorted(rows):
            last = e if a is False else s
            starts.append(s)
            free.append(last if not free else max(free[-1], last))
        for t in targets:
            at = bisect_right(starts, t) - 1
            if at >= 0 and t > free[at]:
                spans.append((free[at], t))
    total, open_s, open_e = 0, None, None
    for s, e in sorted(spans):
        if open_e is None or s > open_e:
            total += 0 if open_e is None else open_e - open_s
            open_s, open_e = s, e
        else:
            open_e = max(open_e, e)
    return total + (0 if open_e is None else open_e - open_s)


def add_row(work: dict[int, StepWork], step: int, r: dict) -> None:
    """A row of ``step`` (``mono_start_ns``, ``mono_end_ns``, ``async_op``, ``op``,
    ``device_duration_ns``, ``end_source``) into ``work``."""
    w = work.get(step)
    if w is None:
        w = work[step] = StepWork()
    asyn = r.get("async_op")
    recv = r.get("op") == "recv"
    if recv and r.get("status") == "ok":
        _add_receive(w, r)
    asyn = r.get("op") == "send" if asyn is None else asyn
    start, end, dev = r.get("mono_start_ns"), r.get("mono_end_ns"), r.get("device_duration_ns")
    if dev is None and r.get("end_source") == "watchdog":
        w.add(start, None, asyn)  # where the step begins, not how long it blocked
    elif dev is not None:
        # on the device a receive blocks, waited for at once or not; the row ends, as far
        # as the host can place it, its device duration after its issue
        asyn = bool(asyn) and not recv
        if not asyn and start is not None and w.blocked_ns is None:
            w.device_ns += dev
        w.add(start, None if start is None else start + dev, asyn, host=False, recv=recv)
    else:
        w.add(start, end, asyn, recv=recv)


def _add_receive(w: StepWork, r: dict) -> None:
    """A finished receive into its step's per-sender figures (its time as the analyzers
    read it: the device's, none for an end only the NCCL watchdog saw)."""
    peer, nbytes = r.get("peer"), r.get("nbytes")
    dur = r.get("device_duration_ns")
    if dur is None and r.get("end_source") != "watchdog":
        dur = r.get("duration_ns")
    if peer is not None and nbytes is not None and nbytes >= MIN_RECV_BYTES \
            and dur is not None and dur > 0:
        w.add_recv(peer, nbytes, dur)


def fold_before(work: dict[int, StepWork], step: int) -> None:
    """Fold every step more than one before ``step`` (the rank's current one)."""
    for k, w in work.items():
        if k < step - 1:
            w.fold()


def finished_work(work: dict[int, StepWork], last: int) -> list[tuple[int, int, int, dict]]:
    """``(step, step_ns, blocked_ns, receives)`` of the newest ``last`` folded steps whose next
    step has begun, oldest first (a step lasts to the first communication of the next one
    seen); ``receives``: sender -> [receives, fastest bytes, its ns]."""
    steps = sorted(work)
    out = []
    for k, nxt in zip(steps, steps[1:], strict=False):
        w, n = work[k], work[nxt]
        if w.blocked_ns is None or w.begin_ns is None or n.begin_ns is None \
                or n.begin_ns <= w.begin_ns:
            continue
        out.append((k, n.begin_ns - w.begin_ns, w.blocked_ns, w.recv))
    return out[-last:]
