"""Profiler traces (``torch.profiler`` / Kineto Chrome-trace JSON) as a source of collectives.

One trace per rank, ``.json`` or ``.json.gz``. What becomes a row (see ``docs/inputs.md``):

- **NCCL**: each kernel carrying collective metadata (``Collective name``, ``In msg
  nelems``, ``Out msg nelems``, ``Group size``, ``dtype``, ``Process Group Name``,
  ``Process Group Description``, ``Process Group Ranks``, ``Seq``), its device start and end
  as ``t_start_ns``/``t_end_ns``; the ``record_param_comms`` CPU op that launched it (same
  ``External id``) gives the issue time and any metadata the kernel lacks.
- **Gloo**: each ``gloo:<op>`` span of the backend's worker threads (start and end of the
  work, waiting for late peers included), matched in issue order to the ``c10d::<op>`` (or
  ``record_param_comms``) CPU op of the training thread, which gives the issue time.

Steps come from the ``ProfilerStep#N`` spans (the step whose span holds the issue time);
without them ``step`` stays null and the analyzers count steps from the rhythm. Ranks lists
that Kineto cut to 30 (ending ``...``) are rebuilt from the trace's ``distributedInfo``.
Whatever cannot be used is one line in the source's ``problems``.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ringwatch._schema import format_ranks
from ringwatch.inputs import Reader
from ringwatch.inputs._gloo_groups import GLOO_THREADS, Unmapped, resolve, thread_runs
from ringwatch.inputs._rows import FrameSource, conform, empty_frame
from ringwatch.inputs._trace_scan import scan_trace

KIND = "profiler traces"
NAMES = ("gloo:", "c10d::", "record_param_comms", "ProfilerStep#", "nccl", "thread_name")
TOP_KEYS = ("distributedInfo", "baseTimeNanoseconds", "host_name")
#: Kineto's cut of "Process Group Ranks".
TRUNCATED_RANKS = 30
_RANK_RE = re.compile(r"rank[-_]?(\d+)", re.IGNORECASE)

# Collective names (Kineto "Collective name", c10d op names, gloo span names) with the
# underscores dropped, to the schema's ops.
_OPS = {
    "allreduce": "all_reduce", "allreducecoalesced": "all_reduce_coalesced",
    "allgather": "all_gather", "allgatherbase": "all_gather_into_tensor",
    "allgatherintotensor": "all_gather_into_tensor",
    "allgathercoalesced": "all_gather_coalesced",
    "allgatherintotensorcoalesced": "all_gather_into_tensor_coalesced",
    "reducescatter": "reduce_scatter", "reducescatterbase": "reduce_scatter_tensor",
    "reducescattertensor": "reduce_scatter_tensor",
    "reducescattertensorcoalesced": "reduce_scatter_tensor_coalesced",
    "broadcast": "broadcast", "reduce": "reduce", "alltoall": "all_to_all",
    "alltoallbase": "all_to_all_single", "alltoallsingle": "all_to_all_single",
    "gather": "gather", "scatter": "scatter", "send": "send", "recv": "recv",
    "recvanysource": "recv", "barrier": "barrier", "monitoredbarrier": "monitored_barrier",
    "coalesced": "coalesced",
}
# Element sizes by the names Kineto (c10 ScalarType) and record_shapes ("float") use.
_DTYPES = {
    "float": ("float32", 4), "double": ("float64", 8), "half": ("float16", 2),
    "c10::half": ("float16", 2), "bfloat16": ("bfloat16", 2), "c10::bfloat16": ("bfloat16", 2),
    "int": ("int32", 4), "long": ("int64", 8), "long int": ("int64", 8),
    "short": ("int16", 2), "byte": ("uint8", 1), "unsigned char": ("uint8", 1),
    "char": ("int8", 1), "signed char": ("int8", 1), "bool": ("bool", 1),
    "float8_e4m3fn": ("float8_e4m3fn", 1), "float8_e5m2": ("float8_e5m2", 1),
}


def _norm(name: str) -> str:
    for prefix in ("gloo:", "c10d::", "nccl:"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.strip("_").replace("_", "").lower()


def op_of(name: str) -> str:
    """The schema's op for a collective's name in a trace (``unknown`` if not known)."""
    return _OPS.get(_norm(name), "unknown")


def _family(op: str) -> str:
    """What a gloo span and its c10d op share (``_allgather_base`` runs as ``all_gather``)."""
    for cut in ("_into_tensor", "_tensor", "_coalesced", "_single"):
        op = op.replace(cut, "")
    return op


def _int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v == int(v):
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def _fits(v: int | None) -> int | None:
    """``v`` where it fits an Int64 column, else None."""
    return v if v is not None and -(1 << 63) <= v < (1 << 63) else None


def parse_ranks_arg(value) -> tuple[list[int] | None, bool]:
    """``Process Group Ranks`` (``"[0, 1, 2]"`` or a list) as (ranks, cut short?)."""
    if isinstance(value, list):
        items, cut = value, False
    elif isinstance(value, str):
        body = value.strip().strip("[]")
        cut = "..." in body
        items = [s.strip() for s in body.replace("...", "").split(",") if s.strip()]
    else:
        return None, False
    ranks = [_int(x) for x in items]
    if any(r is None for r in ranks):
        return None, cut
    return ranks, cut


def _rebuild(shown: list[int], size: int | None, args: dict) -> list[int] | None:
    """A cut ranks list from ``Global rank start``/``stride``, or an evident progression."""
    start, stride = _int(args.get("Global rank start")), _int(args.get("Global rank stride"))
    if size and start is not None and stride and stride > 0:
        return [start + i * stride for i in range(size)]
    head = shown[:-1] if len(shown) > TRUNCATED_RANKS - 1 else shown  # Kineto may add the last
    if size and len(head) >= 2:
        step = head[1] - head[0]
        if step > 0 and all(b - a == step for a, b in zip(head, head[1:], strict=False)):
            return [head[0] + i * step for i in range(size)]
    return None


def _dtype(name) -> tuple[str | None, int | None]:
    if not isinstance(name, str):
        return None, None
    return _DTYPES.get(name.strip().lower(), (name, None))


def _numel(dims) -> int | None:
    """Elements of the first tensor of ``Input Dims`` (``[[4160]]`` or ``[[[8320]]]``)."""
    while isinstance(dims, list) and dims and isinstance(dims[0], list):
        if dims[0] and isinstance(dims[0][0], list):
            dims = dims[0]
            continue
        dims = dims[0]
        break
    if not isinstance(dims, list) or not all(isinstance(d, int) for d in dims):
        return None
    return math.prod(dims) if dims else 1


@dataclass
class RankTrace:
    """What one rank's trace gave: rows (dicts of schema columns) and why some were left out."""

    path: Path
    rank: int | None = None
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    last_ns: int | None = None
    world_size: int | None = None
    base_ns: int = 0
    steps: list[tuple[int, int, int]] = field(default_factory=list)
    #: Gloo spans whose threads this trace alone cannot map to groups, and how to emit them.
    unmapped: Unmapped | None = None
    emit_gloo: Callable[[dict], None] | None = None


