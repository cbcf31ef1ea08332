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

The hook is only safe on a group whose every work is CUDA-timed: PyTorch's hook thread calls
``getDuration()`` on each finished work, and a work created before timing was on makes it throw,
which aborts the group's communicators (seen on an H200: attaching after a group had run
collectives killed the job). So :func:`timing_from_creation` turns timing on for every group
created after ``attach()`` (``TORCH_NCCL_ENABLE_TIMING``, read when a group is built), and a
group that existed before, untimed, is polled instead of hooked. PyTorch keeps a hook for the
group's life, so a hook is registered once per group and re-pointed at the recorder of a later
``attach()``; reports of works issued before that attach are ignored (those come back from
the Flight Recorder like any op issued while detached).
"""

from __future__ import annotations

import datetime
import os
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


#: PyTorch's switch for CUDA-event timing of every NCCL work, read when a group is created.
ENV_NCCL_TIMING = "TORCH_NCCL_ENABLE_TIMING"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on", "y")


def timing_from_creation() -> tuple[bool, bool]:
    """Have every NCCL group created from now on time its works: sets
    ``TORCH_NCCL_ENABLE_TIMING=1`` unless the environment already sets it (to anything).

    Returns:
        ``(existing, new)``: whether groups that exist already were created with timing on,
        and whether groups created from now on will be. Both False only where the job itself
        turned timing off.
    """
    before = os.environ.get(ENV_NCCL_TIMING)
    if before is None:
        os.environ[ENV_NCCL_TIMING] = "1"
        return False, True
    return _truthy(before), _truthy(before)


class _Slot:
    """Where a registered completion hook delivers: the live recorder and group record, or
    nobody (``rec`` None) while detached."""

    __slots__ = ("pg", "rec", "info")

    def __init__(self, pg, rec: Recorder, info: GroupInfo):
        self.pg, self.rec, self.info = pg, rec, info  # pg: kept alive with its hook


#: id(process group) -> the slot of the hook ringwatch registered on it (at most one each).
_SLOTS: dict[int, _Slot] = {}


def _dispatch(slot: _Slot, wi) -> None:
    rec, info = slot.rec, slot.info
    if rec is not None and not rec.closed:
        on_work_info(rec, info, wi)


def release_hooks(rec: Recorder) -> None:
    """Detach ``rec`` from every hook it receives (``detach()``); the hooks stay registered,
    as PyTorch cannot remove them, and deliver to nobody until the next attach."""
    for slot in _SLOTS.values():
        if slot.rec is rec:
            slot.rec = None


def on_work_info(rec: Recorder, info: GroupInfo, wi) -> None:
    """Completion-hook callback (PyTorch's hook thread): never raises."""
    try:
        op = OPTYPE_TO_OP.get(getattr(wi.op_type, "name", str(wi.op_type)), "unknown")
        start = _steady_ns(rec, wi.time_started)
        end = _steady_ns(rec, wi.time_finished)
        dev = _duration_ns(wi.active_duration)
        if op in ("send", "recv"):
            if start is not None and start < info.hook_mono:
                return  # issued before this attach: not ours to record
            rec.complete_p2p(info, op, mono_start=start, mono_end=end, device_ns=dev)
        elif int(wi.seq) <= info.hook_from:
            return  # issued before this attach: recovered from the Flight Recorder
        else:
            # Reserve issue-order slots for ops nobody announced before this report.
            rec.check_tail(info, backend_seq(info.handle))
            rec.complete_seq(info, int(wi.seq), op=op, mono_start=start, mono_end=end,
                             device_ns=dev)
    except Exception as exc:  # noqa: BLE001 - a hook must never raise into PyTorch's thread
        warn_once("nccl_hook_cb", f"NCCL completion hook failed: {exc!r}")


def enable_completion_hook(rec: Recorder, pg, info: GroupInfo, *, timed: bool) -> bool:
    """Turn on CUDA-event timing and, where it is safe, take the group's completion hook.

    Args:
        rec: The recorder.
        pg: The NCCL process group.
        info: Its record.
        timed: Whether every work of the group so far was CUDA-timed (it was created with
            ``TORCH_NCCL_ENABLE_TIMING`` on); otherwise the hook could abort the job
            (module docstring) and the group is polled.

    Returns:
        True if the hook is in place; False means the poller will finish this group's events.
    """
    try:
        pg._enable_collectives_timing()
    except Exception as exc:  # noqa: BLE001
        warn_once("nccl_timing", f"cannot enable NCCL collective timing: {exc!r}")
    slot = _SLOTS.get(id(pg))
    if slot is not None and slot.pg is pg:  # hooked by an earlier attach(): re-point it
        slot.rec, slot.info = rec, info
    elif not timed:
        warn_once("nccl_untimed", f"NCCL group {info.name} existed before ringwatch attached "
                  "and its collectives are not CUDA-timed, so PyTorch's completion hook would "
                  "abort it: polling its works instead (coarser ends; C++-issued collectives "
                  "come back from the Flight Recorder). Attach before init_process_group, or "
                  f"set {ENV_NCCL_TIMING}=1, for the full capture")
        return False
    else:
        slot = _Slot(pg, rec, info)
        try:
            pg._register_on_completion_hook(partial(_dispatch, slot))
        except Exception as exc:  # noqa: BLE001 - one hook per group, or a backend without it
            warn_once("nccl_hook", f"NCCL completion hook unavailable ({exc}); polling work "
                      "objects instead (coarser end times)")
            return False
        _SLOTS[id(pg)] = slot
    with rec.lock:
        info.hook_from = max(0, (backend_seq(pg) or 0) - info.p2p_adjust)
        info.hook_mono = rec.clock.mono_ns()
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
