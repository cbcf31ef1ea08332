"""PyTorch Flight Recorder dumps as an input of ``ringwatch analyze``.

PyTorch writes one dump per rank (``_dump_nccl_trace`` / ``_dump_fr_trace``: a pickle;
their ``_json`` variants: JSON), by default to ``TORCH_FR_DUMP_TEMP_FILE`` + rank, e.g.
``/tmp/nccl_trace_rank_3`` (no extension). Format versions 2.x up to 2.10 (torch 2.13) are
read. What differs between them and between the two encodings, and how it is read:

- Missing times: ``None`` in a pickle, ``0`` in JSON; both read as unknown.
- ``pg_status`` (per process-group *id*): ints in a pickle, strings in JSON.
- ``entries``: absent from a JSON dump when empty (and from a pickle dumped without
  collectives).
- ``pg_config``: ``{pg name: {"name", "desc", "ranks": "[0, 1]"}}`` (``ranks`` a string, or a
  list in hand-made dumps); older dumps map a name to ``(desc, ranks)``. Gloo's recorder keeps
  one entry named ``""`` whose ranks are the last group's it saw (``"[0, 1, 2, 3]"`` in a job
  with the world group only, ``"[]"`` once subgroups exist): a group's members are then the
  ranks whose dumps show its collectives, and the world group's the ranks ``0..highest`` of
  those known (dumps, any ``pg_config`` list): a rank without a dump is seen when its number
  lies below the highest or a ``pg_config`` lists it, not otherwise.
- ``state``: ``completed`` / ``started`` / ``scheduled``. Gloo records no start or completion
  (every entry says ``scheduled``) and marks a finished collective ``retired``.

Entries become rows of the event schema (``docs/schema.md``): status ``ok`` when completed (or,
on Gloo, retired), ``error`` when retired without completing (NCCL: aborted), ``pending`` when
scheduled or started and not retired; ``t_issue_ns`` the creation time, ``t_start_ns`` the
discovered start (else the creation), ``t_end_ns`` the discovered completion; the op from
``profiling_name``; the group's name, description and members from ``process_group`` and
``pg_config``; ``seq`` from ``collective_seq_id`` (``p2p_seq_id`` for send/recv); the rank from
the dump's ``rank`` field, else the digits that end the file name. The rank's last-known-alive
time (:meth:`FrDumps.last_write_ns`) is the dump's own time when it has one, else the file's
modification time.

Pickles are read only through :func:`ringwatch._flight_recorder.load_dump` (plain containers
and scalars; a pickle that names any class or function is refused, never run). Files that
cannot be used are named in ``problems`` with the reason.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

from ringwatch.inputs import Reader

KIND = "flight recorder dumps"
#: PyTorch's default dump file prefix (``TORCH_FR_DUMP_TEMP_FILE``), without its folder.
DEFAULT_PREFIX = "nccl_trace_rank_"
#: A dump's file name: a prefix, then the rank (fr_trace's own rule).
NAME_RE = re.compile(r"^(?P<prefix>.*?)(?P<rank>\d+)(?:\.(?:pkl|pickle|json))?$")
#: Keys of the dump's own time, when a producer adds one (ns since the epoch).
DUMP_TIME_KEYS = ("dump_time_ns", "time_dumped_ns")
_PICKLE_KEYS = (b"pg_config", b"pg_status", b"entries", b"profiling_name")
_JSON_KEYS = (b'"pg_config"', b'"pg_status"', b'"profiling_name"')


def sniff(path: Path, head: bytes) -> bool:
    """A Flight Recorder dump: a pickle (protocol 2+) or a JSON object naming the recorder's
    keys, or any file named like PyTorch's default dumps (so that a damaged one is named)."""
    if path.name.startswith(DEFAULT_PREFIX) and path.name[len(DEFAULT_PREFIX):].isdigit():
        return True
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        # any pickle: a dump, or a file that must be named rather than passed over
        return True
    text = head.lstrip()
    if b'"traceEvents"' in text or b'"schemaVersion"' in text:
        return False  # a profiler trace: its distributedInfo has a pg_config too
    return text[:1] == b"{" and any(k in text for k in _JSON_KEYS)


def _ns(v) -> int | None:
    try:
        v = int(v)
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def _int(v, default: int = -1) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def _ranks_of(value) -> list[int]:
    """``"[0, 1]"`` / ``[0, 1]`` / ``(desc, ranks)`` -> ``[0, 1]`` (``[]`` if unreadable)."""
    if isinstance(value, dict):
        value = value.get("ranks")
    elif isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str):
        value = value[1]
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return []
    if isinstance(value, (list, tuple, set)):
        try:
            return sorted({int(r) for r in value})
        except (TypeError, ValueError):
            return []
    return []


_P2P_RE = re.compile(r"(?:send|recv) (\d+)(->|<-)(\d+)")


