"""``attach()``: install the hooks once; start recording when the default group exists.

This is the agent's composition root: it builds the recorder, the segment writer and the
runtime, and hands them to the hooks through :data:`STATE`.
"""

from __future__ import annotations

import functools
import inspect
import os
import secrets
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ringwatch._config import ENV_DISABLE, CaptureConfig
from ringwatch._flight_recorder import dump_local
from ringwatch._log import warn_once
from ringwatch.agent.capture import _ddp, _pg_hooks
from ringwatch.agent.capture._nccl import backend_seq
from ringwatch.agent.capture._recorder import RankIdentity, Recorder
from ringwatch.agent.capture._runtime import ExitHandlers, Runtime
from ringwatch.agent.capture._state import STATE
from ringwatch.agent.capture._writer import SegmentWriter, rank_dir

_LOCK = threading.RLock()
_JOB_KEY = "ringwatch/job_id"
_JOB_ID_WAIT_S = 30


def attach(*, log_dir: str | os.PathLike | None = None, job_id: str | None = None,
           **options) -> bool:
    """Record every collective of this process, from now on, into per-rank Parquet logs.

    Call it anywhere before or after ``torch.distributed.init_process_group``; recording
    starts once the default process group exists. Calling it again does nothing.

    Args:
        log_dir: Root folder of the logs (default ``$RINGWATCH_LOG_DIR`` or
            ``./ringwatch-logs``); this rank writes to ``log_dir/<job_id>/rank-<RANK>/``.
        job_id: Identifier shared by all ranks (default ``$RINGWATCH_JOB_ID``, else
            ``$TORCHELASTIC_RUN_ID``, else one the ranks agree on through the store).
        **options: Any other :class:`ringwatch.CaptureConfig` field.

    Returns:
        True if the hooks are in place; False if ringwatch is disabled
        (``RINGWATCH_DISABLE=1``) or could not hook this torch (the job runs on regardless).

    Raises:
        ringwatch.ConfigError: an option or environment variable is malformed.
    """
    if os.environ.get(ENV_DISABLE, "").strip() == "1":
        return False
    cfg = CaptureConfig.from_env(log_dir=log_dir, job_id=job_id, **options)
    with _LOCK:
        if STATE.attached:
            return True
        STATE.config = cfg
        if cfg.nccl_hook:
            _time_nccl_works()
        try:
            _install_patches(cfg)
        except Exception as exc:  # noqa: BLE001
            warn_once("patch", f"cannot hook torch.distributed ({exc!r}); the job runs without "
                      "ringwatch")
            return False
        STATE.attached = True
    if dist.is_available() and dist.is_initialized():
        start_recording()
    return True


def _time_nccl_works() -> None:
    """NCCL groups created from now on time every work, which the completion hook needs; the
    groups that exist already and were not, are remembered, so none of them gets the hook."""
    from ringwatch.agent.capture._nccl import timing_from_creation

    existing, new = timing_from_creation()
    STATE.nccl_untimed = not new
    if not existing and dist.is_available() and dist.is_initialized():
        STATE.untimed_groups.update(c10d._world.pg_names)


def _install_patches(cfg: CaptureConfig) -> None:
    if cfg.native:
        from ringwatch.agent.capture import _native

        STATE.native_module = _native.load()
    if STATE.native_module is None:
        # The Python front door; with the native path, the backend wrapper sees every call.
        _pg_hooks.install(STATE.patched)
        _ddp.install(STATE.patched)
    else:
        # ... and these two only say which of its sends/recvs were blocking
        from ringwatch.agent.capture._native import blocking_p2p

        for name in ("send", "recv"):
            _patch_everywhere(name, functools.partial(blocking_p2p, STATE.native_module))
    _patch_function(c10d, "_new_process_group_helper", _wrap_new_group)
    for name, maker in (("init_process_group", _wrap_init),
                        ("destroy_process_group", _wrap_destroy)):
        _patch_everywhere(name, maker)
    if cfg.auto_step:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        STATE.handles.append(register_optimizer_step_post_hook(_on_optimizer_step))
    if cfg.wrap_backend and STATE.native_module is None:
        from ringwatch.agent.capture import _wrapper_backend

        _wrapper_backend.register()
    os.register_at_fork(after_in_child=_after_fork)


def _patch_everywhere(name: str, maker) -> None:
    """c10d's function ``name`` wrapped by ``maker``, in c10d and where torch.distributed
    exports the same function."""
    orig = getattr(c10d, name)
    if getattr(orig, "_ringwatch", False):
        return
    wrapped = maker(orig)
    for mod in (c10d, dist):
        if getattr(mod, name, None) is orig:
            STATE.patched[(mod, name)] = orig
            setattr(mod, name, wrapped)


def _patch_function(mod, name: str, maker) -> None:
    orig = getattr(mod, name, None)
    if orig is None or getattr(orig, "_ringwatch", False):
        return
    STATE.patched[(mod, name)] = orig
    setattr(mod, name, maker(orig))


def _wrap_init(orig):
    @functools.wraps(orig)
    def init_process_group(*args, **kwargs):
        cfg = STATE.config
        if cfg is not None and cfg.wrap_backend:
            from ringwatch.agent.capture._wrapper_backend import rewrite_backend_arg

            args, kwargs = rewrite_backend_arg(orig, args, kwargs)
        out = orig(*args, **kwargs)
        try:
            start_recording()
        except Exception as exc:  # noqa: BLE001
            warn_once("start", f"ringwatch could not start recording: {exc!r}")
        return out

    init_process_group._ringwatch = True
    return init_process_group


