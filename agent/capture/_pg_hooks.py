"""Capture at the ``ProcessGroup`` method level: one event per call into the backend.

``torch.distributed``'s Python functions all end in a ``ProcessGroup`` method call
(``group.allreduce([t], opts)``), so wrapping those methods sees every Python-issued
collective exactly once, including object collectives, ``batch_isend_irecv`` and coalescing
managers, without changing the identity of any ``torch.distributed`` function. Collectives
issued from C++ (DDP's reducer, functional collectives) bypass Python; they are caught by the
DDP comm hook (``_ddp``), the NCCL completion hook (``_nccl``) or, failing both, recovered from
the Flight Recorder (``_backfill``) thanks to the gaps they leave in the sequence counter.

Completion time: ringwatch never waits on the job's behalf. A blocking call's end is when the
caller's own ``work.wait()`` returns (``Work.wait`` is wrapped: ~1 µs); asynchronous Gloo work
gets a future callback (its future completes when the work does), and Gloo send/recv, which
have no future, end when the job waits on them or when the writer's poller sees them done.
NCCL work is never waited for (that would sync the host): the completion hook or the poller
finishes it.
"""

from __future__ import annotations

import sys
from functools import partial

import torch.distributed as dist

from ringwatch._log import warn_once
from ringwatch.agent.capture._nccl import backend_seq
from ringwatch.agent.capture._ops import (
    OP_SPECS,
    OpSpec,
    buffer_stats,
    dtype_name,
    find_opts,
    root_of,
)
from ringwatch.agent.capture._recorder import Event, GroupInfo, Recorder
from ringwatch.agent.capture._state import STATE

_C10D = "torch.distributed.distributed_c10d"
# Frames skipped when looking for the torch.distributed function that issued a call.
_TRANSPARENT = frozenset({
    "torch.distributed.c10d_logger", "contextlib", "typing_extensions", "functools", "warnings",
})
_SYNC_P2P = frozenset({"send", "recv"})


def _caller() -> tuple[str | None, bool]:
    """(outermost ``torch.distributed`` function on the stack, whether a blocking send/recv
    is among them: ``dist.send`` is ``isend`` followed by ``wait``)."""
    f = sys._getframe(3)  # 0 _caller, 1 _prepare, 2 wrapper, 3 whoever called the method
    outer = None
    blocking_p2p = False
    while f is not None:
        mod = f.f_globals.get("__name__")
        if mod == _C10D:
            outer = f.f_code.co_name
            if outer in _SYNC_P2P:
                blocking_p2p = True
        elif mod not in _TRANSPARENT:
            break
        f = f.f_back
    return outer, blocking_p2p


def group_info(rec: Recorder, pg, ranks: list[int] | None = None) -> GroupInfo:
    """The recorder's entry for ``pg``, registering it on first sight.

    Args:
        rec: The recorder.
        pg: The ``ProcessGroup``.
        ranks: Its members' global ranks, when the caller knows them before
            ``torch.distributed`` does (right after the group's creation).
    """
    info = rec.groups.get(pg)
    if info is not None:
        return info
    if ranks is None:
        try:
            ranks = dist.get_process_group_ranks(pg)
        except Exception:  # noqa: BLE001 - a group unknown to torch.distributed's registry
            ranks = list(range(pg.size()))
    try:
        backend = str(dist.get_backend(pg))
    except Exception:  # noqa: BLE001
        backend = pg.name() if hasattr(pg, "name") else "unknown"
    info = GroupInfo(key=pg, name=str(pg.group_name), desc=getattr(pg, "group_desc", None),
                     backend=backend, global_ranks=ranks, group_rank=pg.rank(), handle=pg)
    info = rec.add_group(info)
    if STATE.native is not None and backend == "gloo" and not info.native:
        try:
            STATE.native.register(pg, info)
        except Exception as exc:  # noqa: BLE001 - the group goes unrecorded, the job goes on
            warn_once("native_wrap", f"could not record a Gloo group natively: {exc!r}")
    if "nccl" in backend and STATE.config is not None and STATE.config.nccl_hook:
        from ringwatch.agent.capture._nccl import enable_completion_hook

        timed = not STATE.nccl_untimed and pg not in STATE.untimed_groups
        enable_completion_hook(rec, pg, info, timed=timed)
    return info


