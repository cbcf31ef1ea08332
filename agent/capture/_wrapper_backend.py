"""The opt-in ``ringwatch`` backend: Gloo, with every collective recorded at the backend.

Why: collectives issued from C++ never call the Python ``ProcessGroup`` methods that
``_pg_hooks`` wraps: DDP's reducer (without a Python comm hook) and its construction-time
checks and broadcasts, functional collectives (``torch.distributed._functional_collectives``,
DTensor), compiled code. On Gloo those are otherwise only recovered afterwards from the Flight
Recorder, with no completion state. A group created through this backend sees them as they are
issued, with sizes, completion time and status.

How (PyTorch 2.13): Python can implement a backend only as a subclass of ``ProcessGroup``
(pybind's ``PyProcessGroup`` trampoline; the C++ ``Backend`` class has no Python trampoline),
and ``_new_process_group_helper`` then uses that object *as* the group. So the backend's
creator returns a :class:`RingwatchProcessGroup`: C++ callers reach its Python methods through
the trampoline (which overrides ``allreduce``, ``allreduce_coalesced``, ``allgather``,
``all_gather_single_coalesced``, ``reduce_scatter``, ``reduce_scatter_single_coalesced``,
``all_to_all_single``, ``broadcast``, ``barrier``, ``send`` and ``recv``, or their older
names), and every method delegates to a plain ``ProcessGroup`` holding the real
``ProcessGroupGloo``. That Gloo backend is also registered on the wrapper itself, for the same
devices as a plain Gloo group, so device lists, ``_get_backend``, coalescing, the sequence
counter, ``monitored_barrier`` internals and ``shutdown`` all reach the real Gloo.

Recording: a Python subclass's method shadows the front-door wrapper on ``ProcessGroup``, so
Python callers (``torch.distributed`` functions, DDP's comm hook) reach these methods too. Each
method records exactly as the front door does (``_pg_hooks._prepare``/``_issue``: same
numbering, same completion tracking): ``api`` is ``dist.<function>`` when a
``torch.distributed`` function called it, ``ddp`` inside DDP's comm hook, else ``backend``
(a C++ caller). When the front door already records the call on this thread
(``rec.tls.front``: a ``ProcessGroup`` base method whose C++ implementation calls one of these),
nothing is recorded a second time.

Transparency: after creation the group is registered in ``torch.distributed`` under the backend
name a plain Gloo group would have (``dist.get_backend(group) == "gloo"``), so PyTorch's own
Gloo checks (``monitored_barrier``, the ZeRO DDP hook, device mesh, FSDP) behave as on Gloo,
and the ``backend`` column says ``gloo``; rows only this backend could see carry
``api = "backend"``. Later ``new_group`` calls that would create Gloo groups create wrapped
ones too. If wrapping ever fails, the group is created as plain Gloo and the job goes on.

Entry points: :func:`register` (``attach(wrap_backend=True)`` calls it) and
:func:`rewrite_backend_arg` (applied to ``init_process_group``'s arguments).
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ringwatch._log import warn_once
from ringwatch.agent.capture._ops import OP_SPECS
from ringwatch.agent.capture._pg_hooks import _issue, _prepare, group_info
from ringwatch.agent.capture._state import STATE

BACKEND_NAME = "ringwatch"
API = "backend"
_GLOO = "gloo"
_LOCK = threading.RLock()
# Hand-off between init_process_group's argument rewrite, the group-creation wrapper and the
# backend's creator (all on the thread creating the group): devices to register, and the
# backend name torch.distributed would have registered for the group.
_TLS = threading.local()


def _pybind_method(name: str):
    """``ProcessGroup.<name>`` as PyTorch defines it (under ringwatch's own wrappers)."""
    f = dist.ProcessGroup.__dict__.get(name)
    while f is not None and getattr(f, "_ringwatch", False):
        f = getattr(f, "__wrapped__", None)
    return f


def _prepare_deep(rec, pg, name, spec, args, kwargs):
    # For a call from C++ on a thread with no Python frame: _prepare looks 3 frames up.
    return _prepare(rec, pg, name, spec, args, kwargs)


def _make_method(name: str, spec, orig):
    def delegate(pg, *args, **kwargs):
        return orig(pg._rw_delegate, *args, **kwargs)

    def method(self, *args, **kwargs):
        rec = STATE.recorder
        if rec is None or rec.closed or getattr(rec.tls, "front", False):
            return orig(self._rw_delegate, *args, **kwargs)
        try:
            if self not in rec.groups:
                group_info(rec, self, ranks=self._rw_ranks or None)
            if sys._getframe().f_back is None:
                c = _prepare_deep(rec, self, name, spec, args, kwargs)
            else:  # called right here, so that _prepare finds the caller 3 frames up
                c = _prepare(rec, self, name, spec, args, kwargs)
            if c.event.api.startswith("pg."):
                c.event.api = API  # no torch.distributed function, no comm hook: C++
        except Exception as exc:  # noqa: BLE001 - never stand between the job and Gloo
            warn_once(f"backend_prepare:{name}",
                      f"ringwatch backend could not record {name}: {exc!r}")
            return orig(self._rw_delegate, *args, **kwargs)
        return _issue(rec, c, delegate, self, args, kwargs)

    method.__name__ = name
    method.__qualname__ = f"RingwatchProcessGroup.{name}"
    method.__doc__ = getattr(orig, "__doc__", None)
    return method


class RingwatchProcessGroup(dist.ProcessGroup):
    """A Gloo group whose collectives ringwatch records at the backend (see the module doc).

    Args:
        rank: This process's rank in the group.
        size: The group's size.
        delegate: A plain ``ProcessGroup`` holding the real Gloo backend: every call goes there.
        ranks: The members' global ranks (empty for the default group).
    """

    def __init__(self, rank: int, size: int, delegate: dist.ProcessGroup, ranks: list[int]):
        # (PyTorch builds Python subclasses only through the (rank, size) constructor.)
        super().__init__(rank, size)
        self._rw_delegate = delegate
        self._rw_ranks = list(ranks)

    def __repr__(self) -> str:
        return f"RingwatchProcessGroup(rank={self.rank()}, size={self.size()}, backend=gloo)"

    # A Python subclass is built without a store, which PyTorch's split and merge need: the
    # delegate has one (the groups they create are plain Gloo groups).
    def split_group(self, *args, **kwargs):
        return self._rw_delegate.split_group(*args, **kwargs)

    def merge_remote_group(self, *args, **kwargs):
        return self._rw_delegate.merge_remote_group(*args, **kwargs)


for _name, _spec in OP_SPECS.items():
    _orig = _pybind_method(_name)
    if _orig is not None:
        setattr(RingwatchProcessGroup, _name, _make_method(_name, _spec, _orig))
del _name, _spec, _orig


def _gloo_devices() -> list[str]:
    return list(dist.Backend.backend_capability.get(_GLOO, ["cpu"]))


def _create(opts, backend_options=None) -> RingwatchProcessGroup:
    """The backend's creator (``extended_api``): a real Gloo backend, built as
    ``_new_process_group_helper`` builds one, wrapped in a :class:`RingwatchProcessGroup`.

    ``backend_options`` (``init_process_group``'s ``pg_options``) is ignored, as PyTorch
    ignores it for Gloo.
    """
    store, rank, size, timeout = opts.store, opts.group_rank, opts.group_size, opts.timeout
    ranks = list(opts.global_ranks_in_group)
    gloo = dist.ProcessGroupGloo(store, rank, size, timeout=timeout)
    gloo.options.global_ranks_in_group = ranks
    gloo.options.group_name = opts.group_id
    gloo._set_sequence_number_for_group()
    backend = gloo
    if c10d.get_debug_level() == c10d.DebugLevel.DETAIL:  # as PyTorch does for Gloo
        backend = c10d._create_process_group_wrapper(
            wrapped_pg=gloo, store_prefix=opts.group_id, store=store, rank=rank,
            world_size=size, timeout=timeout)
    try:
        return _wrap(backend, store, rank, size, ranks)
    except Exception as exc:  # noqa: BLE001 - the job gets its Gloo group all the same
        warn_once("wrap_create", f"wrap_backend: could not wrap a Gloo group ({exc!r}); it "
                  "runs as plain Gloo (collectives issued from C++ are then recovered from the "
                  "Flight Recorder)")
        return backend


def _wrap(backend, store, rank: int, size: int, ranks: list[int]) -> RingwatchProcessGroup:
    # The group-level store (torch gives the backend a "<device>/" prefix of it).
    group_store = store.underlying_store if isinstance(store, dist.PrefixStore) else store
    devices = getattr(_TLS, "devices", None) or _gloo_devices()
    gloo_type = dist.ProcessGroup.BackendType.GLOO
    delegate = dist.ProcessGroup(group_store, rank, size)
    pg = RingwatchProcessGroup(rank, size, delegate, ranks)
    for target in (delegate, pg):
        target._set_default_backend(gloo_type)
        for dev in devices:
            target._register_backend(torch.device(dev), gloo_type, backend)
    return pg


# ---- choosing the backend ------------------------------------------------------------------


def _device_map(spec: str) -> dict[str, str]:
    """device -> backend name for a backend string; empty when PyTorch cannot parse it."""
    try:
        return dict(c10d.BackendConfig(dist.Backend(spec)).get_device_backend_map())
    except Exception:  # noqa: BLE001 - unknown to PyTorch: it will say so itself
        return {}


def wrapped_spec(spec: str) -> str | None:
    """The backend string that creates ``spec``'s group through ringwatch, or None to leave
    it alone (no Gloo in it, or Gloo mixed with another backend).

    ``"gloo"`` -> ``"ringwatch"``; ``"cpu:gloo"`` and ``"undefined"`` on a machine without an
    accelerator -> ``"cpu:ringwatch"``. A mix such as ``"cpu:gloo,cuda:nccl"`` stays as it
    is: PyTorch uses a Python backend as the whole group and would drop the other backends.
    """
    if BACKEND_NAME in spec.lower():
        return None
    mapping = _device_map(spec)
    if not mapping:
        return None
    gloo_devices = [d for d, b in mapping.items() if b == _GLOO]
    if not gloo_devices:
        return None
    if len(gloo_devices) < len(mapping):
        others = sorted({b for b in mapping.values() if b != _GLOO})
        warn_once("wrap_mixed", f"wrap_backend: backend {spec!r} mixes Gloo with {others}; "
                  "PyTorch cannot combine a Python backend with other backends in one group, "
                  "so this group is created as asked, without the ringwatch backend (its "
                  "Python-issued collectives are still recorded)")
        return None
    if ":" in spec or spec == dist.Backend.UNDEFINED:
        return ",".join(f"{d}:{BACKEND_NAME}" for d in mapping)
    return BACKEND_NAME


@functools.lru_cache(maxsize=8)
def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


def rewrite_backend_arg(orig, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``init_process_group``'s arguments with a Gloo backend choice turned into ``ringwatch``.

    The backend may be given by position, by keyword, or not at all (PyTorch's default:
    Gloo for the CPU, plus the accelerator's backend where there is one). Only a choice that
    is Gloo on every device it names is rewritten; ``nccl`` and the rest, mixes such as
    ``"cpu:gloo,cuda:nccl"``, and a ``device_id`` without a backend are left untouched.
    Never raises: on any doubt the arguments come back unchanged.

    Args:
        orig: PyTorch's ``init_process_group`` (for its signature).
        args: Positional arguments of the call.
        kwargs: Keyword arguments of the call.
    """
    try:
        sig = _signature(orig)
        given = sig.bind_partial(*args, **kwargs).arguments
        backend = given.get("backend")
        if backend is None and given.get("device_id") is not None:
            return args, kwargs  # PyTorch picks the device's own backend
        spec = str(dist.Backend(backend if backend is not None else dist.Backend.UNDEFINED))
        new = wrapped_spec(spec)
        if new is None:
            return args, kwargs
        _TLS.shown = spec  # what torch.distributed would have registered for the group
        i = list(sig.parameters).index("backend")
        if "backend" not in kwargs and i < len(args):
            args = (*args[:i], new, *args[i + 1:])
        else:
            kwargs = {**kwargs, "backend": new}
        return args, kwargs
    except Exception as exc:  # noqa: BLE001
        warn_once("wrap_rewrite", f"wrap_backend: could not choose the ringwatch backend "
                  f"({exc!r}); the group uses the backend asked for")
        return args, kwargs


def _wrapping_new_groups() -> bool:
    cfg = STATE.config
    if cfg is not None and getattr(cfg, "wrap_backend", False):
        return True
    try:
        return isinstance(c10d._world.default_pg, RingwatchProcessGroup)
    except Exception:  # noqa: BLE001
        return False


def _plan(backend) -> tuple[str, str, list[str]] | None:
    """(backend to create with, name torch.distributed should show, devices) or None."""
    if backend is None:
        return None
    spec = str(backend)
    mapping = _device_map(spec)
    if mapping and all(b == BACKEND_NAME for b in mapping.values()):
        shown = getattr(_TLS, "shown", None) or spec.replace(BACKEND_NAME, _GLOO)
        return spec, shown, list(mapping)
    if not _wrapping_new_groups():
        return None
    new = wrapped_spec(spec)
    if new is None:
        return None
    return new, spec, list(_device_map(new))


def _present_as_gloo(pg: dist.ProcessGroup, shown: str, device_id=None) -> None:
    """Register ``pg`` in torch.distributed under the name a plain Gloo group would have (and
    bind it to ``device_id``, as PyTorch binds the group object it would have used)."""
    if device_id is not None and pg.bound_device_id is None:
        pg.bound_device_id = device_id
    if not isinstance(pg, RingwatchProcessGroup):
        # The creator fell back to the bare Gloo backend, which torch registered as a custom
        # one: register it as Gloo (its sequence counter then serves the hooks and backfill).
        gloo_type = dist.ProcessGroup.BackendType.GLOO
        devices = list(pg._device_types)
        backend = pg._get_backend(devices[0])
        for dev in devices:
            pg._register_backend(dev, gloo_type, backend)
        pg._set_default_backend(gloo_type)
    world = c10d._world
    entry = world.pg_map.get(pg)
    if entry is not None:
        world.pg_map[pg] = (shown, entry[1])
        if pg in world.pg_backend_config:
            world.pg_backend_config[pg] = str(c10d.BackendConfig(dist.Backend(shown)))
    rec = STATE.recorder
    info = rec.groups.get(pg) if rec is not None else None
    if info is not None:  # registered while it still showed "ringwatch"
        info.backend = str(dist.get_backend(pg))


def _wrap_group_helper(orig):
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def _new_process_group_helper(*args, **kwargs):
        plan = None
        try:
            bound = sig.bind(*args, **kwargs)
            plan = _plan(bound.arguments.get("backend"))
            if plan is not None:
                bound.arguments["backend"] = plan[0]
                args, kwargs = bound.args, bound.kwargs
                _TLS.devices = plan[2]
        except Exception as exc:  # noqa: BLE001
            warn_once("wrap_group", f"wrap_backend: could not plan a group's backend: {exc!r}")
            plan = None
        finally:
            _TLS.shown = None
        try:
            out = orig(*args, **kwargs)
        finally:
            _TLS.devices = None
        if plan is not None:
            pg = out[0] if isinstance(out, tuple) else out
            if isinstance(pg, dist.ProcessGroup):  # not a non-member's placeholder
                try:
                    _present_as_gloo(pg, plan[1], bound.arguments.get("device_id"))
                except Exception as exc:  # noqa: BLE001
                    warn_once("wrap_present", f"wrap_backend: could not register the group "
                              f"as Gloo ({exc!r}); dist.get_backend() says {BACKEND_NAME!r}")
        return out

    _new_process_group_helper._ringwatch_backend = True
    return _new_process_group_helper


def register() -> None:
    """Register the ``ringwatch`` backend with ``torch.distributed`` (idempotent).

    After this, ``init_process_group("ringwatch")`` (or a Gloo choice rewritten by
    :func:`rewrite_backend_arg`) creates Gloo groups through :class:`RingwatchProcessGroup`,
    and so do later ``new_group`` calls that would have created Gloo groups.
    """
    with _LOCK:
        plugin = dist.Backend._plugins.get(BACKEND_NAME.upper())
        if plugin is None or plugin.creator_fn is not _create:
            dist.Backend.register_backend(BACKEND_NAME, _create, extended_api=True,
                                          devices=_gloo_devices())
        current = c10d._new_process_group_helper
        if not getattr(current, "_ringwatch_backend", False):
            # detach() restores the original (the entry attach() made, if any, already has it).
            STATE.patched.setdefault((c10d, "_new_process_group_helper"), current)
            c10d._new_process_group_helper = _wrap_group_helper(current)


__all__ = ["BACKEND_NAME", "RingwatchProcessGroup", "register", "rewrite_backend_arg",
           "wrapped_spec"]