def _wrap_new_group(orig):
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def _new_process_group_helper(*args, **kwargs):
        out = orig(*args, **kwargs)
        rec = STATE.recorder
        pg = out[0] if isinstance(out, tuple) else out
        if rec is not None and not rec.closed and isinstance(pg, dist.ProcessGroup):
            try:  # register now, so an NCCL group's hook is in place before its first op
                b = sig.bind(*args, **kwargs).arguments
                ranks = list(b.get("global_ranks_in_group") or range(b["group_size"]))
                _pg_hooks.group_info(rec, pg, ranks=ranks)
            except Exception as exc:  # noqa: BLE001
                warn_once("new_group", f"could not register a new group early: {exc!r}")
        return out

    _new_process_group_helper._ringwatch = True
    return _new_process_group_helper


def _wrap_destroy(orig):
    @functools.wraps(orig)
    def destroy_process_group(group=None):
        runtime = STATE.runtime
        whole = group is None or group is c10d.GroupMember.WORLD
        out = orig(group)
        if runtime is not None and whole:
            runtime.close()  # the job is done with collectives: write everything now
        return out

    destroy_process_group._ringwatch = True
    return destroy_process_group


def _on_optimizer_step(optimizer, args, kwargs) -> None:
    rec = STATE.recorder
    if rec is None:
        return
    if rec.step_owner is None:
        rec.step_owner = id(optimizer)  # with several optimizers, the first one counts
    if id(optimizer) == rec.step_owner:
        rec.auto_step()


def _after_fork() -> None:
    # A forked child (DataLoader worker) does not record, and must not flush the parent's log.
    if STATE.runtime is not None:
        STATE.runtime._closed = True
    STATE.recorder = None
    STATE.runtime = None


def _job_id(cfg: CaptureConfig) -> str:
    if cfg.job_id:
        return cfg.job_id
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id.lower() != "none":
        return run_id
    store = c10d._get_default_store()
    if dist.get_rank() == 0:
        jid = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        store.set(_JOB_KEY, jid)
        return jid
    try:
        store.wait([_JOB_KEY], timedelta(seconds=_JOB_ID_WAIT_S))
        return store.get(_JOB_KEY).decode()
    except Exception as exc:  # noqa: BLE001
        jid = f"local-{socket.gethostname()}-{os.getpid()}"
        warn_once("job_id", f"ranks could not agree on a job id ({exc}); using {jid}; set "
                  "RINGWATCH_JOB_ID to group the ranks of one job")
        return jid


def _identity(cfg: CaptureConfig) -> RankIdentity:
    local = os.environ.get("LOCAL_RANK")
    return RankIdentity(
        job_id=_job_id(cfg), rank=dist.get_rank(),
        local_rank=int(local) if local and local.lstrip("-").isdigit() else None,
        world_size=dist.get_world_size(), host=cfg.host or socket.gethostname(),
        pid=os.getpid())


def start_recording() -> Recorder | None:
    """Create this rank's recorder and writer (idempotent). Called once the default group
    exists; returns None when recording is impossible (the job goes on)."""
    with _LOCK:
        if STATE.recorder is not None:
            if STATE.recorder.closed:
                warn_once("reinit", "the process group was re-created after "
                          "destroy_process_group(): ringwatch records the first one only")
            return STATE.recorder
        cfg = STATE.config
        if cfg is None or STATE.start_failed:
            return None
        ident = _identity(cfg)
        directory = rank_dir(cfg.log_dir, ident.job_id, ident.rank)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            STATE.start_failed = True
            warn_once("log_dir", f"log directory {directory} is not writable ({exc.strerror}); "
                      "the job runs on without ringwatch")
            return None
        rec = Recorder(ident, buffer_events=cfg.buffer_events)
        if cfg.auto_step:
            rec.step = 0
        writer = SegmentWriter(directory, ident, compact_segments=cfg.compact_segments)
        if STATE.native_module is not None:
            from ringwatch.agent.capture._native import NativeFeed

            STATE.native = NativeFeed(STATE.native_module, rec)
            STATE.native.set_step(rec.step)
            rec.step_sink = STATE.native.set_step
        runtime = Runtime(rec, writer, cfg, read_seq=backend_seq, fr_dump=dump_local,
                          native=STATE.native)
        STATE.recorder, STATE.runtime = rec, runtime
        for pg in list(c10d._world.pg_names):
            try:
                _pg_hooks.group_info(rec, pg)
            except Exception as exc:  # noqa: BLE001
                warn_once("register", f"could not register a group: {exc!r}")
        runtime.start()
        ExitHandlers(runtime).install()
        return rec


def mark_step(step: int | None = None) -> int | None:
    """Mark the start of a training step; later collectives carry it in the ``step`` column.

    Args:
        step: The step number; None means the previous one plus one.

    Returns:
        The step now in force, or None when nothing is being recorded.
    """
    rec = STATE.recorder
    if rec is None:
        return None
    return rec.mark_step(step)


def detach() -> None:
    """Flush the log and restore every patched torch function (mostly for tests)."""
    with _LOCK:
        runtime = STATE.runtime
        if runtime is not None:
            runtime.close()
        if STATE.native is not None:
            STATE.native.release()
            STATE.native = None
        STATE.native_module = None
        for (owner, name), orig in reversed(list(STATE.patched.items())):
            setattr(owner, name, orig)
        STATE.patched.clear()
        for handle in STATE.handles:
            handle.remove()
        STATE.handles.clear()
        if STATE.recorder is not None:
            from ringwatch.agent.capture._nccl import release_hooks

            release_hooks(STATE.recorder)
        STATE.recorder = STATE.runtime = None
        STATE.attached = False
        STATE.start_failed = False


__all__ = ["attach", "detach", "mark_step", "start_recording"]