class _Call:
    __slots__ = ("event", "group", "sync", "kind", "nccl", "src", "dst")


def _prepare(rec: Recorder, pg, name: str, spec: OpSpec, args: tuple, kwargs: dict) -> _Call:
    g = group_info(rec, pg)
    api = getattr(rec.tls, "api", None)
    blocking_p2p = False
    if api is None or spec.kind in ("send", "recv", "recv_any"):
        outer, blocking_p2p = _caller()
        api = api or (f"dist.{outer}" if outer else f"pg.{name}")
    ev = rec.new_event(g, spec.op, api)
    c = _Call()
    c.event, c.group, c.kind = ev, g, spec.kind
    c.src = c.dst = None
    first = None
    if spec.inp is not None and len(args) > spec.inp:
        ev.nbytes_in, n_in, first = buffer_stats(args[spec.inp])
    else:
        ev.nbytes_in, n_in = 0, 0
    if spec.out is None or len(args) <= spec.out:
        ev.nbytes_out, n_out = 0, 0
    elif spec.out == spec.inp:
        ev.nbytes_out, n_out = ev.nbytes_in, n_in
    else:
        ev.nbytes_out, n_out, first_out = buffer_stats(args[spec.out])
        first = first if first is not None else first_out
    ev.numel = max(n_in, n_out)
    if first is not None:
        ev.dtype = dtype_name(first.dtype)
        c.nccl = first.is_cuda and "nccl" in g.backend
    else:
        c.nccl = g.backend == "nccl"
    opts = find_opts(args, kwargs)
    kind = spec.kind
    if kind == "rooted":
        ev.root = g.to_global(root_of(args, opts))
    elif kind in ("send", "recv", "recv_any"):
        ev.is_p2p = True
        me = g.global_ranks[g.group_rank] if 0 <= g.group_rank < g.size else None
        peer = g.to_global(args[1]) if kind != "recv_any" and len(args) > 1 else None
        ev.peer = peer
        c.src, c.dst = (me, peer) if kind == "send" else (peer, me)
    if opts is not None:
        c.sync = not opts.asyncOp
    elif kind == "blocking":
        c.sync = True
    elif ev.is_p2p:
        c.sync = blocking_p2p
    else:
        c.sync = False
    ev.async_op = not c.sync
    return c


def _on_future(rec: Recorder, ev: Event, work, fut) -> None:
    """Future callback (Gloo worker thread): the work is done, successfully or not."""
    try:
        try:
            fut.value()
        except BaseException as exc:  # noqa: BLE001 - report, never raise here
            rec.end_exc(ev, exc, end_source="future")
            return
        if ev.peer is None and ev.is_p2p and work is not None:
            rec.set_source(ev, ev.group.to_global(work._source_rank()))
        rec.end(ev, end_source="future")
    except Exception as exc:  # noqa: BLE001
        warn_once("future_cb", f"completion callback failed: {exc!r}")


def _safe(cause: str, fn, *args, **kwargs) -> bool:
    """Run one piece of ringwatch bookkeeping; a failure is logged once, never raised."""
    try:
        fn(*args, **kwargs)
        return True
    except Exception as exc:  # noqa: BLE001 - telemetry must not break the job
        warn_once(cause, f"ringwatch bookkeeping failed ({cause}): {exc!r}")
        return False


def _call_backend(rec: Recorder, ev: Event, orig, pg, args: tuple, kwargs: dict):
    """The backend call itself, flagged as recorded by the front door (``rec.tls.front``);
    its exception ends the event and goes on to the caller unchanged."""
    front, rec.tls.front = getattr(rec.tls, "front", False), True
    try:
        return orig(pg, *args, **kwargs)
    except BaseException as exc:
        _safe("end", rec.end_exc, ev, exc)
        raise
    finally:
        rec.tls.front = front