def _span(ev: dict) -> tuple[int, int] | None:
    """An event's (start, end) in ns of the trace's clock (``ts``/``dur`` are µs floats)."""
    ts, dur = ev.get("ts"), ev.get("dur", 0)
    for v in (ts, dur):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
    if dur < 0:
        return None
    start = round(ts * 1000)
    return start, start + round(dur * 1000)


@dataclass
class _Events:
    """One trace's events of interest, by kind (each span as (start ns, end ns, event))."""

    steps: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, N)
    host_ops: list[tuple[int, int, dict]] = field(default_factory=list)  # issuing CPU ops
    rpc: dict[int, tuple[int, dict]] = field(default_factory=dict)  # External id -> op
    gloo: list[tuple[int, int, dict]] = field(default_factory=list)
    kernels: list[tuple[int, int, dict]] = field(default_factory=list)
    thread_names: dict[int, str] = field(default_factory=dict)
    bad: int = 0  # without a usable ts/dur
    pid: int | None = None


def _sort_events(events: list[dict]) -> _Events:
    out = _Events()
    for ev in events:
        name = ev.get("name")
        if not isinstance(name, str):
            continue
        if ev.get("ph") == "M":
            tid = _int(ev.get("tid"))
            if name == "thread_name" and isinstance(ev.get("args"), dict) and tid is not None:
                out.thread_names[tid] = str(ev["args"].get("name", ""))
            continue
        if ev.get("ph") != "X":
            continue
        t = _span(ev)
        if t is None:
            out.bad += 1
            continue
        args = ev.get("args") if isinstance(ev.get("args"), dict) else {}
        if name.startswith("ProfilerStep#"):
            n = _int(name[len("ProfilerStep#"):])
            if n is not None:
                out.steps.append((t[0], t[1], n))
        elif name == "record_param_comms":
            out.host_ops.append((*t, ev))
            eid = _int(args.get("External id"))
            if eid is not None:
                out.rpc[eid] = (t[0], ev)
        elif name.startswith("c10d::"):
            out.host_ops.append((*t, ev))
        elif name.startswith("gloo:"):
            out.gloo.append((*t, ev))
        elif name.startswith("nccl") and ev.get("cat") == "kernel":
            out.kernels.append((*t, ev))
        if out.pid is None and ev.get("cat") == "cpu_op":
            pid = _int(ev.get("pid"))
            out.pid = pid if pid is not None and 0 <= pid < 1 << 31 else None
    return out


