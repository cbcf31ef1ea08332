"""PyTorch Flight Recorder (FR) dumps: read them, and read the live one of this process.

The FR is PyTorch's own ring buffer of the last ``TORCH_FR_BUFFER_SIZE`` (default 2000)
collectives per process, on by default. ringwatch uses it three ways: to recover collectives
issued from C++ outside its hooks (backfill), to save a copy beside each rank's log at exit,
and as ground truth in tests. Dump format: ``{"version", "pg_config", "pg_status",
"entries": [{"pg_id", "process_group": [name, desc], "collective_seq_id", "p2p_seq_id", "op_id",
"is_p2p", "profiling_name": "gloo:all_reduce", "input_sizes", "input_dtypes", "output_sizes",
"output_dtypes", "state", "retired", "time_created_ns", "time_discovered_started_ns",
"time_discovered_completed_ns", "duration_ms"?}, ...]}``.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from math import prod
from pathlib import Path

# FR dtype names (c10 ScalarType) -> (schema dtype name, bytes per element)
_DTYPES: dict[str, tuple[str, int]] = {
    "Float": ("float32", 4), "Double": ("float64", 8), "Half": ("float16", 2),
    "BFloat16": ("bfloat16", 2), "Long": ("int64", 8), "Int": ("int32", 4),
    "Short": ("int16", 2), "Char": ("int8", 1), "Byte": ("uint8", 1), "Bool": ("bool", 1),
    "ComplexFloat": ("complex64", 8), "ComplexDouble": ("complex128", 16),
    "Float8_e4m3fn": ("float8_e4m3fn", 1), "Float8_e5m2": ("float8_e5m2", 1),
    "UInt16": ("uint16", 2), "UInt32": ("uint32", 4), "UInt64": ("uint64", 8),
}

# FR profiling names (prefix stripped) -> schema op
_OPS: dict[str, str] = {
    "all_reduce": "all_reduce", "allreduce": "all_reduce",
    "allreduce_coalesced": "all_reduce_coalesced", "all_reduce_coalesced": "all_reduce_coalesced",
    "all_reduce_barrier": "barrier", "barrier": "barrier",
    "all_gather": "all_gather", "_all_gather_base": "all_gather_into_tensor",
    "all_gather_into_tensor_coalesced": "all_gather_into_tensor_coalesced",
    "allgather_coalesced": "all_gather_coalesced",
    "reduce_scatter": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter_tensor",
    "reduce_scatter_tensor_coalesced": "reduce_scatter_tensor_coalesced",
    "broadcast": "broadcast", "reduce": "reduce", "gather": "gather", "scatter": "scatter",
    "all_to_all": "all_to_all", "alltoall": "all_to_all", "alltoall_base": "all_to_all_single",
    "all_to_all_single": "all_to_all_single", "send": "send", "recv": "recv",
    "coalesced": "coalesced",
}

# Ops that the FR of each backend names by their family only.
_FAMILY: dict[str, str] = {
    "all_reduce_coalesced": "all_reduce", "all_gather_coalesced": "all_gather",
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_to_all_single": "all_to_all", "monitored_barrier": "barrier",
}


def op_family(op: str) -> str:
    """Coarse family of a schema op (``all_reduce_coalesced`` -> ``all_reduce``)."""
    return _FAMILY.get(op, op)


def op_from_profiling_name(name: str) -> str:
    """``gloo:all_reduce`` / ``nccl:_all_gather_base`` / ``nccl:send 0->1`` -> schema op
    (``unknown`` if new)."""
    return _OPS.get(name.split(":", 1)[-1].split(" ", 1)[0], "unknown")


@dataclass(frozen=True, slots=True)
class FrEntry:
    """One Flight Recorder entry, in ringwatch's vocabulary."""

    pg: str
    pg_desc: str | None
    seq: int
    p2p_seq: int
    op_id: int
    is_p2p: bool
    op: str
    profiling_name: str
    dtype: str | None
    numel_in: int
    nbytes_in: int
    nbytes_out: int
    state: str
    retired: bool
    t_created_ns: int | None
    t_started_ns: int | None
    t_completed_ns: int | None
    duration_ns: int | None


def _bytes(sizes, dtypes) -> tuple[int, int]:
    numel = total = 0
    for i, shape in enumerate(sizes or []):
        n = prod(shape) if shape else 1
        numel += n
        dt = dtypes[i] if dtypes and i < len(dtypes) else (dtypes[0] if dtypes else None)
        total += n * _DTYPES.get(dt, ("", 0))[1]
    return numel, total


def _ns(v) -> int | None:
    return int(v) if v not in (None, 0, "0") else None


