"""NCCL timing without host synchronisation.

On NCCL a ``Work``'s future completes when the kernel is *queued*, so neither ``wait()`` nor a
future callback tells when a collective ended. Instead, for each NCCL group:

* ``ProcessGroup._enable_collectives_timing()`` makes PyTorch bracket every kernel with CUDA
  events, and
* ``ProcessGroup._register_on_completion_hook(fn)`` has PyTorch's hook thread call ``fn`` for
  every finished work, Python- or C++-issued (DDP's reducer, functional collectives), with its
  op type, sequence number, enqueue time (CPU, steady clock), the time the watchdog noticed
  completion (an upper bound of the end, up to ~100 ms late) and the CUDA-event duration.

Collectives are matched to the events recorded at issue by sequence number; send/recv, whose
numbers live on another counter, by direction and enqueue time. Where the hook is unavailable
(one hook per group: someone else may hold it), events keep their ``Work`` and the writer
thread polls ``is_completed()`` and ``_get_duration()``.
"""

from __future__ import annotations

import datetime
from functools import partial

from ringwatch._log import warn_once
from ringwatch.agent.capture._ops import OPTYPE_TO_OP
from ringwatch.agent.capture._recorder import GroupInfo, Recorder


def backend_seq(pg) -> int | None:
    """The backend's per-group counter, or None where it has none."""
    try:
        return pg._get_sequence_number_for_group()
    except Exception:  # noqa: BLE001
        return None


def _steady_ns(rec: Recorder, t) -> int | None:
    """A hook timestamp as monotonic ns: a ``timedelta`` of steady clock (PyTorch >= 2.4) or a
    wall ``datetime`` (older releases)."""
    if t is None:
        return None
    if isinstance(t, datetime.timedelta):
        return (t.days * 86_400 + t.seconds) * 1_000_000_000 + t.microseconds * 1_000
    if isinstance(t, datetime.datetime):
        wall = int(t.timestamp() * 1e9)
        return wall - (rec.clock.wall_ns() - rec.clock.mono_ns())
    return None


def _duration_ns(t) -> int | None:
    if isinstance(t, datetime.timedelta):
        return (t.days * 86_400 + t.seconds) * 1_000_000_000 + t.microseconds * 1_000
    return None


def on_work_info(rec: Recorder, info: GroupInfo, wi) -> None:
    """Completion-hook callback (PyTorch's hook thread): never raises."""
    try:
        op = OPTYPE_TO_OP.get(getattr(wi.op_type, "name", str(wi.op_type)), "unknown")
        start = _steady_ns(rec, wi.time_started)
        end = _steady_ns(rec, wi.time_finished)
        dev = _duration_ns(wi.active_duration)
        if op in ("send", "recv"):
            rec.complete_p2p(info, op, mono_start=start, mono_end=end, device_ns=dev)
        else:
            # Reserve issue-order slots for ops nobody announced before this report.
            rec.check_tail(info, backend_seq(info.handle))
            rec.complete_seq(info, int(wi.seq), op=op, mono_start=start, mono_end=end,
                             device_ns=dev)
    except Exception as exc:  # noqa: BLE001 - a hook must never raise into PyTorch's thread
        warn_once("nccl_hook_cb", f"NCCL completion hook failed: {exc!r}")


def enable_completion_hook(rec: Recorder, pg, info: GroupInfo) -> bool:
    """Turn on CUDA-event timing and register the completion hook on an NCCL group.

    Returns:
        True if the hook is in place; False means the poller will finish this group's events.
    """
    try:
        pg._enable_collectives_timing()
    except Exception as exc:  # noqa: BLE001
        warn_once("nccl_timing", f"cannot enable NCCL collective timing: {exc!r}")
    try:
        pg._register_on_completion_hook(partial(on_work_info, rec, info))
    except Exception as exc:  # noqa: BLE001 - one hook per group, or a backend without it
        warn_once("nccl_hook", f"NCCL completion hook unavailable ({exc}); polling work "
                  "objects instead (coarser end times)")
        return False
    with rec.lock:
        info.hook_from = max(0, (backend_seq(pg) or 0) - info.p2p_adjust)
        info.nccl_hook = True
    return True


def poll_works(rec: Recorder) -> int:
    """Finish pending events whose ``Work`` completed (writer thread). Returns how many."""
    n = 0
    for ev in rec.pending_snapshot():
        work = ev.work
        if work is None:
            continue
        try:
            if not work.is_completed():
                continue
            dev = None
            try:
                dev = int(work._get_duration() * 1e6)
            except Exception:  # noqa: BLE001, S110 - timing off, or not an NCCL work
                pass
            ok = True
            try:
                ok = work.is_success()
            except Exception:  # noqa: BLE001, S110
                pass
            rec.wait_watch.pop(id(work), None)
            rec.end(ev, status="ok" if ok else "error", end_source="poll", device_ns=dev)
            n += 1
        except Exception as exc:  # noqa: BLE001
            warn_once("poll", f"polling a work failed: {exc!r}")
            rec.end(ev, status="unknown", end_source="none")
    return n
