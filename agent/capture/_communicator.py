"""An attach point for communicators that bypass ``torch.distributed``: serving engines' own.

vLLM and SGLang send their tensor-parallel all-reduces through their own objects (custom
all-reduce kernels, ``pynccl``), not through ``torch.distributed``, so the collective hooks never
see most of a decode step's traffic. :func:`attach_communicator` wraps such an object's methods
by name (``all_reduce``, ``all_gather``, ``reduce_scatter``, ``all_to_all``, ``broadcast``,
``gather``, ``send``, ``recv`` where it has them) and records every call like a collective of a
group of its own:

* the group's members from the object (``ranks`` and ``rank_in_group``, as vLLM's
  ``GroupCoordinator`` has them; else ``rank`` and ``world_size``), or given;
* sizes and dtype from the first tensor argument;
* timing: on a CUDA tensor, CUDA events around the call on the current stream, read by the
  writer thread once the device is past them (the device duration, like NCCL's own timing);
  on a CPU tensor, the host's time in the call.

The target in vLLM is ``vllm.distributed.parallel_state.GroupCoordinator`` (what
``get_tp_group()`` returns): every tensor-parallel collective of the model passes through its
methods, whichever device communicator (custom all-reduce, pynccl, symmetric memory) then runs
it::

    from vllm.distributed import get_tp_group
    ringwatch.attach_communicator(get_tp_group(), name="tp")

A call the wrapper cannot describe is still made, unchanged; the wrapper never raises on its
own account (telemetry never harms the job). The returned function restores the methods.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ringwatch.agent.capture._ops import buffer_stats, dtype_name
from ringwatch.agent.capture._recorder import GroupInfo
from ringwatch.agent.capture._state import STATE

#: Method name -> schema op (what the call is recorded as).
METHODS: dict[str, str] = {
    "all_reduce": "all_reduce", "custom_all_reduce": "all_reduce",
    "all_gather": "all_gather", "all_gatherv": "all_gather",
    "reduce_scatter": "reduce_scatter", "reduce_scatterv": "reduce_scatter",
    "all_to_all": "all_to_all", "all_to_all_single": "all_to_all_single",
    "broadcast": "broadcast", "gather": "gather", "send": "send", "recv": "recv",
}
_LOCK = threading.Lock()


class _CudaTiming:
    """Looks like a ``Work`` to the writer's poll: complete once the end event is, its
    duration the events' elapsed time (ms, as ``Work._get_duration``)."""

    __slots__ = ("start", "end")

    def __init__(self, start, end):
        self.start, self.end = start, end

    def is_completed(self) -> bool:
        return bool(self.end.query())

    def _get_duration(self) -> float:
        return float(self.start.elapsed_time(self.end))

    def is_success(self) -> bool:
        return True


def _members(comm, ranks: list[int] | None, rank: int | None) -> tuple[list[int], int]:
    """(global ranks of the group, this process's rank in it): given, or the object's
    ``ranks``/``rank_in_group`` (vLLM's ``GroupCoordinator``), or the members of its ``group``
    (a ``ProcessGroup``, as ``PyNcclCommunicator`` keeps) with its ``rank``, or the whole world
    when its ``world_size`` is the world's."""
    import torch.distributed as dist

    if ranks is None:
        ranks = getattr(comm, "ranks", None)
    if ranks is None and getattr(comm, "group", None) is not None:
        try:
            ranks = dist.get_process_group_ranks(comm.group)
        except Exception:  # noqa: BLE001, S110 - not a group torch.distributed knows
            pass
    if ranks is None:
        size = int(comm.world_size)
        if not (dist.is_initialized() and dist.get_world_size() == size):
            raise ValueError(f"a group of {size} in a world of another size")
        ranks = list(range(size))
    ranks = [int(r) for r in ranks]
    if rank is None:
        rank = getattr(comm, "rank_in_group", None)
    if rank is None:
        rank = int(comm.rank)
    if not 0 <= int(rank) < len(ranks):
        raise ValueError(f"rank {rank} is not a rank of a group of {len(ranks)}")
    return ranks, int(rank)


def _first_tensor(args: tuple, kwargs: dict):
    import torch

    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    return None