def _gloo_pgs(spans: list[dict], names: dict[int, str], pgs: list[dict]) -> dict:
    """``tid -> pg config`` for the Gloo worker threads, or {} where they cannot be told.

    Each Gloo group has its own ``GLOO_THREADS`` worker threads, started when the group was
    made; groups are made, and listed in ``distributedInfo.pg_config``, in the same order, so
    the threads sorted by id, cut in runs of ``GLOO_THREADS``, are the groups in order.
    """
    gloo = [p for p in pgs if "gloo" in str(p.get("backend_config", "gloo"))]
    tids = sorted({s["tid"] for s in spans} | {t for t, n in names.items() if "gloo" in n})
    if len(gloo) == 1:
        return dict.fromkeys(tids, gloo[0])
    if gloo and len(tids) == GLOO_THREADS * len(gloo):
        return {t: gloo[i // GLOO_THREADS] for i, t in enumerate(tids)}
    return {}


def read_rank_trace(path: Path) -> RankTrace:
    """One rank's trace as rows of the schema (``idx``, ``seq`` and ``step`` set later)."""
    out = RankTrace(path)
    scan = scan_trace(path, NAMES, TOP_KEYS)
    out.problems += scan.problems
    info = scan.top.get("distributedInfo")
    info = info if isinstance(info, dict) else {}
    rank = _int(info.get("rank"))
    if rank is None:
        m = _RANK_RE.search(path.name)
        rank = int(m.group(1)) if m else None
    if rank is None or rank < 0 or rank >= 1 << 31:
        out.problems.append(f"{path}: no rank (neither distributedInfo.rank nor rank<N> in "
                            "the name)")
        return out
    out.rank = rank
    world = _int(info.get("world_size"))
    out.world_size = world if world and 0 < world < 1 << 31 else None
    base = _int(scan.top.get("baseTimeNanoseconds")) or 0
    host = scan.top.get("host_name")
    host = host if isinstance(host, str) and host else "unknown"
    pgs = [p for p in info.get("pg_config") or [] if isinstance(p, dict)]
    pg_by_name = {str(p.get("pg_name")): p for p in pgs}
    backend = str(info.get("backend") or "")

    evs = _sort_events(scan.events)
    if evs.bad:
        out.problems.append(f"{path}: {evs.bad} collective event(s) without a usable ts/dur "
                            "left out")
    pid = evs.pid or 0

    def row(op: str, start: int, end: int, issue: int, **kw) -> dict:
        return {"rank": rank, "world_size": out.world_size, "host": host, "pid": pid,
                "op": op, "is_p2p": op in ("send", "recv"), "status": "ok",
                "t_issue_ns": base + issue, "t_start_ns": base + start, "t_end_ns": base + end,
                "mono_start_ns": start, "mono_end_ns": end, "duration_ns": end - start,
                "end_source": "wait", "api": "profiler", **kw}

    out.base_ns, out.steps = base, evs.steps
    if evs.kernels:
        _nccl_rows(out, evs, pg_by_name, row)
    if evs.gloo:
        _gloo_rows(out, evs.gloo, evs.host_ops, evs.thread_names, pgs, backend, row)
    _finish(out)
    return out


def _finish(out: RankTrace) -> None:
    """Steps of the rows, and the newest time the trace shows."""
    _assign_steps(out.rows, out.steps)
    if out.rows:
        out.last_ns = max(r["t_end_ns"] for r in out.rows)
    if out.steps:
        out.last_ns = max(out.last_ns or 0, out.base_ns + max(s[1] for s in out.steps))


def _nccl_rows(out: RankTrace, evs: _Events, pg_by_name: dict, row) -> None:
    """Rows of the NCCL kernels that carry (or whose launch carries) collective metadata."""
    rank, path = out.rank, out.path
    cut_unfixed = 0
    for start, end, ev in evs.kernels:
        args = ev.get("args") or {}
        src = evs.rpc.get(_int(args.get("External id")) or -1)
        meta = dict(src[1].get("args") or {}) if src else {}
        meta.update({k: v for k, v in args.items() if v not in (None, "")})
        if "Collective name" not in meta:
            continue  # a kernel named nccl* with no collective metadata (not one of ours)
        op = op_of(str(meta["Collective name"]))
        size = _int(meta.get("Group size"))
        pg = str(meta.get("Process Group Name", ""))
        ranks, cut = parse_ranks_arg(meta.get("Process Group Ranks"))
        if cut or ranks is None:
            known = pg_by_name.get(pg, {}).get("ranks")
            full = known if isinstance(known, list) and (not size or len(known) == size) \
                else (_rebuild(ranks, size, meta) if ranks else None)
            if full is None:
                cut_unfixed += 1
                continue
            ranks = full
        if rank not in ranks:
            cut_unfixed += 1
            continue
        size = size or len(ranks)
        dtype, width = _dtype(meta.get("dtype"))
        n_in, n_out = _int(meta.get("In msg nelems")), _int(meta.get("Out msg nelems"))
        b_in = n_in * width if n_in is not None and width else None
        b_out = n_out * width if n_out is not None and width else None
        peer = None
        if op == "send":
            peer = _int(meta.get("Dst Rank"))
        elif op == "recv":
            peer = _int(meta.get("Src Rank"))
        issue = src[0] if src else start
        out.rows.append(row(op, start, end, min(issue, start), backend="nccl", pg=pg,
                            pg_desc=meta.get("Process Group Description") or
                            pg_by_name.get(pg, {}).get("pg_desc"),
                            pg_ranks=format_ranks(ranks), pg_size=size,
                            group_rank=ranks.index(rank), seq=_fits(_int(meta.get("Seq"))),
                            peer=peer, dtype=dtype,
                            numel=max((n for n in (n_in, n_out) if n is not None),
                                      default=None),
                            nbytes_in=b_in, nbytes_out=b_out,
                            nbytes=max((b for b in (b_in, b_out) if b is not None),
                                       default=None),
                            device_duration_ns=end - start))
    if cut_unfixed:
        out.problems.append(f"{path}: {cut_unfixed} NCCL kernel(s) left out: their group's "
                            "ranks are cut short in the trace and distributedInfo does not "
                            "list the group (or the rank is not in it)")


def _gloo_rows(out: RankTrace, gloo, host_ops, thread_names, pgs, backend, row) -> None:
    """Rows of the ``gloo:<op>`` spans, each matched to the CPU op that issued it."""
    rank = out.rank
    by_tid = _gloo_pgs([ev for _, _, ev in gloo], thread_names, pgs)
    if not by_tid:
        if not pgs and backend in ("gloo", ""):
            by_tid = {ev.get("tid"): {"pg_name": "0", "pg_desc": "default_pg",
                                      "ranks": list(range(out.world_size or 0))}
                      for _, _, ev in gloo}
        else:  # told apart with the other ranks' traces, or never (open_traces)
            matched = _match_gloo(gloo, host_ops)
            runs = thread_runs([ev.get("tid") for _, _, ev in gloo])
            sigs = [Counter((_family(op_of(ev["name"])), _numel((ev.get("args") or {})
                                                               .get("Input Dims")))
                            for _, _, _, ev, _ in matched if ev.get("tid") in run)
                    for run in runs]
            out.unmapped = Unmapped(rank, runs, [p for p in pgs if "gloo" in str(
                p.get("backend_config", "gloo"))], sigs)
            out.emit_gloo = lambda by_tid: _emit_gloo(out, matched, by_tid, row)
            return
    _emit_gloo(out, _match_gloo(gloo, host_ops), by_tid, row)


def _match_gloo(gloo, host_ops) -> list[tuple[int, int, int, dict, dict | None]]:
    """(issue, start, end, span, issuing op or None) of each span, in issue order."""
    rpc_ops = [h for h in host_ops if h[2].get("name") == "record_param_comms"]
    issuers = sorted(rpc_ops or [h for h in host_ops if h[2]["name"].startswith("c10d::")],
                     key=lambda h: h[0])
    waiting: dict[str, deque] = {}
    for start, end, ev in sorted(gloo, key=lambda g: g[0]):
        waiting.setdefault(_family(op_of(ev["name"])), deque()).append((start, end, ev))
    matched: list[tuple[int, int, int, dict, dict | None]] = []
    for issue, _, hev in issuers:
        name = (hev.get("args") or {}).get("Collective name") or hev["name"]
        q = waiting.get(_family(op_of(str(name))))
        while q and q[0][0] < issue:  # began before this issue: issued by no op we saw
            s, e, ev = q.popleft()
            matched.append((s, s, e, ev, None))
        if q:
            s, e, ev = q.popleft()
            matched.append((issue, s, e, ev, hev))
    for q in waiting.values():
        matched += [(s, s, e, ev, None) for s, e, ev in q]
    return sorted(matched, key=lambda m: (m[0], m[1]))


def _emit_gloo(out: RankTrace, matched, by_tid: dict, row) -> None:
    """The rows of the matched Gloo spans, their groups by worker thread (``by_tid``)."""
    rank = out.rank
    no_group = 0
    for issue, start, end, ev, hev in matched:
        pg = by_tid.get(ev.get("tid"))
        ranks = pg.get("ranks") if pg else None
        if not isinstance(ranks, list) or rank not in ranks:
            no_group += 1
            continue
        op = op_of(ev["name"])
        if hev is not None:
            hop = op_of(str((hev.get("args") or {}).get("Collective name") or hev["name"]))
            op = hop if hop != "unknown" else op
        args = ev.get("args") or {}
        types = args.get("Input type")
        dtype, width = _dtype(types[0] if isinstance(types, list) and types else None)
        numel = _numel(args.get("Input Dims"))
        b_in = numel * width if numel is not None and width else None
        b_out = b_in * len(ranks) if b_in is not None and _family(op) == "all_gather" else b_in
        out.rows.append(row(op, start, end, min(issue, start), backend="gloo",
                            pg=str(pg.get("pg_name")), pg_desc=pg.get("pg_desc"),
                            pg_ranks=format_ranks(ranks), pg_size=len(ranks),
                            group_rank=ranks.index(rank), seq=None, dtype=dtype, numel=numel,
                            nbytes_in=b_in, nbytes_out=b_out,
                            nbytes=max(b_in, b_out) if b_in is not None else None,
                            async_op=None))
    if no_group:
        out.problems.append(f"{out.path}: {no_group} Gloo span(s) left out: on a worker "
                            "thread of no group this rank is in")


def _assign_steps(rows: list[dict], steps: list[tuple[int, int, int]]) -> None:
    """``step`` of each row: the ``ProfilerStep#N`` span holding its issue time."""
    import bisect

    steps.sort()
    starts = [s for s, _, _ in steps]
    for r in rows:
        t = r["mono_start_ns"] - (r["t_start_ns"] - r["t_issue_ns"])
        i = bisect.bisect_right(starts, t) - 1
        r["step"] = steps[i][2] if i >= 0 and t <= steps[i][1] else None


def _job_frame(traces: list[RankTrace]):
    """The ranks' rows as one frame: ``idx`` by issue; for rows with no ``Seq`` of their
    own (Gloo), ``seq`` counted per group from the first step every member traced."""
    import polars as pl

    rows = [r for t in traces for r in t.rows]
    if not rows:
        return empty_frame()
    world = max([t.world_size or 0 for t in traces] + [t.rank + 1 for t in traces])
    df = pl.DataFrame(rows, infer_schema_length=None)
    df = conform(df.with_columns(pl.col("world_size").fill_null(world),
                                 pl.lit("").alias("job_id")))
    counted = df.filter(pl.col("seq").is_null() & ~pl.col("is_p2p"))
    own = df.filter(pl.col("seq").is_not_null() | pl.col("is_p2p"))
    if counted.height:
        # Each rank's window may start at another step: count from the first step all of a
        # group's members have (rows before it, or with no step, keep no seq).
        first = counted.filter(pl.col("step").is_not_null()).group_by("pg", "rank").agg(
            pl.col("step").min().alias("_first")).group_by("pg").agg(pl.col("_first").max())
        counted = counted.join(first, on="pg", how="left").sort("rank", "t_issue_ns")
        inside = pl.col("_first").is_null() | (pl.col("step") >= pl.col("_first"))
        counted = counted.with_columns(
            pl.when(inside).then(pl.int_range(1, pl.len() + 1).over("pg", "rank", inside))
            .otherwise(None).cast(pl.Int64).alias("seq")).drop("_first")
    df = pl.concat([own, counted]).sort("rank", "t_issue_ns", "t_start_ns")
    return df.with_columns(pl.int_range(pl.len()).over("rank").cast(pl.Int64).alias("idx"))


def _map_gloo_threads(traces: list[RankTrace]) -> list[str]:
    """Emit the Gloo rows of the ranks whose worker threads only all the traces together
    map to groups (:mod:`ringwatch.inputs._gloo_groups`); problems for those they cannot."""
    todo = [t for t in traces if t.unmapped is not None]
    if not todo:
        return []
    busy = {r["pg"] for t in traces if t.unmapped is None for r in t.rows
            if r.get("backend") == "gloo"}
    maps = resolve([t.unmapped for t in todo], busy)
    problems = []
    for t in todo:
        if maps is not None:
            t.emit_gloo(maps[t.rank])
            _finish(t)
            t.unmapped = None
            continue
        n = sum(sum(sig.values()) for sig in t.unmapped.sigs)
        problems.append(f"{t.path}: {n} Gloo span(s) left out: their process groups cannot "
                        f"be told apart ({sum(len(r) for r in t.unmapped.runs)} worker "
                        f"threads for {len(t.unmapped.groups)} Gloo group(s), and the ranks' "
                        "traces together do not tell which groups were idle)")
    return problems


def open_traces(files: list[Path], job_id: str | None) -> list[FrameSource]:
    """The traces as sources: one per folder (one rank per file)."""
    import polars as pl

    by_dir: dict[Path, list[Path]] = {}
    for f in files:
        by_dir.setdefault(Path(f).parent, []).append(Path(f))
    sources = []
    for folder, fs in by_dir.items():
        problems: list[str] = []
        traces: list[RankTrace] = []
        ranks: dict[int, Path] = {}
        for f in sorted(fs):
            t = read_rank_trace(f)
            problems += t.problems
            if t.rank is None:
                continue
            if t.rank in ranks:
                problems.append(f"{f}: rank {t.rank} again (first in {ranks[t.rank]}); left "
                                "out")
                continue
            ranks[t.rank] = f
            traces.append(t)
        problems += _map_gloo_threads(traces)
        for t in list(traces):
            if not t.rows:
                if t.unmapped is None:
                    problems.append(f"{t.path}: no collective in it (a trace of rank {t.rank} "
                                    "without NCCL kernels or Gloo spans)")
                del ranks[t.rank]
                traces.remove(t)
        jid = job_id or folder.name or str(folder)
        df = _job_frame(traces).with_columns(pl.lit(jid).alias("job_id"))
        sources.append(FrameSource(KIND, folder if len(fs) > 1 else fs[0], jid,
                                   dict(sorted(ranks.items())), problems, df,
                                   {t.rank: t.last_ns for t in traces if t.last_ns}))
    return sources


def _text_head(path: Path, head: bytes) -> bytes | None:
    """The first bytes of the text (None: gzip data that does not decompress)."""
    if head[:2] == b"\x1f\x8b":
        try:
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head)
        except zlib.error:
            return None
    return head


def sniff(path: Path, head: bytes) -> bool:
    """A Chrome-trace JSON file (``.json`` or ``.json.gz``) written by a profiler."""
    name = path.name.lower()
    if not (name.endswith(".json") or name.endswith(".json.gz")):
        return False
    text = _text_head(path, head)
    if text is None:  # a damaged .json.gz: read, so that the damage is told
        return name.endswith(".json.gz")
    text = text.lstrip()
    if not text.startswith(b"{"):
        return False
    return any(k in text for k in (b'"traceEvents"', b'"schemaVersion"',
                                   b'"distributedInfo"', b'"deviceProperties"'))


READER = Reader(kind=KIND, sniff=sniff, open=open_traces)

__all__ = ["READER", "RankTrace", "op_of", "open_traces", "parse_ranks_arg",
           "read_rank_trace", "sniff"]