def _peer(profiling_name: str, members: list[int]) -> int | None:
    """The other side's global rank of ``nccl:send 0->1`` / ``nccl:recv 1<-0`` (group ranks)."""
    m = _P2P_RE.search(profiling_name)
    if not m:
        return None
    other = int(m.group(3))
    return members[other] if 0 <= other < len(members) else None


def _desc_of(value) -> str | None:
    if isinstance(value, dict):
        return value.get("desc") or None
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return value[0] or None
    return None


@dataclass
class RankDump:
    """One rank's dump, read."""

    rank: int
    path: Path
    dump: dict
    dumped_ns: int
    job_id: str | None


@dataclass
class FrDumps:
    """One job's Flight Recorder dumps (a :class:`ringwatch.inputs.Source`).

    Attributes:
        kind: ``"flight recorder dumps"``.
        path: The folder of the dumps (or the one file).
        job_id: The dumps' job id, else the folder's name.
        ranks: ``rank -> RankDump``.
        problems: One line per file (or entry) that could not be used, with why.
    """

    path: Path
    job_id: str
    ranks: dict[int, RankDump]
    problems: list[str] = field(default_factory=list)
    kind: str = KIND

    def last_write_ns(self) -> dict[int, int]:
        """``rank -> wall ns`` of its dump (the dump's own time, else the file's mtime)."""
        return {r: d.dumped_ns for r, d in self.ranks.items()}

    def members(self) -> dict[str, list[int]]:
        """``pg name -> global ranks``: from ``pg_config`` where it lists them, else the
        ranks whose dumps show the group (the world group: ``0..highest`` known rank)."""
        config: dict[str, list[int]] = {}
        seen: dict[str, set[int]] = {}
        world: set[int] = set(self.ranks)
        world_names: set[str] = set()
        for r, d in self.ranks.items():
            cfg = d.dump.get("pg_config")
            if isinstance(cfg, dict):
                for name, value in cfg.items():
                    rs = _ranks_of(value)
                    world |= set(rs)  # Gloo's one entry, named "", lists them at times
                    if name != "" and rs:
                        config.setdefault(str(name), rs)
            for e in d.dump.get("entries") or []:
                pg = e.get("process_group") or ("", None)
                name = str(pg[0])
                seen.setdefault(name, set()).add(r)
                if name == "0" or (len(pg) > 1 and pg[1] == "default_pg"):
                    world_names.add(name)
        out = dict(config)
        full = list(range(max(world) + 1)) if world else []
        for name, rs in seen.items():
            if name not in out:
                out[name] = full if name in world_names else sorted(rs)
        return out

    def events(self, *, include_pending: bool = True, columns: list[str] | None = None,
               categorical: bool = False):
        """All ranks' rows in the event schema, by (rank, idx) (``idx``: record order)."""
        import polars as pl

        from ringwatch._flight_recorder import parse_entries
        from ringwatch._schema import API_BACKFILL, format_ranks, polars_schema

        schema = polars_schema()
        members = self.members()
        world_size = max((len(m) for m in members.values()), default=len(self.ranks))
        rows = []
        for r in sorted(self.ranks):
            d = self.ranks[r]
            pid = _int(d.dump.get("pid"), 0)
            host = str(d.dump.get("hostname") or d.dump.get("host") or "")
            for idx, fe in enumerate(parse_entries(d.dump)):
                gloo = fe.profiling_name.startswith("gloo:")
                if fe.state == "completed":
                    status = "ok"
                elif fe.retired:
                    status = "ok" if gloo else "error"
                elif not fe.state:
                    status = "unknown"  # an entry that records no state at all
                else:
                    status = "pending"
                if status == "pending" and not include_pending:
                    continue
                ms = members.get(fe.pg) or [r]
                start = fe.t_started_ns or fe.t_created_ns
                end = fe.t_completed_ns if status != "pending" else None
                rows.append({
                    "job_id": self.job_id, "rank": r, "local_rank": None,
                    "world_size": world_size, "host": host, "pid": pid, "idx": idx,
                    "backend": fe.profiling_name.split(":", 1)[0] or "unknown",
                    "pg": fe.pg, "pg_desc": fe.pg_desc, "pg_ranks": format_ranks(ms),
                    "pg_size": len(ms), "group_rank": ms.index(r) if r in ms else -1,
                    "seq": (fe.p2p_seq if fe.is_p2p else fe.seq) or None, "op": fe.op,
                    "is_p2p": fe.is_p2p,
                    "peer": _peer(fe.profiling_name, ms) if fe.is_p2p else None,
                    "root": None, "dtype": fe.dtype,
                    "numel": fe.numel_in, "nbytes_in": fe.nbytes_in,
                    "nbytes_out": fe.nbytes_out, "nbytes": max(fe.nbytes_in, fe.nbytes_out),
                    "async_op": None, "api": API_BACKFILL, "status": status,
                    "error": None if status != "error" else "retired without completing",
                    "t_issue_ns": fe.t_created_ns, "t_start_ns": start, "t_end_ns": end,
                    "mono_start_ns": None, "mono_end_ns": None,
                    "duration_ns": end - start if end and start else None,
                    "device_duration_ns": fe.duration_ns,
                    "end_source": "watchdog" if end else "none", "step": None,
                })
        df = pl.DataFrame(rows, schema=schema)
        if columns is not None:
            unknown = set(columns) - set(schema)
            if unknown:
                raise ValueError(f"not columns of the schema: {sorted(unknown)}")
            keep = dict.fromkeys(("rank", "idx", *columns))
            df = df.select([c for c in schema if c in keep])
        if categorical:
            strings = [c for c in df.columns if schema[c] == pl.String]
            df = df.with_columns(pl.col(strings).cast(pl.Categorical))
        return df