def _issue(rec: Recorder, c: _Call, orig, pg, args: tuple, kwargs: dict):
    """Call the backend exactly once, recording around it; only the backend's own outcome
    (return value or exception) reaches the caller. While the backend runs, ``rec.tls.front``
    is set: the ringwatch wrapper backend (``_wrapper_backend``) under this call records
    nothing itself, so a call is never counted twice."""
    ev = c.event
    if c.kind == "blocking":  # returns only when done: never hold the lock across it
        before = backend_seq(pg)
        with rec.lock:
            if not _safe("issue", rec.issue, ev, before):
                return orig(pg, *args, **kwargs)
            c.group.blocking += 1  # the writer leaves the counter alone until it is numbered
        try:
            work = _call_backend(rec, ev, orig, pg, args, kwargs)
        except BaseException:
            with rec.lock:
                c.group.blocking -= 1
            raise
        with rec.lock:  # numbered and released under one hold of the lock
            _safe("seq", _number, rec, c, before, backend_seq(pg))
            c.group.blocking -= 1
        _safe("end", rec.end, ev, end_source="wait")
        return work
    with rec.lock:  # enqueue only: held for microseconds (first NCCL call: communicator init)
        before = backend_seq(pg)
        if not _safe("issue", rec.issue, ev, before):
            return orig(pg, *args, **kwargs)
        work = _call_backend(rec, ev, orig, pg, args, kwargs)
        _safe("seq", _number, rec, c, before, backend_seq(pg))
    _safe("watch", _watch_completion, rec, c, work)
    return work


def _watch_completion(rec: Recorder, c: _Call, work) -> None:
    """Arrange for the event of an issued non-blocking call to end when its work does."""
    ev, g = c.event, c.group
    if work is None:
        rec.end(ev, end_source="none")
        return
    if g.coalescing is not None:
        return  # finished with its batch (see _end_coalescing)
    if c.nccl:
        if not g.nccl_hook:
            ev.work = work  # no hook on this group: the writer's poller finishes it
        return
    if getattr(rec.tls, "defer_end", False):
        rec.tls.deferred = ev  # the caller (DDP's timed hook) records the end itself
        return
    if c.sync:
        # The caller waits right away (the options say so): its own wait() marks the end.
        # Never wait on its behalf: Gloo's send/recv wait() is not idempotent.
        ev.work = work
        rec.wait_watch[id(work)] = ev
        return
    try:
        fut = work.get_future()
        ev.future = fut
        fut.add_done_callback(partial(_on_future, rec, ev, work))
    except Exception:  # noqa: BLE001 - Gloo send/recv: no future; Work.wait or the poller
        ev.work = work
        rec.wait_watch[id(work)] = ev


# Collective numbers a Gloo monitored_barrier takes (measured on torch 2.13, 2 to 4 ranks: the
# Flight Recorder's counter moves by 2 on every rank; the backend counter by 2 on ranks > 0 and
# by 2 * (world - 1) on rank 0, its internal send/recv).
MONITORED_BARRIER_WIDTH = 2


def _number(rec: Recorder, c: _Call, before, after) -> None:
    if c.event.op == "monitored_barrier":
        rec.assign_composite_seq(c.group, c.event, before, after, MONITORED_BARRIER_WIDTH)
    elif c.event.is_p2p:
        rec.assign_p2p_seq(c.group, c.event, c.src, c.dst, before, after)
    else:
        rec.assign_collective_seq(c.group, c.event, after)


