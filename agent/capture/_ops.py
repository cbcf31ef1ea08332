"""What each ``ProcessGroup`` method is, and how to read sizes, root and peer from its arguments.

The pybind ``ProcessGroup`` methods come in overloads (``allreduce(tensors, opts)``,
``allreduce(tensors, op)``, ``allreduce(tensor, op)``; ``broadcast(tensors, opts)``,
``broadcast(tensor, root)``), so arguments are read by position and by shape, never by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class OpSpec:
    """How to read one ``ProcessGroup`` method.

    Attributes:
        op: Schema op name.
        inp: Position of the input buffer(s), or None.
        out: Position of the output buffer(s), or None.
        kind: ``coll`` (collective), ``rooted`` (collective with a root), ``send``, ``recv``,
            ``recv_any`` (receive from any source), ``blocking`` (returns None, blocks).
    """

    op: str
    inp: int | None
    out: int | None
    kind: str = "coll"


OP_SPECS: dict[str, OpSpec] = {
    "allreduce": OpSpec("all_reduce", 0, 0),
    "allreduce_coalesced": OpSpec("all_reduce_coalesced", 0, 0),
    "allgather": OpSpec("all_gather", 1, 0),
    "allgather_coalesced": OpSpec("all_gather_coalesced", 1, 0),
    "allgather_into_tensor_coalesced": OpSpec("all_gather_into_tensor_coalesced", 1, 0),
    "_allgather_base": OpSpec("all_gather_into_tensor", 1, 0),
    "all_gather_single": OpSpec("all_gather_into_tensor", 1, 0),
    "all_gather_single_coalesced": OpSpec("all_gather_into_tensor_coalesced", 1, 0),
    "reduce_scatter": OpSpec("reduce_scatter", 1, 0),
    "_reduce_scatter_base": OpSpec("reduce_scatter_tensor", 1, 0),
    "reduce_scatter_single": OpSpec("reduce_scatter_tensor", 1, 0),
    "reduce_scatter_single_coalesced": OpSpec("reduce_scatter_tensor_coalesced", 1, 0),
    "reduce_scatter_tensor_coalesced": OpSpec("reduce_scatter_tensor_coalesced", 1, 0),
    "alltoall": OpSpec("all_to_all", 1, 0),
    "alltoall_base": OpSpec("all_to_all_single", 1, 0),
    "all_to_all_single": OpSpec("all_to_all_single", 1, 0),
    "broadcast": OpSpec("broadcast", 0, 0, "rooted"),
    "reduce": OpSpec("reduce", 0, 0, "rooted"),
    "gather": OpSpec("gather", 1, 0, "rooted"),
    "scatter": OpSpec("scatter", 1, 0, "rooted"),
    "send": OpSpec("send", 0, None, "send"),
    "recv": OpSpec("recv", None, 0, "recv"),
    "recv_anysource": OpSpec("recv", None, 0, "recv_any"),
    "barrier": OpSpec("barrier", None, None),
    "monitored_barrier": OpSpec("monitored_barrier", None, None, "blocking"),
}

# PyTorch's c10d ``OpType`` names (NCCL completion hook) and Flight Recorder profiling names
# (after the ``gloo:``/``nccl:`` prefix) mapped to schema op names.
OPTYPE_TO_OP: dict[str, str] = {
    "BROADCAST": "broadcast", "ALLREDUCE": "all_reduce",
    "ALLREDUCE_COALESCED": "all_reduce_coalesced", "REDUCE": "reduce",
    "ALLGATHER": "all_gather", "_ALLGATHER_BASE": "all_gather_into_tensor",
    "ALLGATHER_COALESCED": "all_gather_coalesced", "GATHER": "gather", "SCATTER": "scatter",
    "REDUCE_SCATTER": "reduce_scatter", "ALLTOALL_BASE": "all_to_all_single",
    "ALLTOALL": "all_to_all", "SEND": "send", "RECV": "recv", "RECVANYSOURCE": "recv",
    "BARRIER": "barrier", "_REDUCE_SCATTER_BASE": "reduce_scatter_tensor",
    "COALESCED": "coalesced", "_ALLREDUCE_SPARSE": "all_reduce",
    "REDUCE_SCATTER_TENSOR_COALESCED": "reduce_scatter_tensor_coalesced",
    "UNKNOWN": "unknown",
}

_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``float32`` (cached)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def buffer_stats(x) -> tuple[int, int, torch.Tensor | None]:
    """(bytes, elements, first tensor) of a tensor, a list of tensors or a list of lists."""
    if isinstance(x, torch.Tensor):
        n = x.numel()
        return n * x.element_size(), n, x
    nbytes = numel = 0
    first = None
    if isinstance(x, (list, tuple)):
        for item in x:
            b, n, t = buffer_stats(item)
            nbytes += b
            numel += n
            if first is None:
                first = t
    return nbytes, numel, first


def find_opts(args: tuple, kwargs: dict | None = None):
    """The ``*Options`` object among the arguments (it carries ``asyncOp``), or None."""
    for a in args:
        if hasattr(a, "asyncOp"):
            return a
    if kwargs:
        for a in kwargs.values():
            if hasattr(a, "asyncOp"):
                return a
    return None


def root_of(args: tuple, opts) -> int | None:
    """Group rank of the root of a rooted op (from its options or an ``int`` argument)."""
    if opts is not None and hasattr(opts, "rootRank"):
        return int(opts.rootRank)
    for a in args[1:]:
        if isinstance(a, int) and not isinstance(a, bool):
            return a
    return None