def attach_communicator(comm: Any, *, name: str | None = None,
                        methods: tuple[str, ...] | dict[str, str] | None = None,
                        ranks: list[int] | None = None,
                        rank: int | None = None) -> Callable[[], None]:
    """Record every call of ``comm``'s communication methods (see the module).

    Args:
        comm: The communicator object (vLLM's ``GroupCoordinator``, a ``PyNcclCommunicator``,
            any object with such methods).
        name: The group's name in the logs (default: the object's ``unique_name``, else its
            class name).
        methods: Method names to wrap (default: those of :data:`METHODS` it has), or a
            ``{method: op}`` mapping for methods :data:`METHODS` does not know (``op`` one of
            the schema's ops, e.g. ``{"fused_allreduce_rmsnorm": "all_reduce"}``).
        ranks: The group's global ranks, when the object does not say.
        rank: This process's rank within the group, when the object does not say.

    Returns:
        A function that restores the original methods. Without an attached ringwatch (see
        :func:`ringwatch.attach`) nothing is wrapped and it does nothing.

    Raises:
        ValueError: the group's members cannot be told (give ``ranks`` and ``rank``).
    """
    rec = STATE.recorder
    if rec is None:
        return lambda: None
    try:
        members, mine = _members(comm, ranks, rank)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot tell the members of {type(comm).__name__}: pass ranks= and "
                         f"rank= ({exc})") from exc
    from ringwatch._schema import OPS

    if methods is None:
        wanted = {m: op for m, op in METHODS.items() if callable(getattr(comm, m, None))}
    elif isinstance(methods, dict):
        wanted = dict(methods)
    else:
        wanted = {m: METHODS.get(m) for m in methods}
    bad = sorted(m for m, op in wanted.items() if op not in OPS)
    if bad:
        raise ValueError(f"methods {bad}: say which op each is ({{method: op}}, an op of "
                         "ringwatch.OPS)")
    label = name or getattr(comm, "unique_name", None) or type(comm).__name__
    info = rec.add_group(GroupInfo(key=("communicator", id(comm)), name=str(label),
                                   desc=type(comm).__qualname__,
                                   backend=f"custom:{type(comm).__name__}",
                                   global_ranks=members, group_rank=mine))
    originals: dict[str, Any] = {}
    for meth, op in wanted.items():
        orig = getattr(comm, meth, None)
        if not callable(orig):
            continue
        originals[meth] = orig
        setattr(comm, meth, _wrap(orig, op, info))

    def detach() -> None:
        for meth, orig in originals.items():
            try:
                setattr(comm, meth, orig)
            except Exception:  # noqa: BLE001, S110 - an object that went away
                pass

    return detach


def _wrap(orig: Callable, op: str, info: GroupInfo) -> Callable:
    def call(*args, **kwargs):
        rec = STATE.recorder
        if rec is None:
            return orig(*args, **kwargs)
        ev = timing = None
        try:
            ev, timing = _begin(rec, info, op, args, kwargs)
        except Exception:  # noqa: BLE001 - never the job's problem
            ev = timing = None
        try:
            out = orig(*args, **kwargs)
        except BaseException as exc:
            if ev is not None:
                rec.end_exc(ev, exc)
            raise
        if ev is not None:
            try:
                if timing is not None:
                    timing.end.record()
                    ev.work = timing  # the writer's poll finishes it with the device time
                else:
                    rec.end(ev)
            except Exception:  # noqa: BLE001
                rec.end(ev, status="unknown", end_source="none")
        return out

    call.__wrapped__ = orig
    return call


def _begin(rec, info: GroupInfo, op: str, args: tuple, kwargs: dict):
    t = _first_tensor(args, kwargs)
    ev = rec.new_event(info, op, "communicator")
    if t is not None:
        nbytes, numel, _ = buffer_stats(t)
        ev.nbytes_in = ev.nbytes_out = nbytes
        ev.numel, ev.dtype = numel, dtype_name(t.dtype)
    if op in ("send", "recv"):
        peer = next((a for a in (*args[1:], *kwargs.values())
                     if isinstance(a, int) and not isinstance(a, bool)), None)
        ev.is_p2p, ev.peer = True, info.to_global(peer)
    timing = None
    ev.async_op = bool(t is not None and t.is_cuda)  # a launch returns before the device ends
    if t is not None and t.is_cuda:
        import torch

        timing = _CudaTiming(torch.cuda.Event(enable_timing=True),
                             torch.cuda.Event(enable_timing=True))
        timing.start.record()
    with rec.lock:
        rec.issue(ev, None)
        if ev.is_p2p:
            me = info.my_global_rank
            src, dst = (me, ev.peer) if op == "send" else (ev.peer, me)
            n = info.pair_seq.get((src, dst), 0) + 1
            info.pair_seq[(src, dst)] = n
            ev.seq = n
        else:
            info.coll_seq += 1
            ev.seq = info.coll_seq
    return ev, timing