def parse_entries(dump: dict) -> list[FrEntry]:
    """The entries of a parsed FR dump, oldest first (by ``record_id``)."""
    out = []
    entries = sorted(dump.get("entries") or [], key=lambda e: e.get("record_id", 0))
    for e in entries:
        pg = e.get("process_group") or ["", None]
        in_dtypes = e.get("input_dtypes") or []
        out_dtypes = e.get("output_dtypes") or in_dtypes
        numel_in, nin = _bytes(e.get("input_sizes"), in_dtypes)
        _, nout = _bytes(e.get("output_sizes"), out_dtypes)
        first = (in_dtypes or out_dtypes or [None])[0]
        dur = e.get("duration_ms")
        out.append(FrEntry(
            pg=str(pg[0]), pg_desc=pg[1] if len(pg) > 1 else None,
            seq=int(e.get("collective_seq_id", 0)), p2p_seq=int(e.get("p2p_seq_id", 0)),
            op_id=int(e.get("op_id", 0)), is_p2p=bool(e.get("is_p2p", False)),
            op=op_from_profiling_name(str(e.get("profiling_name", ""))),
            profiling_name=str(e.get("profiling_name", "")),
            dtype=_DTYPES.get(first, (None, 0))[0] if first else None,
            numel_in=numel_in, nbytes_in=nin, nbytes_out=nout,
            state=str(e.get("state", "")), retired=bool(e.get("retired", False)),
            t_created_ns=_ns(e.get("time_created_ns")),
            t_started_ns=_ns(e.get("time_discovered_started_ns")),
            t_completed_ns=_ns(e.get("time_discovered_completed_ns")),
            duration_ns=None if dur is None else int(float(dur) * 1e6),
        ))
    return out


def dump_local() -> dict | None:
    """This process's FR content as a dict, merging the generic and the NCCL recorders.

    Returns None when torch has no FR or it is empty. Costs ~20-40 ms for 2000 entries, so
    callers rate-limit it.
    """
    import torch

    c10d = torch._C._distributed_c10d
    merged: dict | None = None
    for name in ("_dump_fr_trace_json", "_dump_nccl_trace_json"):
        fn = getattr(c10d, name, None)
        if fn is None:
            continue
        try:
            raw = fn(True, False)  # includeCollectives, onlyActive
        except Exception:  # noqa: BLE001 - e.g. the NCCL recorder in a build without NCCL
            continue
        d = json.loads(raw)
        if not d.get("entries"):
            continue
        if merged is None:
            merged = d
        else:
            merged["entries"] = merged["entries"] + d["entries"]
    return merged


#: Largest dump read, bytes: PyTorch's own are a few MB for the default 2,000 entries.
MAX_DUMP_BYTES = 512 << 20

# Older PyTorch releases pickle typed lists through these helpers; they rebuild a plain list
# (the value of ``restore_type_tag`` is the object itself). Nothing else is ever looked up.
_LIST_BUILDERS = {("torch.jit._pickle", name) for name in (
    "build_intlist", "build_doublelist", "build_boollist", "build_stringlist")}


def _tagged(value, _tag=None):
    return value


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle's opcodes make by themselves: dicts, lists, tuples, strings,
    bytes, numbers, booleans and None. A pickle that names any class or function (the way
    a malicious one runs code) is refused before anything is called."""

    def find_class(self, module: str, name: str):
        if (module, name) in _LIST_BUILDERS:
            return list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return _tagged
        raise pickle.UnpicklingError(f"refused: the pickle names {module}.{name}; a Flight "
                                     "Recorder dump holds only plain data")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused: the pickle refers to external objects")


def loads_plain_pickle(data: bytes):
    """Unpickle ``data`` into plain containers and scalars only (see :class:`_PlainUnpickler`).

    Raises:
        pickle.UnpicklingError: the pickle names a class or function, or is malformed.
    """
    return _PlainUnpickler(io.BytesIO(data)).load()


def load_dump(path: str | Path, *, max_bytes: int = MAX_DUMP_BYTES) -> dict:
    """Read an FR dump written as JSON (ringwatch's copy, ``_dump_*_json``) or pickle (PyTorch's
    own dumps). The pickle is read with a loader that builds plain data only: a planted file
    can never run code.

    Raises:
        ValueError: the file is neither, names a class or function, is larger than
            ``max_bytes``, or does not hold a dump (a dict).
    """
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes, over the {max_bytes} read for a Flight "
                         "Recorder dump")
    data = path.read_bytes()
    try:
        dump = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        try:
            dump = loads_plain_pickle(data)
        except Exception as exc:  # noqa: BLE001 - any malformed input is one answer
            raise ValueError(f"{path}: not a Flight Recorder dump (JSON or plain pickle): "
                             f"{exc}") from None
    if not isinstance(dump, dict):
        raise ValueError(f"{path}: not a Flight Recorder dump (a {type(dump).__name__}, "
                         "not a mapping)")
    return dump