def _problem_of_dump(dump: dict) -> str | None:
    """Why a parsed mapping is not a dump this reader understands (None if it is)."""
    version = str(dump.get("version", ""))
    if not version:
        return "no format version: not a Flight Recorder dump"
    if not version.startswith("2."):
        return f"format version {version}, this reader understands 2.x"
    entries = dump.get("entries", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return "its entries are not a list of records"
    for e in entries:
        if "collective_seq_id" not in e or "profiling_name" not in e:
            return "an entry lacks collective_seq_id or profiling_name"
    return None


def read_dump(path: Path) -> RankDump:
    """One file as a rank's dump.

    Raises:
        ValueError: it is not a dump (unreadable, refused pickle, other format), or has no
            rank (no ``rank`` field and no digits ending its name).
    """
    from ringwatch._flight_recorder import load_dump

    dump = load_dump(path)  # the only way a pickle is ever read here
    why = _problem_of_dump(dump)
    if why:
        raise ValueError(f"{path}: {why}")
    rank = dump.get("rank")
    if rank is None:
        m = NAME_RE.match(path.name)
        if not m:
            raise ValueError(f"{path}: no rank (no rank field, no digits ending its name)")
        rank = m.group("rank")
    dumped = next((_ns(dump[k]) for k in DUMP_TIME_KEYS if _ns(dump.get(k))), None)
    if dumped is None:
        dumped = path.stat().st_mtime_ns
    job = dump.get("job_id")
    return RankDump(rank=int(rank), path=path, dump=dump, dumped_ns=dumped,
                    job_id=str(job) if job else None)


def _job_key(d: RankDump) -> tuple[str, str]:
    """``(job id, grouping key)``: the dump's job id, else its folder (and prefix)."""
    if d.job_id:
        return d.job_id, d.job_id
    m = NAME_RE.match(d.path.name)
    prefix = m.group("prefix") if m else d.path.name
    return d.path.parent.name or str(d.path.parent), f"{d.path.parent}\0{prefix}"


def open_dumps(files: list[Path], job_id: str | None = None) -> list[FrDumps]:
    """The dumps among ``files``, one :class:`FrDumps` per job (see module docstring).

    Args:
        files: Files claimed by :func:`sniff`.
        job_id: Keep only the job of this id (when the dumps carry ids, or it is the folder's
            name); None keeps every job.
    """
    problems: list[str] = []
    jobs: dict[str, tuple[str, dict[int, RankDump]]] = {}
    for f in files:
        try:
            d = read_dump(f)
        except (OSError, ValueError) as exc:
            problems.append(str(exc) if str(f) in str(exc) else f"{f}: unreadable ({exc})")
            continue
        jid, key = _job_key(d)
        name, ranks = jobs.setdefault(key, (jid, {}))
        if d.rank in ranks:
            old = ranks[d.rank]
            keep, drop = (d, old) if d.dumped_ns >= old.dumped_ns else (old, d)
            ranks[d.rank] = keep
            problems.append(f"{drop.path}: a second dump of rank {d.rank} (kept the newer "
                            f"{keep.path.name})")
            continue
        ranks[d.rank] = d
    # Several prefixes in one folder without job ids: tell them apart by prefix.
    names = [jid for jid, _ in jobs.values()]
    out = []
    for key, (jid, ranks) in jobs.items():
        if names.count(jid) > 1 and "\0" in key:
            jid = f"{jid}/{key.split(chr(0), 1)[1].rstrip('_-.') or 'dump'}"
        if job_id is not None and jid != job_id:
            continue
        first = min(ranks.values(), key=lambda d: d.rank)
        out.append(FrDumps(path=first.path.parent, job_id=jid, ranks=dict(sorted(
            ranks.items()))))
    if out:
        out[0].problems.extend(problems)
    elif problems:
        where = files[0].parent if files else Path(".")
        out.append(FrDumps(path=where, job_id=job_id or where.name, ranks={},
                           problems=problems))
    return out


READER = Reader(kind=KIND, sniff=sniff, open=open_dumps)

__all__ = ["DEFAULT_PREFIX", "KIND", "READER", "FrDumps", "RankDump", "open_dumps",
           "read_dump", "sniff"]