def _make_wrapper(name: str, orig, spec: OpSpec):
    def wrapper(self, *args, **kwargs):
        rec = STATE.recorder
        if rec is None or rec.closed:
            return orig(self, *args, **kwargs)
        try:
            c = _prepare(rec, self, name, spec, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - never stand between the job and its call
            warn_once(f"prepare:{name}", f"could not record ProcessGroup.{name}: {exc!r}")
            return orig(self, *args, **kwargs)
        return _issue(rec, c, orig, self, args, kwargs)

    wrapper.__name__ = name
    wrapper.__qualname__ = f"ProcessGroup.{name}"
    wrapper.__doc__ = getattr(orig, "__doc__", None)
    wrapper.__wrapped__ = orig
    wrapper._ringwatch = True
    return wrapper


def _make_start_coalescing(orig):
    def _start_coalescing(self, *args, **kwargs):
        before = backend_seq(self)
        out = orig(self, *args, **kwargs)
        rec = STATE.recorder
        if rec is not None and not rec.closed:
            try:
                rec.start_batch(group_info(rec, self), before)
            except Exception as exc:  # noqa: BLE001
                warn_once("start_coalescing", f"coalescing bookkeeping failed: {exc!r}")
        return out

    _start_coalescing._ringwatch = True
    _start_coalescing.__wrapped__ = orig
    return _start_coalescing


def _fail_batch(rec: Recorder, pg, exc: BaseException) -> None:
    g = rec.groups.get(pg)
    for ev in (rec.end_batch(g, backend_seq(pg)) if g else []):
        rec.end_exc(ev, exc)


def _make_end_coalescing(orig):
    def _end_coalescing(self, *args, **kwargs):
        rec = STATE.recorder
        try:
            work = orig(self, *args, **kwargs)
        except BaseException as exc:
            if rec is not None and not rec.closed:
                _safe("end_coalescing", _fail_batch, rec, self, exc)
            raise
        if rec is not None and not rec.closed:
            try:
                g = rec.groups.get(self)
                evs = rec.end_batch(g, backend_seq(self)) if g is not None else []
                for ev in evs:
                    if work is None:
                        rec.end(ev, end_source="none")
                    elif "nccl" not in g.backend:
                        work.get_future().add_done_callback(partial(_on_future, rec, ev, None))
                    elif not g.nccl_hook or (ev.is_p2p and not any(
                            not e.is_p2p for e in evs)):
                        ev.work = work  # polled (a p2p-only batch may carry no number)
            except Exception as exc:  # noqa: BLE001
                warn_once("end_coalescing", f"coalescing bookkeeping failed: {exc!r}")
        return work

    _end_coalescing._ringwatch = True
    _end_coalescing.__wrapped__ = orig
    return _end_coalescing


def _end_waited(rec: Recorder, ev: Event, work, done_before: bool) -> None:
    if ev.peer is None and ev.is_p2p:
        try:
            rec.set_source(ev, ev.group.to_global(work._source_rank()))
        except Exception:  # noqa: BLE001, S110 - no source rank: the peer stays unknown
            pass
    # Still running when the job started waiting, or waited for right after issue: it ended
    # just now (exact). Done long before the wait: now is only an upper bound.
    exact = not done_before or not ev.async_op
    rec.end(ev, end_source="wait" if exact else "poll")


def _make_work_wait(orig):
    def wait(self, *args, **kwargs):
        rec = STATE.recorder
        ev = rec.wait_watch.pop(id(self), None) if rec is not None and rec.wait_watch else None
        if ev is None or ev.work is not self:
            return orig(self, *args, **kwargs)
        try:
            done_before = self.is_completed()
        except Exception:  # noqa: BLE001
            done_before = True
        try:
            out = orig(self, *args, **kwargs)
        except BaseException as exc:
            _safe("end", rec.end_exc, ev, exc)
            raise
        _safe("end", _end_waited, rec, ev, self, done_before)
        return out

    wait._ringwatch = True
    wait.__wrapped__ = orig
    return wait


def install(patched: dict) -> None:
    """Wrap every known ``ProcessGroup`` method (idempotent); originals go to ``patched``."""
    cls = dist.ProcessGroup
    for name, spec in OP_SPECS.items():
        orig = cls.__dict__.get(name)
        if orig is None or getattr(orig, "_ringwatch", False):
            continue
        patched[(cls, name)] = orig
        setattr(cls, name, _make_wrapper(name, orig, spec))
    work_cls = dist.Work
    orig = work_cls.__dict__.get("wait")
    if orig is not None and not getattr(orig, "_ringwatch", False):
        patched[(work_cls, "wait")] = orig
        work_cls.wait = _make_work_wait(orig)
    for name, maker in (("_start_coalescing", _make_start_coalescing),
                        ("_end_coalescing", _make_end_coalescing)):
        orig = cls.__dict__.get(name)
        if orig is not None and not getattr(orig, "_ringwatch", False):
            patched[(cls, name)] = orig
            setattr(cls, name, maker(orig))
