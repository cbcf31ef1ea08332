"""Flight Recorder dumps made by hand, as PyTorch lays them out (format 2.10), for the tests of
the dump reader and of hang attribution from dumps: Gloo-style (no start or completion times,
``retired`` when done, ``pg_config`` empty) or NCCL-style (states, times, ``pg_config`` with
the members)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

T0 = 1_700_000_000_000_000_000
GAP_NS = 10_000_000  # 10 ms between collectives


def entry(seq: int, *, pg: str = "0", desc: str = "default_pg", op: str = "all_reduce",
          done: bool = True, t_ns: int | None = None, sizes=((4,),), dtype: str = "Float",
          backend: str = "gloo", record_id: int | None = None) -> dict:
    """One entry; ``done``: retired (Gloo) or completed (NCCL)."""
    t = T0 + seq * GAP_NS if t_ns is None else t_ns
    e = {"record_id": seq if record_id is None else record_id, "pg_id": int(pg),
         "process_group": (pg, desc), "collective_seq_id": seq, "p2p_seq_id": 0,
         "op_id": seq, "profiling_name": f"{backend}:{op}", "time_created_ns": t,
         "input_sizes": [list(s) for s in sizes], "input_dtypes": [dtype] * len(sizes),
         "output_sizes": [list(s) for s in sizes], "output_dtypes": [dtype] * len(sizes),
         "state": "scheduled", "time_discovered_started_ns": None,
         "time_discovered_completed_ns": None, "retired": done, "timeout_ms": 1800000,
         "is_p2p": False, "thread_id": "1", "thread_name": "python"}
    if backend == "nccl":
        e["time_discovered_started_ns"] = t + 1000
        if done:
            e["state"] = "completed"
            e["time_discovered_completed_ns"] = t + 2000
            e["duration_ms"] = 0.001
        else:
            e["state"] = "started"
            e["retired"] = False
    return e


def dump(entries: list[dict], *, pg_config: dict | None = None, **extra) -> dict:
    """A dump as ``_dump_fr_trace`` returns it (before pickling)."""
    status: dict[str, dict] = {}
    for e in entries:
        s = status.setdefault(str(e["pg_id"]), {"last_enqueued_collective": 0,
                                                "last_started_collective": -1,
                                                "last_completed_collective": 0})
        s["last_enqueued_collective"] = max(s["last_enqueued_collective"],
                                            e["collective_seq_id"])
        if e.get("retired"):
            s["last_completed_collective"] = e["collective_seq_id"]
    return {"version": "2.10",
            "pg_config": pg_config or {"": {"name": "", "desc": "", "ranks": "[]"}},
            "comm_lib_version": "", "pg_status": status, "entries": entries, **extra}


def as_json(d: dict) -> dict:
    """What ``_dump_fr_trace_json`` writes for the same content: times 0 for None, pg_status
    as strings, lists for tuples, no ``entries`` when empty, ``nccl_comm_state``."""
    out = json.loads(json.dumps(d))
    for e in out.get("entries", []):
        for k in ("time_discovered_started_ns", "time_discovered_completed_ns"):
            e[k] = e[k] or 0
    out["pg_status"] = {k: {a: str(b) for a, b in v.items()}
                        for k, v in out["pg_status"].items()}
    if not out.get("entries"):
        out.pop("entries", None)
    out["nccl_comm_state"] = {}
    return out


def write(folder: Path, dumps: dict[int, dict], *, fmt: str = "pickle",
          prefix: str = "nccl_trace_rank_", mtime_ns: dict[int, int] | None = None) -> Path:
    """Write ``rank -> dump`` as PyTorch names them; optionally set each file's mtime."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    for r, d in dumps.items():
        path = folder / f"{prefix}{r}"
        if fmt == "json":
            path.write_text(json.dumps(as_json(d)))
        else:
            path.write_bytes(pickle.dumps(d, protocol=2))
        if mtime_ns and r in mtime_ns:
            os.utime(path, ns=(mtime_ns[r], mtime_ns[r]))
    return folder
