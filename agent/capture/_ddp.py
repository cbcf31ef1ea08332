"""Route DDP's gradient all-reduces through Python so the ProcessGroup hooks see them.

DDP's reducer calls the backend from C++ unless a Python comm hook is registered. Right after
``DistributedDataParallel.__init__`` (when the job registered no hook of its own) ringwatch
registers a dispatching hook whose default target is PyTorch's own ``allreduce_hook`` (divide
by the group size, then all-reduce: the reducer's built-in arithmetic). Its collectives then
reach the wrapped ``ProcessGroup.allreduce`` and are recorded with ``api = "ddp"``; on Gloo their
futures complete at the real completion time.

A job that registers its own hook later still can: ``register_comm_hook`` and
``_register_builtin_comm_hook`` are wrapped to retarget the dispatcher to the job's hook (the
reducer accepts a single registration). Hooks registered before ringwatch's are wrapped so their
collectives are tagged ``ddp`` too.
"""

from __future__ import annotations

import functools

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from ringwatch._log import warn_once
from ringwatch.agent.capture._state import STATE


def timed_allreduce_hook(process_group, bucket):
    """PyTorch's ``allreduce_hook`` (divide by the group size, then all-reduce: the reducer's
    built-in arithmetic), with the collective's end recorded inside the one future callback
    that hands the result back to DDP. A separate completion callback would cost a second
    hand-over of the GIL from Gloo's thread per bucket (~30 us on a busy CPU)."""
    group = process_group if process_group is not None else dist.group.WORLD
    tensor = bucket.buffer()
    tensor.div_(group.size())
    rec = STATE.recorder
    if rec is None or rec.closed:
        return group.allreduce([tensor]).get_future().then(_first_value)
    tls = rec.tls
    prev_api = getattr(tls, "api", None)
    tls.api, tls.defer_end, tls.deferred = "ddp", True, None
    try:
        work = group.allreduce([tensor])
    finally:
        tls.api, tls.defer_end = prev_api, False
    ev, tls.deferred = tls.deferred, None
    fut = work.get_future()
    if ev is None:
        return fut.then(_first_value)

    def done(f):
        try:
            value = f.value()[0]
        except BaseException as exc:
            _end_quietly(rec.end_exc, ev, exc, end_source="future")
            raise
        _end_quietly(rec.end, ev, end_source="future")
        return value

    return fut.then(done)


def _first_value(fut):
    return fut.value()[0]


def _end_quietly(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - never fail DDP's future
        warn_once("ddp_end", f"could not record a DDP bucket's end: {exc!r}")


class _Dispatch:
    """State object of ringwatch's DDP comm hook: the hook it forwards to."""

    __slots__ = ("inner_hook", "inner_state", "retargeted")

    def __init__(self, process_group) -> None:
        self.inner_hook = timed_allreduce_hook
        self.inner_state = process_group
        self.retargeted = False


def _tagged_call(hook, state, bucket):
    rec = STATE.recorder
    tls = rec.tls if rec is not None else None
    prev = getattr(tls, "api", None) if tls is not None else None
    if tls is not None:
        tls.api = "ddp"
    try:
        return hook(state, bucket)
    finally:
        if tls is not None:
            tls.api = prev


def ringwatch_comm_hook(state: _Dispatch, bucket):
    """The comm hook ringwatch registers: forwards to ``state.inner_hook``, tagged ``ddp``."""
    if state.inner_hook is timed_allreduce_hook:
        return timed_allreduce_hook(state.inner_state, bucket)
    return _tagged_call(state.inner_hook, state.inner_state, bucket)


def _tag(hook):
    @functools.wraps(hook)
    def tagged(state, bucket):
        return _tagged_call(hook, state, bucket)

    tagged._ringwatch = True
    return tagged


_BUILTIN = {
    "ALLREDUCE": timed_allreduce_hook,
    "FP16_COMPRESS": default_hooks.fp16_compress_hook,
}


def _install_default(ddp) -> None:
    if getattr(ddp, "_ringwatch_hook", None) is not None:
        return
    if getattr(ddp, "_comm_hooks", None):
        return  # the job (or DDP's mixed precision) already has a hook, tagged by our wrapper
    reducer = getattr(ddp, "reducer", None)
    if reducer is None:
        return
    d = _Dispatch(ddp.process_group)
    dist._register_comm_hook(reducer, d, ringwatch_comm_hook)
    ddp._ringwatch_hook = d


def _patched_init(orig):
    @functools.wraps(orig)
    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        cfg = STATE.config
        if cfg is None or not cfg.ddp_hook or STATE.recorder is None:
            return
        try:
            _install_default(self)
        except Exception as exc:  # noqa: BLE001
            warn_once("ddp_hook", f"could not install the DDP timing hook: {exc!r}")
        runtime = STATE.runtime
        if runtime is not None:
            runtime.request_backfill()  # DDP's init collectives were issued from C++

    __init__._ringwatch = True
    return __init__


def _patched_register(orig):
    @functools.wraps(orig)
    def register_comm_hook(self, state, hook):
        d = getattr(self, "_ringwatch_hook", None)
        if d is None or d.retargeted:
            return orig(self, state, _tag(hook))
        self._check_comm_hook(hook)
        try:
            self.logger._set_comm_hook_name(hook.__qualname__)
            self._comm_hooks.append((hook, state))
        except Exception:  # noqa: BLE001, S110 - DDP internals moved; the hook still works
            pass
        d.inner_hook, d.inner_state, d.retargeted = hook, state, True

    register_comm_hook._ringwatch = True
    return register_comm_hook


def _patched_builtin(orig):
    @functools.wraps(orig)
    def _register_builtin_comm_hook(self, comm_hook_type):
        d = getattr(self, "_ringwatch_hook", None)
        name = getattr(comm_hook_type, "name", str(comm_hook_type).rsplit(".", 1)[-1])
        hook = _BUILTIN.get(name)
        if d is None or d.retargeted or hook is None:
            return orig(self, comm_hook_type)
        try:
            self.logger._set_comm_hook_name(str(comm_hook_type))
        except Exception:  # noqa: BLE001, S110
            pass
        d.inner_hook, d.inner_state, d.retargeted = hook, self.process_group, True

    _register_builtin_comm_hook._ringwatch = True
    return _register_builtin_comm_hook


def install(patched: dict) -> None:
    """Wrap DDP's constructor and hook registration (idempotent)."""
    for name, maker in (("__init__", _patched_init), ("register_comm_hook", _patched_register),
                        ("_register_builtin_comm_hook", _patched_builtin)):
        orig = DDP.__dict__.get(name)
        if orig is None or getattr(orig, "_ringwatch", False):
            continue
        patched[(DDP, name)] = orig
        setattr(DDP, name, maker(orig))
